"""Calibrated (activation-aware) FourierFT -> LoRA conversion: the model runtime behind ``to-lora --calibration``."""

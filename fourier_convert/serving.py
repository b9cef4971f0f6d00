"""The serving stacks ``to-lora`` writes for, by name (no imports: the CLI offers them without loading torch)."""

#: ``peft``: every PEFT LoRA feature; ``vllm``: lora_A / lora_B with rank patterns; ``llama.cpp``: lora_A /
#: lora_B, one alpha, and a GGUF file (fourier_convert.lora).
LORA_TARGETS = ("peft", "vllm", "llama.cpp")

"""``python -m fourier_convert``."""

from fourier_convert.cli.main import main

main()

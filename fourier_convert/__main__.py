"""``python -m fourier_convert``."""

from fourier_convert.cli.entry import main

main()

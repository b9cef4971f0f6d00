"""The ``fourier-convert`` command line: thin commands over the library."""

"""The console script's first code: catches an interrupt while the command line is still being imported.

``fourier_convert.cli.main`` imports click and the package (tens of milliseconds); a Ctrl-C in that window
would otherwise print a traceback. Nothing has been read or written by then.
"""

from __future__ import annotations

import sys

#: The line printed after an interrupt, here and in cli.main.
INTERRUPTED_LINE = "interrupted: nothing was published and the inputs were not touched"


def main() -> None:
    """Console-script entry point: import the command line, then run it.

    Example:
        >>> main()  # doctest: +SKIP
    """
    try:
        from fourier_convert.cli.main import main as run
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    run()

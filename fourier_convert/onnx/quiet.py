"""Silencing third-party chatter (exporter progress, optimiser notices) while keeping it for error reports."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[io.StringIO]:
    """Capture stdout / stderr into the yielded buffer, ignore warnings, and raise ``loggers`` to ERROR.

    Example:
        >>> with quiet("torch.onnx") as log:
        ...     print("progress")
        >>> log.getvalue()
        'progress\\n'
    """
    buffer = io.StringIO()
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for logger, level in saved:
            logger.setLevel(level)

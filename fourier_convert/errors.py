"""Exceptions raised by fourier-convert.

Every error carries three parts: *where* (a file, key or option), *what* was found, and the *fix*.
``str(error)`` joins them into the one line the CLI prints, for example::

    adapter_config.json: peft_type is 'LORA', expected 'FOURIERFT'; pass a FourierFT adapter

The CLI maps each class to an exit code in one table (``fourier_convert.cli.main.EXIT_CODES``).
"""

from __future__ import annotations

from typing import Any


class FourierConvertError(Exception):
    r"""Base class of every error fourier-convert raises on purpose.

    Args:
        where: The file, tensor key or option the problem is about.
        found: What was found there.
        fix: What the user can do about it.

    The message is one printable line: control characters from file or tensor names (a newline, a terminal
    escape) are shown escaped (``\n``, ``\x1b``).

    Example:
        >>> str(FourierConvertError("a.json", "not valid JSON", "re-save the file"))
        'a.json: not valid JSON; re-save the file'
        >>> str(FourierConvertError("odd\nname", "bad"))
        'odd\\nname: bad'
    """

    def __init__(self, where: str, found: str, fix: str = "") -> None:
        self.where = where
        self.found = found
        self.fix = fix
        message = f"{where}: {found}"
        if fix:
            message += f"; {fix}"
        super().__init__(printable(message))


def printable(text: str) -> str:
    r"""``text`` with every non-printable character escaped as Python writes it (one line, no terminal codes).

    Example:
        >>> printable("a\tb\x1b[31m")
        'a\\tb\\x1b[31m'
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when empty), at most 200 characters, escaped.

    Example:
        >>> first_line(ValueError("bad\x1b[31m\nmore")), first_line(ZeroDivisionError())
        ('bad\\x1b[31m', 'ZeroDivisionError')
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return printable(first[:200])


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a config value may be a huge number or map).

    Example:
        >>> short_repr("x" * 100, 10)
        "'xxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class InputFileError(FourierConvertError):
    """A required input file is missing, unreadable, truncated or not in the expected format."""


class AdapterError(FourierConvertError):
    """The adapter's config or tensors are invalid (unknown method, bad spectrum, inconsistent targets)."""


class PickleRefusedError(AdapterError):
    """The adapter is stored as a pickle (``adapter_model.bin``) and loading pickles was not allowed."""


class BaseMismatchError(FourierConvertError):
    """The adapter does not fit the base model (missing module, shape mismatch)."""


class VerificationError(FourierConvertError):
    """A reconstructed delta failed its float64 spot check; nothing was written."""


class OnnxValidationError(VerificationError):
    """The merge proof or the ONNX validation failed (outputs differ beyond the tolerances); nothing was
    published. ``report`` holds the :class:`~fourier_convert.onnx.report.OnnxReport` when there is one."""

    report: Any = None


class ExportError(FourierConvertError):
    """The ONNX export cannot be done here: a missing package, an exporter failure, or an execution provider
    that is not active."""


class OutputError(FourierConvertError):
    """The output cannot be written (exists, no space, not writable)."""


class DiskSpaceError(OutputError):
    """Not enough free disk space for the output."""


class ResourceError(FourierConvertError):
    """The work an input asks for needs more memory than this machine has available; refused before it starts."""


class UsageError(FourierConvertError):
    """Invalid combination of options or arguments (exit code 2 in the CLI)."""

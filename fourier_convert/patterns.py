"""Regular expressions from adapter configs (``target_modules``, ``exclude_modules``, ``layers_pattern``,
``n_frequency_pattern``, ``rank_pattern``...), matched as PEFT matches them, in bounded time.

PEFT hands these strings to Python's ``re``, whose backtracking is exponential for nested repetition such as
``(a+)+b`` and grows as the name's length to the power k for k repetitions in a row (``.*`` twelve times then
``z`` hung every command): a config holding one would hang every command. Patterns are compiled once; a pattern
with a repetition inside a repetition (or alternatives inside one, ``(a|aa)*``), or with at least
:data:`MANY_REPEATS` repetitions, is matched under a deadline (``re`` checks for signals while it backtracks, so
a timer interrupts it), and a pattern that runs past it, or does not compile, is refused with its field named.
Plain patterns run directly: on module names they finish in microseconds.
"""

from __future__ import annotations

import functools
import importlib
import re
import signal
import threading
from typing import Any

from fourier_convert.errors import AdapterError

#: The longest one match of a risky pattern may run (a module name takes microseconds).
MATCH_SECONDS = 0.1
#: Repetitions from which a pattern counts as risky: k of them in a row backtrack in about n**k / k! steps on an
#: n-character name; 4 stay under 40,000 steps on a 31-character name, 12 took longer than 30 s.
MANY_REPEATS = 5

# re's own parser (private since Python 3.11, where its public aliases sre_parse / sre_constants are deprecated)
_sre_parser: Any = importlib.import_module("re._parser")
_sre_constants: Any = importlib.import_module("re._constants")

_REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT}


class _Timeout(Exception):
    pass


def config_match(how: str, pattern: str, text: str, field: str, user: str | None = None) -> re.Match[str] | None:
    """``re.match`` / ``re.fullmatch`` of a pattern built from an adapter config, in bounded time.

    Args:
        how: ``"match"`` or ``"fullmatch"``.
        pattern: The regular expression (the config's string, possibly wrapped as PEFT wraps it).
        text: The module name.
        field: The config field it came from (named in errors).
        user: The config's own string when ``pattern`` wraps it (errors show both).

    Returns:
        The match, or None.

    Raises:
        AdapterError: The pattern does not compile, or it ran past :data:`MATCH_SECONDS` (or, off the main
            thread, it has nested repetition and so cannot be bounded).

    Example:
        >>> config_match("fullmatch", r".*\\.q_proj", "model.layers.0.q_proj", "target_modules") is not None
        True
    """
    shown = f"{user!r} (as PEFT matches it: {pattern!r})" if user is not None else repr(pattern)
    compiled, risk = _compile(pattern, field, shown)
    run = compiled.match if how == "match" else compiled.fullmatch
    if risk is None:
        return run(text)
    if threading.current_thread() is not threading.main_thread():
        raise AdapterError(
            field,
            f"pattern {shown} {risk[0]}, which can take {risk[1]} time in Python's re",
            "simplify the pattern in adapter_config.json (for example list the module names instead)",
        )

    def expire(signum: int, frame: Any) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, MATCH_SECONDS)
        return run(text)
    except _Timeout:
        raise AdapterError(
            field,
            f"pattern {shown} did not finish matching {text!r} within {MATCH_SECONDS:g} s ({risk[2]} in Python's "
            "re, as PEFT uses it)",
            "simplify the pattern in adapter_config.json (for example list the module names instead)",
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, field: str, shown: str) -> tuple[re.Pattern[str], tuple[str, str, str] | None]:
    """The compiled pattern, and why it needs a deadline (None when it does not): what it holds, the kind of
    time it can take, and how it backtracks."""
    try:
        compiled = re.compile(pattern)
        parsed = _sre_parser.parse(pattern)
        nested = _has_nested_repeat(parsed, inside=False)
        repeats = _repeats(parsed)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(
            field,
            f"pattern {shown} is not a valid regular expression ({exc})",
            "fix the pattern in adapter_config.json",
        ) from None
    if nested:
        return compiled, ("repeats a repetition", "exponential", "a repeated repetition backtracks exponentially")
    if repeats >= MANY_REPEATS:
        return compiled, (f"has {repeats} repetitions", "polynomial", f"{repeats} repetitions backtrack polynomially")
    return compiled, None


def _repeats(parsed: Any) -> int:
    """How many repetitions (of more than one) the parsed pattern holds, anywhere."""
    count = 0
    for op, av in parsed:
        if op in _REPEATS:
            _, high, sub = av
            count += int(high is _sre_constants.MAXREPEAT or high > 1) + _repeats(sub)
        else:
            count += sum(_repeats(child) for child in _children(av))
    return count


def _has_nested_repeat(parsed: Any, *, inside: bool) -> bool:
    """Whether a repetition (more than once) holds another one or alternatives (``(a|aa)*`` backtracks
    exponentially too), anywhere in the parsed pattern."""
    for op, av in parsed:
        if op == _sre_constants.BRANCH and inside:
            return True
        if op in _REPEATS:
            _, high, sub = av
            many = high is _sre_constants.MAXREPEAT or high > 1
            if many and inside:
                return True
            if _has_nested_repeat(sub, inside=inside or many):
                return True
        else:
            for child in _children(av):
                if _has_nested_repeat(child, inside=inside):
                    return True
    return False


def _children(av: Any) -> list[Any]:
    """The sub-patterns of a parsed node's argument (groups, branches, assertions, conditionals)."""
    found: list[Any] = []
    items = av if isinstance(av, (tuple, list)) else [av]
    for item in items:
        if isinstance(item, _sre_parser.SubPattern):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            found += _children(item)
    return found

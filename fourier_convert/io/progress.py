"""A byte-counting progress bar with ETA, for terminals only.

Thread-safe: the copy thread and the main thread both advance it. Redraws at most ten times a second on
the given stream (stderr by default) and prints nothing unless enabled.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class ByteProgress:
    """Progress in bytes with rate and ETA.

    Args:
        total: Bytes expected.
        label: Text before the bar.
        stream: Where to draw (stderr by default).
        enabled: Draw at all; callers pass ``stream.isatty() and not quiet``.

    Example:
        >>> p = ByteProgress(100, "merge", enabled=False)
        >>> p.advance(40); p.done
        40
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
                self._last = now
                self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * 30)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
            f"{rate / 1e6:7.1f} MB/s ETA {eta:4.0f}s"
        )
        self.stream.flush()


class StepProgress:
    """A progress bar in steps (with a short status text), for phases that are not counted in bytes.

    Args:
        total: Steps expected.
        label: Text before the bar.
        stream: Where to draw (stderr by default).
        enabled: Draw at all; callers pass ``stream.isatty() and not quiet``.

    Example:
        >>> p = StepProgress(10, "distill", enabled=False)
        >>> p.update(3, "loss 0.12"); p.done
        3
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, status: str = "") -> None:
        """Set the steps done and the status text; redraws at most ten times a second."""
        self.done = done
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or done >= self.total):
            self._last = now
            frac = min(done / self.total, 1.0)
            elapsed = now - self._start
            eta = elapsed / done * (self.total - done) if done else 0.0
            self.stream.write(
                f"\r{self.label} [{'#' * int(frac * 30):<30}] {done}/{self.total} {status} "
                f"{elapsed:5.0f}s ETA {eta:4.0f}s"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def phase(enabled: bool, command: str, text: str) -> None:
    """Print ``command: text ...`` on stderr when ``enabled`` (a phase of a long command, on a terminal).

    Example:
        >>> phase(False, "to-onnx", "exporting the graph")
    """
    if enabled:
        print(f"{command}: {text} ...", file=sys.stderr, flush=True)

"""Running a generator one item ahead of its consumer, in a background thread."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")


def run_ahead(items: Iterator[_T]) -> Iterator[_T]:
    """Run ``items`` one element ahead in a daemon thread; errors (and their types) reach the consumer.

    The merges rebuild the next layer's delta this way while the current one is written.

    Example:
        >>> list(run_ahead(iter(range(3))))
        [0, 1, 2]
    """
    slot: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slot.put((True, item))
                slot.join()  # the next item is computed only once the consumer has taken this one
            slot.put((False, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            slot.put((False, exc))

    worker = threading.Thread(target=run, name="fourier-convert-deltas", daemon=True)
    worker.start()
    try:
        while True:
            ok, value = slot.get()
            slot.task_done()
            if not ok:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty, ValueError):
            slot.get_nowait()  # let a worker blocked on the slot see the stop flag
            slot.task_done()

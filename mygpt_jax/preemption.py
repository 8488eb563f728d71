"""Ctrl-C and SIGTERM (what schedulers, `timeout`, `docker stop` and cluster preemption send), handled alike.

Training asks `StopSignals.requested` at each step boundary, so a stop saves the step just done and nothing
is cut in half (a step, its evaluation, its checkpoint); a second signal gives up at once. Work with no
boundary to stop at (preparing a corpus) uses `signals_interrupt`: SIGTERM raises KeyboardInterrupt there,
as Ctrl-C does, and the work cleans up after itself.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt like Ctrl-C."""
    if not _in_main_thread():  # signal handlers can only be set from the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignals:
    """Within the block, Ctrl-C or SIGTERM asks the loop to stop at its next step boundary (`requested` names
    the signal); a second one raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

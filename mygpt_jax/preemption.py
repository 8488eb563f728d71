"""Ctrl-C and SIGTERM (what schedulers, `timeout`, `docker stop` and cluster preemption send), handled alike.

Training asks `StopSignals.should_stop(step)` at each step boundary, so a stop saves the step just done and
nothing is cut in half (a step, its evaluation, its checkpoint); a second signal gives up at once. Work with
no boundary to stop at (preparing a corpus) uses `signals_interrupt`: SIGTERM raises KeyboardInterrupt there,
as Ctrl-C does, and the work cleans up after itself.

With several processes, one mechanism serves every signal: jax.distributed's preemption notifier, a SIGTERM
handler installed outside Python (a Python handler would silently replace it), and its sync point
(`multihost_utils.reached_preemption_sync_point`), which has every process stop at the same step. Ctrl-C
joins it by sending this process a SIGTERM.

JAX is imported by `StopSignals` only: `prepare` uses `signals_interrupt`, and its worker processes import what
it imports, so JAX at the top here would slow each one's start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _notifier_outside_python() -> bool:
    """Whether SIGTERM has a handler Python did not install (jax.distributed's preemption notifier)."""
    return signal.getsignal(signal.SIGTERM) is None


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt like Ctrl-C."""
    if not _in_main_thread() or _notifier_outside_python():  # only the main thread sets handlers; jax's stays
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignals:
    """Within the block, Ctrl-C or SIGTERM asks the loop to stop at a step boundary (`requested` names the
    signal this process got); a second one raises KeyboardInterrupt at once. With several processes they all
    stop at the same step, the first that every one of them reaches after the signal."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        import jax

        self._synced = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        if _in_main_thread():
            handled = (signal.SIGINT,) if self._synced else SIGNALS
            self._previous = {s: signal.signal(s, self._handle) for s in handled}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._synced:  # tell the other processes through jax's notifier
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after step `step` (asked at every step, by every process)."""
        if self._synced:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested is not None

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

"""The scheduler thread: continuous batching over the engine's rows.

Each turn of its loop frees the rows of sequences that ended or whose client went away, admits waiting sequences
into free rows (one prefill per turn while other rows are decoding, so a newcomer stalls them for no longer than
its own prefill; as many as fit when none is), and runs one decoding step for every live row. The cache length
follows the live rows: the bucket of the furthest end (prompt plus max_tokens) any of them may reach.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

import jax
import numpy as np

from mygpt_jax.serving.engine import Engine, compile_all
from mygpt_jax.serving.sequence import Sequence


class QueueFull(Exception):
    """More sequences would wait than `serve.max_queue` allows."""


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.ready = threading.Event()  # set once every program is compiled
        self._slots: list[Sequence | None] = [None] * engine.rows
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.generated = 0  # tokens generated since the start, every row's
        self._thread: threading.Thread | None = None

    def start(self, on_ready: Callable[[str], None], on_failure: Callable[[BaseException], None]) -> None:
        """Compile, then schedule, on a thread of its own; `on_ready(line)` once compiled, `on_failure(error)` if
        the thread dies."""

        def run() -> None:
            try:
                line = compile_all(self.engine)
                self.ready.set()
                on_ready(line)
                self._loop()
            except BaseException as e:  # reported to the server, which stops with one line
                on_failure(e)

        self._thread = threading.Thread(target=run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self.ready.is_set():  # a compile in progress is not waited for
            self._thread.join()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences (all or none): QueueFull if more would wait than max_queue beyond the rows."""
        with self._wake:
            live = sum(s is not None for s in self._slots)
            if live + len(self._waiting) + len(sequences) > self.engine.rows + self.max_queue:
                raise QueueFull
            self._waiting.extend(sequences)
            self._wake.notify()

    def load(self) -> dict[str, int]:
        """How many rows are decoding and how many sequences wait (a snapshot, for /health)."""
        with self._wake:
            return {"rows": self.engine.rows, "rows_busy": sum(s is not None for s in self._slots),
                    "waiting": len(self._waiting), "tokens_generated": self.generated}

    def cancel(self, sequences: list[Sequence]) -> None:
        """The client has gone: the scheduler frees their rows (or drops them from the queue) at its next turn."""
        for s in sequences:
            s.cancelled = True
        with self._wake:
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._wake.wait()
                if self._stopping:
                    return
                self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
            self._slots = [None if s is None or s.cancelled else s for s in self._slots]
            self._admit()
            if any(self._slots):
                self._step()

    def _next_waiting(self) -> Sequence | None:
        with self._wake:
            return self._waiting.popleft() if self._waiting else None

    def _admit(self) -> None:
        decoding = any(self._slots)
        while None in self._slots:
            sequence = self._next_waiting()
            if sequence is None:
                return
            self._prefill(sequence)
            if decoding:
                return

    def _prefill(self, sequence: Sequence) -> None:
        request = sequence.request
        prefill = self.engine.prefill(request.prompt)
        scores = None
        if request.echo and request.logprobs is not None:
            scores = jax.device_get((prefill.logprob, prefill.top_ids, prefill.top_logprobs))
        if request.max_tokens == 0:  # scoring the prompt: no row needed
            sequence.started(scores)
            sequence.finish_scoring()
            return
        slot = self._slots.index(None)
        self._slots[slot] = sequence
        self._fit_cache()
        self.engine.insert(slot, prefill, len(request.prompt), request.row)
        sequence.started(scores)

    def _fit_cache(self) -> None:
        self.engine.fit_length(max((s.end for s in self._slots if s is not None), default=1))

    def _step(self) -> None:
        active = np.array([s is not None for s in self._slots])
        out = self.engine.step(active)
        self.generated += int(active.sum())
        ended = False
        for i, s in enumerate(self._slots):
            if s is not None and s.push(int(out.token[i]), out.logprob[i], out.top_ids[i], out.top_logprobs[i]):
                self._slots[i], ended = None, True
        if ended:
            self._fit_cache()

"""Where a jitted function's time goes: seconds per kind of XLA op, from a jax.profiler trace.

    seconds = op_seconds(lambda: step(state, batch, rng))   # {"ynn_fusion": (seconds, count), ...}

The function must be compiled with `hardware.jit_options(profile=True)` on a CPU, where XLA records an
event per op only when asked. Ops are grouped by their HLO name without the numeric suffix: on XLA:CPU,
`ynn_fusion` is a matmul run by YNNPACK, `dot`/`dot_general` a matmul run by Eigen, `*_fusion` fused
elementwise work named after its ops, `wrapped_reduce-window` one half of a reduction that XLA split in two.
Ops that run at the same time on different threads share those seconds, so the seconds add up to the
time some op was running: about the call's time (an Eigen matmul runs asynchronously, so part of its
time may show in the ops after it).
"""

from __future__ import annotations

import collections
import glob
import itertools
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from mygpt_jax import hardware

# The CPU executor's own spans and thread-pool markers, the markers that close ops, YNNPACK's waits.
_NOT_OPS = ("ThunkExecutor", "ThreadpoolListener", "end: ", "SlinkyThreadPool")


def _op_lines(data: Any) -> list[Any]:
    """The trace lines that hold XLA ops: a GPU's are its device planes' "XLA Ops" lines; XLA:CPU's run on
    its host threads (tf_XLAEigen/..., and tf_XLAPjRtCpuClient/... for small programs)."""
    device = [line for plane in data.planes if plane.name.startswith("/device:")
              for line in plane.lines if line.name == "XLA Ops"]
    return device or [line for plane in data.planes if plane.name == "/host:CPU"
                      for line in plane.lines if line.name.startswith("tf_XLA")]


def op_seconds(run: Callable[[], Any]) -> dict[str, tuple[float, int]]:
    """{op kind: (seconds, how many ops)} over one call of `run`, most time first; empty if none recorded
    (or if this jax cannot read a trace back: `hardware.can_read_profiles`)."""
    if not hardware.can_read_profiles():
        return {}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            jax.block_until_ready(run())
        finally:
            jax.profiler.stop_trace()
        traces = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not traces:
            return {}
        data = jax.profiler.ProfileData.from_file(traces[0])
    ops = [(event.start_ns, event.start_ns + event.duration_ns, re.sub(r"\.\d+$", "", event.name))
           for line in _op_lines(data) for event in line.events if not event.name.startswith(_NOT_OPS)]
    seconds = _share_overlaps(ops)
    counts = collections.Counter(kind for _, _, kind in ops)
    return {kind: (s, counts[kind]) for kind, s in seconds.most_common()}


def _share_overlaps(ops: list[tuple[int, int, str]]) -> collections.Counter:
    """Seconds per kind where ops running at the same time (on different threads, or nested in one another)
    share each instant equally, so the seconds add up to the time any op was running, not more."""
    edges = sorted({t for start, end, _ in ops for t in (start, end)})
    # Every kind is listed, even one whose ops took no measurable time.
    seconds = collections.Counter({kind: 0.0 for _, _, kind in ops})
    starts = sorted(ops)
    running: list[tuple[int, str]] = []  # (end, kind) of the ops running in the current segment
    i = 0
    for left, right in itertools.pairwise(edges):
        running = [(end, kind) for end, kind in running if end > left]
        while i < len(starts) and starts[i][0] <= left:
            if starts[i][1] > left:
                running.append((starts[i][1], starts[i][2]))
            i += 1
        for _, kind in running:
            seconds[kind] += (right - left) / 1e9 / len(running)
    return seconds

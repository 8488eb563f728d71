"""profiling.op_seconds reads a real jax.profiler trace back into seconds per kind of XLA op."""

import jax
import jax.numpy as jnp
import pytest

from mygpt_jax import backends, bench, hardware, profiling


@pytest.mark.skipif(not hardware.can_read_profiles(), reason="this jax cannot read a profiler trace back")
def test_op_seconds_finds_the_ops_of_a_jitted_function_and_the_report_lists_them():
    layer = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(), **backends.current().jit_options(profile=True))
    x, w = jnp.ones((256, 512)), jnp.ones((512, 256))
    layer(x, w).block_until_ready()  # compile outside the trace
    ops = profiling.op_seconds(lambda: layer(x, w))

    assert any(kind.startswith(("ynn_fusion", "dot")) for kind in ops), ops  # the matmul
    assert len(ops) >= 2  # and the elementwise work after it
    assert all(count >= 1 for _, count in ops.values())
    lines = bench.profile_lines(ops, top=1)
    assert lines[1].split()[0] == next(iter(ops))  # the kind that took most time comes first
    assert lines[-1].strip().startswith(f"the other {len(ops) - 1} kinds")


def test_ops_running_at_the_same_time_share_those_seconds():
    ms = 1_000_000  # ns
    ops = [(0, 10 * ms, "dot"), (5 * ms, 15 * ms, "add"), (20 * ms, 30 * ms, "dot"), (40 * ms, 40 * ms, "copy")]
    seconds = profiling._share_overlaps(ops)
    assert seconds == {"dot": pytest.approx(0.0175), "add": pytest.approx(0.0075), "copy": 0.0}
    assert sum(seconds.values()) == pytest.approx(0.025)  # the time some op was running: 0-15 and 20-30 ms

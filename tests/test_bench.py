"""The benchmark runs end to end through its CLI and reports every field (no timing is asserted)."""

import json
import math

import pytest

from mygpt_jax import hardware
from tests.utils import after_the_device_line, run_cli

FIELDS = ("train_tokens_per_s", "train_flops_fraction", "decode_tokens_per_s", "decode_bandwidth_fraction",
          "kv_cache_speedup", "compile_s", "device")
SMALL = ("--steps=1", "--decode_tokens=6", "--recompute_tokens=3", "--matmul_size=256", "--copy_mb=8")


PROFILES = hardware.can_read_profiles()  # jax 0.5.0 (jax-metal's newest) cannot read a trace back


def test_bench_prints_valid_json_with_every_field():
    result = run_cli("bench", "--json", *(("--profile",) if PROFILES else ()), *SMALL, "--config.train.batch_size=2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert after_the_device_line(result)[0].startswith("[bench] ")
    for field in FIELDS:
        assert field in report, field
    assert report["device"].startswith("cpu") and report["decode_loop"] == "device"
    numbers = [report[f] for f in FIELDS if f != "device"]
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in numbers)
    assert report["num_params"] == 3_242_752 and report["batch_size"] == 2 and report["dtype"] == "float32"
    assert report["decode_tokens"] == 6 and report["recompute_matches"]  # cached decoding = full recompute
    assert report["train_mfu"] is None  # no GPU peak to compare with on a CPU
    assert report["train_page_faults_per_step"] >= 0  # may be 0: a tiny step's memory is reused
    if not PROFILES:
        assert "train_profile" not in report
        return
    ops = report["train_profile"]  # --profile: {XLA op kind: [seconds, count]}, most time first
    assert ops, "the profiled train step recorded no ops"
    assert all(seconds >= 0 and count >= 1 for seconds, count in ops.values())  # a tiny op may round to 0 ns
    assert sum(seconds for seconds, _ in ops.values()) > 0
    assert [s for s, _ in ops.values()] == sorted((s for s, _ in ops.values()), reverse=True)
    assert any(kind.startswith(("ynn_fusion", "dot")) for kind in ops), ops  # the matmuls are among them


@pytest.mark.skipif(PROFILES, reason="this jax reads profiler traces back")
def test_bench_profile_needs_a_jax_that_reads_traces():
    result = run_cli("bench", "--profile", *SMALL)
    assert result.returncode == 1
    lines = after_the_device_line(result)
    assert len(lines) == 1 and "--profile needs" in lines[0], result.stderr


def test_bench_rejects_a_bad_flag_on_one_line():
    result = run_cli("bench", "--steps=0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "steps" in lines[0], result.stderr

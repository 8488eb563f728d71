"""The benchmark runs end to end through its CLI and reports every field (no timing is asserted)."""

import json
import math

from tests.utils import run_cli

FIELDS = ("train_tokens_per_s", "train_flops_fraction", "decode_tokens_per_s", "decode_bandwidth_fraction",
          "kv_cache_speedup", "compile_s", "device")


def test_bench_prints_valid_json_with_every_field():
    result = run_cli("bench", "--json", "--steps=1", "--decode_tokens=4", "--recompute_tokens=2",
                     "--matmul_size=256", "--copy_mb=8", "--config.train.batch_size=2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for field in FIELDS:
        assert field in report, field
    assert report["device"].startswith("cpu")
    numbers = [report[f] for f in FIELDS if f != "device"]
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in numbers)
    assert report["num_params"] == 3_242_752 and report["batch_size"] == 2

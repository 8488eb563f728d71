"""Ablation sweeps: sweep-file checks, and a tiny sweep run for real (2 variants x 2 seeds on configs/tiny.py)."""

import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mygpt_jax import checkpoint, cli, experiments
from mygpt_jax.config import base_config
from mygpt_jax.errors import UserError
from tests.utils import REPO, TINY, after_the_device_line, cli_env

FEW_STEPS = ["--config.train.max_steps=4", "--config.train.eval_freq=2"]
COLUMNS = ["variant", "seed", "status", "data.train_ratio", "train.max_steps", "train.eval_freq", "best_val_loss",
           "final_val_loss", "final_train_loss", "num_params", "tokens_per_s", "wall_s", "error"]


def write_sweep(folder, name, body):
    path = folder / f"{name}.py"
    path.write_text(f'"""A test sweep."""\nBASE = {TINY!r}\n{body}\n')
    return str(path)


def run_sweep(path, *args):
    cmd = [sys.executable, "-m", "mygpt_jax.experiments", path, *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


def read_csv(sweep_dir):
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def trained_runs(stdout):
    """The runs this invocation trained (a progress line that ends in a result, not 'finished earlier')."""
    return sorted(line.split()[2] for line in stdout.splitlines() if line.startswith("[") and " ... " in line)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    # the varied key leaves the compiled programs as they are: the runs after the first reuse them (fast)
    path = write_sweep(folder, "split", 'GRID = {"data.train_ratio": [0.8, 0.9]}\nSEEDS = [1, 2]')
    args = [f"--config.checkpoint_dir={folder / 'ckpt'}", *FEW_STEPS]
    result = run_sweep(path, *args)
    assert result.returncode == 0, result.stderr
    return path, args, folder / "ckpt" / "experiments" / "split", result


def test_a_tiny_sweep_trains_every_variant_and_seed_and_writes_results(sweep):
    _, _, sweep_dir, result = sweep
    assert trained_runs(result.stdout) == ["train_ratio=0.8-s1", "train_ratio=0.8-s2", "train_ratio=0.9-s1",
                                           "train_ratio=0.9-s2"]
    assert "[4/4] split train_ratio=0.9-s2 ... best val " in result.stdout
    rows = read_csv(sweep_dir)
    assert list(rows[0]) == COLUMNS and len(rows) == 4
    assert {(r["variant"], r["seed"], r["status"], r["data.train_ratio"]) for r in rows} == {
        ("train_ratio=0.8", "1", "ok", "0.8"), ("train_ratio=0.8", "2", "ok", "0.8"),
        ("train_ratio=0.9", "1", "ok", "0.9"), ("train_ratio=0.9", "2", "ok", "0.9")}
    assert all(float(r["best_val_loss"]) <= float(r["final_val_loss"]) and int(r["num_params"]) > 0 for r in rows)
    seeds = {r["seed"]: r["final_train_loss"] for r in rows if r["variant"] == "train_ratio=0.8"}
    assert seeds["1"] != seeds["2"]  # train.seed differs between the runs of a variant
    table = (sweep_dir / "results.md").read_text().splitlines()
    variant_rows = [line for line in table if line.startswith("| ") and "train_ratio=" in line]
    assert len(variant_rows) == 2 and sum("**train_ratio=" in line for line in variant_rows) == 1
    assert all(" ± " in line and " 2/2 " in line for line in variant_rows)
    for png in ("val_loss.png", "best_val_loss.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (sweep_dir / "train_ratio=0.9-s1" / "summary.json").exists()


def test_rerunning_a_finished_sweep_trains_nothing(sweep, capsys):
    path, args, sweep_dir, _ = sweep
    before = {run: os.path.getmtime(sweep_dir / run / "summary.json") for run in ("train_ratio=0.8-s1",
                                                                                  "train_ratio=0.9-s2")}
    assert experiments.main([path, "--dry-run", *args]) == 0  # it compares the runs with their resolved settings
    assert capsys.readouterr().out.count(" -- finished") == 4
    assert experiments.main([path, *args]) == 0
    out = capsys.readouterr().out
    assert trained_runs(out) == [] and out.count("finished earlier: best val") == 4
    assert {run: os.path.getmtime(sweep_dir / run / "summary.json") for run in before} == before
    assert len(read_csv(sweep_dir)) == 4


def test_deleting_a_run_directory_reruns_only_that_run(sweep):
    path, args, sweep_dir, _ = sweep
    shutil.rmtree(sweep_dir / "train_ratio=0.9-s1")
    again = run_sweep(path, *args)
    assert again.returncode == 0, again.stderr
    assert trained_runs(again.stdout) == ["train_ratio=0.9-s1"]
    assert [r["status"] for r in read_csv(sweep_dir)] == ["ok"] * 4


def test_a_failing_variant_is_reported_and_the_others_complete(sweep, tmp_path):
    _, args, sweep_dir, _ = sweep  # the same checkpoint root: its compiled programs are reused
    path = write_sweep(tmp_path, "fails", 'VARIANTS = {"base": {}, "nodata": {"data.path": "/no/such/file.txt"}}\n'
                                          "SEEDS = [1]")
    result = run_sweep(path, *args)
    assert result.returncode == 1
    rows = {r["variant"]: r for r in read_csv(sweep_dir.parent / "fails")}
    assert rows["base"]["status"] == "ok" and float(rows["base"]["best_val_loss"]) > 0
    assert rows["nodata"]["status"] == "failed"
    assert rows["nodata"]["error"].startswith("data path /no/such/file.txt does not exist")
    table = (sweep_dir.parent / "fails" / "results.md").read_text()
    assert "| nodata | /no/such/file.txt | 0/1 |" in table and "s1: data path /no/such/file.txt" in table
    assert "[2/2] fails nodata-s1 ... FAILED: data path /no/such/file.txt does not exist" in result.stdout
    assert after_the_device_line(result) == [
        "error: 1 of 2 runs failed; their errors are in results.md and results.csv"]


def test_dry_run_lists_the_runs_and_trains_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, "tying", 'VARIANTS = {"untied": {}, "tied": {"model.tie_embeddings": True}}\n'
                                          "SEEDS = [7, 8]")
    assert experiments.main([path, "--dry-run", f"--config.checkpoint_dir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["[1/4] untied-s7: (base) -- new", "[2/4] tied-s7: --config.model.tie_embeddings=True -- new",
                         "[3/4] untied-s8: (base) -- new", "[4/4] tied-s8: --config.model.tie_embeddings=True -- new"]
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize("body, args, message", [
    ('GRID = {"model.drop_rat": [0.0, 0.1]}\nSEEDS = [1]', [],
     "unknown config key 'model.drop_rat' (did you mean 'model.drop_rate'?)"),
    ("GRID = {}\nSEEDS = [1]", [], "GRID is empty"),
    ('GRID = {"model.drop_rate": []}\nSEEDS = [1]', [], "GRID['model.drop_rate'] is empty"),
    ('VARIANTS = {"a": {"model.n_layers": 2.5}}\nSEEDS = [1]', [],
     "(VARIANTS['a']): model.n_layers = 2.5 has the wrong type; model.n_layers takes an integer"),
    ('VARIANTS = {"a": {"model.n_heads": 5}}\nSEEDS = [1]', [],
     "run a-s1: --config.model.emb_dim=32 is invalid: must be divisible by model.n_heads=5"),
    ('VARIANTS = {"a": {}}\nSEEDS = []', [], "set SEEDS to a non-empty list of integers"),
    ('VARIANTS = {"a": {}}\nSEED = [1]', [], "unknown setting(s) SEED"),
])
def test_a_bad_sweep_file_is_an_error_naming_the_file_and_the_key(tmp_path, body, args, message):
    path = write_sweep(tmp_path, "bad", body)
    with pytest.raises(UserError) as e:
        experiments.main([path, f"--config.checkpoint_dir={tmp_path}", *args])
    assert str(e.value).startswith(f"{path}") and message in str(e.value)
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize("args, message", [
    (["--config.train.num_epochz=3"], "unknown config key 'train.num_epochz' (did you mean 'train.num_epochs'?)"),
    (["--config.train.num_epochs=three"], "--config.train.num_epochs=three: 'three' is not an integer"),
    (["--config.model.drop_rate=0.3"], "model.drop_rate is set per run by"),
    (["--fast"], "unknown option --fast"),
])
def test_bad_command_line_overrides_are_errors(tmp_path, args, message):
    path = write_sweep(tmp_path, "drop", 'GRID = {"model.drop_rate": [0.0, 0.1]}\nSEEDS = [1]')
    with pytest.raises(UserError, match=re.escape(message)):
        experiments.main([path, *args])


def test_errors_print_one_line_and_exit_2(tmp_path, capsys):
    path = write_sweep(tmp_path, "bad", 'GRID = {"model.drop_rat": [0.0]}\nSEEDS = [1]')
    assert cli.exit_status(lambda: experiments.main([path, f"--config.checkpoint_dir={tmp_path}"])) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path} (GRID): unknown config key 'model.drop_rat' (did you mean 'model.drop_rate'?); the keys "
        "and their defaults are in mygpt_jax/config.py"]


def test_a_checkpoint_saved_before_a_config_key_existed_counts_as_that_keys_default(tmp_path):
    """Sweep folders outlive config changes: a key the saved config lacks is the same setting if the run now has
    its default (model.attention, added later), and any other difference still stops the sweep."""
    config = base_config()
    config.checkpoint_dir, config.run_name = str(tmp_path), "old-s1"
    run = experiments.Run("old", 1, config)
    saved = config.to_dict()
    del saved["model"]["attention"]
    checkpoint.save(run.dir, 1, {"w": np.zeros(2, np.float32)}, {"config": saved})
    assert experiments.finished_runs([run]) == {}  # a checkpoint without a summary: to resume, no error
    config.compilation_cache_dir = str(tmp_path / "elsewhere")  # where programs are cached: not a setting
    assert experiments.finished_runs([run]) == {}
    config.model.drop_rate = 0.0
    with pytest.raises(UserError, match=r"holds a run with other settings \(model.drop_rate: 0.1 -> 0.0\)"):
        experiments.finished_runs([run])

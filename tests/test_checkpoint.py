"""The run's checkpointer (mygpt_jax/checkpoint.py): what a run resumes from, damaged and vanishing steps, fresh
starts that set the earlier run aside, and the run lock; on the suite's tiny run (conftest.py), copied."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from mygpt_jax import checkpoint
from mygpt_jax.errors import UserError
from mygpt_jax.model import ModelConfig, init_params
from tests.utils import (
    TINY_RUN,
    after_the_device_line,
    checkpoint_steps as steps,
    in_small_filesystem,
    popen_cli,
    read_metrics,
    run_cli,
    user_error_as_nobody,
)

KEYS = ("update", "train_loss", "val_loss", "batch_loss", "tokens_seen")


def copy_run(tiny_run, tmp_path):
    shutil.copytree(tiny_run[0] / "tiny", tmp_path / "tiny")
    return tmp_path / "tiny"


def damage(run_dir, step: int, part: str = "params") -> None:
    for manifest in (run_dir / str(step) / part).rglob("manifest.ocdbt"):
        manifest.write_bytes(b"not a manifest")


def abstract_params(meta: dict):
    cfg = ModelConfig.from_config(ml_collections.ConfigDict(meta["config"]).model)
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def test_a_damaged_checkpoint_is_named_and_resume_step_goes_on_from_the_intact_one(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    damage(run_dir, 72, "opt_state")
    more = [f"--config.checkpoint_dir={tmp_path}", *TINY_RUN, "--config.train.num_epochs=3"]  # the README's way on
    refused = run_cli("train", *more)
    lines = after_the_device_line(refused)
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr  # no Orbax spew after it
    assert lines[0].startswith("error: checkpoint 72 is damaged: its opt_state cannot be read") and \
        "resume from it with --config.train.resume_step=70" in lines[0] and "settings" not in lines[0], lines[0]
    assert steps(run_dir) == [70, 72]  # nothing moved or deleted by the refusal

    resumed = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *TINY_RUN, "--config.train.resume_step=70")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from update 70 (--config.train.resume_step): moved 72 (" in resumed.stdout
    (aside,) = (run_dir / "previous").iterdir()
    assert steps(aside) == [72] and steps(run_dir)[-1] == 72  # update 72 trained again, the damaged one kept aside
    want = [{k: r[k] for k in KEYS} for r in read_metrics(tiny_run[0] / "tiny")]
    assert [{k: r[k] for k in KEYS} for r in read_metrics(run_dir)] == want  # bit-identical from update 70


def test_resume_step_must_be_a_checkpoint(tiny_run, tmp_path):
    copy_run(tiny_run, tmp_path)
    result = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *TINY_RUN, "--config.train.resume_step=50")
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1 and "resume_step=50 is not a checkpoint" in lines[0], lines
    assert "70, 72" in lines[0]


def test_a_fresh_start_moves_the_earlier_run_aside_and_deletes_nothing(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    before = sorted(p.name for p in run_dir.iterdir() if p.name != "train.lock")
    result = run_cli("train", f"--config.checkpoint_dir={tmp_path}", "--config.train.resume=False",
                     "--config.train.max_steps=2", "--config.train.flops_matmul_size=0", "--config.sample.prompt=")
    assert result.returncode == 0, result.stderr
    (aside,) = (run_dir / "previous").iterdir()
    said = [line for line in result.stdout.splitlines() if line.startswith("Starting fresh")]
    assert said and f"into {aside}" in said[0] and " MB)" in said[0], result.stdout
    assert sorted(p.name for p in aside.iterdir()) == before  # checkpoints, metrics, summary, plot
    assert {"70", "72", "metrics.jsonl", "summary.json", "loss.png"} <= set(before)
    assert steps(run_dir) == [2] and [r["update"] for r in read_metrics(run_dir)] == [1, 2]


def test_a_reader_takes_the_next_newest_step_when_one_vanishes_while_it_reads(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    notes, asked = [], []

    def rotated_away(meta: dict):  # between listing the steps and reading the params, as a training's rotation
        asked.append(meta["step"])
        if meta["step"] == 72:
            shutil.rmtree(run_dir / "72")
        return abstract_params(meta)

    step, meta, params = checkpoint.read_newest(str(run_dir), rotated_away, notes.append)
    assert (step, meta["step"], asked, notes) == (70, 70, [72, 70], [])  # a vanished step is no damage
    assert jax.tree.leaves(params)[0].shape


def test_a_step_rotated_out_is_never_seen_half_deleted(tmp_path, monkeypatch):
    """The training's rotation removes a step while a reader may be reading it: the reader must find it whole or
    gone, never with some files deleted, which reads as damage (a slow reader hit that beside a real training)."""
    params = init_params(ModelConfig(vocab_size=64, context_length=8, emb_dim=8, n_heads=2, n_layers=1),
                         jax.random.PRNGKey(0))
    run_dir, outcomes, real_rmtree = tmp_path / "run", [], shutil.rmtree

    def removal_read_half_way(path, *args, **kwargs):  # the removal has taken the params when a reader looks
        for step_dir in [path] if os.path.basename(path).isdigit() else [os.path.join(path, n) for n in
                                                                        os.listdir(path)]:
            real_rmtree(os.path.join(step_dir, "params"))
            try:
                with checkpoint.Checkpointer(str(run_dir), read_only=True) as reader:
                    reader.restore_params(int(os.path.basename(step_dir)), jax.eval_shape(lambda: params))
                outcomes.append("read")
            except (checkpoint.Vanished, checkpoint.Damaged) as e:
                outcomes.append(type(e).__name__)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", removal_read_half_way)
    with checkpoint.Checkpointer(str(run_dir), max_to_keep=1) as writer:
        for step in (1, 2, 3):
            writer.save(step, params, {"step": step})
    assert outcomes == ["Vanished", "Vanished"]
    assert sorted(os.listdir(run_dir)) == ["3"]  # the steps rotated out are deleted after the save


def test_readers_beside_a_training_that_checkpoints_every_step(tmp_path):
    args = [f"--config.checkpoint_dir={tmp_path}", "--config.train.checkpoint_every=1", "--config.sample.prompt=",
            "--config.train.flops_matmul_size=0", "--config.train.eval_freq=100"]
    training = popen_cli("train", *args)
    reads = set()
    try:
        while training.poll() is None:
            if steps(tmp_path / "tiny") if (tmp_path / "tiny").exists() else []:
                step, _, _ = checkpoint.read_newest(str(tmp_path / "tiny"), abstract_params, pytest.fail)
                reads.add(step)
            time.sleep(0.01)
    finally:
        _, err = training.communicate(timeout=300)
    assert training.returncode == 0, err
    assert len(reads) > 3, reads  # read while the steps rotated


def test_a_read_only_run_folder_is_one_line(tiny_run, tmp_path):
    """Root writes anywhere: the lock is taken by a child process that gives up root for `nobody` first."""
    run_dir = copy_run(tiny_run, tmp_path)
    if os.geteuid() == 0:
        def take_the_lock() -> None:
            with checkpoint.RunLock(str(run_dir)):
                pass

        message = user_error_as_nobody(take_the_lock)
    else:
        os.chmod(run_dir, 0o555)
        os.chmod(run_dir / "train.lock", 0o444)
        try:
            with checkpoint.RunLock(str(run_dir)):
                message = "locked"
        except UserError as e:
            message = str(e)
        finally:
            os.chmod(run_dir, 0o755)
    assert message.startswith(f"cannot write to the run folder {run_dir} (Permission denied)"), message


def test_the_model_shape_of_a_checkpoint_is_checked_before_any_array_is_read(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    damage(run_dir, 72)  # never read: the meta says it is another model
    result = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *TINY_RUN, "--config.model.emb_dim=64")
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "was trained with another model (model.emb_dim: 32 -> 64)" in lines[0]
    assert json.loads((run_dir / "summary.json").read_text())["updates"] == 72


@pytest.mark.parametrize("background", [False, True])
def test_a_full_disk_while_checkpointing_is_one_line(tmp_path, background):
    """The same line whether the write fails in the save itself or in Orbax's background thread."""
    ckpt = tmp_path / "small"
    ckpt.mkdir()
    # 6 MB: the prepared verdict and the metrics fit, a checkpoint of the 3M-parameter model (39 MB) does not.
    result = in_small_filesystem(6, ckpt, [sys.executable, "-m", "mygpt_jax.train", "--config", "configs/tiny.py",
                                           f"--config.checkpoint_dir={ckpt}", "--config.train.flops_matmul_size=0",
                                           "--config.train.max_steps=3", "--config.compilation_cache_dir=",
                                           f"--config.train.async_checkpoint={background}"])
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == (f"error: the disk is full: checkpoint 3 could not be written to {ckpt}/tiny (no checkpoint "
                        "was kept); free some space and rerun the same command to resume")
    shutil.rmtree(ckpt, ignore_errors=True)


def test_an_asynchronous_save_keeps_its_step_while_the_next_steps_reuse_the_donated_state(tmp_path):
    """train.async_checkpoint: Orbax writes update 1 in the background while updates 2-4 run on the state the step
    donates; the update read back is bitwise the one a synchronous save wrote (docs/performance.md)."""
    from mygpt_jax import run_setup, sharding
    from tests.test_run_setup import tiny_config

    run = run_setup.setup(tiny_config(), total_steps=10)
    batch = jax.device_put(np.arange(4 * 33, dtype=np.int32).reshape(1, 4, 33) % 50257, run.batch_sharding)
    rng = sharding.put(jax.random.key(1), sharding.replicated(run.mesh))
    state = run.fresh_state(jax.random.key(0))
    step, _ = run.compile_train_step(state, batch, rng)
    state, _ = step(state, batch, rng)
    with checkpoint.Checkpointer(str(tmp_path / "sync")) as synchronous:
        synchronous.save_state(state, {})
    with checkpoint.Checkpointer(str(tmp_path / "async"), background=True) as background:
        background.save_state(state, {})
        for _ in range(3):
            state, _ = step(state, batch, rng)
        jax.block_until_ready(state)
    abstract = run.abstract_state()
    written = []
    for folder in ("sync", "async"):
        with checkpoint.Checkpointer(str(tmp_path / folder), read_only=True) as reader:
            written.append(reader.restore_state(1, abstract.params, abstract.opt_state))
    assert int(state.step) == 4
    for a, b in zip(jax.tree.leaves(written[0]), jax.tree.leaves(written[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

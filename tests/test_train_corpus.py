"""Training on a corpus folder end to end: the CLI as a subprocess on a generated corpus of a few hundred KB."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time

import pytest

from mygpt_jax import corpus
from tests.utils import (
    after_the_device_line,
    checkpoint_steps as steps,
    popen_cli,
    read_metrics,
    run_cli,
    signal_mid_run,
    words,
)

RANDOM = ["--config.data.sampling=random", "--config.train.max_steps=24", "--config.train.eval_freq=8",
          "--config.train.checkpoint_every=100", "--config.train.flops_matmul_size=0", "--config.sample.prompt=the",
          "--config.train.sample_every=12"]
KEYS = ("update", "train_loss", "val_loss", "batch_loss", "tokens_seen")


def make_corpus(root) -> None:
    rng = random.Random(5)
    for i in range(40):
        (root / f"shelf{i % 4}").mkdir(parents=True, exist_ok=True)
        (root / f"shelf{i % 4}" / f"book{i}.txt").write_text(words(rng, 1500))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    make_corpus(root)
    return root


@pytest.fixture(scope="module")
def random_run(library, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    result = run_cli("train", f"--config.checkpoint_dir={ckpt}", f"--config.data.path={library}", *RANDOM)
    assert result.returncode == 0, result.stderr
    return ckpt, result


def losses(run_dir):
    return [{k: r[k] for k in KEYS} for r in read_metrics(run_dir)]


def test_training_on_a_folder_prepares_it_and_counts_in_steps(random_run, library):
    ckpt, result = random_run
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Prepared {ckpt}/data/{library.name}-") and "split by files" in lines[0]
    assert lines[1].startswith("Model: 3,242,752 parameters;") and "random windows of 32; 24 steps" in lines[1]
    assert [line.split(":")[0] for line in lines if line.startswith("Step ")] == [
        "Step 000000", "Step 000008", "Step 000016", "Step 000023"]
    assert sum(line.startswith("the") for line in lines) == 2  # a sample every 12 steps
    records = read_metrics(ckpt / "tiny")
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.1 and records[0]["epoch"] is None
    summary = json.loads((ckpt / "tiny" / "summary.json").read_text())
    folder = summary["data"]["folder"]
    assert os.path.dirname(folder) == str(ckpt / "data") and os.path.basename(folder).startswith(f"{library.name}-")
    assert summary["data"]["fingerprint"] == corpus.read_meta(folder)["fingerprint"]
    assert summary["updates"] == 24 and summary["startup_s"] > 0 and summary["compile_s"] > 0


def test_sigterm_saves_the_step_and_the_rerun_resumes_with_the_same_losses(random_run, library, tmp_path):
    # A sample after every step: slow enough that the signal comes mid-run, and no change to the losses.
    args = [f"--config.checkpoint_dir={tmp_path}", f"--config.data.path={library}", *RANDOM,
            "--config.train.sample_every=1"]
    status, err = signal_mid_run(signal.SIGTERM, tmp_path / "tiny", *args)
    assert status == 130, err
    assert "Stopped by SIGTERM: saved update " in err and "Traceback" not in err, err
    saved = int(err.split("saved update ")[1].split()[0])
    assert 8 < saved < 24 and steps(tmp_path / "tiny") == [saved]  # no periodic checkpoint was due

    resumed = run_cli("train", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {tmp_path}/tiny from update {saved}\n" in resumed.stdout
    assert losses(tmp_path / "tiny") == losses(random_run[0] / "tiny")  # the batches of each step, again


def test_a_changed_corpus_stops_a_resume_unless_allowed(tmp_path):
    make_corpus(tmp_path / "lib")
    args = [f"--config.checkpoint_dir={tmp_path}", f"--config.data.path={tmp_path / 'lib'}", *RANDOM[:-2],
            "--config.train.max_steps=4"]
    assert run_cli("train", *args).returncode == 0
    book = tmp_path / "lib" / "shelf1" / "book1.txt"
    book.write_text(book.read_text() + " an added ending")
    more = [*args, "--config.train.max_steps=8"]
    refused = run_cli("train", *more)
    lines = after_the_device_line(refused)
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert lines[0] == ("error: the corpus changed since the checkpoint of update 4 (shelf1/book1.txt changed); "
                        "rerun with --config.data.allow_changes=True to train on the corpus as it is now, or start "
                        "fresh with --config.train.resume=False")
    assert steps(tmp_path / "tiny") == [4]
    allowed = run_cli("train", *more, "--config.data.allow_changes=True")
    assert allowed.returncode == 0, allowed.stderr
    assert "Training on the changed corpus in " in allowed.stdout and steps(tmp_path / "tiny") == [4, 8]


def test_a_second_training_of_the_same_run_stops_at_once_naming_the_first(library, tmp_path):
    args = [f"--config.checkpoint_dir={tmp_path}", f"--config.data.path={library}", *RANDOM[:-1],
            "--config.train.max_steps=100000"]
    first = popen_cli("train", *args)
    try:
        metrics = tmp_path / "tiny" / "metrics.jsonl"
        deadline = time.time() + 240
        while not metrics.exists() and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = run_cli("train", *args)
        lines = after_the_device_line(second)
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: {tmp_path}/tiny is being trained by process {first.pid} on "
                                   f"{socket.gethostname()}, started 20") and "another --config.run_name" in lines[0]
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130
    # The lock went with its process: the run can be resumed (here: stopped again at once, by max_steps).
    again = run_cli("train", *args[:-1], "--config.train.max_steps=1")
    assert again.returncode == 0 and "is already trained" in again.stdout


def test_a_checkpoint_from_before_corpora_resumes_where_it_stopped(tiny_run, tmp_path):
    """Checkpoints written before this project prepared corpora keep resuming: their meta holds the epoch and
    the batch position in the epoch, and no corpus fingerprint. Made here by rewriting a new checkpoint's meta
    into that format (the arrays were saved the same way then). The suite's tiny run trains the same first epoch."""
    run = [f"--config.checkpoint_dir={tmp_path}", "--config.train.flops_matmul_size=0", "--config.sample.prompt="]
    assert run_cli("train", *run, "--config.run_name=old", "--config.train.max_steps=5").returncode == 0
    meta_path = tmp_path / "old" / "5" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    config = meta["config"]
    for key in ("sampling", "glob", "exclude", "cache_dir", "workers", "allow_changes"):
        del config["data"][key]
    for key in ("sample_every", "tensorboard"):
        del config["train"][key]
    del config["eval"]["split"]
    config["train"]["max_steps"] = 0  # as if it had been stopped by Ctrl-C
    old = {"step": 5, "epoch": 0, "batch_in_epoch": 5, "tokens_seen": meta["tokens_seen"], "rng": meta["rng"],
           "config": config}
    meta_path.write_text(json.dumps(old))
    resumed = run_cli("train", *run, "--config.run_name=old")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {tmp_path}/old from update 5 (epoch 1, batch 5)\n" in resumed.stdout
    assert "Settings changed" not in resumed.stdout  # keys added since are at their defaults
    # The same evaluations as the uninterrupted run, and the one the 5-step run made of its last update.
    uninterrupted = {r["update"]: r for r in losses(tiny_run[0] / "tiny")}
    got = [r for r in losses(tmp_path / "old") if r["update"] != 5]
    assert [r["update"] for r in got] == [1, 11, 21, 31, 36]
    assert got == [uninterrupted[r["update"]] for r in got]


def test_evaluate_reads_a_prepared_validation_split(random_run, library):
    ckpt, _ = random_run
    args = [f"--config.checkpoint_dir={ckpt}", f"--config.data.path={library}", *RANDOM, "--config.eval.split=val",
            "--config.eval.json=True"]
    result = run_cli("evaluate", *args)  # the windows spread over the split that training scored
    assert result.returncode == 0, result.stderr
    summary = json.loads((ckpt / "tiny" / "summary.json").read_text())
    assert json.loads(result.stdout)["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    every = run_cli("evaluate", *args, "--config.eval.all_tokens=True")
    assert every.returncode == 0, every.stderr
    report = json.loads(every.stdout)
    assert report["tokens"] == corpus.read_meta(summary["data"]["folder"])["val"]["tokens"] - 1
    assert 3 < report["loss"] < 11


def test_a_corpus_too_small_for_a_window_is_one_line(tmp_path):
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.txt").write_text("only a few words here")
    result = run_cli("train", f"--config.checkpoint_dir={tmp_path}", f"--config.data.path={tmp_path / 'few'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: the training split of ") and \
        "fewer than one window of context_length + 1 = 33" in lines[-1], result.stderr

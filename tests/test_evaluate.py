"""`evaluate` scores what training scores: the same windows and the same token-weighted estimator
(`metrics.window_loss`), so on a run's last checkpoint it prints the losses the run logged last."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mygpt_jax.evaluate import every_token
from tests.utils import TINY_RUN, read_metrics, run_cli


@pytest.mark.parametrize("split", ["val", "train"])
def test_evaluate_prints_the_loss_the_run_logged_last(tiny_run, split):
    ckpt, _ = tiny_run
    result = run_cli("evaluate", f"--config.checkpoint_dir={ckpt}", *TINY_RUN, f"--config.eval.split={split}",
                     "--config.eval.json=True")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loss"] == pytest.approx(read_metrics(ckpt / "tiny")[-1][f"{split}_loss"], rel=1e-5)
    assert report["tokens"] == 2 * 4 * 32  # train.eval_iter batches of train.batch_size windows of 32 targets


def test_evaluate_all_tokens_scores_every_token_of_the_split_once(tiny_run):
    ckpt, _ = tiny_run
    result = run_cli("evaluate", f"--config.checkpoint_dir={ckpt}", "--config.eval.split=val",
                     "--config.eval.json=True", "--config.eval.all_tokens=True")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] == 534 - 1  # the verdict's validation tokens, each after the first predicted once
    assert report["loss"] != pytest.approx(read_metrics(ckpt / "tiny")[-1]["val_loss"], rel=1e-5)


def test_every_token_windows_predict_each_target_once():
    padded, starts, targets = every_token(np.arange(1, 12), 4)  # 11 tokens: 10 targets in windows of 4, 4, 2
    assert starts.tolist() == [0, 4, 8] and targets.tolist() == [4, 4, 2]
    predicted = [padded[s + 1:s + 1 + n].tolist() for s, n in zip(starts, targets, strict=True)]
    assert [t for window in predicted for t in window] == list(range(2, 12))

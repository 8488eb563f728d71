"""metrics.py: the one token-weighted loss over windows, what a run records (metrics.jsonl, TensorBoard), and the
progress display closed once however a run ends."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest

from mygpt_jax import backends, sharding, steps
from mygpt_jax.config import base_config
from mygpt_jax.errors import UserError
from mygpt_jax.metrics import MetricsLog, Reporter, window_loss
from mygpt_jax.model import GPT, ModelConfig, init_params
from tests.utils import read_metrics, run_cli

CFG = ModelConfig(vocab_size=50257, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


def test_window_loss_weighs_every_target_alike():
    model = GPT(CFG, backends.current())
    params = init_params(CFG, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 50257, 60).astype(np.int32)
    starts, targets = np.array([0, 9, 20, 40, 51]), np.array([8, 8, 3, 8, 1])
    mesh = sharding.make_mesh(base_config().mesh)
    count, loss = window_loss(steps.jit_eval_step(model), params, tokens, starts, 8, 2, mesh, targets)
    every = []  # each scored target's cross-entropy, computed window by window
    for s, n in zip(starts, targets, strict=True):
        logits, _ = model.apply({"params": params}, tokens[None, s:s + 8])
        every += list(optax.softmax_cross_entropy_with_integer_labels(logits[0, :n], tokens[s + 1:s + 1 + n]))
    assert count == 28 and loss == pytest.approx(float(np.mean(every)), rel=1e-5)


def test_a_divergence_mid_run_closes_the_progress_bar_and_the_writers(tmp_path):
    pytest.importorskip("tensorboardX")
    record = {"update": 3, "step": 2, "epoch": None, "batch_loss": 1.0, "train_loss": float("nan"),
              "val_loss": 2.0, "flops_fraction": None, "tokens_per_s": 1.0}
    log = MetricsLog(str(tmp_path), None, tensorboard=True)
    with pytest.raises(UserError, match="the loss is nan at update 3"), \
            Reporter(log, 10, 0, lambda what: UserError(what)) as reporter:
        reporter.evaluated(dict(record, train_loss=1.5))
        reporter.evaluated(record)
    assert log.writer is None and reporter.bar.disable  # closed (tqdm disables a closed bar)
    assert [r["update"] for r in read_metrics(tmp_path)] == [3]  # the diverged record is not kept
    again = MetricsLog(str(tmp_path), None, tensorboard=True)  # the next run on the folder starts cleanly
    again.close()
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_tensorboard_event_files_hold_the_evaluations(tmp_path):
    pytest.importorskip("tensorboardX")
    result = run_cli("train", f"--config.checkpoint_dir={tmp_path}", "--config.train.tensorboard=True",
                     "--config.train.max_steps=9", "--config.train.eval_freq=8", "--config.sample.prompt=",
                     "--config.train.flops_matmul_size=0")
    assert result.returncode == 0, result.stderr
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf  # a reader that is not tensorboardX's writer

    events = [event for path in (tmp_path / "tiny" / "tensorboard").iterdir()
              for event in tf.compat.v1.train.summary_iterator(str(path))]
    scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}
    records = read_metrics(tmp_path / "tiny")
    assert [r["step"] for r in records] == [0, 8]
    for r in records:
        assert scalars[("loss/val", r["step"])] == pytest.approx(r["val_loss"])
        assert scalars[("loss/train", r["step"])] == pytest.approx(r["train_loss"])
        assert ("learning_rate", r["step"]) in scalars

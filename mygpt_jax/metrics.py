"""What a training run records at each evaluation: `metrics.jsonl` (one JSON line per evaluation) and, with
`train.tensorboard=True`, TensorBoard event files in `<run>/tensorboard/` written by tensorboardX (the
`tensorboard` extra). A resumed run rewrites what came after its checkpoint in both."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mygpt_jax import distributed, sharding
from mygpt_jax.errors import UserError

# metrics.jsonl keys shown in TensorBoard, and their tags there.
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "batch_loss": "loss/batch",
                    "learning_rate": "learning_rate", "tokens_per_s": "speed/tokens_per_s",
                    "flops_fraction": "speed/flops_fraction"}


def window_loss(loss_sum: Callable, params: Any, tokens: np.ndarray, starts: np.ndarray, context_length: int,
                rows: int, mesh: Any, targets: np.ndarray | None = None, progress: bool = False) -> tuple[int, float]:
    """(targets scored, mean cross-entropy per target) of the windows at `starts`: token-weighted, the one
    estimator of training's evaluations and of `evaluate`. `rows` windows at a time (a whole batch's logits may not
    fit where its gradients were accumulated), laid out on the mesh (`sharding.rows_sharding`); `targets` counts
    the targets of each window scored (default: all `context_length`; `tokens` then reach every window's end)."""
    distributed.barrier("evaluate")  # the processes compile the evaluation step side by side, then run it
    if targets is None:
        targets = np.full(len(starts), context_length, np.int32)
    total = jnp.zeros(())
    for i in tqdm(range(0, len(starts), rows), unit="batch", disable=not progress or None, file=sys.stderr):
        part, counts = starts[i:i + rows], targets[i:i + rows].astype(np.int32)
        windows = sharding.device_windows(tokens, part, context_length, mesh)
        # One batch's programs at a time: XLA's CPU runtime can deadlock two programs whose collectives run at
        # once on several devices (docs/development.md); an evaluation has nothing to overlap that pays.
        total = (total + loss_sum(params, windows, sharding.place_rows(counts, mesh))).block_until_ready()
    count = int(targets.sum())
    return count, float(total) / max(count, 1)


class Evaluator:
    """Evaluates the model on the same windows of each split every time and makes the record metrics.jsonl
    keeps. The tokens/s it records count training time alone (`pause` after work that is not training), in all
    and per device; the FLOP fraction is of the devices' peaks together."""

    def __init__(self, loss_sum: Callable, eval_sets: dict[str, tuple[np.ndarray, np.ndarray]], context_length: int,
                 rows: int, mesh: Any, flops_per_token: int, peak_flops: float | None, learning_rate: Any,
                 tokens_seen: int):
        self.loss_sum, self.eval_sets, self.context_length = loss_sum, eval_sets, context_length
        self.rows, self.mesh = rows, mesh
        self.flops_per_token, self.peak_flops, self.learning_rate = flops_per_token, peak_flops, learning_rate
        self.tokens_per_s = 0.0  # the last measured
        self.begin(tokens_seen)

    def begin(self, tokens_seen: int) -> None:
        """Training starts now (its first step compiled): the run's time counts from here."""
        self.start_time = time.time()
        self.pause(tokens_seen)

    def pause(self, tokens_seen: int) -> None:
        self.mark_time, self.mark_tokens = time.time(), tokens_seen

    def __call__(self, params: Any, metrics: dict, step: int, epoch: int | None, tokens_seen: int) -> dict[str, Any]:
        batch_loss = float(metrics["loss"])  # waits for the steps so far: the timing is exact
        if tokens_seen > self.mark_tokens:  # else no step since the last measurement (a final evaluation)
            self.tokens_per_s = (tokens_seen - self.mark_tokens) / max(time.time() - self.mark_time, 1e-9)
        losses = {split: window_loss(self.loss_sum, params, tokens, starts, self.context_length, self.rows,
                                     self.mesh)[1]
                  for split, (tokens, starts) in self.eval_sets.items()}
        lr, devices, tokens_per_s = self.learning_rate, self.mesh.size, self.tokens_per_s
        flops = tokens_per_s * self.flops_per_token
        record = {"update": step + 1, "step": step, "epoch": epoch, "tokens_seen": tokens_seen,
                  "train_loss": losses["train"], "val_loss": losses["val"], "batch_loss": batch_loss,
                  "learning_rate": float(lr(step) if callable(lr) else lr), "tokens_per_s": tokens_per_s,
                  "devices": devices, "tokens_per_s_per_device": tokens_per_s / devices, "tflops": flops / 1e12,
                  "flops_fraction": flops / (self.peak_flops * devices) if self.peak_flops else None,
                  "time_s": time.time() - self.start_time}
        self.pause(tokens_seen)
        return record


class MetricsLog:
    """The records of a run so far (`records`), appended to as it trains."""

    def __init__(self, run_dir: str, resumed_update: int | None, tensorboard: bool, enabled: bool = True):
        """`enabled` False (every process of a run but the first) keeps the records in memory alone."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.records = [] if resumed_update is None else self._truncate(resumed_update)
        if resumed_update is None and os.path.exists(self.path) and enabled:
            os.remove(self.path)
        self.writer = None
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise UserError("--config.train.tensorboard=True needs tensorboardX: install the extra with "
                                "uv sync --extra tensorboard (or pip install 'mygpt_jax[tensorboard]')") from None
            # Events of the steps after the checkpoint (an earlier attempt's) are discarded when rewritten.
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resumed_update)

    def _truncate(self, update: int) -> list[dict]:
        """Keep only records up to `update` (a resumed run rewrites what came after its checkpoint)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            records = [r for r in map(json.loads, f) if r["update"] <= update]
        if self.enabled:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        return records

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Reporter(contextlib.AbstractContextManager):
    """What a person sees of a run and what it keeps: the progress bar, the seed's loss lines, metrics.jsonl and
    TensorBoard; closed once however the run ends (`with`). A loss that is not finite raises `diverged(what)`."""

    def __init__(self, log: MetricsLog, total_steps: int, start: int, diverged: Callable[[str], Exception]):
        self.log, self.diverged = log, diverged
        self.bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=None if log.enabled else True, file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
        self.log.close()

    def write(self, line: str) -> None:
        if self.log.enabled:
            self.bar.write(line)

    def evaluated(self, record: dict) -> None:
        """Log an evaluation and print the seed's line; a loss that is not finite stops the run, unsaved (resuming
        keeps the last good state)."""
        if not np.isfinite([record["batch_loss"], record["train_loss"], record["val_loss"]]).all():
            raise self.diverged(f"the loss is {record['train_loss']} at update {record['update']}")
        self.log.append(record)
        fraction = {} if record["flops_fraction"] is None else {"flops": f"{record['flops_fraction']:.2f}"}
        self.bar.set_postfix(tok_s=f"{record['tokens_per_s']:.0f}", loss=f"{record['train_loss']:.3f}", **fraction)
        where = f"Ep {record['epoch']} (Step {record['step']:06d})" if record["epoch"] else f"Step {record['step']:06d}"
        self.write(f"{where}: Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}")

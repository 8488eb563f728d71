"""What a training run records at each evaluation: `metrics.jsonl` (one JSON line per evaluation) and, with
`train.tensorboard=True`, TensorBoard event files in `<run>/tensorboard/` written by tensorboardX (the
`tensorboard` extra). A resumed run rewrites what came after its checkpoint in both."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mygpt_jax import distributed, sharding
from mygpt_jax.errors import UserError

# metrics.jsonl keys shown in TensorBoard, and their tags there.
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "batch_loss": "loss/batch",
                    "learning_rate": "learning_rate", "tokens_per_s": "speed/tokens_per_s",
                    "flops_fraction": "speed/flops_fraction"}


def evaluate(eval_step: Callable, params: Any, tokens: np.ndarray, starts: np.ndarray, context_length: int,
             batch_size: int, micro_batch_size: int, mesh: Any) -> float:
    """The mean of per-batch mean losses over the windows at `starts` (the seed's calc_loss_loader), each batch
    evaluated in micro-batches (a whole batch's logits may not fit where its gradients were accumulated), laid out
    on the mesh (`sharding.rows_sharding`)."""
    distributed.barrier("evaluate")  # the processes compile the evaluation step side by side, then run it
    batch_losses = []
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        micro = [batch[j:j + micro_batch_size] for j in range(0, len(batch), micro_batch_size)]
        batch_losses.append([eval_step(params, sharding.device_windows(tokens, rows, context_length, mesh))
                             for rows in micro])
    return float(np.mean([np.mean(jax.device_get(m)) for m in batch_losses]))


class Evaluator:
    """Evaluates the model on the same windows of each split every time and makes the record metrics.jsonl
    keeps. The tokens/s it records count training time alone (`pause` after work that is not training), in all
    and per device; the FLOP fraction is of the devices' peaks together."""

    def __init__(self, eval_step: Callable, eval_sets: dict[str, tuple[np.ndarray, np.ndarray]], context_length: int,
                 batch_size: int, micro_batch_size: int, mesh: Any, flops_per_token: int, peak_flops: float | None,
                 learning_rate: Any, tokens_seen: int, records: list[dict]):
        self.eval_step, self.eval_sets, self.context_length = eval_step, eval_sets, context_length
        self.batch_size, self.micro_batch_size, self.mesh = batch_size, micro_batch_size, mesh
        self.flops_per_token, self.peak_flops, self.learning_rate = flops_per_token, peak_flops, learning_rate
        self.records = records
        self.start_time = time.time()
        self.pause(tokens_seen)

    def pause(self, tokens_seen: int) -> None:
        self.mark_time, self.mark_tokens = time.time(), tokens_seen

    def __call__(self, params: Any, metrics: dict, step: int, epoch: int | None, tokens_seen: int) -> dict[str, Any]:
        batch_loss = float(metrics["loss"])  # waits for the steps so far: the timing is exact
        if tokens_seen > self.mark_tokens:
            tokens_per_s = (tokens_seen - self.mark_tokens) / max(time.time() - self.mark_time, 1e-9)
        else:  # no step since the last measurement (the final evaluation right after an epoch's sample)
            tokens_per_s = self.records[-1]["tokens_per_s"]
        losses = {split: evaluate(self.eval_step, params, tokens, starts, self.context_length, self.batch_size,
                                  self.micro_batch_size, self.mesh)
                  for split, (tokens, starts) in self.eval_sets.items()}
        lr, devices = self.learning_rate, self.mesh.size
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

"""Train GPT-2: `python -m mygpt_jax.train --config configs/verdict.py`.

`train_and_evaluate` reads top to bottom: take the run folder, ask its checkpointer what to resume from,
prepare (or check) the corpus, build the run once (`run_setup`), then `_loop`, one loop counted in steps. Each
step trains on the batch of that step (a `data.BatchSource`: a function of the seed and the step), and the loop
itself says what happens every N steps: evaluate and log every `eval_freq`, checkpoint every `checkpoint_every`,
a sample after each epoch (or every `sample_every`). Ctrl-C or SIGTERM saves at the next step boundary; rerunning
the same command resumes and reproduces the losses of an uninterrupted run. The progress bar, metrics.jsonl,
TensorBoard, the checkpointer and the run lock are context managers: however the run ends they close once.

Step numbering follows the seed: "Step N" is printed after the (N+1)-th parameter update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

import mygpt_jax
from mygpt_jax import checkpoint, corpus, data, distributed, hardware, prepare, run_setup, sharding
from mygpt_jax.checkpoint import Checkpointer
from mygpt_jax.config import changed_settings, run_folder
from mygpt_jax.errors import Interrupted, UserError
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.metrics import Evaluator, MetricsLog, Reporter
from mygpt_jax.model import count_params, matmul_flops_per_token
from mygpt_jax.plots import plot_losses
from mygpt_jax.preemption import StopSignals
from mygpt_jax.tokenizer import decode, encode


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict:
    """Train as the config says; returns the run summary (also written to <run dir>/summary.json)."""
    t, primary = config.train, distributed.is_primary()  # every process trains; the first alone writes
    say = print if primary else _quiet
    run_dir = _make_run_dir(config)
    with contextlib.ExitStack() as stack:
        if primary:
            stack.enter_context(checkpoint.RunLock(run_dir))
        checkpoints = stack.enter_context(Checkpointer(run_dir, t.max_to_keep, learning_rate=t.learning_rate,
                                                       background=t.async_checkpoint))
        saved = checkpoints.to_resume(config, say)
        prepared = _prepared_corpus(config, saved, say)
        for name, split in (("training", prepared.train), ("validation", prepared.val)):
            data.check_split(name, len(split), config.model.context_length, prepared.folder)
        batches = data.batch_source(config, prepared.train, checkpoint.resume_position(saved) if saved else (0, 0, 0))
        run = run_setup.setup(config, batches.total_steps)
        state = run.restored_state(checkpoints, saved) if saved else run.fresh_state(_rngs(t.seed)[0])
        _say_resumed(config, saved, batches, say)
        evaluator = _header(run, state, batches, prepared, saved, say)
        if int(state.step) >= batches.total_steps:
            return _already_trained(config, run_dir, int(state.step), batches.total_steps, saved, say)
        loop = _Loop(run, batches, checkpoints, _Sampler(config, run, batches, say), evaluator, {
            "rng": np.asarray(jax.random.key_data(_rngs(t.seed)[1])).tolist(), "config": config.to_dict(),
            "data": {"fingerprint": prepared.fingerprint, "folder": prepared.folder}})
        log = MetricsLog(run_dir, int(state.step) if saved else None, t.tensorboard, enabled=primary)
        with Reporter(log, batches.total_steps, int(state.step), checkpoints.diverged) as reporter, \
                StopSignals() as stop:
            state = loop.train(state, saved["tokens_seen"] if saved else 0, reporter, stop)
        return _summarise(config, run_dir, state, loop, log.records, prepared, say)


def _rngs(seed: int) -> tuple[jax.Array, jax.Array]:
    """(the key of the initial weights, the dropout key every step folds its number into)."""
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    return init_rng, dropout_rng


@dataclasses.dataclass
class _Loop:
    """The loop over steps, and what it keeps across them besides the state (passed in and out)."""

    run: run_setup.Run
    batches: data.BatchSource
    checkpoints: Checkpointer
    sampler: _Sampler
    evaluator: Evaluator
    meta: dict  # what every checkpoint of the run holds besides the step's own
    tokens_seen: int = 0
    compile_s: float = 0.0
    startup_s: float = 0.0

    def train(self, state: Any, tokens_seen: int, reporter: Reporter, stop: StopSignals) -> Any:
        t, batches, total = self.run.config.train, self.batches, self.batches.total_steps
        start, accum, where = int(state.step), t.grad_accum_steps, self.run.batch_sharding
        rng = sharding.put(_rngs(t.seed)[1], sharding.replicated(self.run.mesh))
        next_batch = batches.on_mesh(start, accum, where)
        train_step = self._compile(state, next_batch, rng)
        self.evaluator.begin(tokens_seen)
        for step in range(start, total):
            state, metrics = train_step(state, next_batch, rng)
            tokens_seen += t.batch_size * self.run.cfg.context_length
            if step + 1 < total:  # gathered while the device runs the step
                next_batch = batches.on_mesh(step + 1, accum, where)
            reporter.bar.update(1)
            if step % t.eval_freq == 0 or step + 1 == total:  # and the final model's losses
                reporter.evaluated(self.evaluator(state.params, metrics, step, batches.epoch_of(step), tokens_seen))
            if (step + 1) % t.checkpoint_every == 0:
                self._save(state, step + 1, tokens_seen)
            stopping = stop.should_stop(step)  # every process asks at every step
            if not stopping and self.sampler.due(step):
                self.sampler(state.params, reporter)
                self.evaluator.pause(tokens_seen)
            if stopping and step + 1 < total:  # Ctrl-C or SIGTERM (on any process): save this step, stop
                self._save(state, step + 1, tokens_seen)
                self.checkpoints.wait()
                distributed.barrier("saved")  # a process that left early would fail the others mid-save
                raise _stopped(stop, self.checkpoints)
        self._save(state, total, tokens_seen)
        self.checkpoints.wait()  # the run's last checkpoint on disk before it says it finished
        self.tokens_seen = tokens_seen
        return state

    def _compile(self, state: Any, batch: jax.Array, rng: jax.Array) -> Any:
        train_step, self.compile_s = self.run.compile_train_step(state, batch, rng)
        distributed.barrier("compiled")  # then every process's first step starts together
        self.startup_s = time.time() - mygpt_jax.STARTED - self.compile_s
        return train_step

    def _save(self, state: Any, update: int, tokens_seen: int) -> None:
        position = self.batches.position(update)
        self.checkpoints.save_state(state, {"tokens_seen": tokens_seen, **self.meta, "data": {
            **self.meta["data"], "position": None if position is None else list(position)}})


def _stopped(stop: StopSignals, checkpoints: Checkpointer) -> Interrupted:
    how = {None: "Stopped by a signal to a process of the run", "SIGINT": "Interrupted"}.get(
        stop.requested, f"Stopped by {stop.requested}")
    print(f"\n{how}: saved update {checkpoints.saved_step} to {checkpoints.run_dir}; rerun the same command to "
          "resume.", file=sys.stderr)
    return Interrupted()


class _Sampler:
    """One greedy sample of sample.prompt after each epoch (or every sample_every steps); none without a prompt."""

    def __init__(self, config: ml_collections.ConfigDict, run: run_setup.Run, batches: data.BatchSource, say: Any):
        t = config.train
        self.every_epoch, self.every, self.batches = t.sample_every_epoch, t.sample_every, batches
        wanted = (t.sample_every_epoch and batches.epoch_of(0) is not None) or t.sample_every > 0
        self.prompt, self.seed = config.sample.prompt if wanted else "", config.sample.seed
        if wanted and not self.prompt:
            say("No samples during training: --config.sample.prompt is empty")
        settings = dataclasses.replace(SamplingSettings.from_config(config.sample), num_samples=1)
        self.generator = Generator(dataclasses.replace(run.cfg, drop_rate=0.0), None, settings, run.model.backend)

    def due(self, step: int) -> bool:
        return bool(self.prompt) and ((self.every_epoch and self.batches.ends_epoch(step))
                                      or (self.every > 0 and (step + 1) % self.every == 0))

    def __call__(self, params: Any, reporter: Reporter) -> None:
        distributed.barrier("sample")
        self.generator.params = params
        try:
            (ids,), _ = self.generator.generate(encode(self.prompt), jax.random.key(self.seed))
        finally:
            self.generator.params = None  # its copy of the weights is not needed until the next sample
        reporter.write((self.prompt + decode(ids)).replace("\n", " "))


def _header(run: run_setup.Run, state: Any, batches: data.BatchSource, prepared: corpus.Corpus,
            saved: dict | None, say: Any) -> Evaluator:
    """Say what is trained, and make the evaluator of the same windows every time."""
    t, mesh = run.config.train, run.mesh
    n_params, flops_per_token = count_params(state.params), matmul_flops_per_token(run.cfg)
    peak_flops, peak_name = (hardware.flops_reference(run.cfg.dtype, t.flops_matmul_size, run.model.backend)
                             if t.flops_matmul_size else (None, None))
    devices = f" on {mesh.size} devices (mesh {' x '.join(f'{a} {n}' for a, n in mesh.shape.items())})" \
        if mesh.size > 1 else ""
    say(f"Model: {n_params:,} parameters{devices}; {batches.describe(len(prepared.val))}")
    if peak_flops:
        say(f"Speed: {flops_per_token / 1e9:.3f} GFLOP per token (matmuls only), shown as a fraction of "
            f"{peak_name}, {peak_flops / 1e9:,.0f} GFLOP/s")
    eval_sets = {split: (tokens, data.scored_windows(run.config, tokens, run.cfg.context_length))
                 for split, tokens in (("train", prepared.train), ("val", prepared.val))}
    return Evaluator(run.eval_step(), eval_sets, run.cfg.context_length, run.micro_batch, mesh, flops_per_token,
                     peak_flops, run.learning_rate, saved["tokens_seen"] if saved else 0)


def _say_resumed(config: ml_collections.ConfigDict, saved: dict | None, batches: data.BatchSource, say: Any) -> None:
    if saved is None:
        return
    position = batches.position(saved["step"])
    where = f" (epoch {position.epoch + 1}, batch {position.windows_done // config.train.batch_size})" \
        if position else ""
    say(f"Resuming {run_folder(config)} from update {saved['step']}{where}")
    changed = [c for c in changed_settings(saved["config"], config, within=("model", "data", "train"))
               if not c.startswith("train.resume")]
    if changed:
        say(f"Settings changed since that checkpoint: {'; '.join(changed)}")


def _already_trained(config: ml_collections.ConfigDict, run_dir: str, updates: int, total_steps: int,
                     saved: dict, say: Any) -> dict:
    t = config.train
    limit = "max_steps" if t.max_steps and t.max_steps <= total_steps else "num_epochs"
    say(f"{run_dir} is already trained ({updates} updates); raise --config.train.{limit} to train on, or start "
        "fresh with --config.train.resume=False (the run is moved into previous/)")
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    return {"run_dir": run_dir, "updates": updates, "tokens_seen": saved["tokens_seen"]}  # stopped, not finished


def _summarise(config: ml_collections.ConfigDict, run_dir: str, state: Any, loop: _Loop, records: list[dict],
               prepared: corpus.Corpus, say: Any) -> dict:
    """Write summary.json and loss.png (the first process) and say where they are."""
    wall_s = time.time() - loop.evaluator.start_time
    summary = {"run_dir": run_dir, "num_params": count_params(state.params), "updates": int(state.step),
               "tokens_seen": loop.tokens_seen, "wall_s": wall_s, "startup_s": loop.startup_s,
               "compile_s": loop.compile_s, "checkpoint_wait_s": loop.checkpoints.wait_s,
               "data": {"folder": prepared.folder, "fingerprint": prepared.fingerprint}}
    primary = distributed.is_primary()
    if records and primary:
        summary.update(final_train_loss=records[-1]["train_loss"], final_val_loss=records[-1]["val_loss"],
                       best_val_loss=min(r["val_loss"] for r in records),
                       tokens_per_s=float(np.mean([r["tokens_per_s"] for r in records[1:]] or
                                                  [records[0]["tokens_per_s"]])))
        plot_losses(records, os.path.join(run_dir, "loss.png"))
    if primary:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    say(f"Training finished in {wall_s / 60:.2f} minutes ({loop.tokens_seen:,} tokens seen); "
        f"checkpoint, metrics.jsonl and loss.png in {run_dir}")
    return summary


def _make_run_dir(config: ml_collections.ConfigDict) -> str:
    run_dir = run_folder(config)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir} ({e.strerror}); set --config.checkpoint_dir to a "
                        "writable folder") from e
    return run_dir


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`print` for every process of a run but the first."""


def _prepared_corpus(config: ml_collections.ConfigDict, saved: dict | None, say: Any) -> corpus.Corpus:
    """The config's corpus, prepared if it is not yet or is stale, once a resumed checkpoint has said whether it
    may change: a run is never silently continued on other tokens than it was trained on. The first process
    prepares it; the others wait, then open what it wrote."""
    d = config.data
    spec, status = corpus.check(d, config.checkpoint_dir)
    trained_on = (saved or {}).get("data", {}).get("fingerprint")
    refuse = ("; rerun with --config.data.allow_changes=True to train on the corpus as it is now, or start "
              "fresh with --config.train.resume=False") if trained_on and not d.allow_changes else None
    if refuse and status.stale:
        raise UserError(f"the corpus changed since the checkpoint of update {saved['step']} "
                        f"({corpus.describe(status.stale)}){refuse}")
    if refuse and status.meta is not None and status.fingerprint != trained_on:
        raise UserError(f"the tokens in {status.folder} are not those the checkpoint of update {saved['step']} was "
                        f"trained on{refuse}")
    if distributed.is_primary():
        prepared = prepare.ready_corpus(spec, status, d.workers)
    distributed.barrier("prepared")
    if not distributed.is_primary():
        spec, status = corpus.check(d, config.checkpoint_dir)
        prepared = corpus.open_corpus(status.folder, status.meta)
    if refuse and prepared.fingerprint != trained_on:  # it was missing, and prepared again from changed files
        raise UserError(f"the corpus prepared again in {status.folder} is not the one the checkpoint of update "
                        f"{saved['step']} was trained on{refuse}")
    if trained_on and prepared.fingerprint != trained_on:
        say(f"Training on the changed corpus in {status.folder} (--config.data.allow_changes=True)")
    return prepared


def main(config: ml_collections.ConfigDict) -> None:
    train_and_evaluate(config)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

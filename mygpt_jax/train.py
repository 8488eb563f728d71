"""Train GPT-2: `python -m mygpt_jax.train --config configs/verdict.py`.

`train_and_evaluate` reads top to bottom: prepare (or check) the corpus, restore the checkpoint or start
afresh, then one loop counted in steps. Each step trains on the batch of that step (`data.EpochBatches` or
`data.RandomBatches`: a function of the seed and the step), and the loop itself says what happens every N
steps: evaluate and log every `eval_freq`, checkpoint every `checkpoint_every`, a sample after each epoch (or
every `sample_every`). Ctrl-C or SIGTERM saves at the next step boundary; rerunning the same command resumes
and reproduces the losses of an uninterrupted run. The step functions are in `steps.py`.

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
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

import mygpt_jax
from mygpt_jax import backends, checkpoint, corpus, data, distributed, hardware, preemption, prepare, sharding, steps
from mygpt_jax.config import changed_settings, run_folder
from mygpt_jax.errors import Interrupted, UserError
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.metrics import Evaluator, MetricsLog
from mygpt_jax.model import ModelConfig, count_params, init_params, matmul_flops_per_token, pad_vocab
from mygpt_jax.plots import plot_losses
from mygpt_jax.tokenizer import decode, encode

META_FORMAT = 2  # 1 (no "format" key): the epoch and batch position of the in-memory verdict windows


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict:
    """Train as the config says; returns the run summary (also written to <run dir>/summary.json)."""
    t = config.train
    cfg = ModelConfig.from_config(config.model)
    primary = distributed.is_primary()  # every process trains; the first alone writes what a person reads
    say = print if primary else _quiet
    mesh = sharding.make_mesh(config.mesh)
    micro_batch = t.batch_size // t.grad_accum_steps
    sharding.check_fits(cfg, mesh, micro_batch, f"--config.train.batch_size={t.batch_size} / "
                                                f"train.grad_accum_steps={t.grad_accum_steps}")
    run_dir = _make_run_dir(config)
    with checkpoint.RunLock(run_dir) if primary else contextlib.nullcontext():
        saved = _checkpoint_to_resume(config, run_dir, say)
        prepared = _prepared_corpus(config, saved, say)
        for name, split in (("training", prepared.train), ("validation", prepared.val)):
            data.check_split(name, len(split), cfg.context_length, prepared.folder)
        stride = config.data.stride or cfg.context_length
        if config.data.sampling == "epochs":
            batches = data.EpochBatches(prepared.train, cfg.context_length, stride, t.batch_size, t.seed,
                                        _epoch_anchor(saved))
            if batches.steps_per_epoch == 0:
                raise UserError(f"the training split has {len(batches.starts)} windows, fewer than one batch of "
                                f"--config.train.batch_size={t.batch_size}; lower the batch size or use more text")
            total_steps = batches.steps_until_epoch(t.num_epochs)
            total_steps = min(total_steps, t.max_steps) if t.max_steps else total_steps
        else:
            batches = data.RandomBatches(prepared.train, cfg.context_length, t.batch_size, t.seed)
            total_steps = t.max_steps
        # The same windows at every evaluation: the first of each split (epochs), or spread over it (random).
        spread = config.data.sampling == "random"
        eval_sets = {split: (tokens, data.evaluation_windows(tokens, cfg.context_length, stride,
                                                             t.eval_iter * t.batch_size, spread))
                     for split, tokens in (("train", prepared.train), ("val", prepared.val))}

        backend = backends.current()
        model = sharding.model_on(mesh, cfg, backend)
        tx = steps.create_optimizer(t, total_steps)
        lr = steps.learning_rate(t, total_steps)
        state_shardings, batch_sharding = sharding.state_shardings(cfg, mesh, tx), sharding.batch_sharding(mesh)
        init_rng, dropout_rng = jax.random.split(jax.random.key(t.seed))
        dropout_rng = sharding.put(dropout_rng, sharding.replicated(mesh))
        state = _initial_state(config, cfg, tx, init_rng, run_dir, saved, state_shardings, say)
        tokens_seen = saved["tokens_seen"] if saved else 0
        start = int(state.step)
        log = MetricsLog(run_dir, start if saved else None, t.tensorboard, enabled=primary)

        n_params = count_params(state.params)
        flops_per_token = matmul_flops_per_token(cfg)
        peak_flops, peak_name = (hardware.flops_reference(cfg.dtype, t.flops_matmul_size, backend)
                                 if t.flops_matmul_size else (None, None))
        devices = f" on {mesh.size} devices (mesh {_mesh_shape(mesh)})" if mesh.size > 1 else ""
        if config.data.sampling == "epochs":
            say(f"Model: {n_params:,} parameters{devices}; {len(batches.starts)} training and "
                  f"{len(data.window_starts(len(prepared.val), cfg.context_length, stride))} validation windows of "
                  f"{cfg.context_length} tokens; {batches.steps_per_epoch} steps per epoch, {total_steps} in all")
        else:
            say(f"Model: {n_params:,} parameters{devices}; {len(prepared.train):,} training and {len(prepared.val):,} "
                  f"validation tokens, random windows of {cfg.context_length}; {total_steps} steps")
        if peak_flops:
            say(f"Speed: {flops_per_token / 1e9:.3f} GFLOP per token (matmuls only), shown as a fraction of "
                  f"{peak_name}, {peak_flops / 1e9:,.0f} GFLOP/s")

        summary_path = os.path.join(run_dir, "summary.json")
        if start >= total_steps:
            limit = "max_steps" if t.max_steps and t.max_steps <= total_steps else "num_epochs"
            say(f"{run_dir} is already trained ({start} updates); raise --config.train.{limit} to train "
                  "on, or start fresh with --config.train.resume=False")
            if os.path.exists(summary_path):
                with open(summary_path) as f:
                    return json.load(f)
            return {"run_dir": run_dir, "updates": start, "tokens_seen": tokens_seen}  # stopped, not finished

        # One greedy sample of sample.prompt after each epoch (or every sample_every steps); none without a prompt.
        wants_samples = (config.data.sampling == "epochs" and t.sample_every_epoch) or t.sample_every > 0
        sample_prompt = config.sample.prompt if wants_samples else ""
        if wants_samples and not sample_prompt:
            say("No samples during training: --config.sample.prompt is empty")
        settings = dataclasses.replace(SamplingSettings.from_config(config.sample), num_samples=1)
        generator = Generator(dataclasses.replace(cfg, drop_rate=0.0), None, settings, backend)

        eval_step = steps.jit_eval_step(model)
        next_batch = _step_batch(batches, start, t.grad_accum_steps, batch_sharding)
        compile_start = time.time()
        train_step = steps.jit_train_step(model, tx, t.grad_accum_steps, state_shardings=state_shardings,
                                          batch_sharding=batch_sharding).lower(state, next_batch, dropout_rng).compile()
        compile_s = time.time() - compile_start
        distributed.barrier("compiled")  # then every process's first step starts together
        startup_s = time.time() - mygpt_jax.STARTED - compile_s

        saved_step = saved["step"] if saved else None
        epochs = config.data.sampling == "epochs"
        data_meta = {"fingerprint": prepared.fingerprint, "folder": prepared.folder}
        run_meta = {"rng": np.asarray(jax.random.key_data(dropout_rng)).tolist(), "config": config.to_dict()}
        evaluator = Evaluator(eval_step, eval_sets, cfg.context_length, t.batch_size, micro_batch, mesh,
                              flops_per_token, peak_flops, lr, tokens_seen, log.records)
        bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True, disable=None if primary else True,
                   file=sys.stderr)

        with preemption.StopSignals() as stop:
            for step in range(start, total_steps):
                state, metrics = train_step(state, next_batch, dropout_rng)
                tokens_seen += t.batch_size * cfg.context_length
                if step + 1 < total_steps:  # gathered while the device runs the step
                    next_batch = _step_batch(batches, step + 1, t.grad_accum_steps, batch_sharding)
                bar.update(1)
                epoch = batches.position(step).epoch + 1 if epochs else None
                position = {"position": list(batches.position(step + 1)) if epochs else None}

                if step % t.eval_freq == 0:
                    _log(evaluator(state.params, metrics, step, epoch, tokens_seen), log, bar, saved_step, t)
                if (step + 1) % t.checkpoint_every == 0:
                    saved_step = _save(run_dir, state, saved_step, t, {
                        "tokens_seen": tokens_seen, **run_meta, "data": {**data_meta, **position}})
                stopping = stop.should_stop(step)  # every process asks at every step
                if sample_prompt and not stopping and (
                        (epochs and t.sample_every_epoch and batches.ends_epoch(step))
                        or (t.sample_every and (step + 1) % t.sample_every == 0)):
                    distributed.barrier("sample")
                    generator.params = state.params
                    (ids,), _ = generator.generate(encode(sample_prompt), jax.random.key(config.sample.seed))
                    if primary:
                        bar.write((sample_prompt + decode(ids)).replace("\n", " "))
                    generator.params = None  # its copy of the weights is not needed until the next sample
                    evaluator.pause(tokens_seen)
                if stopping and step + 1 < total_steps:  # Ctrl-C or SIGTERM (on any process): save this step, stop
                    saved_step = _save(run_dir, state, saved_step, t, {
                        "tokens_seen": tokens_seen, **run_meta, "data": {**data_meta, **position}})
                    distributed.barrier("saved")  # a process that left early would fail the others mid-save
                    bar.close()
                    log.close()
                    how = {None: "Stopped by a signal to a process of the run", "SIGINT": "Interrupted"}.get(
                        stop.requested, f"Stopped by {stop.requested}")
                    print(f"\n{how}: saved update {saved_step} to {run_dir}; rerun the same command to resume.",
                          file=sys.stderr)
                    raise Interrupted

            if log.records[-1:] and log.records[-1]["update"] != step + 1:  # the final model's losses, too
                _log(evaluator(state.params, metrics, step, epoch, tokens_seen), log, bar, saved_step, t)
            saved_step = _save(run_dir, state, saved_step, t, {
                "tokens_seen": tokens_seen, **run_meta, "data": {**data_meta, **position}})
        bar.close()
        log.close()

        wall_s = time.time() - evaluator.start_time
        summary = {"run_dir": run_dir, "num_params": n_params, "updates": int(state.step), "tokens_seen": tokens_seen,
                   "wall_s": wall_s, "startup_s": startup_s, "compile_s": compile_s,
                   "data": {"folder": prepared.folder, "fingerprint": prepared.fingerprint}}
        records = log.records
        if records and primary:
            summary.update(final_train_loss=records[-1]["train_loss"], final_val_loss=records[-1]["val_loss"],
                           best_val_loss=min(r["val_loss"] for r in records),
                           tokens_per_s=float(np.mean([r["tokens_per_s"] for r in records[1:]] or
                                                      [records[0]["tokens_per_s"]])))
            plot_losses(records, os.path.join(run_dir, "loss.png"))
        if primary:
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=2)
        say(f"Training finished in {wall_s / 60:.2f} minutes ({tokens_seen:,} tokens seen); "
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


def _step_batch(batches: Any, step: int, grad_accum_steps: int, batch_sharding: Any) -> jax.Array:
    """The batch of `step` as (micro-batches, rows, tokens) on the mesh; this process gathers only its rows."""
    starts = batches.starts_of(step).reshape(grad_accum_steps, -1)
    return sharding.device_batch(batches.tokens, starts, batches.context_length, batch_sharding)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`print` for every process of a run but the first."""


def _mesh_shape(mesh: Any) -> str:
    return " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())


# The model keys that shape the parameters: a checkpoint made with other values cannot be restored.
_MODEL_SHAPE = tuple(f"model.{k}" for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                            "qkv_bias", "tie_embeddings", "vocab_multiple"))


def _checkpoint_to_resume(config: ml_collections.ConfigDict, run_dir: str, say: Any) -> dict | None:
    """The meta of the checkpoint to resume from (None: start afresh, deleting the checkpoints of an earlier run
    when train.resume is False); a checkpoint of another model is a UserError."""
    step = checkpoint.latest_step(run_dir)
    if step is not None and not config.train.resume:
        distributed.barrier("found")  # every process has seen the checkpoints before the first deletes them
        if distributed.is_primary():
            checkpoint.delete_all(run_dir)
        distributed.barrier("deleted")
        say(f"Starting fresh (--config.train.resume=False): removed the checkpoints in {run_dir}")
        return None
    if step is None:
        return None
    meta = checkpoint.restore_meta(run_dir, step)
    diff = changed_settings(meta["config"], config, within=_MODEL_SHAPE)
    if diff:
        raise UserError(f"the checkpoint in {run_dir} was trained with another model ({'; '.join(diff)}); "
                        "use another --config.run_name or start fresh with --config.train.resume=False")
    return meta


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


def _epoch_anchor(saved: dict | None) -> tuple[int, int, int]:
    """(step, epoch, windows done in it) where a resumed checkpoint left the epochs; a checkpoint from before
    corpora counted the epoch's position in batches of its own batch size."""
    if saved is None:
        return 0, 0, 0
    if saved.get("format", 1) == 1:
        return saved["step"], saved["epoch"], saved["batch_in_epoch"] * saved["config"]["train"]["batch_size"]
    position = saved["data"].get("position")
    return (saved["step"], *position) if position else (0, 0, 0)


def _pretrained_params(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Any:
    """GPT-2's weights (--config.init_from) for `cfg`: the context cropped, the vocabulary padded."""
    from mygpt_jax.pretrained.load import load_pretrained  # only fine-tuning needs it

    pretrained_cfg, params = load_pretrained(config, config.init_from)
    fields = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings")
    mismatched = [f"model.{f}={getattr(cfg, f)} (checkpoint: {getattr(pretrained_cfg, f)})"
                  for f in fields if getattr(cfg, f) != getattr(pretrained_cfg, f)]
    if mismatched or cfg.context_length > pretrained_cfg.context_length:
        raise UserError(f"--config.init_from={config.init_from} does not fit this model: "
                        f"{', '.join(mismatched) or f'context_length {cfg.context_length}'}; set the model "
                        f"keys as in configs/{config.init_from.lower()}.py")
    params["wpe"]["embedding"] = params["wpe"]["embedding"][:cfg.context_length]  # shorter context: crop
    return pad_vocab(cfg, params)


def _initial_state(config: ml_collections.ConfigDict, cfg: ModelConfig, tx: Any, init_rng: jax.Array,
                   run_dir: str, saved: dict | None, shardings: steps.TrainState, say: Any) -> steps.TrainState:
    """A fresh state, made where its shardings say (never whole on one device first), or the checkpoint's,
    restored onto them whatever mesh saved it; says what was resumed and which settings changed since."""

    if saved is None:
        if config.init_from:
            params = sharding.put(_pretrained_params(config, cfg), shardings.params)
            return jax.jit(lambda p: steps.new_state(p, tx), out_shardings=shardings)(params)
        return steps.init_state(cfg, tx, init_rng, shardings)
    changed = changed_settings(saved["config"], config, within=("model", "data", "train"))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            jax.eval_shape(lambda: steps.new_state(init_params(cfg, init_rng), tx)), shardings)
    try:
        params, opt_state = checkpoint.restore_train_state(run_dir, abstract.params, abstract.opt_state,
                                                           saved["step"])
    except UserError as e:
        if not changed:
            raise
        raise UserError(f"the checkpoint in {run_dir} does not fit settings changed since it was saved "
                        f"({'; '.join(changed[:3])}); rerun with its settings, use another --config.run_name "
                        "or start fresh with --config.train.resume=False") from e
    where = ""
    if config.data.sampling == "epochs":
        _, epoch, windows = _epoch_anchor(saved)
        where = f" (epoch {epoch + 1}, batch {windows // config.train.batch_size})"
    say(f"Resuming {run_dir} from update {saved['step']}{where}")
    if changed:
        say(f"Settings changed since that checkpoint: {'; '.join(changed)}")
    step = sharding.put(jnp.int32(saved["step"]), shardings.step)
    return steps.TrainState(step, params, opt_state)


def _log(record: dict, log: MetricsLog, bar: tqdm, saved_step: int | None, t: ml_collections.ConfigDict) -> None:
    """Log an evaluation and print the seed's line; a loss that is not finite stops the run, unsaved (resuming
    keeps the last good state)."""
    if not np.isfinite([record["batch_loss"], record["train_loss"], record["val_loss"]]).all():
        raise _diverged(f"the loss is {record['train_loss']} at update {record['update']}", saved_step, t)
    log.append(record)
    if not log.enabled:  # a process of a run but its first
        return
    fraction = {} if record["flops_fraction"] is None else {"flops": f"{record['flops_fraction']:.2f}"}
    bar.set_postfix(tok_s=f"{record['tokens_per_s']:.0f}", loss=f"{record['train_loss']:.3f}", **fraction)
    where = f"Ep {record['epoch']} (Step {record['step']:06d})" if record["epoch"] else f"Step {record['step']:06d}"
    bar.write(f"{where}: Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}")


def _diverged(what: str, saved_step: int | None, t: ml_collections.ConfigDict) -> UserError:
    kept = (f"the checkpoint of update {saved_step} is kept; it may have begun to diverge too: "
            "--config.train.resume=False starts over" if saved_step else "nothing was saved")
    return UserError(f"{what}: training diverged ({kept}); lower --config.train.learning_rate (now "
                     f"{t.learning_rate:g}) or clip the gradients (--config.train.grad_clip=1.0)")


def _save(run_dir: str, state: steps.TrainState, saved_step: int | None, t: ml_collections.ConfigDict,
          meta: dict) -> int:
    """Checkpoint the current update with `meta` and return its number, unless it is already saved (a stop right
    after a periodic save) or has diverged (a checkpoint is only ever a state to resume from)."""
    step = int(state.step)
    if step == saved_step:
        return step
    if not steps.all_finite(state.params):
        raise _diverged(f"the parameters are not finite at update {step}", saved_step, t)
    checkpoint.save(run_dir, step, state.params, {"format": META_FORMAT, "step": step, **meta}, state.opt_state,
                    t.max_to_keep)
    return step


def main(config: ml_collections.ConfigDict) -> None:
    train_and_evaluate(config)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

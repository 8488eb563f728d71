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
from mygpt_jax import backends, checkpoint, corpus, data, hardware, prepare, preemption, steps
from mygpt_jax.config import changed_settings, run_folder
from mygpt_jax.errors import Interrupted, UserError
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.metrics import Evaluator, MetricsLog
from mygpt_jax.model import GPT, ModelConfig, count_params, init_params, matmul_flops_per_token
from mygpt_jax.plots import plot_losses
from mygpt_jax.tokenizer import decode, encode

META_FORMAT = 2  # 1 (no "format" key): the epoch and batch position of the in-memory verdict windows


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict:
    """Train as the config says; returns the run summary (also written to <run dir>/summary.json)."""
    t = config.train
    cfg = ModelConfig.from_config(config.model)
    run_dir = _make_run_dir(config)
    with checkpoint.RunLock(run_dir):
        saved = _checkpoint_to_resume(config, run_dir)
        prepared = _prepared_corpus(config, saved)
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
        eval_sets = {split: (tokens, data.evaluation_windows(tokens, cfg.context_length, stride,
                                                             t.eval_iter * t.batch_size, config.data.sampling == "random"))
                     for split, tokens in (("train", prepared.train), ("val", prepared.val))}

        backend = backends.current()
        model = GPT(cfg, backend)
        tx = steps.create_optimizer(t, total_steps)
        lr = steps.learning_rate(t, total_steps)
        init_rng, dropout_rng = jax.random.split(jax.random.key(t.seed))
        state = _initial_state(config, cfg, tx, init_rng, run_dir, saved)
        tokens_seen = saved["tokens_seen"] if saved else 0
        start = int(state.step)
        log = MetricsLog(run_dir, start if saved else None, t.tensorboard)

        n_params = count_params(state.params)
        flops_per_token = matmul_flops_per_token(cfg)
        peak_flops, peak_name = (hardware.flops_reference(cfg.dtype, t.flops_matmul_size, backend)
                                 if t.flops_matmul_size else (None, None))
        if config.data.sampling == "epochs":
            print(f"Model: {n_params:,} parameters; {len(batches.starts)} training and "
                  f"{len(data.window_starts(len(prepared.val), cfg.context_length, stride))} validation windows of "
                  f"{cfg.context_length} tokens; {batches.steps_per_epoch} steps per epoch, {total_steps} in all")
        else:
            print(f"Model: {n_params:,} parameters; {len(prepared.train):,} training and {len(prepared.val):,} "
                  f"validation tokens, random windows of {cfg.context_length}; {total_steps} steps")
        if peak_flops:
            print(f"Speed: {flops_per_token / 1e9:.3f} GFLOP per token (matmuls only), shown as a fraction of "
                  f"{peak_name}, {peak_flops / 1e9:,.0f} GFLOP/s")

        summary_path = os.path.join(run_dir, "summary.json")
        if start >= total_steps:
            limit = "max_steps" if t.max_steps and t.max_steps <= total_steps else "num_epochs"
            print(f"{run_dir} is already trained ({start} updates); raise --config.train.{limit} to train "
                  "on, or start fresh with --config.train.resume=False")
            if os.path.exists(summary_path):
                with open(summary_path) as f:
                    return json.load(f)
            return {"run_dir": run_dir, "updates": start, "tokens_seen": tokens_seen}  # stopped, not finished

        # One greedy sample of sample.prompt after each epoch (or every sample_every steps); none without a prompt.
        wants_samples = (config.data.sampling == "epochs" and t.sample_every_epoch) or t.sample_every > 0
        sample_prompt = config.sample.prompt if wants_samples else ""
        if wants_samples and not sample_prompt:
            print("No samples during training: --config.sample.prompt is empty")
        settings = dataclasses.replace(SamplingSettings.from_config(config.sample), num_samples=1)
        generator = Generator(dataclasses.replace(cfg, drop_rate=0.0), None, settings, backend)

        eval_step = steps.jit_eval_step(model)
        next_batch = batches.batch(start) if start < total_steps else None
        compile_start = time.time()
        train_step = steps.jit_train_step(model, tx, t.grad_accum_steps).lower(
            state, jnp.asarray(next_batch if next_batch is not None else batches.batch(0)), dropout_rng).compile()
        compile_s = time.time() - compile_start
        startup_s = time.time() - mygpt_jax.STARTED - compile_s

        saved_step = saved["step"] if saved else None
        epochs = config.data.sampling == "epochs"
        data_meta = {"fingerprint": prepared.fingerprint, "folder": prepared.folder}
        run_meta = {"rng": np.asarray(jax.random.key_data(dropout_rng)).tolist(), "config": config.to_dict()}
        evaluator = Evaluator(eval_step, eval_sets, cfg.context_length, t.batch_size, t.batch_size // t.grad_accum_steps,
                              flops_per_token, peak_flops, lr, tokens_seen, log.records)
        bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)

        with preemption.StopSignals() as stop:
            for step in range(start, total_steps):
                batch = next_batch
                state, metrics = train_step(state, jnp.asarray(batch), dropout_rng)
                tokens_seen += batch.shape[0] * (batch.shape[1] - 1)
                next_batch = batches.batch(step + 1) if step + 1 < total_steps else None  # while the device runs
                bar.update(1)
                epoch = batches.position(step).epoch + 1 if epochs else None
                position = {"position": list(batches.position(step + 1)) if epochs else None}

                if step % t.eval_freq == 0:
                    _log(evaluator(state.params, metrics, step, epoch, tokens_seen), log, bar, saved_step, t)
                if (step + 1) % t.checkpoint_every == 0:
                    saved_step = _save(run_dir, state, saved_step, t, {
                        "tokens_seen": tokens_seen, **run_meta, "data": {**data_meta, **position}})
                if sample_prompt and not stop.requested and (
                        (epochs and t.sample_every_epoch and batches.ends_epoch(step))
                        or (t.sample_every and (step + 1) % t.sample_every == 0)):
                    generator.params = state.params
                    (ids,), _ = generator.generate(encode(sample_prompt), jax.random.key(config.sample.seed))
                    bar.write((sample_prompt + decode(ids)).replace("\n", " "))
                    generator.params = None  # its copy of the weights is not needed until the next sample
                    evaluator.pause(tokens_seen)
                if stop.requested and step + 1 < total_steps:  # Ctrl-C or SIGTERM: save this step and stop
                    saved_step = _save(run_dir, state, saved_step, t, {
                        "tokens_seen": tokens_seen, **run_meta, "data": {**data_meta, **position}})
                    bar.close()
                    log.close()
                    how = "Interrupted" if stop.requested == "SIGINT" else f"Stopped by {stop.requested}"
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
        if records:
            summary.update(final_train_loss=records[-1]["train_loss"], final_val_loss=records[-1]["val_loss"],
                           best_val_loss=min(r["val_loss"] for r in records),
                           tokens_per_s=float(np.mean([r["tokens_per_s"] for r in records[1:]] or
                                                      [records[0]["tokens_per_s"]])))
            plot_losses(records, os.path.join(run_dir, "loss.png"))
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"Training finished in {wall_s / 60:.2f} minutes ({tokens_seen:,} tokens seen); "
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


# The model keys that shape the parameters: a checkpoint made with other values cannot be restored.
_MODEL_SHAPE = tuple(f"model.{k}" for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                            "qkv_bias", "tie_embeddings"))


def _checkpoint_to_resume(config: ml_collections.ConfigDict, run_dir: str) -> dict | None:
    """The meta of the checkpoint to resume from (None: start afresh, deleting the checkpoints of an earlier run
    when train.resume is False); a checkpoint of another model is a UserError."""
    step = checkpoint.latest_step(run_dir)
    if step is not None and not config.train.resume:
        checkpoint.delete_all(run_dir)
        print(f"Starting fresh (--config.train.resume=False): removed the checkpoints in {run_dir}")
        return None
    if step is None:
        return None
    meta = checkpoint.restore_meta(run_dir, step)
    diff = changed_settings(meta["config"], config, within=_MODEL_SHAPE)
    if diff:
        raise UserError(f"the checkpoint in {run_dir} was trained with another model ({'; '.join(diff)}); "
                        "use another --config.run_name or start fresh with --config.train.resume=False")
    return meta


def _prepared_corpus(config: ml_collections.ConfigDict, saved: dict | None) -> corpus.Corpus:
    """The config's corpus, prepared if it is not yet or is stale, once a resumed checkpoint has said whether it
    may change: a run is never silently continued on other tokens than it was trained on."""
    d = config.data
    spec, status = corpus.check(d, config.checkpoint_dir)
    trained_on = (saved or {}).get("data", {}).get("fingerprint")
    refuse = (f"; rerun with --config.data.allow_changes=True to train on the corpus as it is now, or start "
              f"fresh with --config.train.resume=False") if trained_on and not d.allow_changes else None
    if refuse and status.stale:
        raise UserError(f"the corpus changed since the checkpoint of update {saved['step']} "
                        f"({corpus.describe(status.stale)}){refuse}")
    if refuse and status.meta is not None and status.fingerprint != trained_on:
        raise UserError(f"the tokens in {status.folder} are not those the checkpoint of update {saved['step']} was "
                        f"trained on{refuse}")
    prepared = prepare.ready_corpus(spec, status, d.workers)
    if refuse and prepared.fingerprint != trained_on:  # it was missing, and prepared again from changed files
        raise UserError(f"the corpus prepared again in {status.folder} is not the one the checkpoint of update "
                        f"{saved['step']} was trained on{refuse}")
    if trained_on and prepared.fingerprint != trained_on:
        print(f"Training on the changed corpus in {status.folder} (--config.data.allow_changes=True)")
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


def _initial_params(config: ml_collections.ConfigDict, cfg: ModelConfig, rng: jax.Array) -> Any:
    if not config.init_from:
        return init_params(cfg, rng)
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
    return params


def _initial_state(config: ml_collections.ConfigDict, cfg: ModelConfig, tx: Any, init_rng: jax.Array,
                   run_dir: str, saved: dict | None) -> steps.TrainState:
    """A fresh state, or the checkpoint's, saying what was resumed and which settings changed since."""
    if saved is None:
        params = _initial_params(config, cfg, init_rng)
        return steps.TrainState(jnp.int32(0), params, tx.init(params))
    changed = changed_settings(saved["config"], config, within=("model", "data", "train"))
    abstract = jax.eval_shape(lambda: init_params(cfg, init_rng))
    try:
        params, opt_state = checkpoint.restore_train_state(run_dir, abstract, jax.eval_shape(tx.init, abstract),
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
    print(f"Resuming {run_dir} from update {saved['step']}{where}")
    if changed:
        print(f"Settings changed since that checkpoint: {'; '.join(changed)}")
    return steps.TrainState(jnp.int32(saved["step"]), params, opt_state)


def _log(record: dict, log: MetricsLog, bar: tqdm, saved_step: int | None, t: ml_collections.ConfigDict) -> None:
    """Log an evaluation and print the seed's line; a loss that is not finite stops the run, unsaved (resuming
    keeps the last good state)."""
    if not np.isfinite([record["batch_loss"], record["train_loss"], record["val_loss"]]).all():
        raise _diverged(f"the loss is {record['train_loss']} at update {record['update']}", saved_step, t)
    log.append(record)
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

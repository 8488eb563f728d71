"""Train GPT-2 on a text file: `python -m mygpt_jax.train --config configs/verdict.py`.

The loop reads top to bottom: load the data, build (or restore) the state, then for each epoch run the
jitted `train_step` over shuffled batches, evaluate every `eval_freq` steps, checkpoint every
`checkpoint_every` steps, and print a greedy sample at the end of the epoch. Ctrl-C saves a checkpoint;
rerunning the same command resumes from it and produces the same losses as an uninterrupted run.

Step numbering follows the seed: "Step N" is printed after the (N+1)-th parameter update.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from mygpt_jax import backends, checkpoint, data, hardware
from mygpt_jax.config import changed_settings
from mygpt_jax.errors import Interrupted, UserError
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.model import GPT, ModelConfig, count_params, init_params, matmul_flops_per_token
from mygpt_jax.plots import plot_losses
from mygpt_jax.tokenizer import decode, encode


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of parameter updates done
    params: Any
    opt_state: Any


def create_optimizer(t: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW, with optional warmup + cosine decay and global-norm gradient clipping."""
    lr: optax.ScalarOrSchedule = t.learning_rate
    if t.warmup_steps > 0:  # the first update at learning_rate / warmup_steps (at 0 it would change nothing)
        lr = optax.warmup_cosine_decay_schedule(
            t.learning_rate / t.warmup_steps, t.learning_rate, t.warmup_steps, max(total_steps, t.warmup_steps + 1),
            end_value=t.learning_rate * t.min_lr_ratio)
    adamw = optax.adamw(lr, b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay,
                        mask=_matrices if t.weight_decay_params == "matrices" else None)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


def _matrices(params: Any) -> Any:
    """The weight-decay mask of train.weight_decay_params="matrices": weights and embeddings, not the 1-D
    biases and LayerNorm parameters."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


@jax.jit
def _all_finite(params: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(params)]))


def loss_fn(model: GPT, params: Any, batch: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Mean next-token cross-entropy of a batch of windows (batch, context_length + 1)."""
    rngs = None if rng is None else {"dropout": rng}
    logits, _ = model.apply({"params": params}, batch[:, :-1], deterministic=rng is None, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(model: GPT, tx: optax.GradientTransformation,
                    grad_accum_steps: int) -> Callable[[TrainState, jax.Array, jax.Array], tuple]:
    """A pure step (state, batch, rng) -> (state, metrics); the dropout key is fold_in(rng, step).

    With grad_accum_steps > 1 the batch is split into that many micro-batches whose gradients are
    averaged inside the same compiled function (lax.scan), before one optimizer update.
    """
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(model, p, b, r))

    def train_step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state.step)
        if grad_accum_steps == 1:
            loss, grads = grad_fn(state.params, batch, rng)
        else:
            micro = batch.reshape(grad_accum_steps, -1, batch.shape[-1])

            def accumulate(carry, xs):
                i, b = xs
                loss, grads = grad_fn(state.params, b, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
            loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def jit_train_step(model: GPT, tx: optax.GradientTransformation, grad_accum_steps: int,
                   profile: bool = False) -> Callable:
    """The train step as training runs it (and the bench times it): jitted whole, the state donated.
    `profile=True` compiles it to record every XLA op in a profiler trace (`Backend.jit_options`)."""
    return jax.jit(make_train_step(model, tx, grad_accum_steps), donate_argnums=(0,),
                   **model.backend.jit_options(profile))


def evaluate(eval_step: Callable, params: Any, windows: np.ndarray, batch_size: int, max_batches: int) -> float:
    """Mean of per-batch mean losses over the first `max_batches` batches (the seed's calc_loss_loader)."""
    losses = [eval_step(params, jnp.asarray(b)) for b, _ in
              zip(data.iterate_batches(windows, batch_size), range(max_batches))]
    return float(np.mean(jax.device_get(losses)))


def _initial_params(config: ml_collections.ConfigDict, cfg: ModelConfig, rng: jax.Array) -> Any:
    if not config.init_from:
        return init_params(cfg, rng)
    from mygpt_jax.pretrained.load import load_gpt2, size_from_name  # only fine-tuning needs it

    pretrained_cfg, params = load_gpt2(size_from_name(config.init_from), checkpoint_dir=config.checkpoint_dir,
                                       weights_dir=config.weights_dir,
                                       base_urls=config.weights_urls.split(","))
    fields = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings")
    mismatched = [f"model.{f}={getattr(cfg, f)} (checkpoint: {getattr(pretrained_cfg, f)})"
                  for f in fields if getattr(cfg, f) != getattr(pretrained_cfg, f)]
    if mismatched or cfg.context_length > pretrained_cfg.context_length:
        raise UserError(f"--config.init_from={config.init_from} does not fit this model: "
                        f"{', '.join(mismatched) or f'context_length {cfg.context_length}'}; set the model "
                        f"keys as in configs/{config.init_from.lower()}.py")
    params["wpe"]["embedding"] = params["wpe"]["embedding"][:cfg.context_length]  # shorter context: crop
    return params


# The model keys that shape the parameters: a checkpoint made with other values cannot be restored.
_MODEL_SHAPE = tuple(f"model.{k}" for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                            "qkv_bias", "tie_embeddings"))


def _check_same_model(saved_config: dict, config: ml_collections.ConfigDict, run_dir: str) -> None:
    diff = changed_settings(saved_config, config, within=_MODEL_SHAPE)
    if diff:
        raise UserError(f"the checkpoint in {run_dir} was trained with another model ({'; '.join(diff)}); "
                        "use another --config.run_name or start fresh with --config.train.resume=False")


class _InterruptsBetweenSteps:
    """Hold Ctrl-C until the end of the block: a step, its evaluation and its checkpoint are never cut in half
    (an interrupt inside an evaluation would save a step whose metrics were never logged)."""

    def __enter__(self) -> "_InterruptsBetweenSteps":
        self.received = False
        self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self.received = True

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self.previous)
        if self.received and exc_type is None:  # an error leaving the block wins: it may forbid the save
            raise KeyboardInterrupt


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: str, step: int) -> list[dict]:
    """Keep only records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [r for r in map(json.loads, f) if r["update"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict:
    """Train as the config says; returns the run summary (also written to <run dir>/summary.json)."""
    t = config.train
    cfg = ModelConfig.from_config(config.model)
    splits = data.load_splits(config.data.path, config.data.train_ratio, cfg.context_length, config.data.stride)
    steps_per_epoch = data.num_batches(len(splits.train), t.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {len(splits.train)} windows, fewer than one batch of "
                        f"--config.train.batch_size={t.batch_size}; lower the batch size or use more text")
    total_steps = steps_per_epoch * t.num_epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    backend = backends.current()
    model = GPT(cfg, backend)
    tx = create_optimizer(t, total_steps)
    train_step = jit_train_step(model, tx, t.grad_accum_steps)
    eval_step = jax.jit(lambda p, b: loss_fn(model, p, b, None), **backend.jit_options())
    init_rng, dropout_rng = jax.random.split(jax.random.key(t.seed))

    run_dir = os.path.join(config.checkpoint_dir, config.run_name)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir} ({e.strerror}); set --config.checkpoint_dir to a "
                        "writable folder") from e
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    resume_step = checkpoint.latest_step(run_dir)
    if resume_step is not None and not t.resume:
        checkpoint.delete_all(run_dir)
        print(f"Starting fresh (--config.train.resume=False): removed the checkpoints in {run_dir}")
        resume_step = None
    if resume_step is None:
        params = _initial_params(config, cfg, init_rng)
        state = TrainState(jnp.int32(0), params, tx.init(params))
        epoch, batch_in_epoch, tokens_seen, records = 0, 0, 0, []
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    else:
        meta = checkpoint.restore_meta(run_dir, resume_step)
        _check_same_model(meta["config"], config, run_dir)
        changed = changed_settings(meta["config"], config, within=("model", "data", "train"))
        abstract = jax.eval_shape(lambda: init_params(cfg, init_rng))
        abstract_opt = jax.eval_shape(tx.init, abstract)
        try:
            params, opt_state = checkpoint.restore_train_state(run_dir, abstract, abstract_opt, resume_step)
        except UserError as e:
            if not changed:
                raise
            raise UserError(f"the checkpoint in {run_dir} does not fit settings changed since it was saved "
                            f"({'; '.join(changed[:3])}); rerun with its settings, use another --config.run_name "
                            "or start fresh with --config.train.resume=False") from e
        state = TrainState(jnp.int32(meta["step"]), params, opt_state)
        epoch, batch_in_epoch, tokens_seen = meta["epoch"], meta["batch_in_epoch"], meta["tokens_seen"]
        # The windows of this epoch already trained on, counted in batches of the batch size used now.
        batch_in_epoch = batch_in_epoch * meta["config"]["train"]["batch_size"] // t.batch_size
        records = _truncate_metrics(metrics_path, meta["step"])
        print(f"Resuming {run_dir} from update {meta['step']} (epoch {epoch + 1}, batch {batch_in_epoch})")
        if changed:
            print(f"Settings changed since that checkpoint: {'; '.join(changed)}")

    n_params = count_params(state.params)
    flops_per_token = matmul_flops_per_token(cfg)
    peak_flops, peak_name = (hardware.flops_reference(cfg.dtype, t.flops_matmul_size, backend) if t.flops_matmul_size
                             else (None, None))
    print(f"Model: {n_params:,} parameters; {len(splits.train)} training and {len(splits.val)} validation "
          f"windows of {cfg.context_length} tokens; {steps_per_epoch} steps per epoch, {total_steps} in all")
    if peak_flops:
        print(f"Speed: {flops_per_token / 1e9:.3f} GFLOP per token (matmuls only), shown as a fraction of "
              f"{peak_name}, {peak_flops / 1e9:,.0f} GFLOP/s")

    saved_step = resume_step

    def diverged(what: str) -> UserError:
        kept = (f"the checkpoint of update {saved_step} is kept; it may have begun to diverge too: "
                "--config.train.resume=False starts over" if saved_step else "nothing was saved")
        return UserError(f"{what}: training diverged ({kept}); lower --config.train.learning_rate (now "
                         f"{t.learning_rate:g}) or clip the gradients (--config.train.grad_clip=1.0)")

    def save() -> None:
        """Checkpoint the current update, unless it is already saved (Ctrl-C right after a periodic save) or
        has diverged (a checkpoint is only ever a state to resume from)."""
        nonlocal saved_step
        if int(state.step) == saved_step:
            return
        if not _all_finite(state.params):
            raise diverged(f"the parameters are not finite at update {int(state.step)}")
        meta = {"step": int(state.step), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "tokens_seen": tokens_seen, "rng": np.asarray(jax.random.key_data(dropout_rng)).tolist(),
                "config": config.to_dict()}
        checkpoint.save(run_dir, int(state.step), state.params, meta, state.opt_state, t.max_to_keep)
        saved_step = int(state.step)

    # One sample of sample.prompt after each epoch; an empty prompt (the GPT-2 configs': chat) means none.
    sample_prompt = config.sample.prompt if t.sample_every_epoch else ""
    if t.sample_every_epoch and not sample_prompt:
        print("No sample after each epoch: --config.sample.prompt is empty")
    settings = dataclasses.replace(SamplingSettings.from_config(config.sample), num_samples=1)
    generator = Generator(dataclasses.replace(cfg, drop_rate=0.0), None, settings, backend)
    start_time = mark_time = time.time()
    mark_tokens = tokens_seen
    def log_evaluation(metrics: dict, epoch_number: int) -> None:
        """Evaluate, print the seed's line, append to metrics.jsonl; tokens/s counts training time alone."""
        nonlocal mark_time, mark_tokens
        batch_loss = float(metrics["loss"])  # waits for the steps so far: the timing is exact
        if tokens_seen > mark_tokens:
            tokens_per_s = (tokens_seen - mark_tokens) / max(time.time() - mark_time, 1e-9)
        else:  # no step since the last measurement (the final evaluation right after an epoch's sample)
            tokens_per_s = records[-1]["tokens_per_s"]
        train_loss = evaluate(eval_step, state.params, splits.train, t.batch_size, t.eval_iter)
        val_loss = evaluate(eval_step, state.params, splits.val, t.batch_size, t.eval_iter)
        if not np.isfinite([batch_loss, train_loss, val_loss]).all():  # not saved: resuming keeps the last good state
            raise diverged(f"the loss is {train_loss} at update {update}")
        record = {"update": update, "step": update - 1, "epoch": epoch_number, "tokens_seen": tokens_seen,
                  "train_loss": train_loss, "val_loss": val_loss, "batch_loss": batch_loss,
                  "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flops_per_token / 1e12,
                  "flops_fraction": tokens_per_s * flops_per_token / peak_flops if peak_flops else None,
                  "time_s": time.time() - start_time}
        records.append(record)
        _append_jsonl(metrics_path, record)
        bar.set_postfix(tok_s=f"{tokens_per_s:.0f}", loss=f"{train_loss:.3f}",
                        **({"flops": f"{record['flops_fraction']:.2f}"} if peak_flops else {}))
        bar.write(f"Ep {record['epoch']} (Step {update - 1:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        mark_time, mark_tokens = time.time(), tokens_seen

    update = int(state.step)
    summary_path = os.path.join(run_dir, "summary.json")
    if update >= total_steps:
        limit = "max_steps" if t.max_steps and t.max_steps < steps_per_epoch * t.num_epochs else "num_epochs"
        print(f"{run_dir} is already trained ({update} updates); raise --config.train.{limit} to train "
              "on, or start fresh with --config.train.resume=False")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                return json.load(f)
    bar = tqdm(total=total_steps, initial=update, unit="step", dynamic_ncols=True, disable=None,
               file=sys.stderr)
    try:
        while epoch < t.num_epochs and update < total_steps:
            order = data.epoch_order(len(splits.train), t.seed, epoch)
            for batch in data.iterate_batches(splits.train, t.batch_size, order, drop_last=True,
                                              start=batch_in_epoch):
                with _InterruptsBetweenSteps():
                    state, metrics = train_step(state, jnp.asarray(batch), dropout_rng)
                    update += 1  # a host-side copy of state.step: reading the device's would sync
                    batch_in_epoch += 1
                    tokens_seen += batch.shape[0] * (batch.shape[1] - 1)
                    bar.update(1)
                    if (update - 1) % t.eval_freq == 0:
                        log_evaluation(metrics, epoch + 1)
                    if update % t.checkpoint_every == 0:
                        save()
                    if update >= total_steps:
                        break
            if batch_in_epoch >= steps_per_epoch:
                with _InterruptsBetweenSteps():
                    if sample_prompt:
                        generator.params = state.params
                        (ids,), _ = generator.generate(encode(sample_prompt), jax.random.key(config.sample.seed))
                        bar.write((sample_prompt + decode(ids)).replace("\n", " "))
                        generator.params = None  # its copy of the weights is not needed until the next sample
                        mark_time, mark_tokens = time.time(), tokens_seen
                epoch, batch_in_epoch = epoch + 1, 0
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"\nInterrupted: saved update {int(state.step)} to {run_dir}; rerun the same command to resume.",
              file=sys.stderr)
        raise Interrupted from None
    if update > (resume_step or 0):
        with _InterruptsBetweenSteps():
            if records[-1:] and records[-1]["update"] != update:  # the final model's losses, too
                log_evaluation(metrics, epoch if batch_in_epoch == 0 else epoch + 1)
            save()
    bar.close()

    wall_s = time.time() - start_time
    summary = {"run_dir": run_dir, "num_params": n_params, "updates": int(state.step),
               "tokens_seen": tokens_seen, "wall_s": wall_s}
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


def main(config: ml_collections.ConfigDict) -> None:
    train_and_evaluate(config)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

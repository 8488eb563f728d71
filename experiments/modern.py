"""The modern recipe, switch by switch (docs/modern.md): GPT-2's architecture and AdamW against each change since 2019
alone, all of them together, and Muon against AdamW each at its best of three learning rates.

    python -m mygpt_jax.experiments experiments/modern.py --dry-run   # the 17 runs, nothing trained
    python -m mygpt_jax.experiments experiments/modern.py             # about 80 minutes on 2 CPU cores
    python -m mygpt_jax.experiments experiments/modern_confirm.py     # then: the recipe on a seed it was not chosen on

On configs/pystdlib.py's corpus (the Python standard library), one size and one token budget for every run: emb_dim
256, 8 layers, 4 heads of 64 (GPT-2's head size; the rotary switch needs it even), context 128, 16 windows a step,
120 steps (245,760 tokens, warmup 20, cosine to a tenth), validation every 20 steps on 2 batches (the same 32
windows for every run, so runs are compared on the same text). Why this size: at GPT-2's 50,257-token vocabulary
the tied embedding is 12.9M parameters whatever the blocks are; pystdlib's 4 layers make the blocks 3.1M of 16M
(20%), so any switch inside them could only move a fifth of the model. 8 layers give the blocks 6.3M of 19.2M
parameters (33%), about a third of the matrix FLOPs (118 MFLOP a token). On the development machine's 2 cores a
step takes about 2 s (about 1,000 tokens/s), so a run takes about 4.5 minutes and the 17 about 80: the budget of
4 hours is a ceiling, and 120 steps leave room for the confirmation runs and the test suite on the same two cores
in one working session. Shorter contexts keep attention cheap. One seed per variant, seed 1 (the issue's budget:
two for the baseline and the recipe, the second in experiments/modern_confirm.py). Runs
resume across sessions; rerunning skips finished ones. `bench` gives the tokens/s of each switch on an idle
machine (the sweep's own tokens/s are those of a shared one).

    python experiments/modern.py checkpoints/experiments/modern   # after it: the steps each run needs to reach the
                                                                  # baseline's final validation loss (interpolated)
"""

import itertools

BASE = "configs/pystdlib.py"
_size = {"model.n_layers": 8, "model.context_length": 128, "train.max_steps": 120, "train.warmup_steps": 20,
        "train.eval_freq": 20, "train.eval_iter": 2, "train.checkpoint_every": 40, "train.sample_every": 0}
_muon = {"train.optimizer": "muon"}
_all = {"model.position": "rope", "model.norm": "rmsnorm", "model.qk_norm": True, "model.mlp": "relu2",
       "model.bias": False, "model.zero_init_proj": True, "model.logit_softcap": 15.0, **_muon}
VARIANTS = {name: {**_size, **switches} for name, switches in {
    "gpt2": {},  # the baseline: AdamW 1e-3, pystdlib's measured rate
    "rope": {"model.position": "rope"},
    "rmsnorm": {"model.norm": "rmsnorm"},
    "qk_norm": {"model.qk_norm": True},
    "relu2": {"model.mlp": "relu2"},
    "all": _all,  # then what decides the recipe and the goal: everything together, Muon's and AdamW's rates
    "muon_lr0.02": {**_muon, "train.muon_learning_rate": 0.02},
    "muon_lr0.01": {**_muon, "train.muon_learning_rate": 0.01},
    "muon_lr0.04": {**_muon, "train.muon_learning_rate": 0.04},
    "adamw_lr2e-3": {"train.learning_rate": 2e-3},
    "adamw_lr5e-4": {"train.learning_rate": 5e-4},
    "swiglu": {"model.mlp": "swiglu"},
    "gqa": {"model.n_kv_heads": 2},
    "no_bias": {"model.bias": False},
    "zero_init_proj": {"model.zero_init_proj": True},
    "softcap": {"model.logit_softcap": 15.0},
    "all_but_qk_norm": {k: v for k, v in _all.items() if k != "model.qk_norm"},  # the one switch worse alone
}.items()}
SEEDS = [1]
METRICS = ["best_val_loss", "final_val_loss", "num_params", "tokens_per_s", "wall_s"]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first update at which a validation curve [(update, loss)] reaches `target`, interpolated linearly between
    evaluations; None if it never does."""
    for (u0, l0), (u1, l1) in itertools.pairwise(curve):
        if l1 <= target:
            return u1 if l0 == l1 else u0 + (l0 - target) / (l0 - l1) * (u1 - u0)
    return None


def non_embedding_params(run_dir: str) -> int:
    """The parameters outside the token and position tables, of the model the run's newest checkpoint holds."""
    import jax
    import ml_collections

    from mygpt_jax.checkpoint import restore_meta
    from mygpt_jax.model import ModelConfig, count_params, init_params

    cfg = ModelConfig.from_config(ml_collections.ConfigDict(restore_meta(run_dir)["config"]["model"]))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return count_params(params) - sum(params[table]["embedding"].size for table in ("wte", "wpe") if table in params)


if __name__ == "__main__":  # python experiments/modern.py DIR: each run's steps to the baseline's final val loss
    import json
    import sys
    from pathlib import Path

    sweep = Path(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/experiments/modern")
    curves = {}
    for summary in sorted(sweep.glob("*/summary.json")):  # the finished runs
        metrics = summary.parent / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        curves[metrics.parent.name] = [(r["update"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    baseline = next((curve for name, curve in curves.items() if name.startswith("gpt2-")), None)
    if baseline is None:
        sys.exit(f"error: no finished gpt2-s* run in {sweep}; run the sweep first")
    target = baseline[-1][1]
    print(f"| run | non-embedding parameters | final val loss | best val loss | steps to {target:.3f} (the "
          "baseline's final) |\n| --- | --- | --- | --- | --- |")
    for name, curve in curves.items():
        steps = steps_to_reach(curve, target)
        print(f"| {name} | {non_embedding_params(str(sweep / name)) / 1e6:.2f}M | {curve[-1][1]:.3f} | "
              f"{min(loss for _, loss in curve):.3f} | {'never' if steps is None else f'{steps:.0f}'} |")

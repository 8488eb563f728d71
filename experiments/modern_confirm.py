"""The modern recipe confirmed on a seed it was not chosen on (docs/modern.md): configs/pystdlib_modern.py against
GPT-2's architecture and AdamW, at experiments/modern.py's size and budget, seed 2 (that sweep chose on seed 1).

    python -m mygpt_jax.experiments experiments/modern_confirm.py    # 2 runs, about 10 minutes on 2 CPU cores
"""

BASE = "configs/pystdlib_modern.py"
_size = {"model.n_layers": 8, "model.context_length": 128, "train.max_steps": 120, "train.warmup_steps": 20,
        "train.eval_freq": 20, "train.eval_iter": 2, "train.checkpoint_every": 40, "train.sample_every": 0}
_gpt2 = {"model.position": "learned", "model.norm": "layernorm", "model.qk_norm": False, "model.mlp": "gelu",
        "model.bias": True, "model.zero_init_proj": False, "model.logit_softcap": 0.0, "train.optimizer": "adamw"}
VARIANTS = {"gpt2": {**_size, **_gpt2}, "recipe": _size}
SEEDS = [2]
METRICS = ["best_val_loss", "final_val_loss", "num_params", "tokens_per_s", "wall_s"]

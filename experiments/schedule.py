"""Schedule: a constant learning rate (the seed) against linear warmup + cosine decay and gradient clipping.

The warmup lasts 18 updates (20% of the 90), the cosine decays to 10% of the peak (train.min_lr_ratio),
clipping bounds the global gradient norm at 1.0; the peak rate is train.learning_rate (4e-4 unless
overridden) throughout.

    python -m mygpt_jax.experiments experiments/schedule.py --quick   # on a CPU (its time: experiments/README.md)
    python -m mygpt_jax.experiments experiments/schedule.py           # GPT-2 124M shape: a GPU job

--quick trains the reduced model of QUICK: emb_dim 256, 4 layers, 4 heads (29.0M parameters, 25.7M of
them in the token embedding and the output head), and estimates the training loss on 1 batch instead of 5
(the validation split is a single batch either way). Everything else is configs/verdict.py: context 256,
batch 2, dropout 0.1, 10 epochs (90 updates).
"""

BASE = "configs/verdict.py"
VARIANTS = {
    "constant": {},
    "clip": {"train.grad_clip": 1.0},
    "warmup-cosine": {"train.warmup_steps": 18},
    "warmup-cosine-clip": {"train.warmup_steps": 18, "train.grad_clip": 1.0},
}
SEEDS = [1, 2]
QUICK = ["--config.model.emb_dim=256", "--config.model.n_layers=4", "--config.model.n_heads=4",
         "--config.train.eval_iter=1"]

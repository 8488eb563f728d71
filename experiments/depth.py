"""Depth: the number of transformer blocks, at a fixed width.

    python -m mygpt_jax.experiments experiments/depth.py --quick   # on a CPU (its time: experiments/README.md)
    python -m mygpt_jax.experiments experiments/depth.py           # 768 wide, 1 to 8 blocks: a GPU job

--quick uses the width of QUICK (emb_dim 256, 4 heads) and estimates the training loss on 1 batch
instead of 5 (the validation split is a single batch either way). Everything else is
configs/verdict.py: context 256, batch 2, AdamW 4e-4, dropout 0.1, 10 epochs (90 updates).
"""

BASE = "configs/verdict.py"
GRID = {"model.n_layers": [1, 2, 4, 8]}
SEEDS = [1, 2]
QUICK = ["--config.model.emb_dim=256", "--config.model.n_heads=4", "--config.train.eval_iter=1"]

"""Width: the embedding size emb_dim at a fixed depth, with 4 heads (the head dimension grows with it).

    python -m mygpt_jax.experiments experiments/width.py --quick   # on a CPU (its time: experiments/README.md)
    python -m mygpt_jax.experiments experiments/width.py           # 12 blocks of each width: a GPU job

--quick uses the depth of QUICK (4 blocks) and estimates the training loss on 1 batch instead of 5
(the validation split is a single batch either way). Everything else is configs/verdict.py:
context 256, batch 2, AdamW 4e-4, dropout 0.1, 10 epochs (90 updates).
"""

BASE = "configs/verdict.py"
VARIANTS = {
    "emb128": {"model.emb_dim": 128, "model.n_heads": 4},
    "emb256": {"model.emb_dim": 256, "model.n_heads": 4},
    "emb512": {"model.emb_dim": 512, "model.n_heads": 4},
}
SEEDS = [1, 2]
QUICK = ["--config.model.n_layers=4", "--config.train.eval_iter=1"]

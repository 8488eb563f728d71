"""Learning rate: AdamW's constant rate, from the seed's 4e-4 up to eight times as much.

    python -m mygpt_jax.experiments experiments/learning_rate.py --quick   # on a CPU (its time: experiments/README.md)
    python -m mygpt_jax.experiments experiments/learning_rate.py           # GPT-2 124M shape: a GPU job

--quick trains the reduced model of QUICK: emb_dim 256, 4 layers, 4 heads (29.0M parameters, 25.7M of
them in the token embedding and the output head), and estimates the training loss on 1 batch instead
of 5 (the validation split is a single batch either way). Everything else is configs/verdict.py:
context 256, batch 2, 10 epochs (90 updates), dropout 0.1, PyTorch-style initialisation.
"""

BASE = "configs/verdict.py"
GRID = {"train.learning_rate": [4e-4, 8e-4, 1.6e-3, 3.2e-3]}
SEEDS = [1, 2]
QUICK = ["--config.model.emb_dim=256", "--config.model.n_layers=4", "--config.model.n_heads=4",
         "--config.train.eval_iter=1"]

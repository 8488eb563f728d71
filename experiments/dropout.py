"""Dropout: does dropout help a model that reads The Verdict's 4,600 training tokens ten times?

    python -m mygpt_jax.experiments experiments/dropout.py --quick   # on a CPU (its time: experiments/README.md)
    python -m mygpt_jax.experiments experiments/dropout.py           # GPT-2 124M shape: a GPU job

--quick trains the reduced model of QUICK: emb_dim 256, 4 layers, 4 heads (29.0M parameters, 25.7M of
them in the token embedding and the output head), and estimates the training loss on 1 batch instead of 5
(the validation split is a single batch either way). Everything else is configs/verdict.py: context 256,
batch 2, AdamW 4e-4, 10 epochs (90 updates), PyTorch-style initialisation.
"""

BASE = "configs/verdict.py"
GRID = {"model.drop_rate": [0.0, 0.1, 0.2]}
SEEDS = [1, 2]
QUICK = ["--config.model.emb_dim=256", "--config.model.n_layers=4", "--config.model.n_heads=4",
         "--config.train.eval_iter=1"]

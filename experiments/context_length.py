"""Context length: windows of 64 to 512 tokens, with the same batch of 2 windows.

Each epoch still covers the whole training text once, so shorter windows mean more, smaller updates
(36 per epoch at 64 tokens, 4 at 512); the validation split is cut into windows of the same length
and evaluated whole (1 to 4 batches).

    python -m mygpt_jax.experiments experiments/context_length.py --quick   # on a CPU (its time: experiments/README.md)
    python -m mygpt_jax.experiments experiments/context_length.py           # GPT-2 124M shape: a GPU job

--quick trains the reduced model of QUICK: emb_dim 256, 4 layers, 4 heads (29M parameters). Everything
else is configs/verdict.py: batch 2, AdamW 4e-4, dropout 0.1, 10 epochs.
"""

BASE = "configs/verdict.py"
GRID = {"model.context_length": [64, 128, 256, 512]}
SEEDS = [1, 2]
QUICK = ["--config.model.emb_dim=256", "--config.model.n_layers=4", "--config.model.n_heads=4"]

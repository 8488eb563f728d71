"""The verdict run, tuned by ablation: a smaller model trained at twice the seed's learning rate.

python -m mygpt_jax.train --config configs/verdict_tuned.py

Against configs/verdict.py only two things change: the model is emb_dim 256, 4 layers, 4 heads (29.0M
parameters instead of 162.4M, 25.7M of them in the token embedding and the output head), and AdamW runs
at 8e-4 instead of 4e-4 (the learning_rate sweep's best at this size). The other sweeps kept the seed's
choices: a constant rate (schedule), dropout 0.1 (0.0-0.2 were equal), an untied head (weight_tying),
no qkv bias (qkv_bias: no difference). Everything else is the seed's: context 256, batch 2, 10 epochs,
PyTorch-style initialisation, seed 123, evaluation every 5 updates. Measured results: experiments/README.md.
"""

from mygpt_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "verdict_tuned"
    c.model.init_scheme = "pytorch"  # as configs/verdict.py
    c.model.emb_dim = 256
    c.model.n_heads = 4
    c.model.n_layers = 4
    c.train.learning_rate = 8e-4
    return c

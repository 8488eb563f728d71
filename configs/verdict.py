"""The seed run: GPT-2 124M architecture, context 256, trained from scratch on "The Verdict".

python -m mygpt_jax.train --config configs/verdict.py
"""

from mygpt_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "verdict"
    # The seed was a PyTorch model with PyTorch's default initialisation (N(0, 1) embeddings,
    # U(+-1/sqrt(fan_in)) linear layers); GPT-2's N(0, 0.02) learns far slower in 90 steps at lr 4e-4.
    c.model.init_scheme = "pytorch"
    # Everything else is the seed's setting and the default: 768/12/12, context 256, dropout 0.1,
    # no qkv bias, untied head; batch 2, AdamW lr 4e-4, weight decay 0.1, 10 epochs, eval every 5
    # steps on 5 batches, seed 123, start context "Every effort moves you".
    return c

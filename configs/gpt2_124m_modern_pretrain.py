"""GPT-2 124M's size from scratch with the modern recipe (docs/modern.md), beside configs/gpt2_124m_pretrain.py.

python -m mygpt_jax.prepare --config configs/gpt2_124m_modern_pretrain.py --config.data.path=/data/fineweb   # once
python -m mygpt_jax.train --config configs/gpt2_124m_modern_pretrain.py --config.data.path=/data/fineweb

For a GPU: configs/gpt2_124m_pretrain.py's width, depth, context, batch and schedule (its docstring), with rotary
positions, RMSNorm, QK-norm, a ReLU² MLP, no biases, zero-initialised output projections, logits soft-capped at
15, the vocabulary padded to 50304 rows, and Muon (0.02, momentum 0.95) for the attention and MLP matrices beside
AdamW (6e-4) for the embedding; the values of the modded-nanogpt speedrun and nanochat, not measured here. Muon
needs far fewer steps than AdamW in the speedrun: shorten train.max_steps (with the cosine's end) to taste.
"""

import os

from mygpt_jax.overrides import load_module

# The config this one changes and the recipe's switches, beside it (config files are read by path, not as a package).
gpt2_124m_pretrain = load_module(os.path.join(os.path.dirname(__file__), "gpt2_124m_pretrain.py"),
                                 "the config configs/gpt2_124m_pretrain.py")
pystdlib_modern = load_module(os.path.join(os.path.dirname(__file__), "pystdlib_modern.py"),
                              "the config configs/pystdlib_modern.py")


def get_config():
    c = pystdlib_modern.recipe(gpt2_124m_pretrain.get_config())
    c.run_name = "gpt2_124m_modern_pretrain"
    c.model.qkv_bias = False
    c.model.vocab_multiple = 128
    return c

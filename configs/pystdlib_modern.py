"""configs/pystdlib.py's model and corpus with the modern recipe (docs/modern.md): what GPT-2 codebases changed since
2019, switched on together.

python -m mygpt_jax.train --config configs/pystdlib_modern.py

Rotary positions instead of the learned table, RMSNorm, QK-norm, a ReLU² MLP, no biases, output projections that
start at zero, logits soft-capped at 15, and Muon (learning rate 0.02) for the attention and MLP matrices with
AdamW for the tied embedding and the gains: modded-nanogpt's and nanochat's choices, and the best that
experiments/modern.py measured on this corpus (against each switch alone, the same without QK-norm, and Muon at
0.01 and 0.04; docs/modern.md has the table and the seed it was confirmed on).
"""

import os

from mygpt_jax.overrides import load_module

# The config this one changes, beside it (loaded by path: config files are read by path, not as a package).
pystdlib = load_module(os.path.join(os.path.dirname(__file__), "pystdlib.py"), "the config configs/pystdlib.py")


def recipe(c):
    """Switch the modern recipe on in config `c` (configs/gpt2_124m_modern_pretrain.py applies it too)."""
    m = c.model
    m.position = "rope"
    m.norm = "rmsnorm"
    m.qk_norm = True
    m.mlp = "relu2"
    m.bias = False
    m.zero_init_proj = True
    m.logit_softcap = 15.0
    c.train.optimizer = "muon"
    c.train.muon_learning_rate = 0.02
    return c


def get_config():
    c = recipe(pystdlib.get_config())
    c.run_name = "pystdlib_modern"
    return c

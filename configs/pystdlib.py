"""A small GPT-2 trained on a real corpus every machine that runs this project has: Python's standard library.

python -m mygpt_jax.train --config configs/pystdlib.py

The corpus is every `*.py` file of this Python's standard library (sysconfig's "stdlib" folder), leaving out
site-packages and the test suite (test/, which some Linux distributions ship apart and which holds files that
are deliberately not UTF-8): about a thousand files and 14 MB, 4-5M tokens. It is tokenized once into
checkpoints/data/ (python -m mygpt_jax.prepare --config configs/pystdlib.py does only that) and trained on
windows at random offsets, nanoGPT's way, for train.max_steps steps; sized to train in about half an hour on two
CPU cores. Other corpora: --config.data.path=DIR (every *.txt below it; --config.data.glob='**/*.md' for other
files) or a single text file.
"""

import sysconfig

from mygpt_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "pystdlib"
    c.data.path = sysconfig.get_paths()["stdlib"]
    c.data.glob = "**/*.py"
    c.data.exclude = "site-packages/*,test/*"
    c.data.sampling = "random"
    c.model.context_length = 256
    c.model.emb_dim = 256
    c.model.n_heads = 4
    c.model.n_layers = 4
    c.model.drop_rate = 0.0  # a few million tokens, seen less than once: nothing to regularise
    c.model.tie_embeddings = True  # the 50257-row head is most of a small model's parameters and FLOPs
    c.train.batch_size = 16
    c.train.learning_rate = 1e-3
    c.train.beta2 = 0.99
    c.train.weight_decay_params = "matrices"
    c.train.warmup_steps = 30
    c.train.grad_clip = 1.0
    c.train.max_steps = 300  # 1.2M tokens, a fifth of the training split
    c.train.eval_freq = 50
    c.train.eval_iter = 5  # 80 windows of each split, spread over it
    c.train.checkpoint_every = 100
    c.train.sample_every = 100
    c.sample.prompt = "def read_config(path):"
    c.sample.max_new_tokens = 60
    c.sample.temperature, c.sample.top_k = 0.8, 40
    return c

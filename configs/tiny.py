"""A tiny model for tests and quick experiments: trains in seconds on a CPU."""

from mygpt_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "tiny"
    c.model.context_length = 32
    c.model.emb_dim = 32
    c.model.n_heads = 2
    c.model.n_layers = 2
    c.train.num_epochs = 1
    c.train.batch_size = 4
    c.train.eval_freq = 10
    c.train.eval_iter = 2
    c.train.checkpoint_every = 20
    c.train.flops_matmul_size = 0  # no matmul-rate measurement at start: it would take longer than the training
    c.sample.max_new_tokens = 10
    return c

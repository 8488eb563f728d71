"""GPT-2 124M from scratch on your own corpus: the recipe of nanoGPT and the GPT-2/GPT-3 papers.

python -m mygpt_jax.prepare --config configs/gpt2_124m_pretrain.py --config.data.path=/data/owt   # once
python -m mygpt_jax.train --config configs/gpt2_124m_pretrain.py --config.data.path=/data/owt

For a GPU (or several): context 1024, bfloat16 compute, ~0.5M tokens per step (480 windows of 1024 tokens, as 40
micro-batches of 12), AdamW 6e-4 with betas (0.9, 0.95), weight decay 0.1 on matrices only, 2,000 warmup steps
then a cosine decay to 6e-5 at step 600,000, global-norm clipping at 1.0, windows at random offsets of the
prepared corpus, no dropout. data.path is yours to set: a folder of text files (--config.data.glob for other
extensions), one big text file, JSON Lines or Parquet shards as downloaded (FineWeb-Edu's sample:
--config.data.path=fineweb-edu, docs/corpora.md), or a folder prepared before.

On a CPU, to try it: --config.model.dtype=float32 (a CPU without bf16 units converts bf16 to float32 for every
product), --config.train.batch_size=8 --config.train.grad_accum_steps=1 (8 windows a step instead of 480),
and perhaps a smaller model (--config.model.n_layers=4); the rates a CPU reaches are in docs/performance.md.
"""

from mygpt_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "gpt2_124m_pretrain"
    c.data.path = "data/corpus"  # set --config.data.path to your corpus
    c.data.sampling = "random"
    c.model.context_length = 1024
    c.model.qkv_bias = True  # GPT-2's architecture: q/k/v biases and a tied head
    c.model.tie_embeddings = True
    c.model.drop_rate = 0.0
    c.model.dtype = "bfloat16"
    c.train.batch_size = 480  # windows per step: 480 x 1024 = 491,520 tokens
    c.train.grad_accum_steps = 40  # micro-batches of 12 windows
    c.train.learning_rate = 6e-4
    c.train.beta1, c.train.beta2 = 0.9, 0.95
    c.train.weight_decay = 0.1
    c.train.weight_decay_params = "matrices"
    c.train.warmup_steps = 2000
    c.train.min_lr_ratio = 0.1  # cosine to 6e-5
    c.train.grad_clip = 1.0
    c.train.max_steps = 600_000
    c.train.eval_freq = 1000
    c.train.eval_iter = 5  # 5 batches of 480 windows, 2.5M tokens per split and evaluation (nanoGPT: 200 x 12)
    c.train.checkpoint_every = 1000
    c.train.max_to_keep = 3
    c.train.sample_every = 5000
    c.train.flops_matmul_size = 0
    c.sample.prompt = "The meaning of life is"
    return c

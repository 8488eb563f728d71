"""OpenAI's GPT-2 774M (weights downloaded on first use): sample, chat, evaluate, fine-tune.

python -m mygpt_jax.sample --config configs/gpt2_774m.py
"""

from mygpt_jax.config import gpt2_config


def get_config():
    return gpt2_config("774M")

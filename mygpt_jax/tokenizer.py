"""GPT-2's byte-pair encoding, built offline from the BPE files bundled with the package.

`tiktoken.get_encoding("gpt2")` downloads these files; we ship them and check the same sha256 hashes
that tiktoken checks, so a fresh install works without network.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from mygpt_jax.errors import UserError

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
VOCAB_SIZE = END_OF_TEXT_ID + 1  # ids 0..50256; a model may have more rows (padding), never fewer
# GPT-2's pre-tokenisation pattern (tiktoken's r50k/gpt2 pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def bundled_file(name: str) -> str:
    """The path of the bundled BPE file `name` ("vocab.bpe", "encoder.json"), checked against its sha256."""
    path = resources.files("mygpt_jax") / "assets" / "gpt2" / name
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(f"the bundled tokenizer file {path} is missing ({e}); reinstall mygpt_jax") from e
    if digest != SHA256[name]:
        raise UserError(f"the bundled tokenizer file {path} is corrupt (sha256 {digest}); reinstall mygpt_jax")
    return str(path)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 tokens, `<|endoftext|>` = 50256), never touching the network."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=bundled_file("vocab.bpe"), encoder_json_file=bundled_file("encoder.json"))
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens={END_OF_TEXT: END_OF_TEXT_ID})


def encode(text: str) -> list[int]:
    """Token ids of `text`; a literal `<|endoftext|>` becomes the special token, as in GPT-2."""
    return get_tokenizer().encode(text, allowed_special={END_OF_TEXT})


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(list(ids))

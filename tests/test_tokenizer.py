import socket

import pytest

from mygpt_jax import tokenizer


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-cache-dir")
    tokenizer.get_tokenizer.cache_clear()
    yield
    tokenizer.get_tokenizer.cache_clear()


def test_known_ids_offline(no_network):
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert tokenizer.encode("<|endoftext|>") == [tokenizer.END_OF_TEXT_ID] == [50256]
    assert tokenizer.get_tokenizer().n_vocab == 50257


def test_round_trip_of_the_verdict():
    from mygpt_jax.data import load_text

    text = load_text("")
    ids = tokenizer.encode(text)
    assert len(ids) == 5145  # the count shared/data/README.md gives for the-verdict.txt
    assert tokenizer.decode(ids) == text


def test_corrupt_bundled_file_is_reported(monkeypatch):
    monkeypatch.setitem(tokenizer.SHA256, "vocab.bpe", "0" * 64)
    tokenizer.get_tokenizer.cache_clear()
    with pytest.raises(tokenizer.UserError, match="corrupt"):
        tokenizer.get_tokenizer()
    tokenizer.get_tokenizer.cache_clear()

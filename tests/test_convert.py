"""Tests for converting OpenAI's GPT-2 TensorFlow checkpoint and loading it (download, Orbax cache).

A tiny checkpoint in OpenAI's exact layout is written with TensorFlow; the converted Flax model must
give the logits of an independent NumPy GPT-2 that reads the TensorFlow variables directly.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mygpt_jax import backends
from mygpt_jax.errors import UserError
from mygpt_jax.model import GPT, init_params
from mygpt_jax.pretrained.convert import convert_checkpoint, model_config_from_hparams, read_hparams
from mygpt_jax.pretrained.download import FILENAMES
from mygpt_jax.pretrained.load import load_gpt2, size_from_name
from tests.openai_checkpoint import (
    numpy_gpt2 as reference_logits,
    openai_variables as _openai_variables,
    write_checkpoint as _write_checkpoint,
)

HPARAMS = {"n_vocab": 200, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}


def openai_variables(seed: int = 0) -> dict[str, np.ndarray]:
    return _openai_variables(HPARAMS, seed)


def write_checkpoint(folder: Path, variables: dict[str, np.ndarray]) -> Path:
    return _write_checkpoint(folder, variables, HPARAMS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A read-only-by-convention tiny GPT-2 folder; tests that load (and so cache) copy it first."""
    return write_checkpoint(tmp_path_factory.mktemp("openai") / "124M", openai_variables())


@pytest.fixture
def weights(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "weights"))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, HPARAMS["n_vocab"], (2, HPARAMS["n_ctx"]))


def numpy_gpt2(folder: Path, tokens: np.ndarray) -> np.ndarray:
    return reference_logits(folder, tokens, HPARAMS)


def assert_logits_match(folder: Path, cfg, params, tokens: np.ndarray) -> None:
    logits, _ = GPT(cfg, backends.current()).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(logits), numpy_gpt2(folder, tokens), rtol=0, atol=1e-4)


def test_converted_model_matches_numpy_gpt2(model_dir, tokens):
    cfg, params = convert_checkpoint(model_dir)
    assert cfg == model_config_from_hparams(HPARAMS)
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (200, 32, 32, 4, 2)
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.drop_rate == 0.0
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(params))
    assert_logits_match(model_dir, cfg, params, tokens)


def _add_extra(v: dict) -> None:
    v["model/h0/attn/extra"] = np.zeros(3, np.float32)


def _drop_bias(v: dict) -> None:
    del v["model/h1/mlp/c_fc/b"]


def _squeeze_kernel(v: dict) -> None:
    v["model/h0/attn/c_attn/w"] = v["model/h0/attn/c_attn/w"][0]


def _longer_context(v: dict) -> None:
    v["model/wpe"] = np.zeros((33, 32), np.float32)


@pytest.mark.parametrize("corrupt, message", [
    (_add_extra, "unexpected variable model/h0/attn/extra "),
    (_drop_bias, "missing variable model/h1/mlp/c_fc/b "),
    (_squeeze_kernel, r"model/h0/attn/c_attn/w .* shape \(32, 96\), expected \(1, 32, 96\)"),
    (_longer_context, r"model/wpe .* shape \(33, 32\), expected \(32, 32\)"),
])
def test_checkpoint_not_matching_the_model_is_a_user_error(tmp_path, corrupt, message):
    variables = openai_variables()
    corrupt(variables)
    folder = write_checkpoint(tmp_path / "bad", variables)
    with pytest.raises(UserError, match=message) as err:
        convert_checkpoint(folder)
    assert "\n" not in str(err.value)


def test_truncated_data_file_is_a_user_error(weights):
    data = weights / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model.ckpt could not be read"):
        convert_checkpoint(weights)


@pytest.mark.parametrize("content, message", [
    (None, "hparams.json is missing"),
    ("{not json", "could not be read"),
    ('{"n_vocab": 200, "n_ctx": 32, "n_embd": 32, "n_head": 4}', "lacks positive integers for n_layer"),
    ('{"n_vocab": 200, "n_ctx": 32, "n_embd": 30, "n_head": 4, "n_layer": 2}', "not divisible"),
])
def test_bad_hparams_is_a_user_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "hparams.json").write_text(content)
    with pytest.raises(UserError, match=message):
        read_hparams(tmp_path)


def test_second_load_restores_the_orbax_cache_without_tensorflow(weights, tmp_path, tokens, capsys, monkeypatch):
    cfg, params = load_gpt2("124M", checkpoint_dir=str(tmp_path / "ckpt"), weights_dir=str(weights))
    err = capsys.readouterr().err
    assert f"loaded a model of 2 layers of 32, 4 heads, context 32 (none of OpenAI's GPT-2 sizes) from {weights} " \
           "(converted from TensorFlow in " in err
    assert f"cached as Orbax in {weights / 'flax'} for next time)" in err
    assert_logits_match(weights, cfg, params, tokens)

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # any `import tensorflow` now fails
    cached_cfg, cached = load_gpt2("gpt2-124m", checkpoint_dir=str(tmp_path / "ckpt"), weights_dir=str(weights))
    assert f"sizes) from {weights / 'flax'} (Orbax cache, " in capsys.readouterr().err
    assert cached_cfg == cfg
    assert jax.tree.structure(cached) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, cached, params)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves((params, cached)))
    assert not (tmp_path / "ckpt").exists()  # the cache is next to the weights


def test_read_only_weights_cache_under_checkpoint_dir_and_other_weights_reconvert(
        weights, tmp_path, tokens, capsys, monkeypatch):
    other = write_checkpoint(tmp_path / "other", openai_variables(seed=7))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) not in (weights, other)
                        and real_access(path, mode, **kw))
    cache = tmp_path / "ckpt" / "gpt2" / "124M" / "flax"
    for folder in (weights, other, other):  # `other` replaces the cache of `weights`, then uses it
        cfg, params = load_gpt2("124M", checkpoint_dir=str(tmp_path / "ckpt"), weights_dir=str(folder))
        assert_logits_match(folder, cfg, params, tokens)
    err = capsys.readouterr().err.splitlines()
    assert [f"cached as Orbax in {cache} " in line for line in err] == [True, True, False]
    assert f"from {cache} (Orbax cache, " in err[2]
    assert not (weights / "flax").exists() and not (other / "flax").exists()


def test_the_converted_files_are_the_ones_the_cache_is_keyed_on(weights, tmp_path, tokens):
    """A second Saver checkpoint in the folder (`checkpoint` then names model-2) changes neither what is
    converted nor what is cached: both are OpenAI's model.ckpt, whose index the cache hashes."""
    from tests.openai_checkpoint import tf

    load_gpt2("124M", checkpoint_dir=str(tmp_path), weights_dir=str(weights))
    other = {name: value + 1.0 for name, value in openai_variables().items()}
    tf.compat.v1.train.Saver(var_list={n: tf.Variable(v) for n, v in other.items()}, save_relative_paths=True).save(
        sess=None, save_path=str(weights / "model"), global_step=2)
    assert 'model_checkpoint_path: "model-2"' in (weights / "checkpoint").read_text()
    for _ in range(2):  # from the cache made before, then converted afresh
        cfg, params = load_gpt2("124M", checkpoint_dir=str(tmp_path), weights_dir=str(weights))
        assert_logits_match(weights, cfg, params, tokens)
        shutil.rmtree(weights / "flax")


def test_corrupt_cache_says_to_delete_it(weights, tmp_path):
    load_gpt2("124M", checkpoint_dir=str(tmp_path), weights_dir=str(weights))
    for path in (weights / "flax").rglob("*"):
        if path.is_file() and "params" in path.parts:
            path.write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"Orbax cache {weights / 'flax'} .* delete that folder"):
        load_gpt2("124M", checkpoint_dir=str(tmp_path), weights_dir=str(weights))


def test_incomplete_weights_dir_names_the_missing_files(weights, tmp_path):
    (weights / "vocab.bpe").unlink()
    (weights / "model.ckpt.index").unlink()
    with pytest.raises(UserError, match=f"weights folder {weights} lacks model.ckpt.index, vocab.bpe;"):
        load_gpt2("124M", checkpoint_dir=str(tmp_path), weights_dir=str(weights))


def test_download_convert_and_load(model_dir, http_server, tmp_path, tokens):
    server = http_server(model_dir)
    cfg, params = load_gpt2("124M", checkpoint_dir=str(tmp_path), sources=("openai",), base_urls=[server.base],
                            progress=False)
    assert sorted(server.fetched()) == sorted(FILENAMES)
    assert (tmp_path / "gpt2" / "124M" / "flax").is_dir()
    assert_logits_match(tmp_path / "gpt2" / "124M", cfg, params, tokens)


@pytest.mark.parametrize("name, size", [
    ("124M", "124M"), ("124m", "124M"), ("gpt2_124m", "124M"), ("gpt2-124M", "124M"), ("GPT2_355M", "355M"),
    (" gpt-2-774m ", "774M"), ("1558M", "1558M"), ("gpt2", "124M"), ("gpt2-medium", "355M"), ("gpt2-xl", "1558M"),
])
def test_size_from_name_accepts(name, size):
    assert size_from_name(name) == size


@pytest.mark.parametrize("name", ["", "125M", "gpt2_7b", "gpt3-124m", "124", "gpt2__124m", "large"])
def test_size_from_name_rejects(name):
    with pytest.raises(UserError, match="valid names are 124M, 355M, 774M, 1558M"):
        size_from_name(name)

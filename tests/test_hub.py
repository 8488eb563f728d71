"""Loading GPT-2 in the Hugging Face Hub's layout: folders written here by hand (tests/numpy_gpt2.py, with the Hub's
names and layouts) must give the NumPy GPT-2's logits, bad folders one line naming what is wrong, and the Hub as a
download source (a loopback server standing in for it, redirect included) or the Hugging Face cache."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mygpt_jax import backends
from mygpt_jax.errors import ConfigError, UserError
from mygpt_jax.model import GPT, ModelConfig
from mygpt_jax.pretrained.convert import model_label
from mygpt_jax.pretrained.download import HUB_FILES, HUB_MODELS
from mygpt_jax.pretrained.load import load_gpt2
from tests.conftest import hub_layout
from tests.numpy_gpt2 import hub_tensors, hub_weights, logits, write_hub_folder

ARCH = {"vocab_size": 200, "n_positions": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}
REPO, REVISION = HUB_MODELS["124M"]


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, ARCH["vocab_size"], (2, ARCH["n_positions"]))


def load(folder: Path, tmp_path: Path, **kw):
    return load_gpt2("124M", checkpoint_dir=str(tmp_path / "ckpt"), weights_dir=str(folder), **kw)


def assert_logits_match(cfg, params, tensors: dict, tokens: np.ndarray) -> None:
    out, _ = GPT(cfg, backends.current()).apply({"params": params}, tokens)
    expected = logits(hub_weights(tensors), tokens, ARCH["n_head"], ARCH["n_layer"])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prefix", ["", "transformer."])
@pytest.mark.parametrize("head", ["tied", "untied", "tied, saved as lm_head.weight too"])
def test_hub_folder_loads_and_matches_numpy_gpt2(tmp_path, tokens, capsys, prefix, head):
    tensors = hub_tensors(ARCH, prefix=prefix, untied=head == "untied")
    if head.startswith("tied, saved"):
        tensors["lm_head.weight"] = tensors[f"{prefix}wte.weight"].copy()
    config = ARCH | {"n_inner": 4 * ARCH["n_embd"], "activation_function": "gelu_new"}
    folder = write_hub_folder(tmp_path / "hub", tensors, config | {"tie_word_embeddings": head != "untied"})
    cfg, params = load(folder, tmp_path)
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (200, 32, 32, 4, 2)
    assert cfg.qkv_bias and cfg.tie_embeddings == (head != "untied") and cfg.drop_rate == 0.0
    assert ("lm_head" in params) == (head == "untied")
    assert_logits_match(cfg, params, tensors, tokens)
    assert f"loaded a model of 2 layers of 32, 4 heads, context 32 (none of OpenAI's GPT-2 sizes) from {folder} " \
           "(safetensors, 2 layers of 32, " in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no cache written
    assert not (tmp_path / "ckpt").exists()


def test_sharded_folder_loads(tmp_path, tokens):
    """save_pretrained's layout for large models: model.safetensors.index.json and the shards it names."""
    tensors = hub_tensors(ARCH, prefix="transformer.")
    folder = write_hub_folder(tmp_path / "hub", {}, ARCH)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, in_shard in shards.items():
        save_file({name: tensors[name] for name in in_shard}, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: shard for shard, in_shard in shards.items() for name in in_shard}}))
    cfg, params = load(folder, tmp_path)
    assert_logits_match(cfg, params, tensors, tokens)


def _extra(t: dict) -> None:
    t["h.0.attn.extra"] = np.zeros(3, np.float32)


def _missing(t: dict) -> None:
    del t["h.1.mlp.c_fc.bias"]


def _missing_prefixed(t: dict) -> None:
    for name in list(t):
        t["transformer." + name] = t.pop(name)
    del t["transformer.h.1.mlp.c_fc.bias"]


def _transposed(t: dict) -> None:
    t["h.0.attn.c_attn.weight"] = np.ascontiguousarray(t["h.0.attn.c_attn.weight"].T)  # nn.Linear's layout


def _longer_context(t: dict) -> None:
    t["wpe.weight"] = np.zeros((33, 32), np.float32)


def _untied_head(t: dict) -> None:
    t["lm_head.weight"] = t["wte.weight"] + 1


@pytest.mark.parametrize("corrupt, config, message", [
    (_extra, {}, "unexpected tensor h.0.attn.extra in .*model.safetensors; is it a GPT-2"),
    (_missing, {}, "missing tensor h.1.mlp.c_fc.bias in "),
    (_missing_prefixed, {}, "missing tensor transformer.h.1.mlp.c_fc.bias in "),
    (_transposed, {}, r"tensor h.0.attn.c_attn.weight in .* has shape \(96, 32\), expected \(32, 96\)"),
    (_longer_context, {}, r"tensor wpe.weight in .* has shape \(33, 32\), expected \(32, 32\)"),
    (lambda t: None, {"tie_word_embeddings": False}, "missing tensor lm_head.weight in "),
    (_untied_head, {}, "lm_head.weight that differs from wte.weight, but config.json ties them"),
])
def test_tensors_not_matching_the_config_are_one_line(tmp_path, corrupt, config, message):
    tensors = hub_tensors(ARCH)
    corrupt(tensors)
    folder = write_hub_folder(tmp_path / "hub", tensors, ARCH | config)
    with pytest.raises(UserError, match=message) as err:
        load(folder, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("n_inner", 64), ("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True), ("layer_norm_epsilon", 1e-6), ("scale_attn_weights", False),
])
def test_config_this_model_cannot_express_is_one_line(tmp_path, key, value):
    folder = write_hub_folder(tmp_path / "hub", hub_tensors(ARCH), ARCH | {key: value})
    with pytest.raises(UserError, match=f"config.json: {key}={value!r} cannot be expressed by this model") as err:
        load(folder, tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type='llama'; only GPT-2 models"),
    ({"n_head": 5}, "n_embd=32 is not divisible by n_head=5"),
    ({"n_layer": "2"}, "n_layer must be positive integers"),
])
def test_bad_config_json_is_one_line(tmp_path, change, message):
    folder = write_hub_folder(tmp_path / "hub", hub_tensors(ARCH), ARCH | change)
    with pytest.raises(UserError, match=message):
        load(folder, tmp_path)


def test_a_truncated_file_in_a_users_weights_dir_is_to_be_replaced_not_deleted(tmp_path):
    folder = write_hub_folder(tmp_path / "hub", hub_tensors(ARCH), ARCH)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError) as e:
        load(folder, tmp_path)
    message = str(e.value)
    assert f"{weights} could not be read" in message and "replace it" in message
    assert "delete" not in message and "download" not in message and "\n" not in message
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json could not be read .*replace it") as e:
        load(folder, tmp_path)
    assert "delete" not in str(e.value)


def test_a_truncated_file_in_the_download_cache_is_to_be_deleted_and_downloaded_again(http_server, hub_dir,
                                                                                       tmp_path):
    download(tmp_path, http_server(hub_dir, **hub_layout()))
    weights = tmp_path / "ckpt" / "gpt2" / "124M" / "hub" / REVISION / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError, match=f"{weights} could not be read .*; delete {weights} so that it is "
                                        "downloaded again"):
        download(tmp_path, http_server(hub_dir, **hub_layout()))


@pytest.mark.parametrize("make, what", [(lambda p: None, "does not exist"), (lambda p: p.write_text(""), "is a file")])
def test_a_weights_dir_that_is_not_a_folder_says_so(tmp_path, make, what):
    make(tmp_path / "weights")
    with pytest.raises(ConfigError, match=f"--config.weights_dir='{tmp_path}/weights' {what}"):
        load(tmp_path / "weights", tmp_path)


def test_folder_of_neither_layout_says_what_both_need(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="lacks checkpoint, .*OpenAI's GPT-2 files .* or a Hugging Face model "
                                        r"\(config.json and model.safetensors\)"):
        load(tmp_path / "empty", tmp_path)


# The Hub as a download source.

@pytest.fixture(scope="module")
def served_tensors() -> dict:
    return hub_tensors(ARCH, seed=3)


@pytest.fixture
def hub_dir(tmp_path, served_tensors) -> Path:
    """The files the loopback Hub serves."""
    return write_hub_folder(tmp_path / "served", served_tensors, ARCH)


def download(tmp_path: Path, server, **kw):
    return load_gpt2("124M", checkpoint_dir=str(tmp_path / "ckpt"), sources=("hub",), hub_url=server.base,
                     progress=False, **kw)


def test_hub_download_follows_the_redirect_and_resumes_after_a_drop(http_server, hub_dir, served_tensors, tmp_path,
                                                                    tokens, capsys):
    dest = tmp_path / "ckpt" / "gpt2" / "124M" / "hub" / REVISION
    size = (hub_dir / "model.safetensors").stat().st_size
    dropping = http_server(hub_dir, "drop", **hub_layout())
    with pytest.raises(UserError, match=f"could not download model.safetensors for {REPO} at revision {REVISION} "
                                        r"\(.*\) \(partial file kept; rerun to resume\)") as err:
        download(tmp_path, dropping)
    assert "\n" not in str(err.value)
    assert dropping.redirected == [f"/{REPO}/resolve/{REVISION}/model.safetensors"]
    assert (dest / "model.safetensors.part").stat().st_size == size // 2
    assert (dest / "config.json").read_bytes() == (hub_dir / "config.json").read_bytes()

    healthy = http_server(hub_dir, **hub_layout())
    cfg, params = download(tmp_path, healthy)
    assert healthy.requests == [("GET", "model.safetensors", f"bytes={size // 2}-")]  # config.json kept
    assert healthy.redirected == [f"/{REPO}/resolve/{REVISION}/model.safetensors"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(HUB_FILES)
    assert (dest / "model.safetensors").read_bytes() == (hub_dir / "model.safetensors").read_bytes()
    assert_logits_match(cfg, params, served_tensors, tokens)
    assert f"sizes) from {dest} (safetensors" in capsys.readouterr().err

    healthy.requests.clear()
    download(tmp_path, healthy)
    assert healthy.requests == []


def test_another_revision_is_downloaded_beside_the_pinned_one(http_server, hub_dir, tmp_path):
    server = http_server(hub_dir, **hub_layout(revision="main"))
    download(tmp_path, server, hub_revision="main")
    assert (tmp_path / "ckpt" / "gpt2" / "124M" / "hub" / "main" / "model.safetensors").is_file()
    with pytest.raises(UserError, match="HTTP Error 404"):  # the pinned revision is not served: no mix-up
        download(tmp_path, server)


@pytest.mark.parametrize("variable, repo_folder", [
    ("HF_HUB_CACHE", "models--openai-community--gpt2"),
    ("HF_HOME", "models--gpt2"),  # the repository's name before it moved under openai-community
    ("XDG_CACHE_HOME", "models--openai-community--gpt2"),
])
def test_the_hugging_face_cache_is_used_without_downloading(http_server, hub_dir, served_tensors, tmp_path, tokens,
                                                            monkeypatch, capsys, variable, repo_folder):
    """huggingface_hub's layout: blobs named by hash, snapshots/<commit>/<file> linking to them, refs/main."""
    root = {"HF_HUB_CACHE": tmp_path / "hf", "HF_HOME": tmp_path / "hf" / "hub",
            "XDG_CACHE_HOME": tmp_path / "xdg" / "huggingface" / "hub"}[variable] / repo_folder
    monkeypatch.setenv(variable, str(tmp_path / ("xdg" if variable == "XDG_CACHE_HOME" else "hf")))
    snapshot = root / "snapshots" / REVISION
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(HUB_FILES):
        (root / "blobs" / f"blob{i}").write_bytes((hub_dir / name).read_bytes())
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)

    server = http_server(hub_dir, **hub_layout())
    for revision in ("", "main"):  # the pinned commit, and the branch whose ref names it
        cfg, params = download(tmp_path, server, hub_revision=revision)
        assert f"sizes) from {snapshot} (safetensors" in capsys.readouterr().err
    assert server.requests == server.redirected == []
    assert not (tmp_path / "ckpt").exists()  # nothing copied, nothing cached
    assert_logits_match(cfg, params, served_tensors, tokens)


def test_hf_hub_offline_fetches_nothing_and_says_so(http_server, hub_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = http_server(hub_dir, **hub_layout())
    with pytest.raises(UserError, match=f"HF_HUB_OFFLINE is set and {REPO} at revision {REVISION} is neither in the "
                                        "Hugging Face cache .* unset it to download"):
        download(tmp_path, server)
    assert server.requests == server.redirected == []


def test_sources_are_tried_in_order(http_server, hub_dir, served_tensors, tmp_path, tokens):
    openai, hub = http_server(hub_dir, "404"), http_server(hub_dir, **hub_layout())
    cfg, params = load_gpt2("124M", checkpoint_dir=str(tmp_path / "ckpt"), sources=("openai", "hub"),
                            base_urls=[openai.base], hub_url=hub.base, progress=False)
    assert openai.fetched() == ["checkpoint"] and sorted(hub.fetched()) == sorted(HUB_FILES)
    assert_logits_match(cfg, params, served_tensors, tokens)


def test_no_source_answering_gives_each_reason_on_one_line(http_server, hub_dir, tmp_path):
    openai, hub = http_server(hub_dir, "404"), http_server(hub_dir, "404", **hub_layout())
    with pytest.raises(UserError) as err:
        load_gpt2("124M", checkpoint_dir=str(tmp_path / "ckpt"), base_urls=[openai.base], hub_url=hub.base,
                  progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"hub: could not download config.json for {REPO} at revision {REVISION} ")
    assert " | openai: could not download checkpoint for GPT-2 124M " in message
    assert message.count("HTTP Error 404") == 2 and "--config.weights_dir" in message


@pytest.mark.parametrize("sources", ["hub,s3", "", "hub,hub"])
def test_weights_sources_are_checked(sources):
    from mygpt_jax.config import base_config, validate

    config = base_config()
    config.weights_sources = sources
    with pytest.raises(UserError, match=f"--config.weights_sources={sources!r} is invalid: use hub and/or openai"):
        validate(config)


def test_weights_are_labelled_by_their_shape_not_the_name_asked_for():
    gpt2 = ModelConfig(vocab_size=50257, context_length=1024, emb_dim=1024, n_heads=16, n_layers=24)
    assert model_label(gpt2) == "GPT-2 355M"
    assert "GPT-2" not in model_label(dataclasses.replace(gpt2, n_layers=12)).split("(")[0]

"""`python -m mygpt_jax.export`: a tiny trained run and a pretrained GPT-2 written as Hugging Face folders, loaded
back bit for bit, checked against the NumPy GPT-2 reading the exported file by the Hub's names, and (where
transformers and torch are installed) loaded by transformers itself."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import stat
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file

from configs.tiny import get_config
from mygpt_jax import backends, export, tokenizer
from mygpt_jax.errors import ConfigError, UserError
from mygpt_jax.model import GPT, ModelConfig
from mygpt_jax.pretrained import hub
from mygpt_jax.pretrained.download import HUB_MODELS
from mygpt_jax.pretrained.load import load_gpt2
from mygpt_jax.weights import load_model
from tests.conftest import hub_layout
from tests.numpy_gpt2 import hub_tensors, hub_weights, logits, write_hub_folder
from tests.utils import REPO, TINY, after_the_device_line, in_small_filesystem, run_cli

GPT2 = f"{REPO}/configs/gpt2_124m.py"
TEXT = "Every effort moves you toward the<|endoftext|> end."
UMASK = os.umask(0o022)
os.umask(UMASK)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained for two steps (no q/k/v biases, an untied head, dropout 0.1) and its export."""
    root = tmp_path_factory.mktemp("run")
    ckpt, out = root / "ckpt", root / "export" / "tiny"
    trained = run_cli("train", f"--config.checkpoint_dir={ckpt}", "--config.train.max_steps=2",
                      "--config.train.flops_matmul_size=0")
    assert trained.returncode == 0, trained.stderr
    exported = run_cli("export", f"--config.checkpoint_dir={ckpt}", f"--config.export.dir={out}")
    assert exported.returncode == 0, exported.stderr
    assert f"exported to {out}; load it with transformers.GPT2LMHeadModel.from_pretrained" in exported.stderr
    config = get_config()
    config.checkpoint_dir = str(ckpt)
    backends.resolve(config, backends.current())  # as the commands do at start-up
    cfg, params = load_model(config)
    return cfg, params, out


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.asarray([tokenizer.encode(TEXT)])


def test_export_loads_back_bit_for_bit(run, tmp_path):
    cfg, params, out = run
    loaded_cfg, loaded = load_gpt2("124M", checkpoint_dir=str(tmp_path), weights_dir=str(out))
    assert not cfg.qkv_bias and not cfg.tie_embeddings
    assert loaded_cfg == dataclasses.replace(cfg, drop_rate=0.0)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_the_exported_file_gives_the_models_logits(run, tokens):
    cfg, params, out = run
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    expected = logits(hub_weights(tensors), tokens, config["n_head"], config["n_layer"])
    got, _ = GPT(cfg, backends.current()).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)


def test_the_export_folder_is_what_transformers_reads(run):
    cfg, _, out = run
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "generation_config.json", "merges.txt", "model.safetensors", export.MARKER,
        "special_tokens_map.json", "tokenizer_config.json", "vocab.json"])
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] == 0o666 & ~UMASK, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~UMASK  # not a temporary folder's 0700
    config = json.loads((out / "config.json").read_text())
    assert config | {"initializer_range": None} == config | {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257, "n_positions": 32,
        "n_ctx": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": None}
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert not f.get_tensor("transformer.h.1.attn.c_attn.bias").any()  # the model has no q/k/v biases
        assert f.get_slice("lm_head.weight").get_shape() == [50257, 32]
    assert names == {name if name == "lm_head.weight" else f"transformer.{name}"
                     for name in hub.tensor_layout(cfg)}
    assert (out / "vocab.json").read_bytes() == Path(tokenizer.bundled_file("encoder.json")).read_bytes()
    assert (out / "merges.txt").read_bytes() == Path(tokenizer.bundled_file("vocab.bpe")).read_bytes()
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 50256, "eos_token_id": 50256, "max_new_tokens": 10, "do_sample": False}


def test_sampling_from_an_export_names_its_real_size(run):
    result = run_cli("sample", f"--config.weights_dir={run[2]}", "--config.sample.prompt=Every effort",
                     "--config.sample.max_new_tokens=3", config=GPT2)
    assert result.returncode == 0, result.stderr
    assert f"loaded a model of 2 layers of 32, 2 heads, context 32 (none of OpenAI's GPT-2 sizes) from {run[2]}" in \
        result.stderr and "GPT-2 124M" not in result.stderr


def test_pretrained_gpt2_from_the_hub_exports_its_own_tensors(http_server, tmp_path):
    """Downloaded from the loopback Hub through the config's keys, then exported: q/k/v biases and the tied head
    come back as the Hub's file held them, and the sampling settings of configs/gpt2_124m.py."""
    arch = {"vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
    served = hub_tensors(arch, seed=5)
    server = http_server(write_hub_folder(tmp_path / "served", served, arch), **hub_layout())
    out = tmp_path / "export"
    result = run_cli("export", f"--config.checkpoint_dir={tmp_path / 'ckpt'}", "--config.weights_sources=hub",
                     f"--config.hub_url={server.base}", f"--config.export.dir={out}", config=GPT2)
    assert result.returncode == 0, result.stderr
    assert server.redirected == [f"/{HUB_MODELS['124M'][0]}/resolve/{HUB_MODELS['124M'][1]}/model.safetensors"]
    exported = load_file(out / "model.safetensors")
    weights = {name: value for name, value in served.items() if not re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", name)}
    assert exported.keys() == {f"transformer.{name}" for name in weights}  # tied: no lm_head.weight
    for name, value in weights.items():
        np.testing.assert_array_equal(exported[f"transformer.{name}"], value)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 50256, "eos_token_id": 50256, "max_new_tokens": 50, "do_sample": True,
        "temperature": 1.0, "top_k": 40, "top_p": 1.0}


def test_export_without_a_folder_is_one_line(tmp_path):
    result = run_cli("export", f"--config.checkpoint_dir={tmp_path}")
    assert result.returncode == 2
    assert after_the_device_line(result) == ["error: no folder to export to; pass --config.export.dir=DIR"]


def export_config(run, out, **export):
    config = get_config()
    config.checkpoint_dir = str(run[2].parent.parent / "ckpt")
    config.export.dir = str(out)
    config.export.update(export)
    backends.resolve(config, backends.current())
    return config


def test_export_refuses_a_folder_of_other_files_and_replaces_an_earlier_export(run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own settings")
    with pytest.raises(ConfigError, match=r"holds other files \(config.json\).*overwrite=True"):
        export.main(export_config(run, mine))
    assert sorted(os.listdir(tmp_path)) == ["mine"] and (mine / "config.json").read_text() == "my own settings"
    (mine / "notes.txt").write_text("kept")
    export.main(export_config(run, mine, overwrite=True))
    assert json.loads((mine / "config.json").read_text())["n_embd"] == 32 and (mine / "notes.txt").read_text() == "kept"
    again = tmp_path / "again"
    for _ in range(2):  # the second time into an earlier export: no overwrite needed
        export.main(export_config(run, again))
        assert sorted(os.listdir(again)) == sorted(os.listdir(run[2]))
    assert sorted(os.listdir(tmp_path)) == ["again", "mine"]  # no temporary folder left
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        export.main(export_config(run, tmp_path / "a_file"))


def test_a_failed_export_leaves_nothing_half_written(run, tmp_path):
    """A disk that holds one export but not a second copy: the second fails and the first is as it was."""
    small, ckpt = tmp_path / "small", run[2].parent.parent / "ckpt"
    small.mkdir()
    command = [sys.executable, "-m", "mygpt_jax.export", "--config", TINY, f"--config.checkpoint_dir={ckpt}",
               f"--config.export.dir={small}/out"]
    script = (f'{shlex.join(command)} 2>/dev/null && {shlex.join(command)} 2>&1; echo "status=$?"; ls -A {small}; '
              f"ls -A {small}/out; md5sum {small}/out/model.safetensors {run[2]}/model.safetensors")
    result = in_small_filesystem(20, small, ["sh", "-c", script])
    lines = result.stdout.splitlines()
    assert "status=1" in lines and "Traceback" not in result.stdout, result.stdout + result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: could not write the model into {small}/out")
    after = lines[lines.index("status=1") + 1:]
    assert after[0] == "out" and sorted(after[1:-2]) == sorted(os.listdir(run[2])), after  # and no temporary folder
    assert after[-2].split()[0] == after[-1].split()[0]  # the earlier export is whole


def test_a_padded_vocabulary_exports_its_real_rows(tmp_path):
    """Rows past vocab_size (a vocabulary padded for speed) are no token's: the export leaves them out."""
    arch = {"vocab_size": 200, "n_positions": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}
    served = hub_tensors(arch, untied=True)
    cfg, params = hub.load_folder(write_hub_folder(tmp_path / "hub", served, arch | {"tie_word_embeddings": False}))
    padded = jax.tree.map(lambda a: a, params)
    padded["wte"]["embedding"] = np.concatenate([params["wte"]["embedding"], np.ones((56, 32), np.float32)])
    padded["lm_head"]["kernel"] = np.concatenate([params["lm_head"]["kernel"], np.ones((32, 56), np.float32)], 1)
    exported, unpadded = hub.to_hub(cfg, padded), hub.to_hub(cfg, params)
    assert exported["transformer.wte.weight"].shape == exported["lm_head.weight"].shape == (200, 32)
    assert all(np.array_equal(exported[name], unpadded[name]) for name in unpadded)
    np.testing.assert_array_equal(exported["lm_head.weight"], served["lm_head.weight"])


def test_a_model_transformers_cannot_express_names_its_key_or_parameter():
    @dataclasses.dataclass(frozen=True)
    class WithRotary(ModelConfig):
        rotary: bool = False

    cfg = WithRotary(vocab_size=200, context_length=32, emb_dim=32, n_heads=4, n_layers=1, rotary=True)
    with pytest.raises(UserError, match=r"model.rotary=True has no equivalent in transformers' GPT2LMHeadModel; only "
                                        "a model with model.rotary=False can be exported"):
        hub.to_hub(cfg, {})
    cfg = ModelConfig(vocab_size=200, context_length=32, emb_dim=32, n_heads=4, n_layers=1)
    params = traverse_util.unflatten_dict({path: np.zeros(shape, np.float32)
                                           for path, shape in hub.parameter_shapes(cfg).items()})
    params["h_0"]["attn"]["rotary"] = {"scale": np.zeros(4, np.float32)}
    with pytest.raises(UserError, match="parameter h_0/attn/rotary/scale has no counterpart in transformers'"):
        hub.to_hub(cfg, params)


def test_transformers_loads_the_export_and_gives_the_models_logits(run, tokens):
    """Skipped unless transformers and torch are installed (they are no dependencies of the project)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params, out = run
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(torch.tensor(tokens)).logits.numpy()
    expected, _ = GPT(cfg, backends.current()).apply({"params": params}, tokens)
    np.testing.assert_allclose(got, np.asarray(expected), rtol=0, atol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT)
    assert hf_tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert hf_tokenizer.eos_token_id == tokenizer.END_OF_TEXT_ID

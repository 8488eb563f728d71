"""Write a model as a Hugging Face folder that transformers loads (GPT2LMHeadModel, AutoTokenizer).

    python -m mygpt_jax.export --config configs/verdict.py --config.export.dir=exports/verdict
    python -m mygpt_jax.export --config configs/gpt2_124m.py --config.export.dir=exports/gpt2

The model is the one `sample` would use: a training run's latest checkpoint, or pretrained GPT-2 with
`config.pretrained`. The folder holds config.json, model.safetensors (float32, named as save_pretrained names
them), generation_config.json (the config's sampling settings) and GPT-2's tokenizer (vocab.json and merges.txt
are the bundled encoder.json and vocab.bpe).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import ml_collections
from safetensors.numpy import save_file

from mygpt_jax import tokenizer
from mygpt_jax.config import gpt2_lacks
from mygpt_jax.errors import UserError
from mygpt_jax.model import ModelConfig
from mygpt_jax.pretrained import hub
from mygpt_jax.weights import load_model

TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}  # the Hub's name: the bundled file's


def export(folder: str | os.PathLike, cfg: ModelConfig, params: dict, config: ml_collections.ConfigDict) -> Path:
    """Write `params` of architecture `cfg` into `folder` as a transformers model; `config` gives its dropout and
    sampling settings. The weights are written to a .part file first, so a model.safetensors is always whole."""
    cfg = gpt2_shaped(cfg)
    tensors = hub.to_hub(cfg, jax.device_get(params))  # checks first that GPT2LMHeadModel can express `cfg`
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f"{hub.WEIGHTS_FILE}.part"
        save_file(tensors, part, metadata={"format": "pt"})  # transformers refuses files without it
        os.replace(part, folder / hub.WEIGHTS_FILE)
        _write_json(folder / hub.CONFIG_FILE, hub.hub_config(cfg, config.model.drop_rate))
        _write_json(folder / "generation_config.json", _generation_config(config.sample))
        for name, bundled in TOKENIZER_FILES.items():
            shutil.copyfile(tokenizer.bundled_file(bundled), folder / name)
        end = tokenizer.END_OF_TEXT
        _write_json(folder / "special_tokens_map.json", {"bos_token": end, "eos_token": end, "unk_token": end})
        _write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.context_length, "bos_token": end,
            "eos_token": end, "unk_token": end, "add_prefix_space": False, "add_bos_token": False,
            "errors": "replace", "clean_up_tokenization_spaces": False})
    except OSError as e:
        raise UserError(f"could not write the model into {folder} ({e}); choose another --config.export.dir") from e
    return folder


def gpt2_shaped(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the modern switches that leave a model GPT-2-shaped (an init, an unused rotary base, as many
    key/value heads as heads) at GPT-2's values; a switch GPT-2 lacks is a UserError naming every such setting."""
    lacks = gpt2_lacks(cfg)
    if lacks:
        raise UserError(f"transformers' GPT-2 has no {', '.join(lacks)}; export writes GPT-2-shaped models only "
                        "(docs/modern.md)")
    defaults = ModelConfig()
    return dataclasses.replace(cfg, zero_init_proj=False, rope_base=defaults.rope_base, n_kv_heads=0)


def _generation_config(sample: ml_collections.ConfigDict) -> dict:
    """How `python -m mygpt_jax.sample` samples, as transformers' generate() reads it (top_k 0 is off in both)."""
    settings = {"bos_token_id": tokenizer.END_OF_TEXT_ID, "eos_token_id": tokenizer.END_OF_TEXT_ID,
                "max_new_tokens": sample.max_new_tokens, "do_sample": sample.temperature > 0}
    if sample.temperature > 0:
        settings |= {"temperature": sample.temperature, "top_k": sample.top_k, "top_p": sample.top_p}
    return settings


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def main(config: ml_collections.ConfigDict) -> None:
    if not config.export.dir:
        raise UserError("no folder to export to; pass --config.export.dir=DIR")
    cfg, params = load_model(config)
    folder = export(config.export.dir, cfg, params, config)
    print(f"exported to {folder}; load it with transformers.GPT2LMHeadModel.from_pretrained({str(folder)!r})",
          file=sys.stderr)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

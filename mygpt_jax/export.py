"""Write a model as a Hugging Face folder that transformers loads (GPT2LMHeadModel, AutoTokenizer).

    python -m mygpt_jax.export --config configs/verdict.py --config.export.dir=exports/verdict
    python -m mygpt_jax.export --config configs/gpt2_124m.py --config.export.dir=exports/gpt2

The model is the one `sample` would use: a training run's latest checkpoint, or pretrained GPT-2 with
`config.pretrained`. The folder holds config.json, model.safetensors (float32, named as save_pretrained names
them), generation_config.json (the config's sampling settings) and GPT-2's tokenizer (vocab.json and merges.txt
are the bundled encoder.json and vocab.bpe), and mygpt_jax_export.json, the marker that says the folder is an
export (what it was exported from).

Everything is written into a hidden folder beside the target (`.<name>.tmp-<pid>`), then moved into place, so a
failed or interrupted export leaves nothing half-written. A folder that holds other files and no marker is
refused unless `export.overwrite`; an earlier export is replaced. Replacing moves the new files over the old
ones, file by file, and leaves any other file in the folder as it was. Every file gets the permissions a new
file gets (the umask's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import jax
import ml_collections
from safetensors import SafetensorError
from safetensors.numpy import save_file

from mygpt_jax import tokenizer
from mygpt_jax.config import gpt2_lacks, run_folder
from mygpt_jax.errors import ConfigError, UserError
from mygpt_jax.model import ModelConfig
from mygpt_jax.pretrained import hub
from mygpt_jax.weights import load_model

TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}  # the Hub's name: the bundled file's


MARKER = "mygpt_jax_export.json"  # in every folder export writes; its presence makes the folder an export


def export(folder: str | os.PathLike, cfg: ModelConfig, params: dict, config: ml_collections.ConfigDict,
           source: str = "") -> Path:
    """Write `params` of architecture `cfg` into `folder` as a transformers model; `config` gives its dropout and
    sampling settings, `source` what it was exported from (for the marker)."""
    cfg = gpt2_shaped(cfg)
    tensors = hub.to_hub(cfg, jax.device_get(params))  # checks first that GPT2LMHeadModel can express `cfg`
    folder = Path(folder)
    check_target(folder, config.export.overwrite)
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed export of the same process id
        staging.mkdir(parents=True)  # the umask's mode, like any folder the user makes
        _write_files(staging, cfg, tensors, config, source)
        _move_into_place(staging, folder)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        raise UserError(f"could not write the model into {folder} ({e}); free space or choose another "
                        "--config.export.dir") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _move_into_place(staging: Path, folder: Path) -> None:
    """A new folder is one rename; into an existing one each file is replaced on its own, the marker last."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    for name in sorted(os.listdir(staging), key=lambda n: n == MARKER):
        os.replace(staging / name, folder / name)


def check_target(folder: Path, overwrite: bool) -> None:
    """A folder export may write into: none yet, an empty one, an earlier export, or any with `overwrite`."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--config.export.dir={str(folder)!r} is a file; name a folder")
    held = sorted(os.listdir(folder)) if folder.is_dir() else []
    if held and MARKER not in held and not overwrite:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(f"{folder} holds other files ({shown}) and is no earlier export; choose an empty or new "
                          "--config.export.dir, or add --config.export.overwrite=True to write the model's files "
                          "over those of the same name")


def _write_files(folder: Path, cfg: ModelConfig, tensors: dict, config: ml_collections.ConfigDict,
                 source: str) -> None:
    _write_json(folder / hub.CONFIG_FILE, hub.hub_config(cfg, config.model.drop_rate))
    save_file(tensors, folder / hub.WEIGHTS_FILE, metadata={"format": "pt"})  # transformers refuses files without it
    os.chmod(folder / hub.WEIGHTS_FILE, stat.S_IMODE(os.stat(folder / hub.CONFIG_FILE).st_mode))  # not its 0600
    _write_json(folder / "generation_config.json", _generation_config(config.sample))
    for name, bundled in TOKENIZER_FILES.items():
        shutil.copyfile(tokenizer.bundled_file(bundled), folder / name)
    end = tokenizer.END_OF_TEXT
    _write_json(folder / "special_tokens_map.json", {"bos_token": end, "eos_token": end, "unk_token": end})
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.context_length, "bos_token": end,
        "eos_token": end, "unk_token": end, "add_prefix_space": False, "add_bos_token": False,
        "errors": "replace", "clean_up_tokenization_spaces": False})
    _write_json(folder / MARKER, {"exported_by": "mygpt_jax", "source": source})


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
        raise ConfigError("no folder to export to; pass --config.export.dir=DIR")
    check_target(Path(config.export.dir), config.export.overwrite)  # before the weights load
    cfg, params = load_model(config)
    folder = export(config.export.dir, cfg, params, config,
                    source=f"GPT-2 {config.pretrained}" if config.pretrained else run_folder(config))
    print(f"exported to {folder}; load it with transformers.GPT2LMHeadModel.from_pretrained({str(folder)!r})",
          file=sys.stderr)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

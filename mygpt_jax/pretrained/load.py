"""Load GPT-2: from a local folder, a copy already on disk, or the first source that downloads it.

Two layouts hold GPT-2: OpenAI's seven TensorFlow files and the Hugging Face Hub's config.json +
model.safetensors; a `weights_dir` may hold either, and each download source (`sources`, tried in order)
has its own. OpenAI's files go to `<checkpoint_dir>/gpt2/<size>/`, the Hub's to
`<checkpoint_dir>/gpt2/<size>/hub/<revision>/`; a model already there, or in the Hugging Face cache at that
revision, is used before anything is downloaded, in the same order.

The Hub's safetensors are read directly every time (that is faster than restoring Orbax). OpenAI's checkpoint
is converted once (see `convert.py`) and saved as an Orbax checkpoint in `flax/` next to the files (under
`<checkpoint_dir>/gpt2/<size>/flax` if that folder is read-only); later loads restore the cache without
importing TensorFlow.  The cache's metadata records a format version, the hparams and a digest of OpenAI's
`model.ckpt.index` (which holds a checksum of every tensor), so a cache made from other weights or by an older
converter is converted again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from mygpt_jax import checkpoint
from mygpt_jax.errors import ConfigError, UserError
from mygpt_jax.model import ModelConfig, init_params
from mygpt_jax.pretrained import hub
from mygpt_jax.pretrained.convert import (
    convert_checkpoint,
    model_config_from_hparams,
    model_label,
    read_hparams,
    weights_remedy,
)
from mygpt_jax.pretrained.download import (
    DEFAULT_BASE_URLS,
    FILENAMES,
    HUB_FILES,
    HUB_MODELS,
    MODEL_SIZES,
    download_gpt2,
    download_hub,
    hf_cache_snapshot,
    is_complete,
)

CACHE_FORMAT = 1  # bump when the converted tree changes: older caches are then converted again
SOURCES = ("hub", "openai")  # the download sources, by the layout each serves
_HF_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def size_from_name(name: str) -> str:
    """The GPT-2 size ("124M", ...) that `name` means: "124M", "124m", "gpt2_124m", "gpt2-124M", "gpt2-xl"."""
    key = name.strip().lower()
    m = re.fullmatch(r"(?:gpt-?2[-_])?(\d+)m", key)
    size = f"{m[1]}M" if m else _HF_NAMES.get(key)
    if size not in MODEL_SIZES:
        raise UserError(f"unknown GPT-2 model {name!r}; valid names are {', '.join(MODEL_SIZES)} "
                        "(also written gpt2_124m, gpt2-124m, ...)")
    return size


def load_pretrained(config: ml_collections.ConfigDict, name: str) -> tuple[ModelConfig, Any]:
    """`load_gpt2(name)` from where `config`'s keys say (weights_dir, weights_sources, weights_urls, hub_*)."""
    return load_gpt2(name, checkpoint_dir=config.checkpoint_dir, weights_dir=config.weights_dir,
                     sources=config.weights_sources.split(","), base_urls=config.weights_urls.split(","),
                     hub_url=config.hub_url, hub_revision=config.hub_revision)


def load_gpt2(size: str, *, checkpoint_dir: str = "checkpoints", weights_dir: str = "",
              sources: Sequence[str] = SOURCES, base_urls: Sequence[str] = DEFAULT_BASE_URLS,
              hub_url: str = "", hub_revision: str = "", progress: bool = True,
              ) -> tuple[ModelConfig, Any]:
    """(config, float32 params as jax.Arrays) of GPT-2 `size` (any name `size_from_name` accepts).

    The weights come from `weights_dir` if given (either layout; the architecture is the folder's), else from
    the first of `sources` with a copy on disk, else from the first that downloads: "hub" (`hub_url`, see
    `download_hub`, at `hub_revision` or the commit pinned in download.HUB_MODELS) or "openai" (`base_urls`,
    tried in order).
    Prints one line to stderr saying where they came from and how long loading took.
    """
    size = size_from_name(size)
    home = Path(checkpoint_dir) / "gpt2" / size
    start = time.perf_counter()
    if weights_dir:
        folder = Path(weights_dir)
        layout = _layout(folder)
    else:
        repo, pinned = HUB_MODELS[size]
        revision = hub_revision or pinned
        hub_model = (repo, revision, home / "hub" / revision)  # the Hub's repository, revision and our folder
        folder, layout = _find(sources, home, hub_model) or _download(
            size, sources, home, base_urls, hub_model, hub_url, progress)
    with weights_remedy(downloaded=not weights_dir):
        if layout == "hub":
            cfg, params = hub.load_folder(folder)
            print(f"loaded {model_label(cfg)} from {folder} (safetensors, {cfg.n_layers} layers of {cfg.emb_dim}, "
                  f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
            return cfg, jax.device_put(params)
        return _load_openai(size, folder, folder / "flax" if os.access(folder, os.W_OK) else home / "flax", start)


def _layout(folder: Path) -> str:
    """"hub" or "openai": which of the two layouts `folder` holds, else a UserError saying what it lacks."""
    if not folder.is_dir():
        raise ConfigError(f"--config.weights_dir={str(folder)!r} " + ("is a file" if folder.exists() else
                          "does not exist") + "; name the folder that holds GPT-2's weights, or leave it empty to "
                          "download them")
    if (folder / hub.CONFIG_FILE).is_file():
        return "hub"
    missing = [name for name in FILENAMES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"weights folder {folder} lacks {', '.join(missing)}; it must hold OpenAI's GPT-2 files "
                        f"({', '.join(FILENAMES)}) or a Hugging Face model ({' and '.join(HUB_FILES)}), "
                        "or leave --config.weights_dir empty to download them")
    return "openai"


def _find(sources: Sequence[str], home: Path, hub_model: tuple[str, str, Path]) -> tuple[Path, str] | None:
    """(folder, layout) of the first of `sources` whose files are already on disk: the Hub's (repo, revision,
    folder) in that folder or in the Hugging Face cache, OpenAI's in `home`."""
    repo, revision, hub_dir = hub_model
    for source in sources:
        if source == "hub":
            for folder in (hub_dir, hf_cache_snapshot(repo, revision)):
                if folder and is_complete(folder, HUB_FILES):
                    return folder, "hub"
        elif is_complete(home):
            return home, "openai"
    return None


def _download(size: str, sources: Sequence[str], home: Path, base_urls: Sequence[str],
              hub_model: tuple[str, str, Path], hub_url: str, progress: bool) -> tuple[Path, str]:
    """(folder, layout) of the first of `sources` that downloads GPT-2 `size`; if none does, a UserError
    with each source's reason."""
    failures = []
    for source in sources:
        try:
            if source == "hub":
                return download_hub(*hub_model, hub_url, progress=progress), "hub"
            return download_gpt2(size, home, base_urls, progress=progress), "openai"
        except UserError as e:
            failures.append(f"{source}: {e}" if len(sources) > 1 else str(e))
    raise UserError(" | ".join(failures))


def _load_openai(size: str, folder: Path, cache: Path, start: float) -> tuple[ModelConfig, Any]:
    """OpenAI's checkpoint in `folder`, from its Orbax `cache` if that matches it, else converted and cached."""
    hparams = read_hparams(folder)
    meta = {"format": CACHE_FORMAT, "hparams": hparams,
            "index_sha256": hashlib.sha256((folder / "model.ckpt.index").read_bytes()).hexdigest()}
    cfg = model_config_from_hparams(hparams)
    if _cache_matches(cache, meta):
        params = _restore(cache, cfg)
        print(f"loaded {model_label(cfg)} from {cache} (Orbax cache, {time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
        return cfg, jax.device_put(params)

    cfg, params = convert_checkpoint(folder)
    shutil.rmtree(cache, ignore_errors=True)  # a cache of other weights or of an older format
    checkpoint.save(str(cache), 0, params, meta)
    print(f"loaded {model_label(cfg)} from {folder} (converted from TensorFlow in {time.perf_counter() - start:.1f} s; "
          f"cached as Orbax in {cache} for next time)", file=sys.stderr)
    return cfg, jax.device_put(params)


def _cache_matches(cache: Path, meta: dict) -> bool:
    """True if `cache` holds a conversion of the weights that `meta` describes."""
    try:
        with checkpoint.Checkpointer(str(cache), read_only=True) as cached:
            return cached.latest() is not None and cached.read_meta(cached.latest()) == meta
    except UserError as e:
        raise _corrupt(cache) from e


def _restore(cache: Path, cfg: ModelConfig) -> Any:
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    try:
        with checkpoint.Checkpointer(str(cache), read_only=True) as cached:
            return cached.restore_params(cached.latest(), abstract)
    except UserError as e:
        raise _corrupt(cache) from e


def _corrupt(cache: Path) -> UserError:
    return UserError(f"the Orbax cache {cache} of converted GPT-2 weights could not be read; "
                     "delete that folder to convert OpenAI's checkpoint again")

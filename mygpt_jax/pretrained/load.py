"""Load OpenAI's GPT-2: download it (or take a local folder), convert it once, then reuse an Orbax cache.

OpenAI's files go to `<checkpoint_dir>/gpt2/<size>/` unless `weights_dir` already holds them.  The first
load converts the TensorFlow checkpoint (see `convert.py`) and saves the Flax parameters as an Orbax
checkpoint in `flax/` next to the files (under `<checkpoint_dir>/gpt2/<size>/flax` if that folder is
read-only); later loads restore the cache without importing TensorFlow.  The cache's metadata records
a format version, the hparams and a digest of OpenAI's `model.ckpt.index` (which holds a checksum of
every tensor), so a cache made from other weights or by an older converter is converted again.
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

from mygpt_jax import checkpoint
from mygpt_jax.errors import UserError
from mygpt_jax.model import ModelConfig, init_params
from mygpt_jax.pretrained.convert import convert_checkpoint, model_config_from_hparams, read_hparams
from mygpt_jax.pretrained.download import DEFAULT_BASE_URLS, FILENAMES, MODEL_SIZES, download_gpt2

CACHE_FORMAT = 1  # bump when the converted tree changes: older caches are then converted again
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


def load_gpt2(size: str, *, checkpoint_dir: str = "checkpoints", weights_dir: str = "",
              base_urls: Sequence[str] = DEFAULT_BASE_URLS, progress: bool = True) -> tuple[ModelConfig, Any]:
    """(config, float32 params as jax.Arrays) of OpenAI's GPT-2 `size` (any name `size_from_name` accepts).

    The weights come from `weights_dir` if given (it must hold OpenAI's 7 files), else they are downloaded
    from `base_urls` (tried in order) into `<checkpoint_dir>/gpt2/<size>/`.  Prints one line to stderr
    saying where they came from and how long loading took.
    """
    size = size_from_name(size)
    home = Path(checkpoint_dir) / "gpt2" / size
    if weights_dir:
        folder = Path(weights_dir)
        missing = [name for name in FILENAMES if not (folder / name).is_file()]
        if missing:
            raise UserError(f"weights folder {folder} lacks {', '.join(missing)}; it must hold OpenAI's GPT-2 "
                            f"{size} files ({', '.join(FILENAMES)}), or leave --config.weights_dir empty "
                            "to download them")
    else:
        folder = download_gpt2(size, home, base_urls, progress=progress)
    cache = folder / "flax" if os.access(folder, os.W_OK) else home / "flax"

    start = time.perf_counter()
    hparams = read_hparams(folder)
    meta = {"format": CACHE_FORMAT, "hparams": hparams,
            "index_sha256": hashlib.sha256((folder / "model.ckpt.index").read_bytes()).hexdigest()}
    cfg = model_config_from_hparams(hparams)
    if _cache_matches(cache, meta):
        params = _restore(cache, cfg)
        print(f"loaded GPT-2 {size} from {cache} (Orbax cache, {time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
        return cfg, jax.device_put(params)

    cfg, params = convert_checkpoint(folder)
    shutil.rmtree(cache, ignore_errors=True)  # a cache of other weights or of an older format
    checkpoint.save(str(cache), 0, params, meta)
    print(f"loaded GPT-2 {size} from {folder} (converted from TensorFlow in {time.perf_counter() - start:.1f} s; "
          f"cached as Orbax in {cache} for next time)", file=sys.stderr)
    return cfg, jax.device_put(params)


def _cache_matches(cache: Path, meta: dict) -> bool:
    """True if `cache` holds a conversion of the weights that `meta` describes."""
    if checkpoint.latest_step(str(cache)) is None:
        return False
    try:
        return checkpoint.restore_meta(str(cache)) == meta
    except UserError as e:
        raise _corrupt(cache) from e


def _restore(cache: Path, cfg: ModelConfig) -> Any:
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    try:
        return checkpoint.restore_params(str(cache), abstract)[0]
    except UserError as e:
        raise _corrupt(cache) from e


def _corrupt(cache: Path) -> UserError:
    return UserError(f"the Orbax cache {cache} of converted GPT-2 weights could not be read; "
                     "delete that folder to convert OpenAI's checkpoint again")

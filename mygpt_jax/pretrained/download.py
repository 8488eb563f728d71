"""Download OpenAI's GPT-2 checkpoints (standard library + tqdm).

Each file is streamed to ``<name>.part`` and renamed to its final name only after its size
matches what the server announced, so a final name always means a whole file.  An interrupted
download keeps its ``.part`` and the next run resumes it with an HTTP ``Range`` request.  Files
already present are skipped; when a file cannot be fetched from the primary URL, the next base
URL (a mirror) is tried.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from mygpt_jax.errors import UserError

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
FILENAMES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
DEFAULT_BASE_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/models",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2",
)
CHUNK_SIZE = 1 << 20  # 1 MiB

_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def is_complete(dest_dir: str | os.PathLike) -> bool:
    """True if all 7 checkpoint files are in `dest_dir` under their final names.

    A file is only given its final name once fully downloaded, so a ``.part`` never counts.
    """
    return all((Path(dest_dir) / name).is_file() for name in FILENAMES)


def download_gpt2(
    size: str,
    dest_dir: str | os.PathLike,
    base_urls: Sequence[str] = DEFAULT_BASE_URLS,
    *,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download the GPT-2 checkpoint `size` (e.g. "124M") into `dest_dir` and return that folder.

    `base_urls` are tried in order for each file (primary first, then mirrors); file URLs are
    ``f"{base}/{size}/{filename}"``.  `timeout` (seconds) applies to connecting and to each read.
    Raises UserError with a one-line explanation if the size is unknown or a file cannot be
    fetched from any base URL.
    """
    if size not in MODEL_SIZES:
        raise UserError(f"unknown GPT-2 size {size!r}; valid sizes are {', '.join(MODEL_SIZES)}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if is_complete(dest):
        return dest
    for name in FILENAMES:
        if (dest / name).is_file():
            continue
        failures = []
        for base in base_urls:
            url = f"{base.rstrip('/')}/{size}/{name}"
            try:
                _fetch(url, dest / name, timeout=timeout, progress=progress)
                break
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
                failures.append(f"{url}: {str(e) or type(e).__name__}")
        else:
            resume = " (partial file kept; rerun to resume)" if _part(dest / name).exists() else ""
            reasons = "; ".join(failures).replace("\n", " ")
            raise UserError(
                f"could not download {name} for GPT-2 {size} ({reasons}){resume}. "
                f"Without network, put the 7 files ({', '.join(FILENAMES)}) in {dest} "
                f"or pass --config.weights_dir=DIR"
            )
    return dest


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _fetch(url: str, path: Path, *, timeout: float, progress: bool) -> None:
    """Download `url` to `path` via `path.part`, resuming an existing `.part` if possible."""
    part = _part(path)
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:
            raise
        part.unlink()  # the .part is already whole or does not fit the remote file: start over
        return _fetch(url, path, timeout=timeout, progress=progress)
    with resp:
        total = _announced_size(resp, start)
        if resp.status != 206:
            start = 0  # the server ignored the Range request: it sends the whole file
        with open(part, "ab" if start else "wb") as f, tqdm(
            total=total, initial=start, desc=path.name, unit="B", unit_scale=True,
            unit_divisor=1024, disable=not progress,
        ) as bar:
            while chunk := resp.read(CHUNK_SIZE):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    got = part.stat().st_size
    if got != total:
        raise ConnectionError(f"connection closed after {got} of {total} bytes")
    os.replace(part, path)


def _announced_size(resp: http.client.HTTPResponse, start: int) -> int:
    """Full size of the remote file from Content-Range (206) or Content-Length (200).

    Without it a truncated body could not be told from a whole one, so it is required.
    """
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
        if not m or int(m[1]) != start:
            raise ConnectionError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
        if m[2] != "*":
            return int(m[2])
        if length:
            return start + int(length)
    elif length:
        return int(length)
    raise ConnectionError("the server did not announce the file size")

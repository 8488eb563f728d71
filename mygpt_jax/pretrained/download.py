"""Download GPT-2's files (standard library + tqdm): OpenAI's TensorFlow checkpoint or the Hugging Face Hub's.

Each source has its own layout: OpenAI's store (and its mirror) serve seven files at `<base>/<size>/<file>`;
the Hub serves `config.json` and `model.safetensors` at `<hub>/<repo>/resolve/<revision>/<file>`, the weights
through a redirect to its CDN, at a revision pinned here so that the bytes never change under a user.

Each file is streamed to ``<name>.part`` and renamed to its final name only after its size
matches what the server announced, so a final name always means a whole file.  An interrupted
download keeps its ``.part`` and the next run resumes it with an HTTP ``Range`` request.  Files
already present are skipped; when a file cannot be fetched from the primary URL, the next base
URL (a mirror) is tried.

A model already in the Hugging Face cache (what `transformers` and `huggingface_hub` download into) is
found there (`hf_cache_snapshot`), so it is not downloaded again; the project reads that cache, never writes it.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
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
DEFAULT_HUB_URL = "https://huggingface.co"
HUB_FILES = ("config.json", "model.safetensors")
# Each size's repository on the Hub and the commit its files are downloaded at (the repositories were
# renamed from "gpt2", ...: caches made under the old names hold the same commits).
HUB_MODELS = {
    "124M": ("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e"),
    "355M": ("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da"),
    "774M": ("openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519"),
    "1558M": ("openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2"),
}
CHUNK_SIZE = 1 << 20  # 1 MiB

_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def is_complete(dest_dir: str | os.PathLike, files: Sequence[str] = FILENAMES) -> bool:
    """True if all `files` (default: OpenAI's 7) are in `dest_dir` under their final names.

    A file is only given its final name once fully downloaded, so a ``.part`` never counts.
    """
    return all((Path(dest_dir) / name).is_file() for name in files)


def download_gpt2(
    size: str,
    dest_dir: str | os.PathLike,
    base_urls: Sequence[str] = DEFAULT_BASE_URLS,
    *,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download OpenAI's GPT-2 checkpoint `size` (e.g. "124M") into `dest_dir` and return that folder.

    `base_urls` are tried in order for each file (primary first, then mirrors); file URLs are
    ``f"{base}/{size}/{filename}"``.  `timeout` (seconds) applies to connecting and to each read.
    Raises UserError with a one-line explanation if the size is unknown or a file cannot be
    fetched from any base URL.
    """
    if size not in MODEL_SIZES:
        raise UserError(f"unknown GPT-2 size {size!r}; valid sizes are {', '.join(MODEL_SIZES)}")
    dest = Path(dest_dir)
    return _download(FILENAMES, dest, lambda name: [f"{base.rstrip('/')}/{size}/{name}" for base in base_urls],
                     f"GPT-2 {size}", f"put the 7 files ({', '.join(FILENAMES)}) in {dest}",
                     progress=progress, timeout=timeout)


def download_hub(repo: str, revision: str, dest_dir: str | os.PathLike, hub_url: str = "", *,
                 progress: bool = True, timeout: float = 30.0) -> Path:
    """Download `config.json` and `model.safetensors` of the Hub's `repo` at `revision` into `dest_dir`.

    URLs are ``f"{hub_url}/{repo}/resolve/{revision}/{file}"`` (redirects are followed); an empty `hub_url` is
    HF_ENDPOINT's, else huggingface.co. With HF_HUB_OFFLINE set nothing is fetched: a UserError says what is
    missing. (Both variables as huggingface_hub reads them.)
    """
    dest = Path(dest_dir)
    hub_url = hub_url or os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_URL
    offline = f"put {' and '.join(HUB_FILES)} of {repo} in {dest}"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") and not is_complete(dest, HUB_FILES):
        raise UserError(f"HF_HUB_OFFLINE is set and {repo} at revision {revision} is neither in the Hugging Face "
                        f"cache {hf_cache_dir()} nor in {dest}; unset it to download, {offline} "
                        "or pass --config.weights_dir=DIR")
    return _download(HUB_FILES, dest, lambda name: [f"{hub_url.rstrip('/')}/{repo}/resolve/{revision}/{name}"],
                     f"{repo} at revision {revision}", offline, progress=progress, timeout=timeout)


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps its downloads: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_cache_snapshot(repo: str, revision: str, files: Sequence[str] = HUB_FILES) -> Path | None:
    """The Hugging Face cache's folder of `repo` at `revision` (a commit, or a branch its refs/ name) if it
    holds all `files`, else None. The cache's layout is models--<owner>--<name>/snapshots/<commit>/<file>;
    `repo`'s name without its owner (the old "gpt2") is looked up too."""
    for name in dict.fromkeys((repo, repo.rpartition("/")[2])):
        root = hf_cache_dir() / f"models--{name.replace('/', '--')}"
        ref = root / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        snapshot = root / "snapshots" / commit
        if commit and is_complete(snapshot, files):
            return snapshot
    return None


def _download(files: Sequence[str], dest: Path, urls: Callable[[str], Sequence[str]], what: str, offline: str, *,
              progress: bool, timeout: float) -> Path:
    """Fetch each of `files` missing from `dest` from the first of `urls(file)` that serves it whole.

    `what` names the model and `offline` says where its files could be put by hand, in the error."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (dest / name).is_file():
            continue
        failures = []
        for url in urls(name):
            try:
                _fetch(url, dest / name, timeout=timeout, progress=progress)
                break
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
                failures.append(f"{url}: {str(e) or type(e).__name__}")
        else:
            resume = " (partial file kept; rerun to resume)" if _part(dest / name).exists() else ""
            reasons = "; ".join(failures).replace("\n", " ")
            raise UserError(f"could not download {name} for {what} ({reasons}){resume}. "
                            f"Without network, {offline} or pass --config.weights_dir=DIR")
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

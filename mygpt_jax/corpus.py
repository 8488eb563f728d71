"""Prepared corpora: where a corpus's token files live, what their meta.json says, whether they are stale.

A corpus is `data.path`: one text or record file, a folder (every `data.glob` file below it, minus
`data.exclude`, each real file once), a glob, or an already prepared folder. `python -m mygpt_jax.prepare`
(or `train`, on first use) tokenizes it into `<data.cache_dir or checkpoint_dir/data>/<name>-<hash>/`:

    train.bin, val.bin   GPT-2 token ids as uint16, read through memory maps
    meta.json            the sources (path, size, mtime, sha256, split, tokens), the tokenizer, the split rule,
                         token and document counts, the token files' sha256 and the corpus fingerprint

The folder's name hashes what decides its content (the resolved path, glob, exclude, train ratio), so two
corpora never share one. `check` compares every source's (path, size, mtime) with meta.json at each start
and hashes only the files whose size or mtime moved, so start-up stays fast on a large corpus; a changed,
added or removed file makes the folder stale. The writing side is `mygpt_jax.prepare`.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import glob as globlib
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from mygpt_jax.data import default_text_path
from mygpt_jax.errors import UserError
from mygpt_jax.records import record_format
from mygpt_jax.tokenizer import SHA256 as TOKENIZER_FILES, get_tokenizer

FORMAT_VERSION = 2  # 2: each real file once (format 1 took files again through folder links)
TOKENIZER = {"name": "gpt2", "encode": "encode_ordinary", **TOKENIZER_FILES}
META = "meta.json"
SPLITS = ("train", "val")
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit
HASH_BLOCK = 1 << 24
DEFAULT_GLOB = "**/*.txt"  # data.glob's default: a folder without such files takes its record files instead


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to prepare, from the config's `data` section: the decisions that shape the token files."""

    path: str  # absolute: a file, a folder or a glob pattern
    kind: str  # "file", "folder" or "glob"
    glob: str  # the files of a folder, relative to it
    exclude: tuple[str, ...]  # fnmatch patterns of relative paths left out
    train_ratio: float
    text_field: str = "text"  # the field of a record (JSON Lines, JSON, Parquet) that holds its document
    max_tokens: int = 0  # > 0: only the corpus's first documents, up to the one that reaches this many tokens
    # "auto": by the hash of a file's path or a record's (path, index), each document's tail when that leaves a
    # split shorter than one window; "tails": the last (1 - train_ratio) of every document's tokens validates.
    split: str = "auto"

    @property
    def root(self) -> str:
        """The folder that source paths are relative to."""
        if self.kind == "folder":
            return self.path
        if self.kind == "file":
            return os.path.dirname(self.path)
        return _glob_root(self.path)

    def key(self) -> str:
        """A short hash of everything that decides the token files' content (not the format: a folder
        written by another version of the project is found, and reported stale)."""
        decided = [self.path, self.kind, self.glob, list(self.exclude), self.train_ratio]
        # The later keys only when they are not their defaults, so folders prepared before them keep their names.
        later = {k: v for k, v in (("text_field", self.text_field), ("max_tokens", self.max_tokens),
                                   ("split", self.split)) if v != Spec.__dataclass_fields__[k].default}
        text = json.dumps(decided + ([later] if later else []))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def name(self) -> str:
        base = os.path.basename(self.root if self.kind == "glob" else self.path.rstrip(os.sep))
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(base)[0] if self.kind == "file" else base)
        return f"{base or 'corpus'}-{self.key()}"


@dataclasses.dataclass(frozen=True)
class Source:
    rel: str  # path relative to Spec.root
    size: int
    mtime_ns: int


def _glob_root(pattern: str) -> str:
    """The longest leading folder of a glob pattern without wildcards."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if globlib.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.sep


def is_prepared_folder(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, f)) for f in (META, "train.bin", "val.bin"))


def spec_from_config(data: Any) -> Spec:
    """The Spec of the config's `data` section; a path that names nothing is a UserError."""
    path = os.path.abspath(os.path.expanduser(data.path)) if data.path else default_text_path()
    exclude = tuple(p.strip() for p in data.exclude.split(",") if p.strip())
    if globlib.has_magic(data.path):
        kind = "glob"
    elif os.path.isdir(path):
        kind = "folder"
    elif os.path.isfile(path):
        kind = "file"
    else:
        raise UserError(f"data path {path} does not exist; point --config.data.path at a text file, a folder of "
                        "text files, a glob or a prepared folder")
    return Spec(path, kind, data.glob, exclude, float(data.train_ratio), data.text_field, int(data.max_tokens),
                data.split)


def _name_regex(part: str) -> str:
    """The regex of one glob path component: `*` and `?` never cross a folder, `[...]` as fnmatch's."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        close = part.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif close > 0:
            body = part[i + 1:close].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern:
    """A relative glob pattern as a regex over '/'-separated relative paths; `**` spans any number of folders."""
    parts = pattern.replace(os.sep, "/").split("/")
    regex = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _name_regex(part) + ("" if last else "/")
    return re.compile(regex + r"\Z", re.S)


def _walk(root: str, pattern: str) -> tuple[list[tuple[str, str]], int]:
    """(relative path, real path) of every file below `root` that `pattern` may match (no deeper than its folders
    unless it has `**`), hidden names left out as glob leaves them out, and the number of folder links skipped:
    those that lead back into the tree or to a folder already walked (loops), which would take files again."""
    tree = os.path.realpath(root)
    walked, links, found = {tree}, 0, []
    depth = None if "**" in pattern else pattern.replace(os.sep, "/").count("/")
    for folder, dirs, files in os.walk(root, followlinks=True):
        if depth is not None and os.path.relpath(folder, root).count(os.sep) + (folder != root) >= depth:
            dirs[:] = []  # the pattern matches no file deeper than this
        kept = []
        for name in sorted(dirs):
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if name.startswith("."):
                continue
            inside = real.startswith(tree + os.sep) or (tree + os.sep).startswith(real + os.sep)  # or an ancestor
            if os.path.islink(path) and (real in walked or inside):
                links += 1
                continue
            walked.add(real)
            kept.append(name)
        dirs[:] = kept
        found += [(os.path.relpath(os.path.join(folder, f), root), os.path.realpath(os.path.join(folder, f)))
                  for f in files if not f.startswith(".")]
    return found, links


@dataclasses.dataclass(frozen=True)
class Found:
    """The files of a corpus and what was left out on the way."""

    sources: list[Source]
    links_skipped: int  # folder links back into the tree or in a loop, and second names of one real file


def find_sources(spec: Spec) -> Found:
    """Every file of the corpus once (by its real path), sorted by relative path; no file is a UserError."""
    root = spec.root
    if spec.kind == "file":
        candidates, links = [(os.path.basename(spec.path), os.path.realpath(spec.path))], 0
    else:
        relative = spec.glob if spec.kind == "folder" else os.path.relpath(spec.path, root)
        walked, links = _walk(root, relative)
        pattern = glob_regex(relative)
        candidates = [(rel, real) for rel, real in walked if pattern.match(rel.replace(os.sep, "/"))]
        if not candidates and spec.kind == "folder" and spec.glob == DEFAULT_GLOB:
            # A folder of record files only (a dataset downloaded from the Hub) works as it is.
            candidates = [(rel, real) for rel, real in walked if record_format(rel)]
    sources, taken = [], set()
    for rel, real in sorted(candidates):
        if not os.path.isfile(real) or any(fnmatch.fnmatchcase(rel, p) for p in spec.exclude):
            continue
        if real in taken:  # a second name (a file link) of a file already taken
            links += 1
            continue
        taken.add(real)
        stat = os.stat(real)
        sources.append(Source(rel, stat.st_size, stat.st_mtime_ns))
    if not sources:
        what = (f"the glob {spec.path}" if spec.kind == "glob" else
                f"the folder {spec.path} has no file matching --config.data.glob={spec.glob!r}")
        left_out = f" once --config.data.exclude={','.join(spec.exclude)!r} is applied" if spec.exclude else ""
        hint = (spec.kind == "folder" and _records_hint(walked)) or "check --config.data.glob and data.exclude"
        raise UserError(f"{what} matches no file{left_out}; check --config.data.path, data.glob and data.exclude"
                        if spec.kind == "glob" else f"{what}{left_out}; {hint}")
    return Found(sources, links)


def _records_hint(walked: list[tuple[str, str]]) -> str:
    """What to set for a folder of record files (a dataset downloaded from the Hub) that the glob left out."""
    formats = collections.Counter(record_format(rel) for rel, _ in walked)
    formats.pop(None, None)
    if not formats:
        return ""
    fmt, count = formats.most_common(1)[0]
    return f"it has {count} .{fmt} files: set --config.data.glob='**/*.{fmt}'"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def unreadable(path: str, e: OSError) -> UserError:
    return UserError(f"cannot read the corpus file {path} ({e.strerror or e}); make it readable, or leave it out "
                     "with --config.data.exclude")


def readable_sha256(path: str) -> str:
    """A source file's sha256; a file that cannot be read is a UserError naming it."""
    try:
        return file_sha256(path)
    except OSError as e:
        raise unreadable(path, e) from e


def read_meta(folder: str) -> dict | None:
    """The folder's meta.json, or None if it has none (missing, or a preparation that never finished)."""
    try:
        with open(os.path.join(folder, META)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{os.path.join(folder, META)} cannot be read ({e}); delete {folder} to prepare it "
                        "again") from e


def incompatibility(meta: dict) -> str | None:
    """Why this project cannot read a prepared folder with this meta (another format or tokenizer), or None."""
    if meta.get("format") == 1:
        return ("it was prepared in format 1, which could take a file more than once through a folder link; this "
                f"version reads format {FORMAT_VERSION}")
    if meta.get("format") != FORMAT_VERSION:
        return f"it was prepared in format {meta.get('format')!r}, and this version reads format {FORMAT_VERSION}"
    if meta.get("tokenizer") != TOKENIZER:
        return f"it was prepared with another tokenizer ({meta.get('tokenizer')})"
    return None


def changes(spec: Spec, meta: dict) -> list[str]:
    """What differs between the corpus's files now and those `meta` was prepared from ([] = nothing):
    (path, size, mtime) compared for every file, the content hashed only where size or mtime moved."""
    recorded = {rel: (size, mtime, sha) for rel, size, mtime, sha in
                zip(*(meta["files"][k] for k in ("path", "size", "mtime_ns", "sha256")), strict=True)}
    now = {s.rel: s for s in find_sources(spec).sources}
    found = [f"{rel} added" for rel in sorted(now.keys() - recorded.keys())]
    found += [f"{rel} removed" for rel in sorted(recorded.keys() - now.keys())]
    for rel in sorted(now.keys() & recorded.keys()):
        size, mtime, sha = recorded[rel]
        source = now[rel]
        if (source.size, source.mtime_ns) != (size, mtime) and (
                source.size != size or readable_sha256(os.path.join(spec.root, rel)) != sha):
            found.append(f"{rel} changed")
    return found


@dataclasses.dataclass(frozen=True)
class Status:
    folder: str
    meta: dict | None  # None: nothing prepared there yet
    stale: list[str]  # why the folder no longer matches its sources ([] = it does)

    @property
    def ready(self) -> bool:
        return self.meta is not None and not self.stale

    @property
    def fingerprint(self) -> str | None:
        return None if self.meta is None else self.meta["fingerprint"]


def cache_folder(spec: Spec, data: Any, checkpoint_dir: str) -> str:
    return os.path.join(os.path.expanduser(data.cache_dir) or os.path.join(checkpoint_dir, "data"), spec.name())


def check(data: Any, checkpoint_dir: str) -> tuple[Spec | None, Status]:
    """(spec, status) of the config's corpus. A prepared folder given as data.path is used as it is (its
    sources need not exist here), so its spec is None; one this version cannot read is a UserError."""
    path = os.path.expanduser(data.path)
    if data.path and is_prepared_folder(path):
        meta = read_meta(path)
        problem = incompatibility(meta)
        if problem:
            raise UserError(f"cannot train on the prepared folder {path}: {problem}; prepare its sources again with "
                            "python -m mygpt_jax.prepare")
        return None, Status(path, meta, [])
    spec = spec_from_config(data)
    folder = cache_folder(spec, data, checkpoint_dir)
    meta = read_meta(folder)
    if meta is None:
        return spec, Status(folder, None, [])
    problem = incompatibility(meta)
    return spec, Status(folder, meta, [problem] if problem else changes(spec, meta))


def describe(reasons: list[str], limit: int = 3) -> str:
    more = f" and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return ", ".join(reasons[:limit]) + more


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus opened for reading: both splits as memory-mapped token arrays."""

    folder: str
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def open_corpus(folder: str, meta: dict) -> Corpus:
    splits = []
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.bin")
        expected = meta[split]["tokens"] * np.dtype(TOKEN_DTYPE).itemsize
        if os.path.getsize(path) != expected:
            raise UserError(f"{path} has {os.path.getsize(path)} bytes where {META} says {expected}; delete "
                            f"{folder} to prepare it again")
        # An empty split cannot be memory-mapped; the caller says it is too small for a window.
        splits.append(np.memmap(path, TOKEN_DTYPE, "r") if expected else np.zeros(0, TOKEN_DTYPE))
    return Corpus(folder, meta, *splits)


class BadFile(Exception):
    """A file that is no text: binary, or not UTF-8 (`at`: the byte where decoding failed)."""

    def __init__(self, reason: str, at: int | None = None):
        super().__init__(reason, at)  # both in args: a worker process's exception is pickled back
        self.reason, self.at = reason, at


def safe_cut(data: bytes, lo: int) -> int | None:
    """The last position p > lo where `data` may be cut into two chunks whose tokens are the whole's:
    data[p - 1] is a newline with printable ASCII before and after it. None if there is none."""
    p = len(data) - 1
    while (p := data.rfind(b"\n", lo + 1, p)) > 0:
        if 0x21 <= data[p - 1] <= 0x7E and p + 1 < len(data) and 0x21 <= data[p + 1] <= 0x7E:
            return p + 1
    return None


def encode_chunk(data: bytes) -> np.ndarray:
    """The GPT-2 tokens (`encode_ordinary`) of one chunk of a text file."""
    if b"\0" in data:
        raise BadFile("binary, with NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile("not UTF-8", e.start) from None
    # encode_ordinary's tokens, as an array: with no special token allowed and none disallowed, a literal
    # "<|endoftext|>" is ordinary text, and no Python int is made per token.
    ids = get_tokenizer().encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return ids.astype(TOKEN_DTYPE)

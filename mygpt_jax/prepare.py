"""Tokenize a corpus once into a prepared folder: `python -m mygpt_jax.prepare --config CONFIG`.

`train` does the same on first use. The files are read in chunks and tokenized by `data.workers` worker
processes (threads for a small corpus, where starting processes would cost more than it saves: tiktoken
releases the GIL only for part of its work), the results written in order, so memory stays bounded whatever
the corpus's size and 1 or N workers write byte-identical files. A file is cut into chunks only after a newline
with printable ASCII on both sides: no GPT-2 pre-token crosses such a point (a newline after other whitespace
can join it: "\\n\\n" is one token), so a chunk's tokens are those of the whole file at that place.

Documents: in a folder or glob every file is one document, its `encode_ordinary` tokens followed by
<|endoftext|>; a file goes to validation when the hash of its relative path falls in the last (1 - train_ratio)
of the range, so adding a file never moves another. When that leaves either split shorter than one window
at GPT-2's longest context, each document is split instead: its first train_ratio of tokens to training, the
rest to validation. A single text file is split by characters at train_ratio, as the seed split its text,
with no <|endoftext|>. Empty files are skipped; so, in a folder, are binary and non-UTF-8 files (named in
one line; a single file that is not UTF-8 stops with one line).

Everything is written into `<folder>.tmp-<pid>` and renamed into place after meta.json, so an interrupted
or failed preparation never leaves a folder that is taken as complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
from tqdm import tqdm

from mygpt_jax import corpus
from mygpt_jax.corpus import SPLITS, TOKEN_DTYPE, BadFile, Source, Spec, encode_chunk, safe_cut
from mygpt_jax.errors import Interrupted, UserError
from mygpt_jax.preemption import signals_interrupt
from mygpt_jax.tokenizer import END_OF_TEXT_ID

CHUNK_BYTES = 1 << 20  # what one worker tokenizes at a time
PROCESSES_FROM_BYTES = 64 << 20  # corpora this large are tokenized by processes, smaller ones by threads
MIN_SPLIT_TOKENS = 1025  # one window at GPT-2's context of 1024: less in a split and documents are split instead
COPY_TOKENS = 1 << 24
SHARE_TOLERANCE = 0.1  # a validation share further than this from 1 - train_ratio gets a line


@dataclasses.dataclass
class _Chunk:
    doc: int  # index of its file in the sources
    split: str
    offset: int  # of its first byte in the file
    data: bytes
    first: bool  # of its document in this split
    last: bool


def validation_share(rel: str) -> float:
    """Where a file's relative path hashes to in [0, 1): above train_ratio, the file is validation."""
    return int(hashlib.sha256(rel.replace(os.sep, "/").encode()).hexdigest()[:8], 16) / 2 ** 32


def _char_offset(path: str, chars: int) -> int:
    """The byte offset of code point `chars` of a UTF-8 file (counting the bytes that start a character)."""
    seen = 0
    with open(path, "rb") as f:
        while block := f.read(corpus.HASH_BLOCK):
            starts = np.flatnonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80)
            if seen + len(starts) > chars:
                return f.tell() - len(block) + int(starts[chars - seen])
            seen += len(starts)
    return os.path.getsize(path)


def _count_chars(path: str) -> int:
    count = 0
    with open(path, "rb") as f:
        while block := f.read(corpus.HASH_BLOCK):
            count += int(np.count_nonzero((np.frombuffer(block, np.uint8) & 0xC0) != 0x80))
    return count


class _Reader:
    """Reads the sources in order, hashing each file, and cuts them into chunks at safe points."""

    def __init__(self, spec: Spec, sources: list[Source]):
        self.spec, self.sources = spec, sources
        self.sha256: dict[int, str] = {}
        self.bytes_read: dict[int, int] = {}
        self.failed: set[int] = set()  # documents the writer found bad: not worth reading further

    def _parts(self, doc: int, path: str) -> list[tuple[str, int, int]]:
        """(split, start, end) byte ranges of one file."""
        size = os.path.getsize(path)
        if self.spec.kind == "file":  # the seed's split: the first train_ratio of its characters
            cut = _char_offset(path, int(self.spec.train_ratio * _count_chars(path)))
            return [("train", 0, cut), ("val", cut, size)]
        split = "val" if validation_share(self.sources[doc].rel) >= self.spec.train_ratio else "train"
        return [(split, 0, size)]

    def chunks(self) -> Iterator[_Chunk]:
        for doc, source in enumerate(self.sources):
            path = os.path.join(self.spec.root, source.rel)
            try:
                yield from self._file_chunks(doc, path)
            except OSError as e:
                raise corpus.unreadable(path, e) from e

    def _file_chunks(self, doc: int, path: str) -> Iterator[_Chunk]:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for split, start, end in self._parts(doc, path):
                f.seek(start)
                offset, carry, first = start, b"", True
                while doc not in self.failed:
                    block = f.read(min(CHUNK_BYTES, end - f.tell()))
                    digest.update(block)
                    data = carry + block
                    if f.tell() >= end or not block:  # the part's last chunk
                        if data:
                            yield _Chunk(doc, split, offset, data, first, True)
                        break
                    cut = safe_cut(data, max(0, len(carry) - 2))  # carry itself has no safe point
                    if cut is None:
                        carry = data  # the chunk grows until one is found
                        continue
                    yield _Chunk(doc, split, offset, data[:cut], first, False)
                    offset, carry, first = offset + cut, data[cut:], False
            while block := f.read(corpus.HASH_BLOCK):  # the rest of a file found bad, for its hash
                digest.update(block)
            self.bytes_read[doc] = f.tell()
        self.sha256[doc] = digest.hexdigest()


class _TokenFile:
    """One split's token file, written in order; a document found bad is cut off again."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - open while the split is written; close() closes it
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        self.file.write(ids.tobytes())
        self.tokens += len(ids)

    def truncate(self, tokens: int) -> None:
        self.file.seek(tokens * np.dtype(TOKEN_DTYPE).itemsize)
        self.file.truncate()
        self.tokens = tokens

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _ignore_interrupts() -> None:
    """A worker process leaves Ctrl-C (sent to the whole process group) to the process that started it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool(workers: int, processes: bool) -> concurrent.futures.Executor:
    if not processes:
        return concurrent.futures.ThreadPoolExecutor(workers)
    # Spawned, not forked: the parent may be a training process whose JAX threads a fork would copy half-way.
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_ignore_interrupts)


def _write_tokens(reader: _Reader, files: dict[str, _TokenFile], workers: int, processes: bool, end_of_text: bool,
                  bar: tqdm) -> tuple[dict[int, list[tuple[str, int, int]]], dict[int, str]]:
    """Tokenize every chunk on `workers` processes (or threads) and write the tokens in order. Returns each
    document's (split, first token, token count) spans and the reason of every bad document."""
    spans: dict[int, list[tuple[str, int, int]]] = collections.defaultdict(list)
    bad: dict[int, str] = {}
    eot = np.asarray([END_OF_TEXT_ID], TOKEN_DTYPE)

    def consume(chunk: _Chunk, future: concurrent.futures.Future) -> None:
        if chunk.doc in bad:
            return
        out = files[chunk.split]
        if chunk.first:
            spans[chunk.doc].append((chunk.split, out.tokens, 0))
        try:
            ids = future.result()
        except BadFile as e:
            bad[chunk.doc] = e.reason if e.at is None else f"{e.reason} at byte {chunk.offset + e.at}"
            reader.failed.add(chunk.doc)
            for split, start, _ in spans.pop(chunk.doc):
                files[split].truncate(start)
            return
        out.write(ids)
        if chunk.last and end_of_text:
            out.write(eot)
        split, start, _ = spans[chunk.doc][-1]
        spans[chunk.doc][-1] = (split, start, out.tokens - start)
        bar.update(len(chunk.data))
        bar.set_postfix(tokens=f"{sum(f.tokens for f in files.values()):,}", refresh=False)

    pool = _pool(workers, processes)
    pending: collections.deque = collections.deque()
    try:
        for chunk in reader.chunks():
            pending.append((chunk, pool.submit(encode_chunk, chunk.data)))
            while len(pending) > 2 * workers:  # bounded memory: a few chunks in flight
                consume(*pending.popleft())
        while pending:
            consume(*pending.popleft())
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)  # an interrupt does not wait for running chunks
    return spans, bad


def _split_documents(folder: str, spans: dict[int, list[tuple[str, int, int]]], train_ratio: float) -> None:
    """Rewrite train.bin and val.bin so that each document's first train_ratio of tokens is training and the
    rest validation, each part ending in <|endoftext|> (the files were split by file, one part per document)."""
    sources = {split: np.memmap(os.path.join(folder, f"{split}.bin"), TOKEN_DTYPE, "r")
               if os.path.getsize(os.path.join(folder, f"{split}.bin")) else np.zeros(0, TOKEN_DTYPE)
               for split in SPLITS}
    outs = {split: _TokenFile(os.path.join(folder, f"{split}.bin.new")) for split in SPLITS}
    eot = np.asarray([END_OF_TEXT_ID], TOKEN_DTYPE)
    for doc in sorted(spans):
        (split, start, count), = spans[doc]
        body = sources[split][start:start + count - 1]  # without its <|endoftext|>
        cut = int(train_ratio * len(body))
        spans[doc] = []
        for part, tokens in (("train", body[:cut]), ("val", body[cut:])):
            if len(tokens):
                spans[doc].append((part, outs[part].tokens, len(tokens) + 1))
                for i in range(0, len(tokens), COPY_TOKENS):
                    outs[part].write(np.asarray(tokens[i:i + COPY_TOKENS]))
                outs[part].write(eot)
    del sources
    for split, out in outs.items():
        out.close()
        os.replace(out.path, os.path.join(folder, f"{split}.bin"))


def _split_stats(folder: str, spans: dict[int, list[tuple[str, int, int]]]) -> dict[str, dict[str, Any]]:
    stats = {}
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.bin")
        stats[split] = {"tokens": os.path.getsize(path) // np.dtype(TOKEN_DTYPE).itemsize,
                        "documents": sum(any(s == split for s, _, _ in parts) for parts in spans.values()),
                        "sha256": corpus.file_sha256(path)}
    return stats


def _remove_leftovers(folder: str) -> None:
    """Temporary folders of earlier preparations of this corpus whose process is gone (killed, or the machine
    went down)."""
    parent, name = os.path.split(folder)
    for entry in os.listdir(parent):
        if entry.startswith(f"{name}.tmp-") or entry.startswith(f"{name}.old-"):
            pid = entry.rsplit("-", 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_error(e: OSError, path: str) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"the disk is full: no space left to write {path}; nothing was kept; free some space or "
                         "set --config.data.cache_dir to a folder on another disk")
    return UserError(f"cannot write the prepared corpus folder {path} ({e.strerror or e}); set "
                     "--config.data.cache_dir to a writable folder")


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(spec: Spec, folder: str, workers: int = 0, progress: bool | None = None, out: Any = None) -> dict:
    """Tokenize the corpus of `spec` into `folder` (replacing what is there) and return its meta; the summary
    line goes to `out` (default: stdout)."""
    found = corpus.find_sources(spec)
    sources = found.sources
    workers = workers or default_workers()
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_leftovers(folder)
    except OSError as e:
        raise _disk_error(e, folder) from e
    tmp = f"{folder}.tmp-{os.getpid()}"
    start = time.perf_counter()
    total_bytes = sum(s.size for s in sources)
    try:
        with signals_interrupt():
            os.makedirs(tmp, exist_ok=True)
            files = {split: _TokenFile(os.path.join(tmp, f"{split}.bin")) for split in SPLITS}
            reader = _Reader(spec, sources)
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"preparing {os.path.basename(folder)}",
                      disable=None if progress is None else not progress, file=sys.stderr) as bar:
                spans, bad = _write_tokens(reader, files, workers, total_bytes >= PROCESSES_FROM_BYTES,
                                           spec.kind != "file", bar)
            for f in files.values():
                f.close()
            if spec.kind == "file" and bad:
                raise UserError(f"data file {spec.path} is {bad[0]}; convert it to UTF-8 text or choose another "
                                "--config.data.path")
            rule = "characters" if spec.kind == "file" else "files"
            if rule == "files" and spans and (spec.split == "tails" or min(f.tokens for f in files.values())
                                              < MIN_SPLIT_TOKENS):
                _split_documents(tmp, spans, spec.train_ratio)
                rule = "document tails"
            meta = _meta(spec, found, reader, spans, bad, rule, _split_stats(tmp, spans),
                         time.perf_counter() - start, workers)
            with open(os.path.join(tmp, corpus.META), "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _move_into_place(tmp, folder)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"\nInterrupted: stopped preparing {folder}; nothing was kept; rerun to prepare it again",
              file=sys.stderr)
        raise Interrupted from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(e, folder) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(folder, meta, total_bytes, out or sys.stdout)
    return meta


def _move_into_place(tmp: str, folder: str) -> None:
    if os.path.exists(folder):  # a stale folder: replaced as a whole
        old = f"{folder}.old-{os.getpid()}"
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, folder)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process prepared the same corpus first


def _meta(spec: Spec, found: corpus.Found, reader: _Reader, spans: dict, bad: dict[int, str], rule: str,
          splits: dict[str, dict[str, Any]], seconds: float, workers: int) -> dict:
    sources = found.sources

    def split_of(doc: int) -> str:
        if doc in bad or doc not in spans:
            return "skipped"
        return "+".join(dict.fromkeys(s for s, _, _ in spans[doc]))

    docs = range(len(sources))
    return {
        "format": corpus.FORMAT_VERSION, "tokenizer": corpus.TOKENIZER,
        "source": {"path": spec.path, "kind": spec.kind, "glob": spec.glob, "exclude": list(spec.exclude),
                   "train_ratio": spec.train_ratio, "split": spec.split},
        "split": rule, "end_of_text": spec.kind != "file",
        "files": {"path": [s.rel for s in sources], "size": [s.size for s in sources],
                  "mtime_ns": [s.mtime_ns for s in sources], "sha256": [reader.sha256.get(d, "") for d in docs],
                  "split": [split_of(d) for d in docs],
                  "tokens": [sum(n for _, _, n in spans.get(d, [])) for d in docs],
                  "note": [bad.get(d, "empty" if reader.bytes_read.get(d) == 0 else "") for d in docs]},
        **splits,
        "skipped": {"empty": sum(reader.bytes_read.get(d) == 0 for d in docs), "not_text": len(bad),
                    "links": found.links_skipped},
        "fingerprint": hashlib.sha256((splits["train"]["sha256"] + splits["val"]["sha256"]).encode()).hexdigest()[:16],
        "prepared": {"seconds": round(seconds, 3), "workers": workers, "bytes": sum(reader.bytes_read.values())},
    }


def _report(folder: str, meta: dict, total_bytes: int, out: Any) -> None:
    files, prepared = meta["files"], meta["prepared"]
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    seconds = max(prepared["seconds"], 1e-9)
    skipped = meta["skipped"]["empty"] + meta["skipped"]["not_text"]
    links = meta["skipped"]["links"]
    links = f", {links} links skipped that lead back into the folder or to a file taken already" if links else ""
    print(f"Prepared {folder}: {len(files['path']):,} files ({skipped} skipped{links}), {total_bytes / 1e6:,.2f} MB -> "
          f"{meta['train']['tokens']:,} training + {meta['val']['tokens']:,} validation tokens (split by "
          f"{meta['split']}) in {seconds:.1f} s: {total_bytes / 1e6 / seconds:.2f} MB/s, {tokens / seconds:,.0f} "
          f"tokens/s on {prepared['workers']} workers", file=out)
    bad = [f"{p} ({n})" for p, n in zip(files["path"], files["note"], strict=True) if n and n != "empty"]
    if bad:
        print(f"Skipped {len(bad)} files that are not text: {corpus.describe(bad)}", file=sys.stderr)
    _report_shares(meta)


def _report_shares(meta: dict) -> None:
    """One line when the validation share of the tokens is far from what data.train_ratio asks (a split by whole
    files, of a folder of few or unevenly sized files)."""
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    asked = 1 - meta["source"]["train_ratio"]
    if meta["split"] != "files" or not tokens or abs(meta["val"]["tokens"] / tokens - asked) <= SHARE_TOLERANCE:
        return
    print(f"Note: validation holds {meta['val']['tokens'] / tokens:.0%} of the tokens and training "
          f"{meta['train']['tokens'] / tokens:.0%}, where --config.data.train_ratio={meta['source']['train_ratio']} "
          f"asks for {asked:.0%} validation: whole files go to one split, and these are few or of unequal size; "
          f"--config.data.split=tails takes the last {asked:.0%} of every document's tokens instead", file=sys.stderr)


def ready_corpus(spec: Spec | None, status: corpus.Status, workers: int) -> corpus.Corpus:
    """The corpus `corpus.check` found, prepared first if it is missing or stale."""
    meta = status.meta
    if not status.ready:
        if status.stale:
            print(f"{status.folder} is stale ({corpus.describe(status.stale)}): preparing it again")
        meta = prepare(spec, status.folder, workers)
    return corpus.open_corpus(status.folder, meta)


def main(config: ml_collections.ConfigDict) -> None:
    spec, status = corpus.check(config.data, config.checkpoint_dir)
    if spec is None:
        print(f"{status.folder} is a prepared folder: nothing to prepare")
    elif status.ready:
        print(f"{status.folder} is up to date ({status.meta['train']['tokens']:,} training and "
              f"{status.meta['val']['tokens']:,} validation tokens)")
    else:
        if status.stale:
            print(f"{status.folder} is stale ({corpus.describe(status.stale)}): preparing it again")
        prepare(spec, status.folder, config.data.workers, out=sys.stdout)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

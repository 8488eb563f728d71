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
one line; a single file that is not UTF-8 stops with one line). Record files (JSON Lines, JSON, Parquet:
`mygpt_jax.records`) give one document per record, split by the hash of (path, index); `data.split=tails` splits
every document's tokens instead, and `data.max_tokens` stops after the document that reaches that many tokens.

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

from mygpt_jax import corpus, records
from mygpt_jax.corpus import SPLITS, TOKEN_DTYPE, BadFile, Source, Spec, encode_chunk, safe_cut
from mygpt_jax.errors import Interrupted, UserError
from mygpt_jax.preemption import signals_interrupt
from mygpt_jax.records import RecordChunk
from mygpt_jax.tokenizer import END_OF_TEXT_ID

CHUNK_BYTES = 1 << 20  # what one worker tokenizes at a time
PROCESSES_FROM_BYTES = 64 << 20  # corpora this large are tokenized by processes, smaller ones by threads
COMPRESSED_TEXT = 3  # bytes of text per byte of a Parquet or compressed JSON Lines file, to choose between them
MIN_SPLIT_TOKENS = 1025  # one window at GPT-2's context of 1024: less in a split and documents are split instead
COPY_TOKENS = 1 << 24
RECORDS_PER_CHUNK = 256  # of a JSON array, for one worker at a time
SHARE_TOLERANCE = 0.1  # a validation share further than this from 1 - train_ratio gets a line


@dataclasses.dataclass
class _Chunk:
    doc: int  # index of its file in the sources
    split: str
    offset: int  # of its first byte in the file
    data: bytes
    first: bool  # of its document in this split
    last: bool
    records: RecordChunk | None = None  # a record file's chunk (then split, data, first and last are unused)
    size: int = -1  # the file's bytes it moves the progress bar by; -1 = len(data)


def validation_share(rel: str) -> float:
    """Where a file's relative path hashes to in [0, 1): above train_ratio, the file is validation."""
    return records.hash_share(rel.replace(os.sep, "/"))


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
        self.stop = False  # the writer has data.max_tokens: read no further

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
            fmt = records.record_format(source.rel)
            try:
                yield from self._record_chunks(doc, path, fmt) if fmt else self._file_chunks(doc, path)
            except records.BadRecord as e:
                raise UserError(f"{path} {e}") from None
            except OSError as e:
                raise corpus.unreadable(path, e) from e
            if self.stop:
                return

    def _record_chunks(self, doc: int, path: str, fmt: str) -> Iterator[_Chunk]:
        base = {"rel": self.sources[doc].rel, "field": self.spec.text_field,
                "train_ratio": 1.0 if self.spec.split == "tails" else self.spec.train_ratio}
        size, done = self.sources[doc].size, 0
        if fmt == "parquet":
            for index, values, fraction in records.parquet_texts(path, self.spec.text_field, CHUNK_BYTES):
                chunk = RecordChunk(index=index, values=values, parquet=True, **base)
                yield _Chunk(doc, "", index, b"", False, False, chunk, int(fraction * size) - done)
                done = int(fraction * size)
                if self.stop:
                    return
            self.sha256[doc] = corpus.readable_sha256(path)
        else:
            with open(path, "rb") as f:
                raw = records.HashingFile(f)
                items = (records.json_records(raw, RECORDS_PER_CHUNK) if fmt == "json" else
                         records.json_lines(raw, fmt, CHUNK_BYTES))
                for index, lines in items:
                    chunk = RecordChunk(index=index, **base, **({"values": lines} if fmt == "json" else
                                                                {"lines": lines}))
                    yield _Chunk(doc, "", index, b"", False, False, chunk, raw.position - done)
                    done = raw.position
                    if self.stop:
                        return
                while raw.read(corpus.HASH_BLOCK):  # the rest (a gzip trailer), for the hash
                    pass
            self.sha256[doc] = raw.digest.hexdigest()
        self.bytes_read[doc] = size

    def _file_chunks(self, doc: int, path: str) -> Iterator[_Chunk]:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for split, start, end in self._parts(doc, path):
                f.seek(start)
                offset, carry, first = start, b"", True
                while doc not in self.failed and not self.stop:
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


_Spans = dict[int, list[tuple[str, int, int]]]  # per document: (split, first token, tokens) in each split it has


class _Writer:
    """Writes the tokens of the chunks in order into the split files: each document's spans, the reason of every
    bad text file, each record file's record counts, and where data.max_tokens stopped it."""

    def __init__(self, reader: _Reader, files: dict[str, _TokenFile], end_of_text: bool, max_tokens: int,
                 bar: tqdm):
        self.reader, self.files, self.end_of_text, self.max_tokens, self.bar = reader, files, end_of_text, \
            max_tokens, bar
        self.spans: _Spans = collections.defaultdict(list)
        self.bad: dict[int, str] = {}
        self.records: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])  # [written, empty]
        self.last_doc = -1  # the last document written before data.max_tokens stopped the rest

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files.values())

    def _write(self, doc: int, split: str, ids: np.ndarray) -> None:
        _extend(self.spans[doc], split, self.files[split].tokens, len(ids))
        self.files[split].write(ids)

    def consume(self, chunk: _Chunk, future: concurrent.futures.Future) -> None:
        if chunk.doc in self.bad or self.reader.stop:
            return
        self.last_doc = chunk.doc
        try:
            result = future.result()
        except BadFile as e:
            self.bad[chunk.doc] = e.reason if e.at is None else f"{e.reason} at byte {chunk.offset + e.at}"
            self.reader.failed.add(chunk.doc)
            for split, start, _ in self.spans.pop(chunk.doc, []):
                self.files[split].truncate(start)
            return
        except records.BadRecord as e:
            raise UserError(f"{os.path.join(self.reader.spec.root, self.reader.sources[chunk.doc].rel)}: {e}") \
                from None
        if chunk.records is not None:
            self._consume_records(chunk.doc, result)
        else:
            self._write(chunk.doc, chunk.split, result)
            if chunk.last and self.end_of_text:
                self._write(chunk.doc, chunk.split, np.asarray([END_OF_TEXT_ID], TOKEN_DTYPE))
            self.reader.stop = chunk.last and 0 < self.max_tokens <= self.tokens
        self.bar.update(len(chunk.data) if chunk.size < 0 else chunk.size)
        self.bar.set_postfix(tokens=f"{self.tokens:,}", refresh=False)

    def _consume_records(self, doc: int, result: records.RecordTokens) -> None:
        keep = len(result.lengths)
        if self.max_tokens and self.tokens + int(result.lengths.sum()) >= self.max_tokens:
            keep = int(np.searchsorted(np.cumsum(result.lengths), self.max_tokens - self.tokens)) + 1
            self.reader.stop = True
        lengths, is_val = result.lengths[:keep], result.is_val[:keep]
        for split, ids, mask in (("train", result.train, ~is_val), ("val", result.val, is_val)):
            if mask.any():
                self._write(doc, split, ids[:int(lengths[mask].sum())])
        self.records[doc][0] += keep
        self.records[doc][1] += result.empty


def _write_tokens(writer: _Writer, workers: int, processes: bool) -> None:
    """Tokenize every chunk on `workers` processes (or threads) and write the tokens in order."""
    pool = _pool(workers, processes)
    pending: collections.deque = collections.deque()
    try:
        for chunk in writer.reader.chunks():
            work = (records.encode_records, chunk.records) if chunk.records else (encode_chunk, chunk.data)
            pending.append((chunk, pool.submit(*work)))
            while len(pending) > 2 * workers:  # bounded memory: a few chunks in flight
                writer.consume(*pending.popleft())
            if writer.reader.stop:
                break
        while pending:
            writer.consume(*pending.popleft())
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)  # an interrupt does not wait for running chunks


def _extend(spans: list[tuple[str, int, int]], split: str, start: int, tokens: int) -> None:
    """Add tokens written at `start` of `split` to a document's spans (contiguous in each split: documents are
    written in order)."""
    for i, (s, first, count) in enumerate(spans):
        if s == split:
            spans[i] = (s, first, count + tokens)
            return
    spans.append((split, start, tokens))


def _document_ends(tokens: np.ndarray, start: int, count: int) -> Iterator[int]:
    """The positions of the <|endoftext|> that end each document in tokens[start:start + count], read in blocks."""
    for block_start in range(start, start + count, COPY_TOKENS):
        block = np.asarray(tokens[block_start:min(block_start + COPY_TOKENS, start + count)])
        yield from (int(p) + block_start for p in np.flatnonzero(block == END_OF_TEXT_ID))


def _split_documents(folder: str, spans: _Spans, train_ratio: float) -> None:
    """Rewrite train.bin and val.bin so that each document's first train_ratio of tokens is training and the
    rest validation, each part ending in <|endoftext|> (a text file is one document, a record one)."""
    sources = {split: np.memmap(os.path.join(folder, f"{split}.bin"), TOKEN_DTYPE, "r")
               if os.path.getsize(os.path.join(folder, f"{split}.bin")) else np.zeros(0, TOKEN_DTYPE)
               for split in SPLITS}
    outs = {split: _TokenFile(os.path.join(folder, f"{split}.bin.new")) for split in SPLITS}
    eot = np.asarray([END_OF_TEXT_ID], TOKEN_DTYPE)
    for doc in sorted(spans):
        segments, spans[doc] = spans[doc], []
        for split, start, count in segments:
            tokens, begin = sources[split], start
            for end in _document_ends(tokens, start, count):
                cut = begin + int(train_ratio * (end - begin))
                for part, a, b in (("train", begin, cut), ("val", cut, end)):
                    if b > a:
                        _extend(spans[doc], part, outs[part].tokens, b - a + 1)
                        for i in range(a, b, COPY_TOKENS):
                            outs[part].write(np.asarray(tokens[i:min(i + COPY_TOKENS, b)]))
                        outs[part].write(eot)
                begin = end + 1
    del sources
    for split, out in outs.items():
        out.close()
        os.replace(out.path, os.path.join(folder, f"{split}.bin"))


def _split_stats(folder: str, end_of_text: bool) -> dict[str, dict[str, Any]]:
    """Each token file's tokens, documents (its <|endoftext|> tokens) and sha256, in one pass of reads (a memory
    map would count the whole file in the process's resident memory)."""
    stats = {}
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.bin")
        digest, ends = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while block := f.read(corpus.HASH_BLOCK):  # an even number of bytes: whole tokens
                digest.update(block)
                ends += int(np.count_nonzero(np.frombuffer(block, TOKEN_DTYPE) == END_OF_TEXT_ID))
        tokens = os.path.getsize(path) // np.dtype(TOKEN_DTYPE).itemsize
        stats[split] = {"tokens": tokens, "documents": ends if end_of_text else int(tokens > 0),
                        "sha256": digest.hexdigest()}
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
    workers = workers or default_workers()
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        _remove_leftovers(folder)
    except OSError as e:
        raise _disk_error(e, folder) from e
    tmp = f"{folder}.tmp-{os.getpid()}"
    try:
        with signals_interrupt():
            os.makedirs(tmp, exist_ok=True)
            meta = _prepare_into(spec, found, tmp, workers, progress)
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
    _report(folder, meta, out or sys.stdout)
    return meta


def _prepare_into(spec: Spec, found: corpus.Found, tmp: str, workers: int, progress: bool | None) -> dict:
    """Write the token files into `tmp` and return the meta."""
    start, sources = time.perf_counter(), found.sources
    formats = [records.record_format(s.rel) or "text" for s in sources]
    single_text = spec.kind == "file" and formats[0] == "text"
    files = {split: _TokenFile(os.path.join(tmp, f"{split}.bin")) for split in SPLITS}
    reader = _Reader(spec, sources)
    total_bytes = sum(s.size for s in sources)
    # Parquet and compressed lines hold several times their size in text: they count so for processes or threads.
    text_bytes = sum(s.size * (1 if f in ("text", "jsonl", "json") else COMPRESSED_TEXT) for s, f in zip(
        sources, formats, strict=True))
    name = os.path.basename(tmp).rsplit(".tmp-", 1)[0]
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"preparing {name}",
              disable=None if progress is None else not progress, file=sys.stderr) as bar:
        # A single text file is one document, never cut: data.max_tokens takes it whole.
        writer = _Writer(reader, files, not single_text, 0 if single_text else spec.max_tokens, bar)
        _write_tokens(writer, workers, text_bytes >= PROCESSES_FROM_BYTES)
    for f in files.values():
        f.close()
    if single_text and writer.bad:
        raise UserError(f"data file {spec.path} is {writer.bad[0]}; convert it to UTF-8 text or choose another "
                        "--config.data.path")
    kinds = ("text" in formats, any(f != "text" for f in formats))
    rule = "characters" if single_text else {(True, False): "files", (False, True): "records"}.get(
        kinds, "files and records")
    if rule != "characters" and writer.spans and (
            spec.split == "tails" or min(f.tokens for f in files.values()) < MIN_SPLIT_TOKENS):
        _split_documents(tmp, writer.spans, spec.train_ratio)
        rule = "document tails"
    return _meta(spec, found, formats, writer, rule, _split_stats(tmp, not single_text),
                 time.perf_counter() - start, workers)


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


def _meta(spec: Spec, found: corpus.Found, formats: list[str], writer: _Writer, rule: str,
          splits: dict[str, dict[str, Any]], seconds: float, workers: int) -> dict:
    sources, reader, spans, bad = found.sources, writer.reader, writer.spans, writer.bad
    docs = range(len(sources))
    cut_off = {d for d in docs if reader.stop and d > writer.last_doc}

    def split_of(doc: int) -> str:
        if doc in bad or doc not in spans:
            return "skipped"
        return "+".join(dict.fromkeys(s for s, _, _ in spans[doc]))

    def note(doc: int) -> str:
        if doc in cut_off:
            return "after data.max_tokens"
        return bad.get(doc, "empty" if reader.bytes_read.get(doc) == 0 else "")

    prefix = f":{spec.max_tokens}" if spec.max_tokens else ""
    return {
        "format": corpus.FORMAT_VERSION, "tokenizer": corpus.TOKENIZER,
        "source": {"path": spec.path, "kind": spec.kind, "glob": spec.glob, "exclude": list(spec.exclude),
                   "train_ratio": spec.train_ratio, "split": spec.split, "text_field": spec.text_field,
                   "max_tokens": spec.max_tokens},
        "split": rule, "end_of_text": rule != "characters",
        "files": {"path": [s.rel for s in sources], "size": [s.size for s in sources],
                  "mtime_ns": [s.mtime_ns for s in sources], "sha256": [reader.sha256.get(d, "") for d in docs],
                  "format": formats, "split": [split_of(d) for d in docs],
                  "tokens": [sum(n for _, _, n in spans.get(d, [])) for d in docs],
                  "records": [writer.records[d][0] if formats[d] != "text" else None for d in docs],
                  "empty_records": [writer.records[d][1] if formats[d] != "text" else None for d in docs],
                  "note": [note(d) for d in docs]},
        **splits,
        "records": {"documents": sum(n for n, _ in writer.records.values()),
                    "empty": sum(e for _, e in writer.records.values())},
        "skipped": {"empty": sum(reader.bytes_read.get(d) == 0 for d in docs), "not_text": len(bad),
                    "links": found.links_skipped, "after_max_tokens": len(cut_off)},
        "fingerprint": hashlib.sha256((splits["train"]["sha256"] + splits["val"]["sha256"] + prefix).encode()
                                      ).hexdigest()[:16],
        "prepared": {"seconds": round(seconds, 3), "workers": workers, "bytes": sum(reader.bytes_read.values())},
    }


def _report(folder: str, meta: dict, out: Any) -> None:
    files, prepared = meta["files"], meta["prepared"]
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    seconds, megabytes = max(prepared["seconds"], 1e-9), prepared["bytes"] / 1e6
    skipped = meta["skipped"]["empty"] + meta["skipped"]["not_text"]
    links = meta["skipped"]["links"]
    links = f", {links} links skipped that lead back into the folder or to a file taken already" if links else ""
    kept = meta["records"]
    kept = f", {kept['documents']:,} records ({kept['empty']:,} empty skipped)" if kept["documents"] or kept[
        "empty"] else ""
    cut = meta["skipped"]["after_max_tokens"]
    cut = f", the first {meta['source']['max_tokens']:,} tokens ({cut} files left out)" if meta["source"][
        "max_tokens"] else ""
    print(f"Prepared {folder}: {len(files['path']):,} files ({skipped} skipped{links}){kept}{cut}, {megabytes:,.2f} "
          f"MB -> {meta['train']['tokens']:,} training + {meta['val']['tokens']:,} validation tokens (split by "
          f"{meta['split']}) in {seconds:.1f} s: {megabytes / seconds:.2f} MB/s, {tokens / seconds:,.0f} "
          f"tokens/s on {prepared['workers']} workers", file=out)
    bad = [f"{p} ({n})" for p, n in zip(files["path"], files["note"], strict=True)
           if n and n not in ("empty", "after data.max_tokens")]
    if bad:
        print(f"Skipped {len(bad)} files that are not text: {corpus.describe(bad)}", file=sys.stderr)
    _report_shares(meta)


def _report_shares(meta: dict) -> None:
    """One line when the validation share of the tokens is far from what data.train_ratio asks (a split by whole
    files, of a folder of few or unevenly sized files)."""
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    asked = 1 - meta["source"]["train_ratio"]
    if meta["split"] not in ("files", "files and records") or not tokens or abs(
            meta["val"]["tokens"] / tokens - asked) <= SHARE_TOLERANCE:
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

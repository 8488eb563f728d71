"""Corpora of records: JSON Lines (plain, gzip, zstd), JSON arrays and Parquet, one record one document.

The preparing process reads a record file as a stream (JSON Lines in blocks of whole lines, Parquet a row group at
a time in batches, a `.json` array whole: it is one JSON value) and hands out chunks of records; the worker
processes parse the lines, take each record's `data.text_field`, tokenize it and add <|endoftext|>. A record goes
to validation when the hash of (its file's relative path, its index) falls in the last (1 - train_ratio) of the
range, so adding a shard moves no record of another. Its index is its line's number - 1 in JSON Lines, its
position in a JSON array, its row in a Parquet file.

Bad input stops the preparation with one line naming the file and the line, record or row group: a malformed
JSON line, a record that is no object, lacks the field (its fields are named) or holds something else than text
there, a truncated or damaged gzip or zstd stream, a Parquet file that cannot be read or has no such column.
A record whose field is empty (or null) is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from mygpt_jax.tokenizer import END_OF_TEXT_ID, get_tokenizer

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".json": "json",
           ".parquet": "parquet"}
RAW_BLOCK = 1 << 18  # compressed bytes read at a time
TOKEN_DTYPE = np.uint16


def record_format(path: str) -> str | None:
    """The record format of a file by its name ("jsonl", "jsonl.gz", "jsonl.zst", "json", "parquet"), or None
    for text."""
    for suffix, name in FORMATS.items():
        if path.endswith(suffix):
            return name
    return None


class BadRecord(Exception):
    """Input a record file should not have: the message names the line, record or row group."""


def hash_share(key: str) -> float:
    """Where a key hashes to in [0, 1), the same on every machine: above train_ratio, its document validates."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2 ** 32


def record_share(rel: str, index: int) -> float:
    """Where a record's (relative path, index) hashes to in [0, 1)."""
    return hash_share(f"{rel.replace(os.sep, '/')}#{index}")


@dataclasses.dataclass
class RecordChunk:
    """Records handed to a worker: JSON Lines as whole lines, or values (a JSON array's records, Parquet texts)."""

    rel: str
    index: int  # of its first record (line) in the file
    field: str
    train_ratio: float  # 1.0: every record to training (the document-tails split divides them later)
    lines: bytes = b""
    values: list | None = None  # JSON records (objects), or Parquet texts (already checked as strings)
    parquet: bool = False


@dataclasses.dataclass
class RecordTokens:
    """A chunk's tokens: each split's records in order, each followed by <|endoftext|>."""

    train: np.ndarray
    val: np.ndarray
    lengths: np.ndarray  # tokens of each record written, its <|endoftext|> included, in order
    is_val: np.ndarray
    empty: int  # records skipped, their field empty or null


def _text_of(record: Any, field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise BadRecord(f"{where} is a JSON {type(record).__name__}, not a record (an object with a {field!r} "
                        "field)")
    if field not in record:
        fields = ", ".join(list(record)[:8]) or "none"
        raise BadRecord(f"{where} has no field {field!r} (its fields: {fields}); set --config.data.text_field to "
                        "the field that holds the text")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise BadRecord(f"{where}'s field {field!r} holds a JSON {type(value).__name__}, not text")
    return value


def _texts(chunk: RecordChunk) -> Iterator[tuple[int, str | None]]:
    if chunk.parquet:
        yield from enumerate(chunk.values, chunk.index)
    elif chunk.values is not None:
        for index, record in enumerate(chunk.values, chunk.index):
            yield index, _text_of(record, chunk.field, f"record {index}")
    else:
        for index, line in enumerate(chunk.lines.split(b"\n"), chunk.index):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise BadRecord(f"line {index + 1} is not valid JSON ({e}); fix or remove that line") from None
            yield index, _text_of(record, chunk.field, f"line {index + 1}")


def encode_records(chunk: RecordChunk) -> RecordTokens:
    """Tokenize a chunk of records (`encode_ordinary`, each followed by <|endoftext|>), split by their hash."""
    encoding = get_tokenizer()
    eot = np.asarray([END_OF_TEXT_ID], TOKEN_DTYPE)
    pieces: dict[bool, list[np.ndarray]] = {False: [], True: []}
    lengths, is_val, empty = [], [], 0
    for index, text in _texts(chunk):
        if not text:
            empty += 1
            continue
        ids = encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(TOKEN_DTYPE)
        val = chunk.train_ratio < 1.0 and record_share(chunk.rel, index) >= chunk.train_ratio
        pieces[val] += [ids, eot]
        lengths.append(len(ids) + 1)
        is_val.append(val)

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)

    return RecordTokens(joined(pieces[False]), joined(pieces[True]), np.asarray(lengths, np.int64),
                        np.asarray(is_val, bool), empty)


class HashingFile:
    """A binary file read through: its sha256 and the bytes read so far."""

    def __init__(self, f: BinaryIO):
        self.f, self.digest, self.position = f, hashlib.sha256(), 0
        self.mode = "rb"  # gzip.GzipFile asks

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.digest.update(block)
        self.position += len(block)
        return block


class _ZstdStream:
    """A zstd file's decompressed bytes, frame after frame; one that ends inside a frame is a BadRecord (the
    zstandard library's own reader returns what it has)."""

    def __init__(self, raw: HashingFile):
        import zstandard  # only where a corpus has zstd files

        self.raw, self.zstd = raw, zstandard
        self.frame, self.in_frame = self.zstd.ZstdDecompressor().decompressobj(), False

    def read(self, _n: int = -1) -> bytes:
        while block := self.raw.read(RAW_BLOCK):
            out = []
            try:
                while block:
                    out.append(self.frame.decompress(block))
                    self.in_frame = not self.frame.eof
                    block = self.frame.unused_data if self.frame.eof else b""
                    if self.frame.eof:
                        self.frame = self.zstd.ZstdDecompressor().decompressobj()
            except self.zstd.ZstdError as e:
                raise BadRecord(f"is not a readable zstd stream ({e})") from None
            if data := b"".join(out):
                return data
        if self.in_frame:
            raise BadRecord("ends inside a zstd frame: the file is truncated; download it again")
        return b""


def _line_blocks(stream: Any, chunk_bytes: int) -> Iterator[bytes]:
    """The decompressed stream in blocks of whole lines (the last may lack its newline)."""
    carry = b""
    while True:
        try:
            block = stream.read(chunk_bytes)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise BadRecord(f"is a truncated or damaged gzip stream ({e}); download it again") from None
        if not block:
            break
        data = carry + block
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            yield data[:cut]
    if carry:
        yield carry


def json_lines(raw: HashingFile, fmt: str, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(index of the first line, whole lines) of a JSON Lines file, decompressed as its name says."""
    if fmt == "jsonl.gz":
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
    elif fmt == "jsonl.zst":
        stream = _ZstdStream(raw)
    else:
        stream = raw
    index = 0
    for block in _line_blocks(stream, chunk_bytes):
        yield index, block
        index += block.count(b"\n")


def json_records(raw: HashingFile, per_chunk: int) -> Iterator[tuple[int, list]]:
    """(index of the first record, records) of a `.json` file, `per_chunk` records at a time."""
    values = _json_array(raw)
    for index in range(0, len(values), per_chunk):
        yield index, values[index:index + per_chunk]


def _json_array(raw: HashingFile) -> list:
    """The records of a `.json` file: one JSON array, read whole (JSON Lines stream; a JSON value does not)."""
    try:
        value = json.load(raw)
    except ValueError as e:
        raise BadRecord(f"is not valid JSON ({e})") from None
    if not isinstance(value, list):
        raise BadRecord(f"holds a JSON {type(value).__name__}, not an array of records; use JSON Lines (.jsonl) "
                        "for one record per line")
    return value


def parquet_texts(path: str, field: str, chunk_bytes: int) -> Iterator[tuple[int, list, float]]:
    """(index of the first row, the field's values, the fraction of the file read) of a Parquet file, a row group
    at a time in batches of about chunk_bytes of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = "its footer"
    try:
        parquet = pq.ParquetFile(path)
        _check_column(parquet.schema_arrow, field)
        index, groups = 0, parquet.num_row_groups
        for group in range(groups):
            where = f"row group {group}"
            meta = parquet.metadata.row_group(group)
            rows = max(1, meta.num_rows * chunk_bytes // max(1, meta.total_byte_size))
            for batch in parquet.iter_batches(batch_size=rows, row_groups=[group], columns=[field]):
                values = batch.column(0).to_pylist()
                yield index, values, (group + 1) / groups
                index += len(values)
    except (pa.ArrowException, OSError) as e:
        raise BadRecord(f"is not a readable Parquet file ({where}: {' '.join(str(e).split())[:200]})") from None


def _check_column(schema: Any, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise BadRecord(f"has no column {field!r} (its columns: {', '.join(schema.names[:8])}); set "
                        "--config.data.text_field to the column that holds the text")
    kind = schema.field(field).type
    string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow 16 and later
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or string_view(kind)):
        raise BadRecord(f"has the column {field!r} of type {kind}, not text (string)")

"""Corpora of records (JSON Lines plain, gzip and zstd, JSON arrays, Parquet): the token files against an
independent count, the split by record, the prefix, and one line for every kind of bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mygpt_jax import corpus, prepare
from mygpt_jax.errors import UserError
from tests.test_prepare import data_config, ordinary, prepared
from tests.utils import after_the_device_line, run_cli, words

EOT = 50256


def is_val(rel: str, index: int, ratio: float = 0.9) -> bool:
    """The split rule, written out again: the hash of (relative path, index) in the last (1 - ratio)."""
    return int(hashlib.sha256(f"{rel}#{index}".encode()).hexdigest()[:8], 16) / 2 ** 32 >= ratio


def expected_tokens(records: dict[str, list]) -> dict[str, list[int]]:
    """Each non-empty record's tiktoken tokens and one end-of-text, in file and record order, by split."""
    out = {"train": [], "val": []}
    for rel in sorted(records):
        for index, text in enumerate(records[rel]):
            if text:
                out["val" if is_val(rel, index) else "train"] += [*ordinary(text), EOT]
    return out


def texts(seed: int, n: int) -> list:
    rng = random.Random(seed)
    out = [words(rng, rng.randrange(5, 120)) for _ in range(n)]
    out[3], out[7] = "", None  # an empty field and a null: skipped and counted
    out[5] = "a literal <|endoftext|> is ordinary text\r\n"
    return out


def write_jsonl(path, values: list, opener=open) -> None:
    with opener(path, "wb") as f:
        for i, text in enumerate(values):
            f.write(json.dumps({"id": i, "text": text}).encode() + b"\n")


def write_parquet(path, values: list, row_group_size: int = 16) -> None:
    pq.write_table(pa.table({"id": list(range(len(values))), "text": values}), path, row_group_size=row_group_size)


def zstd_open(path, mode):
    return zstandard.ZstdCompressor().stream_writer(open(path, mode))


@pytest.fixture
def shards(tmp_path):
    """A folder of record files in every format, and the records each holds."""
    root = tmp_path / "shards"
    (root / "sub").mkdir(parents=True)
    records = {"a.jsonl": texts(1, 40), "b.jsonl.gz": texts(2, 40), "sub/c.jsonl.zst": texts(3, 40),
               "d.parquet": texts(4, 70), "e.json": texts(5, 20)}
    write_jsonl(root / "a.jsonl", records["a.jsonl"])
    write_jsonl(root / "b.jsonl.gz", records["b.jsonl.gz"], gzip.open)
    write_jsonl(root / "sub/c.jsonl.zst", records["sub/c.jsonl.zst"], zstd_open)
    write_parquet(root / "d.parquet", records["d.parquet"])
    (root / "e.json").write_text(json.dumps([{"text": t} for t in records["e.json"]]))
    return root, records


@pytest.mark.parametrize("workers, processes", [(1, False), (3, True)])
def test_records_are_documents_split_by_their_hash(shards, tmp_path, monkeypatch, workers, processes):
    root, records = shards
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 1024)  # many chunks of lines and batches of each row group
    monkeypatch.setattr(prepare, "RECORDS_PER_CHUNK", 3)
    monkeypatch.setattr(prepare, "PROCESSES_FROM_BYTES", 0 if processes else 1 << 40)
    d = data_config(root, tmp_path, glob="**/*", workers=workers)
    spec, status = corpus.check(d, "unused")
    meta = prepare.prepare(spec, status.folder, workers)
    assert prepared(status.folder) == expected_tokens(records)
    assert pq.ParquetFile(root / "d.parquet").num_row_groups == 5
    assert meta["split"] == "records" and meta["source"]["text_field"] == "text"
    assert meta["files"]["path"] == ["a.jsonl", "b.jsonl.gz", "d.parquet", "e.json", "sub/c.jsonl.zst"]
    assert meta["files"]["format"] == ["jsonl", "jsonl.gz", "parquet", "json", "jsonl.zst"]
    assert meta["files"]["records"] == [38, 38, 68, 18, 38] and meta["records"] == {"documents": 200, "empty": 10}
    assert meta["train"]["documents"] + meta["val"]["documents"] == 200
    assert corpus.check(d, "unused")[1].ready


def test_one_and_three_worker_processes_write_the_same_bytes(shards, tmp_path, monkeypatch):
    root, _ = shards
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 512)
    monkeypatch.setattr(prepare, "PROCESSES_FROM_BYTES", 0)
    outputs = []
    for workers in (1, 3):
        spec = corpus.spec_from_config(data_config(root, tmp_path, glob="**/*"))
        meta = prepare.prepare(spec, str(tmp_path / f"w{workers}"), workers)
        outputs.append((prepared(tmp_path / f"w{workers}"), meta["fingerprint"]))
    assert outputs[0] == outputs[1]


def test_adding_a_shard_moves_no_record_of_another(shards, tmp_path):
    root, records = shards
    d = data_config(root, tmp_path, glob="**/*")
    spec, folder = _spec_folder(d)
    prepare.prepare(spec, folder, 2)
    before = prepared(folder)
    added = texts(9, 30)
    write_jsonl(root / "b2.jsonl", added)
    assert corpus.check(d, "unused")[1].stale == ["b2.jsonl added"]
    prepare.prepare(*_spec_folder(d), 2)
    after = prepared(folder)
    assert after == expected_tokens({**records, "b2.jsonl": added})
    for split in corpus.SPLITS:  # the new shard's records, cut out again, leave the corpus as it was
        mine = expected_tokens({"b2.jsonl": added})[split]
        start = len(expected_tokens({k: records[k] for k in ("a.jsonl", "b.jsonl.gz")})[split])
        assert after[split][start:start + len(mine)] == mine
        assert after[split][:start] + after[split][start + len(mine):] == before[split]


def _spec_folder(d):
    spec, status = corpus.check(d, "unused")
    return spec, status.folder


def test_a_mix_with_text_files_and_a_prefix_of_the_tokens(shards, tmp_path):
    root, _records = shards
    (root / "notes.txt").write_text("a text file is one document")
    d = data_config(root, tmp_path, glob="**/*", train_ratio=0.5)  # splits long enough for no document tails
    meta = prepare.prepare(*_spec_folder(d), 2)
    assert meta["split"] == "files and records" and meta["files"]["format"][-2:] == ["text", "jsonl.zst"]
    everything = prepared(_spec_folder(d)[1])
    d.max_tokens = 3000
    spec, folder = _spec_folder(d)
    assert folder != _spec_folder(data_config(root, tmp_path, glob="**/*", train_ratio=0.5))[1]  # a folder of its own
    cut = prepare.prepare(spec, folder, 2)
    tokens = cut["train"]["tokens"] + cut["val"]["tokens"]
    assert cut["split"] == "files and records" and cut["source"]["max_tokens"] == 3000
    assert 3000 <= tokens < 3000 + 200  # up to the record that reaches it
    assert cut["fingerprint"] != meta["fingerprint"] and cut["skipped"]["after_max_tokens"] == 5
    ours = prepared(folder)
    for split in corpus.SPLITS:  # a prefix of each split: whole records, in order
        assert everything[split][:len(ours[split])] == ours[split] and (not ours[split] or ours[split][-1] == EOT)
    assert corpus.check(d, "unused")[1].ready


def test_another_text_field(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"content": w}) + "\n" for w in texts(6, 60) if w))
    meta = prepare.prepare(*_spec_folder(data_config(root, tmp_path, glob="*.jsonl", text_field="content")), 1)
    assert meta["records"]["documents"] == 58


def bad_inputs(root) -> dict[str, tuple[str, str]]:
    """Name -> (file written, what the one line must say)."""
    good = json.dumps({"text": "fine"}) + "\n"
    (root / "no_field.jsonl").write_text(good + json.dumps({"id": 1, "body": "x"}) + "\n")
    (root / "number.jsonl").write_text(good * 2 + json.dumps({"text": 12}) + "\n")
    (root / "malformed.jsonl").write_text(good + '{"text": "unterminated\n' + good)
    (root / "list.jsonl").write_text("[1, 2]\n")
    rng = random.Random(8)
    payload = "".join(json.dumps({"text": words(rng, 50)}) + "\n" for _ in range(300)).encode()
    (root / "truncated.jsonl.gz").write_bytes(gzip.compress(payload)[:-500])
    (root / "truncated.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload)[:-500])
    (root / "garbage.jsonl.gz").write_bytes(b"not gzip at all")
    write_parquet(root / "corrupt.parquet", ["x" * 50] * 100)
    data = (root / "corrupt.parquet").read_bytes()
    (root / "corrupt.parquet").write_bytes(data[:10] + bytes(range(200)) + data[210:])  # a page header overwritten
    (root / "footer.parquet").write_bytes(data[:-30])
    pq.write_table(pa.table({"body": ["x"]}), root / "no_column.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), root / "int_column.parquet")
    (root / "object.json").write_text('{"text": "one record, not an array"}')
    return {
        "no_field.jsonl": "line 2 has no field 'text' (its fields: id, body); set --config.data.text_field",
        "number.jsonl": "line 3's field 'text' holds a JSON int, not text",
        "malformed.jsonl": "line 2 is not valid JSON (",
        "list.jsonl": "line 1 is a JSON list, not a record",
        "truncated.jsonl.gz": "is a truncated or damaged gzip stream",
        "truncated.jsonl.zst": "ends inside a zstd frame: the file is truncated",
        "garbage.jsonl.gz": "is a truncated or damaged gzip stream",
        "corrupt.parquet": "is not a readable Parquet file (row group 0: ",
        "footer.parquet": "is not a readable Parquet file (its footer: ",
        "no_column.parquet": "has no column 'text' (its columns: body); set --config.data.text_field",
        "int_column.parquet": "has the column 'text' of type int64, not text",
        "object.json": "holds a JSON dict, not an array of records",
    }


def test_every_bad_input_is_one_line_naming_the_file_and_nothing_is_kept(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for name, message in bad_inputs(root).items():
        d = data_config(root / name, tmp_path)
        spec, folder = _spec_folder(d)
        with pytest.raises(UserError) as caught:
            prepare.prepare(spec, folder, 2, progress=False)
        assert str(caught.value).startswith(str(root / name)) and message in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)
        assert os.listdir(tmp_path / "cache") == []  # nothing half-prepared


def test_a_bad_record_through_the_command_is_one_line_without_a_traceback(tmp_path):
    root = tmp_path / "hub"
    root.mkdir()
    write_jsonl(root / "0.jsonl", texts(7, 20))
    (root / "1.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    result = run_cli("prepare", f"--config.data.path={root}/*.jsonl", f"--config.checkpoint_dir={tmp_path}")
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == (f"error: {root / '1.jsonl'}: line 1 has no field 'text' (its fields: content); set "
                        "--config.data.text_field to the field that holds the text")
    assert not list((tmp_path / "data").iterdir())


def test_token_counts_match_numpy_of_the_files(shards, tmp_path):
    """meta.json's counts are those of the token files."""
    root, _ = shards
    spec, folder = _spec_folder(data_config(root, tmp_path, glob="**/*"))
    meta = prepare.prepare(spec, folder, 2)
    for split in corpus.SPLITS:
        ids = np.fromfile(os.path.join(folder, f"{split}.bin"), np.uint16)
        assert meta[split]["tokens"] == len(ids) and meta[split]["documents"] == int((ids == EOT).sum())


def test_a_folder_of_record_files_works_as_it_is(tmp_path):
    """As a dataset downloaded from the Hub: shards below the folder, a hidden .cache/ beside them."""
    root = tmp_path / "hub" / "sample" / "10BT"
    root.mkdir(parents=True)
    for i in range(3):
        write_parquet(root / f"00{i}_00000.parquet", texts(i, 10))
    (tmp_path / "hub" / ".cache").mkdir()
    write_jsonl(tmp_path / "hub" / ".cache" / "hidden.jsonl", texts(9, 10))
    (tmp_path / "hub" / "README.md").write_text("a dataset card")
    spec, folder = _spec_folder(data_config(tmp_path / "hub", tmp_path))  # the default glob, **/*.txt
    meta = prepare.prepare(spec, folder, 1)
    assert meta["files"]["path"] == [f"sample/10BT/00{i}_00000.parquet" for i in range(3)]
    assert meta["records"]["documents"] == 24
    # A glob that takes none of them says which one would.
    with pytest.raises(UserError, match=r"it has 3 \.parquet files: set --config\.data\.glob='\*\*/\*\.parquet'"):
        corpus.find_sources(corpus.spec_from_config(data_config(tmp_path / "hub", tmp_path, glob="**/*.csv")))


def test_the_tails_split_divides_every_record(shards, tmp_path):
    root, records = shards
    spec, folder = _spec_folder(data_config(root, tmp_path, glob="**/*", split="tails"))
    meta = prepare.prepare(spec, folder, 2)
    expected = {"train": [], "val": []}
    for rel in sorted(records):
        for text in filter(None, records[rel]):
            ids = ordinary(text)
            cut = int(0.9 * len(ids))
            expected["train"] += [*ids[:cut], EOT] if cut else []
            expected["val"] += [*ids[cut:], EOT]
    assert meta["split"] == "document tails" and prepared(folder) == expected


@pytest.mark.parametrize("key, value, what", [("split", "halves", "use auto or tails"),
                                              ("text_field", "", "must name the field"),
                                              ("max_tokens", -1, "must be >= 0")])
def test_the_corpus_keys_are_validated(key, value, what):
    from configs.tiny import get_config
    from mygpt_jax.config import validate

    config = get_config()
    config.data[key] = value
    with pytest.raises(UserError, match=f"--config.data.{key}=.* is invalid: {what}"):
        validate(config)

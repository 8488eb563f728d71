"""Preparing corpora: the token files, the split rules, staleness, and what bad input and faults do."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs.tiny import get_config
from mygpt_jax import corpus, prepare
from mygpt_jax.tokenizer import END_OF_TEXT_ID, get_tokenizer
from tests.utils import after_the_device_line, in_small_filesystem, popen_cli, run_cli, user_error_as_nobody, words

EOT = [END_OF_TEXT_ID]


def ordinary(text: str) -> list[int]:
    return get_tokenizer().encode_ordinary(text)


def data_config(path, tmp_path, **overrides) -> ml_collections.ConfigDict:
    d = get_config().data
    d.path = str(path)
    d.cache_dir = str(tmp_path / "cache")
    for key, value in overrides.items():
        d[key] = value
    return d


def prepared(folder) -> dict[str, list[int]]:
    return {split: np.fromfile(os.path.join(folder, f"{split}.bin"), np.uint16).tolist() for split in corpus.SPLITS}


@pytest.fixture
def books(tmp_path):
    """A folder of text files: nested, one empty, one large enough for many chunks."""
    rng = random.Random(0)
    root = tmp_path / "books"
    for i in range(12):
        sub = root / ("a" if i % 3 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"book{i}.txt").write_text(words(rng, 400 if i else 30_000))
    (root / "empty.txt").write_text("")
    (root / "notes.md").write_text("not matched by the default glob")
    return root


def test_safe_cuts_never_change_the_tokens():
    rng, cuts = random.Random(1), 0
    for _ in range(200):
        text = words(rng, 40)
        data = text.encode()
        p = len(data)
        while (p := corpus.safe_cut(data[:p - 1], 0) or 0) > 0:
            a, b = data[:p].decode(), data[p:].decode()
            assert ordinary(a) + ordinary(b) == ordinary(text), (a[-5:], b[:5])
            cuts += 1
    assert cuts > 1000
    # Where a cut after a newline would not be safe: "\n\n" is one token.
    assert corpus.safe_cut(b"a\n\nb", 0) is None and corpus.safe_cut(b"a\nb", 0) == 2


@pytest.mark.parametrize("workers", [1, 3])
def test_a_folder_is_each_documents_tokens_then_end_of_text(books, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 4096)  # the big book is cut into ~40 chunks
    d = data_config(books, tmp_path, workers=workers)
    spec, status = corpus.check(d, "unused")
    assert status.meta is None and status.folder == str(tmp_path / "cache" / f"books-{spec.key()}")
    meta = prepare.prepare(spec, status.folder, workers)

    expected = {"train": [], "val": []}
    files = sorted(str(p.relative_to(books)) for p in books.rglob("*.txt") if p.stat().st_size)
    for rel in files:
        path = books / rel
        split = "val" if prepare.validation_share(rel) >= d.train_ratio else "train"
        expected[split] += ordinary(path.read_text()) + EOT
    assert expected["val"] and expected["train"]  # the hash split gives both splits files here
    assert prepared(status.folder) == expected
    assert meta["split"] == "files"
    assert meta["skipped"] == {"empty": 1, "not_text": 0, "links": 0, "after_max_tokens": 0}
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(files)
    assert meta["files"]["path"][0] == "a/book1.txt" and "notes.md" not in meta["files"]["path"]
    assert corpus.check(d, "unused")[1].ready


@pytest.mark.parametrize("processes", [False, True])
def test_one_and_three_workers_write_the_same_bytes(books, tmp_path, monkeypatch, processes):
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(prepare, "PROCESSES_FROM_BYTES", 0 if processes else 1 << 40)  # worker processes, or threads
    outputs = []
    for workers in (1, 3):
        spec = corpus.spec_from_config(data_config(books, tmp_path))
        folder = str(tmp_path / f"w{workers}")
        meta = prepare.prepare(spec, folder, workers)
        outputs.append([Path(folder, f"{s}.bin").read_bytes() for s in corpus.SPLITS])
        outputs[-1].append(meta["fingerprint"])
    assert outputs[0] == outputs[1]



def test_preparing_imports_no_jax():
    """The worker processes import what the prepare command imports: JAX would slow each one's start."""
    code = ("import sys, mygpt_jax.prepare\n"
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

def test_a_single_file_splits_its_characters_as_the_seed_did(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 1024)
    text = words(random.Random(2), 20_000) + " <|endoftext|> is ordinary text here"
    path = tmp_path / "one.txt"
    path.write_text(text)
    spec, status = corpus.check(data_config(path, tmp_path), "unused")
    meta = prepare.prepare(spec, status.folder, 2)
    cut = int(0.9 * len(text))  # characters, not bytes: the text has some that take two or three
    assert prepared(status.folder) == {"train": ordinary(text[:cut]), "val": ordinary(text[cut:])}
    assert meta["split"] == "characters" and not meta["end_of_text"]


def test_a_folder_of_few_files_splits_each_document(tmp_path):
    root = tmp_path / "two"
    root.mkdir()
    texts = {name: words(random.Random(i), 3000) for i, name in enumerate(("a.txt", "c.txt"))}
    for name, text in texts.items():
        (root / name).write_text(text)
    assert all(prepare.validation_share(n) < 0.9 for n in texts)  # the hash split puts both in training
    spec, status = corpus.check(data_config(root, tmp_path), "unused")
    meta = prepare.prepare(spec, status.folder, 2)
    expected = {"train": [], "val": []}
    for name in sorted(texts):
        ids = ordinary(texts[name])
        cut = int(0.9 * len(ids))
        expected["train"] += ids[:cut] + EOT
        expected["val"] += ids[cut:] + EOT
    assert prepared(status.folder) == expected and meta["split"] == "document tails"


def test_a_changed_added_or_removed_file_makes_the_folder_stale(books, tmp_path):
    d = data_config(books, tmp_path)
    spec, status = corpus.check(d, "unused")
    prepare.prepare(spec, status.folder, 2)
    book = books / "a" / "book1.txt"
    os.utime(book, ns=(book.stat().st_atime_ns, book.stat().st_mtime_ns + 10 ** 9))
    assert corpus.check(d, "unused")[1].ready  # touched, not changed: its hash is the same
    book.write_text(book.read_text().replace("the", "THE", 1))
    (books / "a" / "new.txt").write_text("a new book")
    (books / "a" / "book2.txt").unlink()
    assert corpus.check(d, "unused")[1].stale == ["a/new.txt added", "a/book2.txt removed", "a/book1.txt changed"]


def test_binary_and_non_utf8_files_in_a_folder_are_skipped_and_named(books, tmp_path, capsys):
    (books / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (books / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    spec, status = corpus.check(data_config(books, tmp_path), "unused")
    meta = prepare.prepare(spec, status.folder, 2)
    err = capsys.readouterr().err
    assert "Skipped 2 files that are not text: image.txt (binary, with NUL bytes), latin1.txt (not UTF-8 at " \
           "byte 3)" in err
    assert meta["skipped"] == {"empty": 1, "not_text": 2, "links": 0, "after_max_tokens": 0}
    assert "latin1.txt" in meta["files"]["path"]  # recorded: fixing it makes the folder stale
    (books / "latin1.txt").write_text("café au lait")
    assert corpus.check(data_config(books, tmp_path), "unused")[1].stale == ["latin1.txt changed"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.mkdir(), "has no file matching --config.data.glob='**/*.txt'; check --config.data.glob"),
    (lambda p: None, "does not exist; point --config.data.path at a text file, a folder of text files"),
])
def test_a_folder_without_text_or_a_missing_path_is_one_line(tmp_path, setup, message):
    setup(tmp_path / "corpus")
    result = run_cli("prepare", f"--config.data.path={tmp_path / 'corpus'}", f"--config.checkpoint_dir={tmp_path}")
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1 and message in lines[-1], result.stderr


def test_bad_corpora_get_one_line(books, tmp_path):
    glob = run_cli("prepare", f"--config.data.path={tmp_path}/nothing/*.txt", f"--config.checkpoint_dir={tmp_path}")
    assert glob.returncode == 1 and "matches no file" in glob.stderr.strip().splitlines()[-1]
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    single = run_cli("prepare", f"--config.data.path={latin}", f"--config.checkpoint_dir={tmp_path}")
    assert single.returncode == 1 and single.stderr.strip().splitlines()[-1] == (
        f"error: data file {latin} is not UTF-8 at byte 3; convert it to UTF-8 text or choose another "
        "--config.data.path")
    denied = run_cli("prepare", f"--config.data.path={books}", "--config.data.cache_dir=/proc/mygpt_jax",
                     f"--config.checkpoint_dir={tmp_path}")
    assert denied.returncode == 1 and denied.stderr.strip().splitlines()[-1].startswith(
        "error: cannot write the prepared corpus folder /proc/mygpt_jax/books-") and \
        "set --config.data.cache_dir to a writable folder" in denied.stderr


def test_a_prepared_folder_of_another_format_is_refused_in_one_line(books, tmp_path):
    spec, status = corpus.check(data_config(books, tmp_path), "unused")
    prepare.prepare(spec, status.folder, 2)
    meta_path = os.path.join(status.folder, corpus.META)
    meta = json.loads(Path(meta_path).read_text())
    meta["format"] = 0
    Path(meta_path).write_text(json.dumps(meta))
    # As data.path, the folder is used as it is: one line says why it cannot be.
    result = run_cli("train", f"--config.data.path={status.folder}", f"--config.checkpoint_dir={tmp_path}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1] == (
        f"error: cannot train on the prepared folder {status.folder}: it was prepared in format 0, and this "
        f"version reads format {corpus.FORMAT_VERSION}; prepare its sources again with python -m mygpt_jax.prepare")
    # As the cache of its sources, it is stale, and prepared again.
    assert corpus.check(data_config(books, tmp_path), "unused")[1].stale == [
        f"it was prepared in format 0, and this version reads format {corpus.FORMAT_VERSION}"]


def big_corpus(root, megabytes: int) -> None:
    rng = random.Random(3)
    root.mkdir()
    chunk = words(rng, 20_000)
    for i in range(megabytes * 10):
        (root / f"part{i:03d}.txt").write_text(chunk[i % 100:] + chunk[:i % 100])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_preparation_leaves_nothing_taken_as_complete(tmp_path, sig):
    big_corpus(tmp_path / "big", 8)
    args = [f"--config.data.path={tmp_path / 'big'}", f"--config.checkpoint_dir={tmp_path}", "--config.data.workers=1"]
    proc = popen_cli("prepare", *args)
    cache = tmp_path / "data"
    deadline = time.time() + 120
    while not (cache.exists() and any(".tmp-" in p.name for p in cache.iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("Interrupted: stopped preparing ") and "Traceback" not in err
    assert list(cache.iterdir()) == []  # no folder, finished or not
    _, status = corpus.check(data_config(tmp_path / "big", tmp_path, cache_dir=""), str(tmp_path))
    assert status.meta is None


def test_a_full_disk_while_preparing_is_one_line_and_keeps_nothing(tmp_path):
    big_corpus(tmp_path / "big", 2)  # ~2 MB of text: ~1 MB of tokens, more than the 1 MB filesystem holds
    cache = tmp_path / "cache"
    cache.mkdir()
    result = in_small_filesystem(1, cache, [sys.executable, "-m", "mygpt_jax.prepare", "--config", "configs/tiny.py",
                                            f"--config.data.path={tmp_path / 'big'}",
                                            f"--config.data.cache_dir={cache}"])
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the disk is full: no space left to write ") and "nothing was kept" in lines[0]


def test_folder_links_never_take_a_file_twice(books, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "far.txt").write_text("a book kept elsewhere, linked in")
    (books / "a" / "up").symlink_to("..")  # back into the tree: every file again, and again
    (books / "loop").symlink_to(books / "loop")  # a link to itself
    (books / "b" / "same").symlink_to(books / "a")  # another name for a folder of the tree
    (books / "alias.txt").symlink_to(books / "a" / "book1.txt")  # another name for a file
    (books / "elsewhere").symlink_to(outside)  # a folder outside the tree: taken
    d = data_config(books, tmp_path)
    spec, status = corpus.check(d, "unused")
    meta = prepare.prepare(spec, status.folder, 2)
    real = sorted(str(p.relative_to(books)) for p in books.rglob("*.txt") if not p.is_symlink()
                  and "up" not in p.parts and "same" not in p.parts and "elsewhere" not in p.parts)
    assert meta["files"]["path"] == sorted([*real, "elsewhere/far.txt"])
    assert meta["skipped"]["links"] == 3  # up, same, and alias.txt (the loop is not a folder that can be walked)
    assert "3 links skipped" in capsys.readouterr().out
    assert corpus.check(d, "unused")[1].ready


def test_a_corpus_prepared_in_format_1_is_prepared_again_saying_why(books, tmp_path):
    d = data_config(books, tmp_path)
    spec, status = corpus.check(d, "unused")
    prepare.prepare(spec, status.folder, 2)
    meta_path = Path(status.folder, corpus.META)
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format": 1}))
    stale = corpus.check(d, "unused")[1].stale
    assert len(stale) == 1 and "could take a file more than once through a folder link" in stale[0]


def test_a_split_far_from_the_ratio_is_said_in_one_line(tmp_path, capsys):
    root = tmp_path / "few"
    root.mkdir()
    rng = random.Random(5)
    # Two big files that the hash puts in validation, one small in training: validation gets most tokens.
    names = [n for n in (f"f{i}.txt" for i in range(100)) if prepare.validation_share(n) >= 0.9][:2]
    names += [n for n in (f"f{i}.txt" for i in range(100)) if prepare.validation_share(n) < 0.9][:1]
    for name, n_words in zip(names, (3000, 3000, 1000), strict=True):
        (root / name).write_text(words(rng, n_words))
    d = data_config(root, tmp_path)
    spec, status = corpus.check(d, "unused")
    meta = prepare.prepare(spec, status.folder, 2)
    assert meta["split"] == "files"
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Note: ")]
    share = meta["val"]["tokens"] / (meta["train"]["tokens"] + meta["val"]["tokens"])
    assert len(note) == 1 and f"validation holds {share:.0%}" in note[0] and "--config.data.split=tails" in note[0]
    d.split = "tails"
    spec, status = corpus.check(d, "unused")
    meta = prepare.prepare(spec, status.folder, 2)
    assert meta["split"] == "document tails" and not [line for line in capsys.readouterr().err.splitlines()
                                                      if line.startswith("Note: ")]


@pytest.mark.filterwarnings("ignore:os.fork")  # the child runs no JAX: it prepares and exits
def test_an_unreadable_source_file_is_named(tmp_path):
    """Root reads a file of mode 000: as root, the preparation runs in a child process that has become nobody."""
    shared = Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))  # a path that every user may enter
    try:
        shared.chmod(0o777)
        root = shared / "corpus"
        root.mkdir()
        (root / "a.txt").write_text("a readable book")
        (root / "b.txt").write_text("a book nobody may read")
        (root / "b.txt").chmod(0)
        d = data_config(root, shared)
        message = _as_unprivileged(lambda: prepare.prepare(*_check(d), 1, progress=False), shared)
        assert message.startswith(f"cannot read the corpus file {root / 'b.txt'} (Permission denied)"), message
        assert os.listdir(shared / "cache") == []  # nothing half-prepared
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _check(d):
    spec, status = corpus.check(d, "unused")
    return spec, status.folder


def _as_unprivileged(fn, home: Path) -> str:
    """The UserError message of fn(), run as nobody when this process is root (else as it is); '' if none. The
    tokenizer is loaded once first, so that the child finds its cache in place."""
    prepare.prepare(*_check(data_config(Path(corpus.default_text_path()), home / "warm")), 1, progress=False)
    return user_error_as_nobody(fn, home)


def test_folders_prepared_before_the_record_keys_keep_their_names(books, tmp_path):
    """So that a folder of format 1 is found, and reported stale with its reason, rather than left behind."""
    spec = corpus.spec_from_config(data_config(books, tmp_path))
    before = json.dumps([spec.path, spec.kind, spec.glob, list(spec.exclude), spec.train_ratio])
    assert spec.key() == hashlib.sha256(before.encode()).hexdigest()[:10]
    assert corpus.spec_from_config(data_config(books, tmp_path, text_field="body")).key() != spec.key()

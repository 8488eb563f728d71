"""Tests for the GPT-2 checkpoint downloader against a real local HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

import pytest

from mygpt_jax.errors import UserError
from mygpt_jax.pretrained.download import FILENAMES, download_gpt2, is_complete

SIZE = "124M"
BIG = "model.ckpt.data-00000-of-00001"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A synthetic model folder; the data file spans several 1 MiB chunks."""
    src = tmp_path / "source"
    src.mkdir()
    for name in FILENAMES:
        n = 3 * 2**20 + 12345 if name == BIG else 1000
        (src / name).write_bytes(os.urandom(n))
    (src / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768}))
    return src


@pytest.fixture
def serve(http_server, source: Path):
    """Factory: serve(mode) starts a server (conftest.py) for `source`; all are stopped afterwards."""
    return functools.partial(http_server, source)


def assert_identical(dest: Path, source: Path) -> None:
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILENAMES)  # no .part left behind
    for name in FILENAMES:
        assert (dest / name).read_bytes() == (source / name).read_bytes(), name


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/models"


def test_full_download_then_cached(serve, source, tmp_path, capsys):
    server = serve()
    dest = tmp_path / "checkpoints" / "gpt2" / SIZE
    assert not is_complete(dest)
    assert download_gpt2(SIZE, dest, (server.base,), progress=True) == dest
    assert_identical(dest, source)
    assert is_complete(dest)
    assert sorted(server.fetched()) == sorted(FILENAMES)
    assert BIG in capsys.readouterr().err  # tqdm bar

    server.requests.clear()
    assert download_gpt2(SIZE, dest, (server.base,), progress=False) == dest
    assert server.requests == []


def test_dropped_connection_keeps_part_and_resumes(serve, source, tmp_path):
    dest = tmp_path / SIZE
    half = (source / BIG).stat().st_size // 2
    with pytest.raises(UserError, match=BIG) as err:
        download_gpt2(SIZE, dest, (serve("drop").base,), progress=False)
    assert "rerun to resume" in str(err.value)
    assert (dest / f"{BIG}.part").stat().st_size == half
    assert not (dest / BIG).exists()
    assert not is_complete(dest)

    healthy = serve()
    download_gpt2(SIZE, dest, (healthy.base,), progress=False)
    assert_identical(dest, source)
    assert ("GET", BIG, f"bytes={half}-") in healthy.requests
    assert BIG in healthy.fetched() and "checkpoint" not in healthy.fetched()  # done files skipped


def test_server_ignoring_range_restarts_from_zero(serve, source, tmp_path):
    dest = tmp_path / SIZE
    dest.mkdir()
    (dest / f"{BIG}.part").write_bytes(b"garbage" * 1000)
    server = serve("norange")
    download_gpt2(SIZE, dest, (server.base,), progress=False)
    assert_identical(dest, source)
    assert ("GET", BIG, "bytes=7000-") in server.requests


def test_whole_but_unrenamed_part_is_refetched(serve, source, tmp_path):
    dest = tmp_path / SIZE
    dest.mkdir()
    (dest / f"{BIG}.part").write_bytes((source / BIG).read_bytes())  # server answers 416
    download_gpt2(SIZE, dest, (serve().base,), progress=False)
    assert_identical(dest, source)


def test_primary_404_falls_back_to_mirror(serve, source, tmp_path):
    primary, mirror = serve("404"), serve()
    dest = tmp_path / SIZE
    download_gpt2(SIZE, dest, (primary.base, mirror.base), progress=False)
    assert_identical(dest, source)
    assert sorted(primary.fetched()) == sorted(mirror.fetched()) == sorted(FILENAMES)


def test_no_server_gives_one_line_user_error(tmp_path):
    dest = tmp_path / "checkpoints" / "gpt2" / SIZE
    urls = (closed_port_url(), closed_port_url())
    with pytest.raises(UserError) as err:
        download_gpt2(SIZE, dest, urls, progress=False, timeout=2)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"could not download checkpoint for GPT-2 {SIZE}" in msg
    assert all(f"{u}/{SIZE}/checkpoint" in msg for u in urls)
    assert "refused" in msg.lower()
    assert str(dest) in msg and "vocab.bpe" in msg and "--config.weights_dir" in msg
    assert list(dest.iterdir()) == []


def test_all_mirrors_404_names_the_file(serve, tmp_path):
    with pytest.raises(UserError, match="HTTP Error 404"):
        download_gpt2(SIZE, tmp_path / SIZE, (serve("404").base,), progress=False)


def test_unknown_size(tmp_path):
    with pytest.raises(UserError, match="124M, 355M, 774M, 1558M"):
        download_gpt2("7B", tmp_path / "7B", ("http://127.0.0.1:9",), progress=False)
    assert not (tmp_path / "7B").exists()

"""Shared fixtures: a real HTTP server on 127.0.0.1 that serves a GPT-2 model folder in OpenAI's layout or
the Hugging Face Hub's; a tiny trained run made once for the whole suite (`tiny_run`)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mygpt_jax.pretrained.download import FILENAMES, HUB_MODELS
from tests.utils import QUICK_COMPILE

# Read when jax starts its CPU backend, after this: the suite's own processes compile at XLA's lowest level.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILE}".strip()

DROPPED = "model.ckpt.data-00000-of-00001"  # the file that mode "drop" cuts short


@pytest.fixture(autouse=True, scope="session")
def compilation_cache(tmp_path_factory) -> Iterator[Path]:
    """The commands the tests run share one compilation cache (config.compilation_cache_dir's default, under
    XDG_CACHE_HOME) in a temporary folder, not the developer's ~/.cache; xdist's workers share it through their
    session's common folder, so a program one worker's commands compiled is read, not compiled again, by the
    other's (most of the tests' commands run configs/tiny.py's few programs)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xdg_cache"
    folder.mkdir(exist_ok=True)
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder / "mygpt_jax" / "xla"
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Talk to 127.0.0.1 directly even if the developer has an HTTP proxy configured."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1")


@pytest.fixture(autouse=True)
def no_hugging_face_settings(monkeypatch):
    """The Hugging Face cache the tests see is the temporary XDG_CACHE_HOME's, and no endpoint or offline mode of
    the developer's applies."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


def openai_routes(size: str = "124M") -> dict[str, str]:
    """OpenAI's layout: /models/<size>/<file>."""
    return {f"/models/{size}/{name}": name for name in FILENAMES}


def hub_layout(repo: str = HUB_MODELS["124M"][0], revision: str = HUB_MODELS["124M"][1]) -> dict:
    """Server arguments for the Hub's URLs: config.json answered at /<repo>/resolve/<revision>/, model.safetensors
    redirected (302) from there to a CDN path, as huggingface.co answers a file stored in LFS."""
    resolve = f"/{repo}/resolve/{revision}"
    return {"routes": {f"{resolve}/config.json": "config.json", "/cdn/model.safetensors": "model.safetensors"},
            "redirects": {f"{resolve}/model.safetensors": "/cdn/model.safetensors"}, "dropped": "model.safetensors"}


class Server:
    """Serves files of `root` on 127.0.0.1 at the URL paths `routes` maps to their names (default: OpenAI's
    layout, `base` ending in /models); a path in `redirects` answers 302 with the absolute URL of the path it maps
    to. `mode` is "ok", "404", "drop" (file `dropped` is cut short) or "norange"."""

    def __init__(self, root: Path, mode: str = "ok", size: str = "124M", routes: dict[str, str] | None = None,
                 redirects: dict[str, str] | None = None, dropped: str = DROPPED) -> None:
        self.root, self.mode, self.dropped = root, mode, dropped
        self.routes, self.redirects = routes or openai_routes(size), redirects or {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, file name, Range header) of files served
        self.redirected: list[str] = []  # paths answered with a redirect
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.base = self.origin + ("/models" if routes is None else "")
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def fetched(self) -> list[str]:
        return [name for method, name, _ in self.requests if method == "GET"]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                if server.mode != "404" and self.path in server.redirects:
                    server.redirected.append(self.path)
                    self.send_response(302)
                    self.send_header("Location", server.origin + server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                name = server.routes.get(self.path, self.path.rpartition("/")[2])
                rng = self.headers.get("Range")
                server.requests.append((self.command, name, rng))
                if server.mode == "404" or self.path not in server.routes:
                    self.send_error(404)
                    return
                data = (server.root / name).read_bytes()
                start = 0
                if rng and server.mode != "norange":
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(data) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                if server.mode == "drop" and name == server.dropped:  # announce everything, send half, hang up
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        return Handler


@pytest.fixture
def http_server() -> Iterator[Callable[..., Server]]:
    """Factory: http_server(root, mode="ok", **layout) serves `root` on 127.0.0.1:<free port> (`layout`: Server's
    routes, redirects, dropped); all stop afterwards."""
    servers: list[Server] = []

    def start(root: Path, mode: str = "ok", **layout) -> Server:
        servers.append(Server(root, mode, **layout))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(checkpoint_dir, the train command's result) of configs/tiny.py trained with TINY_RUN, made once for the
    whole suite: xdist workers share it through a file lock in their session's common folder. Tests read it;
    a test that changes a run copies it first."""
    from tests.utils import TINY_RUN, run_cli

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_run"
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "result.json").exists():
            result = run_cli("train", f"--config.checkpoint_dir={root / 'ckpt'}", *TINY_RUN)
            assert result.returncode == 0, result.stderr
            (root / "result.json").write_text(json.dumps([result.args, result.stdout, result.stderr]))
    args, stdout, stderr = json.loads((root / "result.json").read_text())
    return root / "ckpt", subprocess.CompletedProcess(args, 0, stdout, stderr)

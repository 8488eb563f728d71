"""Serve a model over HTTP with OpenAI's completions API, and a playground page (docs/serving.md).

    python -m mygpt_jax.serve --config configs/gpt2_124m.py          # http://127.0.0.1:8000
    python -m mygpt_jax.serve --config configs/tiny.py --config.serve.port=8080

Serves what `sample` would load for the config. GET /health answers 503 until every program is compiled, then
200, and the address is printed. Ctrl-C or SIGTERM stops taking requests, lets those in flight finish (up to
serve.drain_s) and exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import sys
from collections.abc import Iterator

import ml_collections

from mygpt_jax import backends
from mygpt_jax.errors import UserError


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one line (not uvicorn's log)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"{host}:{port} is in use (another server?); choose another port with "
                            f"--config.serve.port=N (0 = any free one)") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; check --config.serve.host") from None
    return sock


def _uvicorn_server(app: object, drain_s: float) -> object:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopping on SIGINT/SIGTERM as it does (no new connections, requests in flight
        drained), without raising the signal again afterwards: the command then exits 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                 timeout_graceful_shutdown=drain_s))


def main(config: ml_collections.ConfigDict) -> None:
    try:
        from mygpt_jax.serving.api import Limits
        from mygpt_jax.serving.app import Service, build_app
    except ImportError as e:
        raise UserError(f"the server needs the serve extra ({e.name} is missing): uv sync --extra serve") from None
    from mygpt_jax.serving.engine import Engine
    from mygpt_jax.serving.scheduler import Scheduler
    from mygpt_jax.weights import load_model

    v = config.serve
    sock = _bind(v.host, v.port)
    cfg, params = load_model(config)
    scheduler = Scheduler(Engine(cfg, params, backends.current(), v.max_batch), v.max_queue)
    del params  # the engine keeps its own copy, laid out for decoding
    name = v.model_name or config.run_name
    service = Service(scheduler, Limits(name, cfg.context_length, v.max_n), v.request_timeout_s)
    origins = [o.strip() for o in v.cors_origins.split(",") if o.strip()]
    server = _uvicorn_server(build_app(service, origins), v.drain_s)
    host, port = sock.getsockname()[:2]
    failures: list[BaseException] = []

    def ready(line: str) -> None:
        print(line, file=sys.stderr)
        print(f"serving {name} at http://{host if ':' not in host else f'[{host}]'}:{port} "
              "(the playground at /, the API at /v1/completions; Ctrl-C stops)", flush=True)

    def failed(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    scheduler.start(ready, failed)
    server.run(sockets=[sock])
    scheduler.stop()
    if failures:
        raise UserError(f"the decoding engine failed: {type(failures[0]).__name__}: {failures[0]}")
    print(f"stopped after {service.served} completion requests", file=sys.stderr)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

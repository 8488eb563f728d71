"""The HTTP API (Starlette routes): OpenAI's completions, the model list, health, the playground page.

A completion's choices become sequences for the scheduler; their events come back on an asyncio queue (the
scheduler thread puts them through the event loop) and leave as one JSON reply or as server-sent events in
OpenAI's chunk format. A client that goes away, or a request past `serve.request_timeout_s`, cancels its
sequences, and the scheduler frees their rows at its next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mygpt_jax.serving.api import ApiError, Completion, Limits, parse_completion, parse_json
from mygpt_jax.serving.engine import RowSettings
from mygpt_jax.serving.scheduler import QueueFull, Scheduler
from mygpt_jax.serving.sequence import Delta, End, Event, Request as ChoiceRequest, Sequence, Token

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclasses.dataclass
class Service:
    """What the routes share."""

    scheduler: Scheduler
    limits: Limits
    timeout_s: float
    started: int = dataclasses.field(default_factory=lambda: int(time.time()))
    served: int = 0  # completion requests answered


class Gone(Exception):
    """The client closed the connection."""


def _error(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _logprobs(tokens: list[Token]) -> dict[str, list]:
    """OpenAI's legacy logprobs object."""
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens], "text_offset": [t.offset for t in tokens]}


async def _race(work: Awaitable[Any], receive: Receive, timeout_s: float) -> Any:
    """`work`'s result, unless the client disconnects first (Gone) or the time runs out (TimeoutError)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise Gone if watcher in done else TimeoutError


class Choices:
    """One request's sequences and the queue their events arrive on."""

    def __init__(self, c: Completion, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        seed = c.seed if c.seed is not None else secrets.randbits(32)

        def sink(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed (the server stopped): no listener
                loop.call_soon_threadsafe(self.queue.put_nowait, event)

        self.sequences = [
            Sequence(i * c.n + j, ChoiceRequest(prompt, c.max_tokens, c.stop, c.logprobs, c.echo,
                                                RowSettings(seed, i * c.n + j, c.temperature, c.top_k, c.top_p)),
                     sink)
            for i, prompt in enumerate(c.prompts) for j in range(c.n)]

    async def events(self) -> AsyncIterator[Event]:
        """Every event until each choice has ended."""
        left = len(self.sequences)
        while left:
            event = await self.queue.get()
            left -= isinstance(event, End)
            yield event


class Reply:
    """Builds the JSON of a completion and of its stream's chunks."""

    def __init__(self, service: Service, c: Completion):
        self.c, self.model = c, service.limits.model_name
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.prompt_tokens = sum(len(p) for p in c.prompts)

    def _envelope(self, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def chunk(self, event: Event) -> dict[str, Any]:
        text, tokens = (event.text, event.tokens) if isinstance(event, Delta) else ("", [])
        reason = event.finish_reason if isinstance(event, End) else None
        logprobs = _logprobs(tokens) if self.c.logprobs is not None else None
        return self._envelope([{"text": text, "index": event.index, "logprobs": logprobs, "finish_reason": reason}])

    async def whole(self, choices: Choices) -> dict[str, Any]:
        texts, tokens = [""] * len(choices.sequences), [[] for _ in choices.sequences]
        reasons, generated = [""] * len(choices.sequences), 0
        async for event in choices.events():
            if isinstance(event, Delta):
                texts[event.index] += event.text
                tokens[event.index] += event.tokens
            else:
                reasons[event.index], generated = event.finish_reason, generated + event.completion_tokens
        return self._envelope([{"text": text, "index": i, "finish_reason": reason,
                                "logprobs": _logprobs(toks) if self.c.logprobs is not None else None}
                               for i, (text, toks, reason) in enumerate(zip(texts, tokens, reasons, strict=True))],
                              usage=self.usage(generated))

    async def stream(self, choices: Choices) -> AsyncIterator[bytes]:
        generated = 0
        async for event in choices.events():
            generated += event.completion_tokens if isinstance(event, End) else 0
            yield _sse(self.chunk(event))
        if self.c.include_usage:
            yield _sse(self._envelope([], usage=self.usage(generated)))
        yield b"data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


class EventStream(StreamingResponse):
    """Server-sent events from `chunks`, until they end, the client goes or the time runs out; `on_close` runs
    in every case."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None], timeout_s: float):
        super().__init__(chunks, headers={"Cache-Control": "no-cache"}, media_type="text/event-stream")
        self.on_close, self.timeout_s = on_close, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            await _race(pump(), receive, self.timeout_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            error = ApiError(504, "the request ran past serve.request_timeout_s", None, "timeout", "timeout")
            await send({"type": "http.response.body", "body": _sse(error.body()) + b"data: [DONE]\n\n"})
        except (Gone, OSError):
            pass
        finally:
            self.on_close()


def _not_ready() -> ApiError:
    return ApiError(503, "the model is still compiling; retry when GET /health answers 200", None, "not_ready",
                    "server_error")


async def completions(service: Service, request: Request) -> Response:
    if not service.scheduler.ready.is_set():
        return _error(_not_ready(), {"Retry-After": "5"})
    try:
        c = parse_completion(parse_json(await request.body()), service.limits)
    except ApiError as e:
        return _error(e)
    choices, reply = Choices(c, asyncio.get_running_loop()), Reply(service, c)
    try:
        service.scheduler.submit(choices.sequences)
    except QueueFull:
        return _error(ApiError(429, "the server's queue is full; retry later", None, "queue_full", "rate_limit"),
                      {"Retry-After": "1"})
    service.served += 1

    def cancel() -> None:
        service.scheduler.cancel(choices.sequences)

    if c.stream:
        return EventStream(reply.stream(choices), cancel, service.timeout_s)
    try:
        return JSONResponse(await _race(reply.whole(choices), request.receive, service.timeout_s))
    except TimeoutError:
        return _error(ApiError(504, "the request ran past serve.request_timeout_s", None, "timeout", "timeout"))
    except Gone:
        return Response(status_code=499)
    finally:
        cancel()


async def chat_completions(request: Request) -> Response:
    return _error(ApiError(404, "This is a completion model, not a chat model: use POST /v1/completions", None,
                           "unsupported_endpoint"))


def models(service: Service) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": service.limits.model_name, "object": "model", "created": service.started, "owned_by": "mygpt_jax",
         "context_length": service.limits.context_length}]})


def health(service: Service) -> Response:
    if service.scheduler.ready.is_set():
        return JSONResponse({"status": "ok", **service.scheduler.load()})
    return _error(_not_ready(), {"Retry-After": "5"})


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return _error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, code))


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The handler, with an unexpected exception answered 500 in OpenAI's format and logged as one line."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:  # a bug must not print a traceback per request
            print(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            return _error(ApiError(500, f"internal error: {type(e).__name__}", None, "internal_error",
                                   "server_error"))

    return guarded


def build_app(service: Service, cors_origins: list[str]) -> Starlette:
    async def on_completions(request: Request) -> Response:
        return await completions(service, request)

    async def on_models(request: Request) -> Response:
        return models(service)

    async def on_health(request: Request) -> Response:
        return health(service)

    async def on_page(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html")

    routes = [Route("/v1/completions", _guarded(on_completions), methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", on_models), Route("/health", on_health), Route("/", on_page)]
    middleware = [Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                             allow_headers=["*"])] if cors_origins else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})

"""The completions request, checked field by field as OpenAI checks it: a bad one is an `ApiError` whose body is
OpenAI's error object naming the field (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mygpt_jax.serving.sampling import TOP_LOGPROBS
from mygpt_jax.tokenizer import END_OF_TEXT_ID, VOCAB_SIZE, encode

# Fields of OpenAI's completions API that are accepted only at their neutral value (docs/serving.md).
NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0),
           "frequency_penalty": (None, 0)}
SUPPORTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs",
             "echo", "user", "top_k", "stream_options"}
MAX_STOPS = 4  # OpenAI's limit


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
    model_name: str
    context_length: int
    max_n: int


@dataclasses.dataclass(frozen=True)
class Completion:
    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    logprobs: int | None
    echo: bool
    include_usage: bool


_TYPES = {"integer": (int,), "number": (int, float), "boolean": (bool,), "string": (str,), "object": (dict,)}


def _field(body: dict, key: str, kind: str, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, _TYPES[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
        raise ApiError(400, f"{value!r} is not of type '{kind}' - '{key}'", key, "invalid_type")
    return value


def _require(ok: bool, key: str, message: str, code: str = "invalid_value") -> None:
    if not ok:
        raise ApiError(400, message, key, code)


def _token_ids(ids: list) -> list[int]:
    _require(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < VOCAB_SIZE for t in ids), "prompt",
             f"token ids must be integers in [0, {VOCAB_SIZE})")
    return list(ids)


def _prompts(value: Any) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists -> token id lists; an empty text
    is the end-of-text token (GPT-2's start of a document)."""
    if isinstance(value, str):
        return [encode(value) or [END_OF_TEXT_ID]]
    _require(isinstance(value, list) and len(value) > 0, "prompt",
             "prompt must be a string, a list of strings, a list of token ids or a list of token id lists")
    if all(isinstance(p, str) for p in value):
        return [encode(p) or [END_OF_TEXT_ID] for p in value]
    if all(isinstance(p, list) for p in value):
        _require(all(p for p in value), "prompt", "a token id list of the prompt is empty")
        return [_token_ids(p) for p in value]
    return [_token_ids(value)]


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    _require(isinstance(stops, list) and all(isinstance(s, str) and s for s in stops), "stop",
             "stop must be a non-empty string or a list of them")
    _require(len(stops) <= MAX_STOPS, "stop", f"at most {MAX_STOPS} stop sequences")
    return tuple(stops)


def _unsupported(body: dict) -> None:
    for key in body:
        if key in NEUTRAL:
            _require(body[key] in NEUTRAL[key] or (key == "best_of" and body[key] == body.get("n", 1)), key,
                     f"{key} is not supported by this server (leave it out)", "unsupported_parameter")
        else:
            _require(key in SUPPORTED, key, f"Unrecognized request argument supplied: {key}",
                     "unrecognized_argument")


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def parse_completion(body: dict, limits: Limits) -> Completion:
    """The request's settings, or an ApiError naming the first bad field."""
    _unsupported(body)
    model = _field(body, "model", "string", None)
    _require(model is not None, "model", "you must provide a model parameter", "missing_required_parameter")
    if model != limits.model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{limits.model_name}'",
                       "model", "model_not_found")
    _require("prompt" in body, "prompt", "you must provide a prompt", "missing_required_parameter")
    echo = _field(body, "echo", "boolean", False)
    max_tokens = _field(body, "max_tokens", "integer", 16)
    _require(max_tokens > 0 or (max_tokens == 0 and echo), "max_tokens",
             "max_tokens must be positive (0 only with echo, to score the prompt)")
    n = _field(body, "n", "integer", 1)
    _require(1 <= n <= limits.max_n, "n", f"n must be between 1 and {limits.max_n}")
    logprobs = _field(body, "logprobs", "integer", None)
    _require(logprobs is None or 0 <= logprobs <= TOP_LOGPROBS, "logprobs",
             f"logprobs must be between 0 and {TOP_LOGPROBS}")
    stream = _field(body, "stream", "boolean", False)
    options = _field(body, "stream_options", "object", {})
    _require(not options or stream, "stream_options", "stream_options is only allowed with stream: true")
    _require(set(options) <= {"include_usage"}, "stream_options", "only stream_options.include_usage is supported")
    completion = Completion(
        _prompts(body["prompt"]), max_tokens, _sampling(body, "temperature", 1.0, 0.0), _top_p(body),
        _field(body, "top_k", "integer", 0), n, _stops(body.get("stop") or []), _field(body, "seed", "integer", None),
        stream, logprobs, echo, bool(options.get("include_usage")))
    _require(completion.top_k >= 0, "top_k", "top_k must be >= 0 (0 = off)")
    _check_context(completion, limits.context_length)
    return completion


def _sampling(body: dict, key: str, default: float, minimum: float) -> float:
    value = float(_field(body, key, "number", default))
    _require(value >= minimum, key, f"{key} must be >= {minimum}")
    return value


def _top_p(body: dict) -> float:
    value = float(_field(body, "top_p", "number", 1.0))
    _require(0.0 < value <= 1.0, "top_p", "top_p must be in (0, 1]")
    return value


def _check_context(c: Completion, context_length: int) -> None:
    for prompt in c.prompts:
        if len(prompt) + c.max_tokens > context_length:
            raise ApiError(400, f"This model's maximum context length is {context_length} tokens, however you "
                           f"requested {len(prompt) + c.max_tokens} tokens ({len(prompt)} in your prompt; "
                           f"{c.max_tokens} for the completion). Please reduce your prompt or max_tokens.",
                           "max_tokens", "context_length_exceeded")

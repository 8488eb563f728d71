"""python -m mygpt_jax.serve in a real process, through the official `openai` client and plain HTTP: completions,
streams, choices, stop sequences, seeds, log-probabilities against the model itself, concurrency, disconnects,
bad input, and a SIGTERM that drains requests in flight. One server for the module (started once)."""

from __future__ import annotations

import functools
import http.client
import itertools
import json
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from mygpt_jax.backends.profile import STOCK  # noqa: E402 - after the skips
from mygpt_jax.model import GPT  # noqa: E402
from mygpt_jax.tokenizer import decode, encode  # noqa: E402
from tests.serve_process import start_server, tiny_model  # noqa: E402
from tests.utils import run_cli  # noqa: E402

MAX_BATCH, MAX_QUEUE = 4, 16
ORIGIN = "http://playground.test"  # the one origin allowed to call from a browser
PROMPTS = ["Every effort moves you", "I had always thought", "The sun", "It was", "She said that", "Hello",
           "In the end", "A dog"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    cfg, params = tiny_model(folder)
    server = start_server(folder, f"--config.serve.max_batch={MAX_BATCH}", f"--config.serve.max_queue={MAX_QUEUE}",
                          f"--config.serve.cors_origins={ORIGIN}")
    yield server, cfg, params
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def complete(client, prompt, **kwargs):
    return client.completions.create(model="tiny", prompt=prompt, **kwargs)


def streamed(client, prompt, **kwargs) -> tuple[dict[int, str], dict[int, str]]:
    """(text, finish_reason) per choice index of a streamed completion."""
    texts, reasons = {}, {}
    for chunk in complete(client, prompt, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


def test_models_health_and_a_completion(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert _health(served[0].url)["status"] == "ok"
    reply = complete(client, "Every effort moves you", max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.model == "tiny" and reply.id
    [choice] = reply.choices
    assert choice.finish_reason == "length" and choice.text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(encode("Every effort moves you")), 8)


def test_a_stream_joins_into_the_same_text(client):
    settings = dict(max_tokens=12, temperature=1.0, seed=7, extra_body={"top_k": 50})
    whole = complete(client, "I had always thought", **settings).choices[0]
    texts, reasons = streamed(client, "I had always thought", **settings)
    assert texts == {0: whole.text} and reasons == {0: whole.finish_reason}


def test_choices_and_seeds(client):
    settings = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    three = complete(client, ["The sun", "A dog"], n=3, **settings)
    assert sorted(c.index for c in three.choices) == list(range(6))
    again = complete(client, ["The sun", "A dog"], n=3, **settings)
    assert [c.text for c in again.choices] == [c.text for c in three.choices]
    assert len({c.text for c in three.choices[:3]}) > 1  # the choices of one prompt are sampled, not copies
    alone = complete(client, "The sun", n=1, **settings)  # choice 0 draws the same keys, in whichever row
    assert alone.choices[0].text == three.choices[0].text
    other = complete(client, "The sun", n=1, **{**settings, "seed": 124})
    assert other.choices[0].text != alone.choices[0].text


def test_stop_sequences_cut_the_text_streamed_or_not(client):
    full = complete(client, "Every effort moves you", max_tokens=20, temperature=0, logprobs=0).choices[0]
    tokens, offsets = full.logprobs.tokens, full.logprobs.text_offset
    across = [t[-1] + u[0] for (t, u), end in zip(itertools.pairwise(tokens), offsets[1:], strict=True) if t and u
              and full.text.index(t[-1] + u[0]) == end - 1]  # the first place it appears is across two tokens
    assert across, f"no two neighbouring tokens to stop across in {tokens}"
    stop = across[0]
    expected = full.text[:full.text.index(stop)]
    cut = complete(client, "Every effort moves you", max_tokens=20, temperature=0, stop=[stop, "never appears"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")
    # the stream must hold back the stop's first character, which ends a token, until the next token shows it
    texts, reasons = streamed(client, "Every effort moves you", max_tokens=20, temperature=0, stop=stop)
    assert (texts[0], reasons[0]) == (expected, "stop")


def _model_logprobs(cfg, params, ids: list[int]) -> np.ndarray:
    """log-softmax of the model's logits at every position of `ids`, by a direct apply (no cache), as evaluation
    computes them; padded to the context (causal: the padding changes nothing before it), so one compile."""
    padded = np.zeros((1, cfg.context_length), np.int32)
    padded[0, :len(ids)] = ids
    logits = _apply(cfg, params, padded)
    return np.asarray(jax.nn.log_softmax(logits[0, :len(ids), :cfg.vocab_size], axis=-1))


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens):
    return GPT(cfg, STOCK).apply({"params": params}, tokens)[0]


def test_logprobs_and_echo_are_the_models(served, client):
    _, cfg, params = served
    prompt = "I had always thought Jack"
    ids = encode(prompt)
    scored = complete(client, prompt, max_tokens=0, echo=True, logprobs=3).choices[0]
    assert scored.text == prompt == "".join(scored.logprobs.tokens)
    logp = _model_logprobs(cfg, params, ids)
    assert scored.logprobs.token_logprobs[0] is None and scored.logprobs.top_logprobs[0] is None
    np.testing.assert_allclose(scored.logprobs.token_logprobs[1:], logp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    top = scored.logprobs.top_logprobs[1]
    assert len(top) == 3 and max(top.values()) == pytest.approx(float(logp[0].max()), abs=1e-4)

    greedy = list(ids)
    for _ in range(6):  # the model's own greedy continuation
        greedy.append(int(np.argmax(_model_logprobs(cfg, params, greedy)[-1])))
    logp = _model_logprobs(cfg, params, greedy)
    made = complete(client, prompt, max_tokens=6, temperature=0, logprobs=1, echo=True).choices[0]
    assert made.text == decode(greedy) == "".join(made.logprobs.tokens)
    np.testing.assert_allclose(made.logprobs.token_logprobs[len(ids):],
                               logp[np.arange(len(ids) - 1, len(greedy) - 1), greedy[len(ids):]], atol=1e-4)
    assert made.logprobs.text_offset[len(ids)] == len(prompt)


def test_concurrent_requests_complete_and_greedy_ones_match_their_solo_answers(client):
    solo = {p: complete(client, p, max_tokens=10, temperature=0).choices[0].text for p in PROMPTS}

    def one(i: int) -> tuple[str, str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:  # sampled and streamed, beside the greedy ones
            _, reasons = streamed(client, prompt, max_tokens=10, temperature=1.0, seed=i)
            return prompt, "sampled", reasons[0]
        choice = complete(client, prompt, max_tokens=10, temperature=0).choices[0]
        return prompt, choice.text, choice.finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32
    for prompt, text, reason in results:
        assert reason in ("length", "stop")
        assert text == "sampled" or text == solo[prompt]


def _post(url: str, body: bytes | str | dict) -> tuple[int, dict, Any]:
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), e.headers


BAD = [  # (body, status, param)
    (b"{not json", 400, None),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 40}, 400, "max_tokens"),  # past the context of 32
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 9}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"model": "tiny", "prompt": [99999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 1}, 400, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": "x", "colour": "red"}, 400, "colour"),
    ({"model": "tiny", "prompt": "x", "n": True}, 400, "n"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[str(p) for _, _, p in BAD])
def test_bad_input_is_an_openai_error_naming_the_field(served, body, status, param):
    got, reply, _ = _post(served[0].url + "/v1/completions", body)
    assert got == status
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param


def test_other_routes_and_a_full_queue(served, client):
    url = served[0].url
    status, reply, _ = _post(url + "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert status == 404 and "completion model" in reply["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    status, reply, _ = _post(url + "/nowhere", {})
    assert status == 404 and reply["error"]["code"] == "not_found"
    too_many = {"model": "tiny", "prompt": ["a", "b", "c"], "n": 8, "max_tokens": 2}  # 24 > rows + queue
    status, reply, headers = _post(url + "/v1/completions", too_many)
    assert status == 429 and headers.get("Retry-After") and reply["error"]["code"] == "queue_full"
    for origin, allowed in ((ORIGIN, ORIGIN), ("http://elsewhere.test", None)):
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers={"Origin": origin})) as r:
            assert r.headers.get("Access-Control-Allow-Origin") == allowed


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health") as r:
        return json.load(r)


def test_a_client_that_leaves_mid_stream_frees_its_rows(served, client):
    url = served[0].url
    before = _health(url)["tokens_generated"]
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port)
    many = {"model": "tiny", "prompt": ["Hello", "A dog", "The sun"], "n": 5, "max_tokens": 28, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(many), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.read(7) == b"data: {"
    connection.close()  # mid-stream: 15 sequences of 28 tokens, 4 rows at a time, most still queued
    # served after them (first come, first served) unless the closed stream's sequences were dropped
    assert complete(client, "Hello", max_tokens=3, temperature=0).choices[0].finish_reason == "length"
    health = _health(url)
    assert (health["rows_busy"], health["waiting"]) == (0, 0)
    assert health["tokens_generated"] - before < 15 * 28
    assert "Traceback" not in served[0].stderr() and "error" not in served[0].stderr()


def test_a_busy_port_is_one_line(served):
    port = urllib.parse.urlsplit(served[0].url).port
    result = run_cli("serve", f"--config.serve.port={port}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: 127.0.0.1:") and "Traceback" not in result.stderr


def test_a_bad_setting_is_one_line():
    result = run_cli("serve", "--config.serve.max_batch=0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: --config.serve.max_batch=0 is invalid: must be a "
                                                      "positive number of rows")


def test_sigterm_drains_requests_in_flight(served, client):
    """Last in the module: it stops the module's server."""
    server = served[0]
    started = threading.Barrier(9)

    def one(i: int) -> tuple[str, str]:
        stream = complete(client, PROMPTS[i], max_tokens=25, temperature=1.0, seed=i, stream=True)
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        started.wait()
        reason = None
        for chunk in chunks:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        started.wait()
        server.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert all(reason in ("length", "stop") for _, reason in results)
    assert server.stop() == 0
    log = server.stderr().strip().splitlines()
    assert log[-1].startswith("stopped after ") and "Traceback" not in server.stderr()

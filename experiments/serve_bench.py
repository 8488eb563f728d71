"""The completions server under load: aggregate generated tokens/s, time to first token and latency (p50, p95) at
1, 4, 8 and 16 concurrent streams, all arriving at once or at random times (a Poisson process), on random weights.

    uv run --extra serve python experiments/serve_bench.py                       # configs/tiny.py's model
    uv run --extra serve python experiments/serve_bench.py --model gpt2_124m     # GPT-2 124M's shape

It starts `python -m mygpt_jax.serve` (serve.max_batch 8) on a free port, times streamed requests through plain
HTTP, and prints a Markdown table (the figures: docs/serving.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.serve_process import start_server, tiny_model  # the repository's root is on the path now

SHAPES = {"tiny": {}, "gpt2_124m": dict(emb_dim=768, n_heads=12, n_layers=12, context_length=1024, qkv_bias=True,
                                         tie_embeddings=True)}
PROMPT = "Every effort moves you forward, one step after another, until"


def one_stream(url: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the end, tokens generated) of one streamed greedy completion."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start, first, tokens = time.perf_counter(), None, 0
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"error: the server answered {response.status}: {response.read().decode()}")
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"][0]["text"]:
            first = time.perf_counter() - start
    connection.close()
    return first or 0.0, time.perf_counter() - start, tokens


def run_load(url: str, model: str, streams: int, requests: int, max_tokens: int, gap_s: float) -> dict:
    """`requests` streams, at most `streams` at a time; gap_s > 0 spaces their starts by exponential gaps of that
    mean (Poisson arrivals), 0 starts them all at once."""
    rng, results, lock = random.Random(0), [], threading.Lock()

    def request() -> None:
        result = one_stream(url, model, max_tokens)
        with lock:
            results.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for _ in range(requests):
            pool.submit(request)
            if gap_s:
                time.sleep(rng.expovariate(1 / gap_s))
    wall = time.perf_counter() - start
    ttft, latency = sorted(r[0] for r in results), sorted(r[1] for r in results)
    p95 = min(len(results) - 1, math.ceil(0.95 * len(results)) - 1)  # nearest rank
    return {"tokens_per_s": sum(r[2] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[p95], "latency_p50": statistics.median(latency), "latency_p95": latency[p95]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--max-tokens", type=int, default=0, help="per request; 0 = 16 for tiny (its context is 32), "
                        "64 for gpt2_124m")
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream slot at each level")
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (16 if args.model == "tiny" else 64)
    with tempfile.TemporaryDirectory() as folder:
        tiny_model(Path(folder), args.model, **SHAPES[args.model])
        server = start_server(Path(folder), f"--config.run_name={args.model}", "--config.serve.max_batch=8")
        try:
            run_load(server.url, args.model, 1, 1, args.max_tokens, 0)  # warm-up: the first request's costs
            solo = run_load(server.url, args.model, 1, 3, args.max_tokens, 0)
            print(f"{args.model}: one stream alone: {solo['tokens_per_s']:.1f} tokens/s, first token after "
                  f"{solo['ttft_p50'] * 1000:.0f} ms\n")
            print("| arrivals | streams | tokens/s | x one stream | TTFT p50 / p95 (ms) | latency p50 / p95 (s) |")
            print("| --- | --- | --- | --- | --- | --- |")
            for arrivals in ("at once", "Poisson"):
                for streams in (1, 4, 8, 16):
                    gap = solo["latency_p50"] / streams if arrivals == "Poisson" else 0
                    r = run_load(server.url, args.model, streams, streams * args.rounds, args.max_tokens, gap)
                    print(f"| {arrivals} | {streams} | {r['tokens_per_s']:.1f} | "
                          f"{r['tokens_per_s'] / solo['tokens_per_s']:.1f} | {r['ttft_p50'] * 1000:.0f} / "
                          f"{r['ttft_p95'] * 1000:.0f} | {r['latency_p50']:.2f} / {r['latency_p95']:.2f} |",
                          flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()

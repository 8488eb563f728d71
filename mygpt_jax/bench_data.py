"""The data benchmark, `python -m mygpt_jax.bench --config configs/tiny.py --prepare`: corpus preparation and
what the data costs training, on corpora generated from the standard library's sources and "The Verdict".

prepare    for each of --prepare_mb (a folder of 1 MB documents), `python -m mygpt_jax.prepare` in a process of
           its own: MB/s, tokens/s, peak memory (its maximum resident set); then the same text as records of
           about 4 KB in JSON Lines shards and in Parquet shards, each against the text files (the goal: at least
           0.9 of their tokens/s). The yardstick is tiktoken's
           single-thread rate on a 16 MB sample, in pieces as preparing reads them, measured in the same run:
           the goal is at least
           0.8 x cores x that rate, and peak memory that grows by less than 10% from the smallest corpus to the
           largest.
train      the config's train step fed as training feeds it (the batch of each step gathered while the
           device runs the one before) from the prepared corpus's memory map, against the same windows
           materialised in memory beforehand (as the trainer did before corpora): tokens/s of each, alternating
           --data_rounds times; the goal is within 3%.
startup    `python -m mygpt_jax.train` on the prepared largest corpus for one step: the seconds from the command's
           start to its first step, compiling excluded (summary.json's startup_s).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mygpt_jax import corpus, data, run_setup, sharding
from mygpt_jax.model import ModelConfig
from mygpt_jax.prepare import CHUNK_BYTES, default_workers

DOCUMENT_BYTES = 1 << 20
RECORD_CHARS = 4096  # a record of the JSON Lines and Parquet corpora: about a web page's text
DOCUMENTS_PER_SHARD = 64  # of 1 MB: a JSON Lines or Parquet shard of 64 MB of text
FORMATS = ("txt", "jsonl", "parquet")


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def sample_text(megabytes: float, seed: int = 0) -> str:
    """Text like a mixed corpus: pieces of the standard library's sources and of "The Verdict", shuffled."""
    rng = random.Random(seed)
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = [os.path.join(root, f) for root, _, files in os.walk(stdlib) if "site-packages" not in root
               for f in files if f.endswith(".py")][:400]
    pieces = [data.load_text("")]
    for path in sources:
        try:
            with open(path, encoding="utf-8") as f:
                pieces.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue
    out, size = [], 0
    while size < megabytes * 1e6:
        piece = rng.choice(pieces)
        start = rng.randrange(max(1, len(piece) - 20_000))
        out.append(piece[start:start + 20_000])
        size += len(out[-1])
    return "".join(out)


def write_corpus(folder: str, megabytes: int, seed: int, fmt: str = "txt") -> None:
    """`megabytes` documents of about 1 MB each: one .txt file each, or (the same text) as records of
    RECORD_CHARS characters in .jsonl or .parquet shards of DOCUMENTS_PER_SHARD documents."""
    os.makedirs(folder, exist_ok=True)
    text = sample_text(16, seed)
    rng = random.Random(seed)
    documents = []
    for i in range(megabytes):
        start = rng.randrange(len(text) - DOCUMENT_BYTES)
        documents.append(text[start:start + DOCUMENT_BYTES])
        if fmt == "txt":
            with open(os.path.join(folder, f"doc{i:05d}.txt"), "w") as f:
                f.write(documents.pop())
        elif len(documents) == DOCUMENTS_PER_SHARD or i == megabytes - 1:
            records = [d[j:j + RECORD_CHARS] for d in documents for j in range(0, len(d), RECORD_CHARS)]
            _write_shard(os.path.join(folder, f"shard{i // DOCUMENTS_PER_SHARD:04d}.{fmt}"), records)
            documents = []


def _write_shard(path: str, records: list[str]) -> None:
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": records}), path, row_group_size=1024)
        return
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": r}) + "\n" for r in records)


def tokenizer_rate(text: str) -> tuple[float, float]:
    """(MB/s, tokens/s) of tiktoken on one thread, called as preparing calls it (`corpus.encode_chunk`), on
    pieces of the size it reads."""
    pieces = [text[i:i + CHUNK_BYTES].encode() for i in range(0, len(text), CHUNK_BYTES)]
    corpus.encode_chunk(pieces[0][:10_000])  # builds the tokenizer
    start = time.perf_counter()
    tokens = sum(len(corpus.encode_chunk(piece)) for piece in pieces)
    seconds = time.perf_counter() - start
    return sum(map(len, pieces)) / 1e6 / seconds, tokens / seconds


def _run_measured(cmd: list[str]) -> tuple[int, float, str]:
    """(exit status, peak resident memory in bytes, stdout) of a command in a process of its own."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return proc.returncode, rss, out.read()


def bench_prepare(root: str, sizes: list[int], config_path: str) -> list[dict[str, Any]]:
    """Each size's corpus prepared as text files, JSON Lines and Parquet, each in a process of its own."""
    results = []
    for megabytes in sizes:
        for fmt in FORMATS:
            folder = os.path.join(root, f"corpus{megabytes}-{fmt}")
            _progress(f"writing a {megabytes} MB corpus of .{fmt} files, then preparing it in a process of its own")
            write_corpus(folder, megabytes, seed=megabytes, fmt=fmt)
            cache = os.path.join(root, "prepared")
            status, rss, _ = _run_measured([sys.executable, "-m", "mygpt_jax.prepare", "--config", config_path,
                                            f"--config.data.path={folder}/*.{fmt}", f"--config.data.cache_dir={cache}"])
            if status:
                raise RuntimeError(f"preparing {folder} failed with status {status}")
            data_keys = ml_collections.ConfigDict({"path": f"{folder}/*.{fmt}", "glob": "**/*.txt", "exclude": "",
                                                   "train_ratio": 0.9, "text_field": "text", "max_tokens": 0,
                                                   "split": "auto"})
            prepared = os.path.join(cache, corpus.spec_from_config(data_keys).name())
            shutil.rmtree(folder)  # the sources: not needed again
            results.append(_prepared_figures(prepared, megabytes, fmt, rss))
        text = results[-len(FORMATS)]
        for r in results[-len(FORMATS):]:
            r["tokens_per_s_over_txt"] = r["tokens_per_s"] / text["tokens_per_s"]
    return results


def _prepared_figures(prepared: str, megabytes: int, fmt: str, rss: int) -> dict[str, Any]:
    meta = corpus.read_meta(prepared)
    seconds = meta["prepared"]["seconds"]
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    return {"megabytes": megabytes, "format": fmt, "folder": prepared, "seconds": seconds,
            "mb_per_s": megabytes * DOCUMENT_BYTES / 1e6 / seconds, "file_mb": meta["prepared"]["bytes"] / 1e6,
            "tokens_per_s": tokens / seconds, "tokens": tokens, "workers": meta["prepared"]["workers"],
            "peak_rss_bytes": rss}


class _InMemory:
    """The epochs' windows materialised as one array beforehand, as the trainer held them before corpora."""

    def __init__(self, batches: data.EpochBatches):
        self.batches = batches
        self.windows = data.gather(batches.tokens, batches.starts, batches.context_length)

    def batch(self, step: int) -> np.ndarray:  # the same windows as the memory map's, by their index
        return self.windows[self.batches.starts_of(step) // self.batches.context_length]


def bench_training(config: ml_collections.ConfigDict, prepared_folder: str, n_steps: int, rounds: int
                   ) -> dict[str, list[float]]:
    """Tokens/s of the config's train step fed from the memory map and from memory, alternating."""
    t = config.train
    cfg = ModelConfig.from_config(config.model)
    tokens = corpus.open_corpus(prepared_folder, corpus.read_meta(prepared_folder)).train
    mapped = data.EpochBatches(tokens, cfg.context_length, cfg.context_length, t.batch_size, t.seed)
    sources = {"memory_map": mapped, "in_memory": _InMemory(data.EpochBatches(
        np.asarray(tokens), cfg.context_length, cfg.context_length, t.batch_size, t.seed))}
    run = run_setup.setup(config, n_steps)
    state = run.fresh_state(jax.random.key(0))
    rng = sharding.put(jax.random.key(1), sharding.replicated(run.mesh))
    step_fn, _ = run.compile_train_step(state, _on_mesh(run, mapped.batch(0)), rng)
    state, metrics = step_fn(state, _on_mesh(run, mapped.batch(0)), rng)
    jax.block_until_ready(metrics)
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(rounds):
        for name, source in sources.items():
            start, batch = time.perf_counter(), source.batch(0)
            for step in range(n_steps):  # as the training loop: the next batch gathered while the step runs
                state, metrics = step_fn(state, _on_mesh(run, batch), rng)
                batch = source.batch(step + 1)
            jax.block_until_ready(metrics)
            rates[name].append(n_steps * t.batch_size * cfg.context_length / (time.perf_counter() - start))
    return rates


def _on_mesh(run: run_setup.Run, batch: np.ndarray) -> jax.Array:
    """A host batch as the train step takes it: (micro-batches, rows, tokens) with the batch's sharding."""
    accum = run.config.train.grad_accum_steps
    return jax.device_put(batch.reshape(accum, -1, batch.shape[-1]), run.batch_sharding)


def bench_startup(config_path: str, prepared_folder: str, root: str) -> float:
    """Seconds from the train command's start to its first step on a prepared corpus, compiling excluded."""
    ckpt = os.path.join(root, "startup")
    cmd = [sys.executable, "-m", "mygpt_jax.train", "--config", config_path, f"--config.data.path={prepared_folder}",
           f"--config.checkpoint_dir={ckpt}", "--config.run_name=startup", "--config.train.max_steps=1",
           "--config.train.flops_matmul_size=0", "--config.sample.prompt="]
    status, _, _ = _run_measured(cmd)
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status}")
    with open(os.path.join(ckpt, "startup", "summary.json")) as f:
        return json.load(f)["startup_s"]


def run(config: ml_collections.ConfigDict, config_path: str, sizes: list[int], train_steps: int, rounds: int
        ) -> dict[str, Any]:
    cores = default_workers()
    _progress("tiktoken's single-thread rate on a 16 MB sample")
    mb_per_s, tokens_per_s = tokenizer_rate(sample_text(16, seed=1))
    with tempfile.TemporaryDirectory() as root:
        prepared = bench_prepare(root, sizes, config_path)
        _progress(f"the train step fed from the memory map and from memory, {rounds} x {train_steps} steps each")
        rates = bench_training(config, prepared[0]["folder"], train_steps, rounds)
        _progress("start-up of the train command on the prepared corpus")
        startup_s = bench_startup(config_path, prepared[-1]["folder"], root)
    text_rows = [p for p in prepared if p["format"] == "txt"]
    for p in prepared:
        p["fraction_of_cores_x_single_thread"] = p["tokens_per_s"] / (cores * tokens_per_s)
        del p["folder"]
    return {"device": f"cpu ({cores} cores)", "single_thread_mb_per_s": mb_per_s,
            "single_thread_tokens_per_s": tokens_per_s, "prepare": prepared,
            "peak_rss_growth": text_rows[-1]["peak_rss_bytes"] / text_rows[0]["peak_rss_bytes"],
            "train_tokens_per_s": rates,
            "memory_map_over_in_memory": float(np.median(rates["memory_map"]) / np.median(rates["in_memory"])),
            "startup_s": startup_s}


def report(r: dict[str, Any]) -> str:
    lines = [f"tokenizer, one thread: {r['single_thread_mb_per_s']:.2f} MB/s, "
             f"{r['single_thread_tokens_per_s']:,.0f} tokens/s ({r['device']})"]
    for p in r["prepare"]:
        lines.append(f"prepare {p['megabytes']} MB of text as .{p['format']} ({p['file_mb']:,.0f} MB of files, "
                     f"{p['tokens']:,} tokens) on {p['workers']} workers: {p['seconds']:.1f} s, {p['mb_per_s']:.2f} "
                     f"MB/s of text, {p['tokens_per_s']:,.0f} tokens/s = {p['fraction_of_cores_x_single_thread']:.2f} "
                     f"of cores x one thread, {p['tokens_per_s_over_txt']:.2f}x the .txt files'; peak memory "
                     f"{p['peak_rss_bytes'] / 1e6:,.0f} MB")
    lines.append(f"peak memory of the .txt corpora, largest over smallest: {r['peak_rss_growth']:.3f}x")
    rates = r["train_tokens_per_s"]
    lines.append(f"train step from the memory map: {', '.join(f'{x:.0f}' for x in rates['memory_map'])} tokens/s; "
                 f"from memory: {', '.join(f'{x:.0f}' for x in rates['in_memory'])}; median ratio "
                 f"{r['memory_map_over_in_memory']:.3f}")
    lines.append(f"start-up of the train command to its first step (compiling excluded): {r['startup_s']:.2f} s")
    return "\n".join(lines)

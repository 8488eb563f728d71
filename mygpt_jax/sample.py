"""Complete text with a trained run or OpenAI's GPT-2.

    python -m mygpt_jax.sample --config configs/verdict.py                  # one-shot, the config's prompt
    python -m mygpt_jax.sample --config configs/gpt2_124m.py                # interactive chat
    python -m mygpt_jax.sample --config configs/gpt2_124m.py --config.sample.prompt="Hello"

An empty `sample.prompt` starts the chat; any other prompt is completed once and printed after the prompt.
A prompt is kept whole and the new tokens capped to the room it leaves in the context (said in one note; in the
chat, the first time only). The chat's input line has line editing and history where Python has `readline`.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import sys
import time

import jax
import ml_collections

from mygpt_jax import backends, sharding
from mygpt_jax.generate import Generator, SamplingSettings
from mygpt_jax.tokenizer import decode, encode, get_tokenizer
from mygpt_jax.weights import load_model

CHAT_BANNER = "MyGPT: Please enter a sentence to complete (enter 'exit' to end chat)"


def _notes(notes: list[str], said: set[str]) -> None:
    """Print each note whose kind (its first words, before any number) is not in `said` yet, and remember it."""
    for note in notes:
        kind = note.split("=")[0].split(" has ")[0]
        if kind not in said:
            said.add(kind)
            print(f"[{note}]", file=sys.stderr)


def complete_once(generator: Generator, prompt: str, rng: jax.Array, said: set[str] | None = None) -> None:
    samples, notes = generator.generate(encode(prompt), rng)
    _notes(notes, set() if said is None else said)
    for i, ids in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i + 1} ---")
        print(prompt + decode(ids))


def stream_completion(generator: Generator, prompt: str, rng: jax.Array, said: set[str]) -> None:
    """Print the prompt, then each new token as soon as it is made (sample 1 of the batch)."""
    ids, _, notes = generator.prepare(encode(prompt))
    _notes(notes, said)
    tokenizer = get_tokenizer()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens can split a character
    print(prompt, end="", flush=True)
    start, count, first = time.time(), 0, None
    for tokens in generator.stream(ids, rng):
        token = int(tokens[0])
        if token == generator.settings.stop_token:
            break
        first = first or time.time() - start
        count += 1
        print(utf8.decode(tokenizer.decode_single_token_bytes(token)), end="", flush=True)
    print(utf8.decode(b"", final=True))
    if count > 1:
        print(f"[{count} tokens; first after {first:.2f} s, then {(count - 1) / (time.time() - start - first):.1f} "
              "tokens/s]", file=sys.stderr)


def _line_editing() -> None:
    """Arrow keys, editing and history (up/down) for input(), from the standard library's readline where it
    exists (not on Windows) and the input is a terminal."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            importlib.import_module("readline")  # input() uses it once it is imported


def chat(generator: Generator, rng: jax.Array) -> None:
    _line_editing()
    print(CHAT_BANNER)
    said: set[str] = set()  # each kind of note once a chat
    for turn in range(sys.maxsize):
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line == "exit":
            return
        if not line:
            continue
        try:
            if generator.settings.num_samples == 1:
                stream_completion(generator, line, jax.random.fold_in(rng, turn), said)
            else:
                complete_once(generator, line, jax.random.fold_in(rng, turn), said)
        except KeyboardInterrupt:
            print()
            return


def main(config: ml_collections.ConfigDict) -> None:
    cfg, params = load_model(config, sharding.make_mesh(config.mesh))
    generator = Generator(cfg, params, SamplingSettings.from_config(config.sample), backends.current())
    del params  # the generator keeps its own copy, laid out for decoding
    rng = jax.random.key(config.sample.seed)
    if config.sample.prompt:
        complete_once(generator, config.sample.prompt, rng)
    else:
        chat(generator, rng)


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main)

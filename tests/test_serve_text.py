"""A choice's tokens becoming streamed text (mygpt_jax/serving/sequence.py), without a server: pieces are final
(no half of a UTF-8 character, no start of a stop sequence that may yet complete), they join into the text, and
the logprobs tokens join into it too."""

from __future__ import annotations

import numpy as np

from mygpt_jax.serving.engine import RowSettings
from mygpt_jax.serving.sequence import Delta, End, Request, Sequence
from mygpt_jax.tokenizer import END_OF_TEXT_ID, encode

TOP = (np.zeros(5, np.int32), np.zeros(5, np.float32))


def run(text_ids: list[int], stop: tuple[str, ...] = (), max_tokens: int = 50, logprobs: int | None = 0,
        prompt: str = "Hi", echo: bool = False) -> tuple[list[Delta], End]:
    events = []
    sequence = Sequence(0, Request(encode(prompt), max_tokens, stop, logprobs, echo, RowSettings(0, 0, 0.0, 0, 1.0)),
                        events.append)
    sequence.started()
    for token in text_ids:
        if sequence.push(token, -1.0, *TOP):
            break
    *deltas, end = events
    return deltas, end


def test_pieces_hold_back_incomplete_utf8_and_join_into_the_text():
    text = "🙂 smile, 日本語 naïve café"
    deltas, end = run(encode(text), max_tokens=len(encode(text)))
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text
    assert "".join(t.text for d in deltas for t in d.tokens) == text
    assert (end.finish_reason, end.completion_tokens) == ("length", len(encode(text)))


def test_a_stop_sequence_across_tokens_is_held_back_and_cut():
    ids = encode("one two three four")  # ' two' and ' three' are tokens; the stop spans them
    deltas, end = run(ids, stop=("o th",))
    assert "".join(d.text for d in deltas) == "one tw"
    assert all(not d.text.endswith("o") or d.text == "one" for d in deltas)  # the 'o' waited for ' three'
    assert end.finish_reason == "stop"
    tokens = [t for d in deltas for t in d.tokens]
    assert "".join(t.text for t in tokens) == "one tw" and tokens[-1].offset == 3


def test_the_end_of_text_token_stops_and_echo_comes_first():
    deltas, end = run([*encode(" and"), END_OF_TEXT_ID, *encode(" more")], prompt="Bread", echo=True)
    assert "".join(d.text for d in deltas) == "Bread and"
    assert deltas[0].tokens[0].logprob is None  # the prompt's first token has no log-probability
    assert (end.finish_reason, end.completion_tokens) == ("stop", 2)


def test_max_tokens_ends_with_length():
    deltas, end = run(encode(" a b c d e f"), max_tokens=3)
    assert "".join(d.text for d in deltas) == " a b c" and end.finish_reason == "length"

"""One completion choice on the host: its tokens become text as they arrive, cut at a stop sequence, and go to
its listener in pieces that are final (a possible stop prefix and incomplete UTF-8 bytes are held back until
they resolve)."""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Callable
from typing import Any

from mygpt_jax.serving.engine import RowSettings
from mygpt_jax.tokenizer import END_OF_TEXT_ID, get_tokenizer


@dataclasses.dataclass
class Token:
    """A token of the legacy `logprobs` object: the text it completed (tokens join to the choice's text), its
    log-probability (None for the first prompt token), the most likely alternatives, where its text starts."""

    text: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


@dataclasses.dataclass
class Delta:
    index: int  # the choice
    text: str
    tokens: list[Token]


@dataclasses.dataclass
class End:
    index: int
    finish_reason: str  # "stop" or "length"
    completion_tokens: int


Event = Delta | End


@dataclasses.dataclass
class Request:
    """What a choice asks for, as the API's checks left it."""

    prompt: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    logprobs: int | None  # how many alternatives per token; None = no logprobs object
    echo: bool
    row: RowSettings


def _piece(token: int) -> bytes:
    return get_tokenizer().decode_single_token_bytes(token)


class Sequence:
    """A choice's text as it is generated; `sink` receives its Delta and End events (from the scheduler's
    thread)."""

    def __init__(self, index: int, request: Request, sink: Callable[[Event], None]):
        self.index, self.request, self.sink = index, request, sink
        self.cancelled = False  # set by the HTTP side when the client has gone; the scheduler frees the row
        self.generated = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # everything decoded so far: the prompt if echoed, then the completion
        self._sent = 0  # characters of _text already given to the sink
        self._start = 0  # where the completion starts in _text (stop sequences are searched after it)
        self._tokens: list[Token] = []  # decoded, not yet sent

    @property
    def end(self) -> int:
        """The furthest cache position this sequence may write: its prompt and max_tokens new tokens."""
        return len(self.request.prompt) + self.request.max_tokens

    def started(self, prompt_logprobs: Any = None) -> None:
        """The prompt is in its row; with `echo` its text (and, asked for, its log-probabilities: (logprob,
        top ids, top logprobs) per position, position j for token j + 1) goes out first."""
        if self.request.echo:
            for i, token in enumerate(self.request.prompt):
                scores = None if prompt_logprobs is None or i == 0 else [a[i - 1] for a in prompt_logprobs]
                self._add(token, scores, first=i == 0)
            self._text += self._utf8.decode(b"", final=True)
            self._utf8.reset()
            self._send(len(self._text))
        self._start = len(self._text)

    def push(self, token: int, logprob: float, top_ids: Any, top_logprobs: Any) -> bool:
        """A generated token; True when the choice has ended (its End sent)."""
        self.generated += 1
        if token == END_OF_TEXT_ID:
            return self._finish("stop")
        self._add(token, (logprob, top_ids, top_logprobs))
        cut = self._stop_at()
        if cut is not None:
            return self._finish("stop", cut)
        if self.generated >= self.request.max_tokens:
            return self._finish("length")
        self._send(len(self._text) - self._held())
        return False

    def finish_scoring(self) -> None:
        """A request of max_tokens 0 (scoring its echoed prompt) ends after `started`."""
        self._finish("length")

    def _add(self, token: int, scores: Any, first: bool = False) -> None:
        text = self._utf8.decode(_piece(token))
        if self.request.logprobs is not None:
            lp, top = (None, None) if first or scores is None else self._scores(*scores)
            self._tokens.append(Token(text, lp, top, len(self._text)))
        self._text += text

    def _scores(self, logprob: float, top_ids: Any, top_logprobs: Any) -> tuple[float, dict[str, float]]:
        k = self.request.logprobs or 0
        top = {_piece(int(t)).decode("utf-8", errors="replace"): float(lp)
               for t, lp in zip(top_ids[:k], top_logprobs[:k], strict=True)}
        return float(logprob), top

    def _stop_at(self) -> int | None:
        """Where the first stop sequence starts in the text, if one has appeared."""
        longest = max((len(s) for s in self.request.stop), default=0)
        since = max(self._start, self._sent - longest)
        found = [i for i in (self._text.find(s, since) for s in self.request.stop) if i >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        """How many characters at the end of the text could begin a stop sequence (not sent yet)."""
        tail = self._text[self._start:]
        return max((k for s in self.request.stop for k in range(1, len(s)) if tail.endswith(s[:k])), default=0)

    def _send(self, upto: int) -> None:
        if upto <= self._sent and not self._tokens:
            return
        ready = [t for t in self._tokens if t.offset + len(t.text) <= upto]
        self._tokens = self._tokens[len(ready):]
        text, self._sent = self._text[self._sent:upto], max(upto, self._sent)
        if text or ready:
            self.sink(Delta(self.index, text, ready))

    def _finish(self, reason: str, cut: int | None = None) -> bool:
        """End the choice: the rest of its text (to a stop sequence's start `cut`) and its End."""
        if cut is None:
            self._text += self._utf8.decode(b"", final=True)  # incomplete bytes left become U+FFFD
        else:
            self._text = self._text[:cut]
            for t in self._tokens:  # a token cut by the stop sequence keeps the part before it
                t.text = t.text[:max(0, cut - t.offset)]
            self._tokens = [t for t in self._tokens if t.offset < cut]
        self._send(len(self._text))
        self.sink(End(self.index, reason, self.generated))
        return True

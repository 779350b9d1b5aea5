"""Streaming text output: token ids to final text deltas, and stop-sequence cutting.

`IncrementalDetokenizer` turns generated ids into text deltas whose concatenation is exactly
`tokenizer.decode(ids)`, without re-decoding the whole output on every token.
`StopMatcher` cuts a stream of text deltas right before the first occurrence of a stop string.

How SentencePiece decodes, and what the detokenizer relies on (checked against the real
tokenizer by tests/test_streaming.py):

* ids outside `[0, n_pieces)` are dropped by `ChatGLMTokenizer.decode` before SentencePiece
  sees them, so they neither carry text nor split anything.
* Consecutive byte-fallback pieces (`<0xNN>`) form one run that is decoded as UTF-8, greedily
  from its start; each byte that does not begin a complete, valid character becomes one
  U+FFFD. Any other piece (controls included) ends the run.
* A non-byte piece's text does not depend on later pieces. The one context rule is at the
  start: the leading "▁" of the first non-control piece is dropped, and control pieces
  (<s>, </s>) neither carry text nor end that start state.
"""

from __future__ import annotations

from typing import Sequence

from chatglm3.tokenizer import ChatGLMTokenizer

REPLACEMENT = "\ufffd"
# Longest proper prefix of a UTF-8 sequence: the lead byte of a 4-byte character plus two
# continuation bytes. Only this many trailing bytes can still change their text.
_MAX_INCOMPLETE = 3


class IncrementalDetokenizer:
    """Turns token ids into text deltas, one id at a time.

    `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)` for any ids. A delta
    is only emitted once it is final, so no delta carries a U+FFFD that merely stands for a
    character whose bytes have not all arrived. At most three byte pieces are held back at any
    time and every `tokenizer.decode` call gets at most five ids, so the cost per token does not
    grow with the length of the output.
    """

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer
        self._n_pieces = tokenizer.n_pieces
        self._sp = tokenizer.sp
        # Ids pushed but not yet emitted: always empty or a run of byte pieces, at most
        # _MAX_INCOMPLETE long after each push.
        self._pending: list[int] = []
        # Whether a non-control piece has been emitted, i.e. SentencePiece's "drop the first
        # piece's leading space" rule has been used up.
        self._started = False
        # Decoded after a plain non-byte piece (no leading "▁"), later pieces render as they do
        # mid-text; its own text is then cut off again.
        self._anchor_id = self._sp.piece_to_id("a")
        self._anchor_text = tokenizer.decode([self._anchor_id])
        assert self._anchor_text == "a" and not self._sp.is_byte(self._anchor_id)

    def push(self, token_id: int) -> str:
        """Adds one generated id; returns the text that became final with it (may be "")."""
        if not 0 <= token_id < self._n_pieces:
            return ""  # special tokens carry no text and leave byte runs intact
        self._pending.append(token_id)
        if not self._sp.is_byte(token_id):
            # A non-byte piece closes any byte run: everything pending is final.
            return self._emit(len(self._pending))
        text = self._render(self._pending)
        if not text.endswith(REPLACEMENT):
            # Last character complete: the earlier U+FFFDs of this run are already decided.
            return self._emit(len(self._pending), text)
        return self._emit(self._stable_prefix(text))

    def flush(self) -> str:
        """Returns the held-back text at the end of generation and resets the stream state."""
        text = self._emit(len(self._pending))
        self._started = False
        return text

    def _render(self, ids: Sequence[int]) -> str:
        """Text of `ids` as they decode at the current point of the output."""
        if not ids:
            return ""
        if not self._started:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode([self._anchor_id, *ids])[len(self._anchor_text):]

    def _stable_prefix(self, text: str) -> int:
        """How many pending byte ids are final, `text` being their rendering (ends in U+FFFD).

        Returns the first character boundary of the run within the last three bytes: the
        characters before it have had all the bytes that decide them. A split point k is a
        boundary exactly when decoding both halves apart gives the same text; splitting inside
        a character turns it into several U+FFFDs instead.
        """
        pending = self._pending
        for k in range(max(0, len(pending) - _MAX_INCOMPLETE), len(pending)):
            if self._render(pending[:k]) + self._render(pending[k:]) == text:
                return k
        return len(pending) - 1  # unreachable: the last byte is a one-byte U+FFFD unit

    def _emit(self, count: int, text: str | None = None) -> str:
        """Emits the first `count` pending ids (`text`: their rendering, when known)."""
        if count == 0:
            return ""
        ids = self._pending[:count]
        if text is None:
            text = self._render(ids)
        del self._pending[:count]
        if not self._started and any(not self._sp.is_control(i) for i in ids):
            self._started = True
        return text


class StopMatcher:
    """Cuts a stream of text deltas right before the first occurrence of any stop string.

    "First" means the smallest start index in the whole text; stops starting at the same
    index cut at the same place. So the emitted text always equals `text[:start]`, even when
    a shorter stop would end earlier (stops ["abcd", "bc"] on "abcd" give ""). Text that might
    still begin a stop is held back until it is known not to. Each push costs
    O(number of stops * (longest stop + len(new text))), however long the output is.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._prefixes = frozenset(s[:k] for s in self.stops for k in range(1, len(s)))
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been seen; further pushes then return ""."""
        return self._stopped

    def push(self, text: str) -> str:
        """Adds the next delta; returns the text that is now safe to emit."""
        if self._stopped:
            return ""
        buf = self._held + text
        # Every held position is still a possible stop start, so buf never begins with text
        # that is known to be clear; only its last (longest stop - 1) positions can be undecided.
        match = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        undecided = next(
            (i for i in range(max(0, len(buf) - self._max_len + 1), len(buf))
             if buf[i:] in self._prefixes),
            len(buf),
        )
        if match >= 0 and match <= undecided:
            # No earlier position can still turn into a stop: the match is the first one.
            self._stopped = True
            self._held = ""
            return buf[:match]
        self._held = buf[undecided:]
        return buf[:undecided]

    def flush(self) -> str:
        """At the end of the stream: the held text, which can no longer begin a stop."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

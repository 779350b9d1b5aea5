"""Streaming text output: token ids to final text deltas, and stop-sequence cutting.

`IncrementalDetokenizer` turns generated ids into text deltas whose concatenation is exactly
`tokenizer.decode(ids)`, without re-decoding the whole output on every token.
`StopMatcher` cuts a stream of text deltas right before the first occurrence of a stop string.

How SentencePiece decodes, and what the detokenizer relies on (checked against the real
tokenizer by tests/text/test_streaming.py):

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

import re
from array import array
from collections import deque
from itertools import islice
from typing import Sequence

from chatglm3.text.tokenizer import ChatGLMTokenizer

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


# Trie edges that are not a node's chain edge live in one dict keyed by
# (node << _CODE_BITS) | code point: every code point (at most 0x10FFFF) fits in 21 bits.
_CODE_BITS = 21


def _step(chain: array, branch: dict[int, int], forks: bytearray, fail: array, state: int,
          code: int) -> int:
    """The automaton's transition from `state` on code point `code` (inlined in push(), the hot loop)."""
    while True:
        if chain[state] == code:
            return state + 1
        if forks[state]:
            nxt = branch.get((state << _CODE_BITS) | code)
            if nxt is not None:
                return nxt
        if state == 0:
            return 0
        state = fail[state]


class StopMatcher:
    """Cuts a stream of text deltas right before the first occurrence of any stop string.

    "First" means the smallest start index in the whole text; stops starting at the same
    index cut at the same place. So the emitted text always equals `text[:start]`, even when
    a shorter stop would end earlier (stops ["abcd", "bc"] on "abcd" give ""). Text that might
    still begin a stop is held back until it is known not to, and is emitted as soon as it is.

    Algorithm: an Aho-Corasick automaton over the stops. Its states are the trie nodes (the
    prefixes of the stops); after each character the state is the longest suffix of the text
    that is still a prefix of some stop, found by following failure links (a node's longest
    proper suffix that is also a node). So the state's depth is exactly how much text must be
    held back, and `_out[state]`, the length of the longest stop that is a suffix of the state
    (precomputed along the failure links), gives the earliest-starting match ending there.
    A match can be committed once no earlier start is still live, i.e. once its start is at or
    before the start of the held text; until then the smallest pending start is remembered.

    Why: the previous version kept every prefix of every stop in a set, which is quadratic in
    the stop length (one 100,000-character stop took 6-14 s and 4.7 GB to construct), and it
    scanned every stop on every push. Here construction time and memory are O(total length of
    the stops), about 17 bytes per trie node, and each pushed character costs O(1) amortised:
    the depth grows by at most one per character and each failure step shrinks it, whatever
    the number or length of the stops and however long the output has been.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        # The trie is stored in flat arrays indexed by node (root 0). The nodes for the part
        # of a stop that no earlier stop shares are numbered consecutively, so most nodes have
        # a single child n + 1: `chain[n]` is the code point of that edge (-1 if none), and
        # only the few branching edges (at most one per stop) need the `branch` dict.
        # Arrays of C ints: 4 bytes a node, up to 2**31 nodes.
        chain = array("i", [-1])
        depth = array("i", [0])
        branch: dict[int, int] = {}
        branch_kids: dict[int, list[tuple[int, int]]] = {}
        ends: list[tuple[int, int]] = []
        for stop in self.stops:
            node, d, n = 0, 0, len(stop)
            while d < n:  # walk the part shared with earlier stops
                code = ord(stop[d])
                if chain[node] == code:
                    node += 1
                else:
                    nxt = branch.get((node << _CODE_BITS) | code)
                    if nxt is None:
                        break
                    node = nxt
                d += 1
            if d < n:
                new, code = len(chain), ord(stop[d])
                if node == new - 1 and chain[node] < 0:
                    chain[node] = code  # extends the newest leaf: the new node is its n + 1
                else:
                    branch[(node << _CODE_BITS) | code] = new
                    branch_kids.setdefault(node, []).append((code, new))
                chain.extend(map(ord, islice(stop, d + 1, None)))
                chain.append(-1)
                depth.extend(range(d + 1, n + 1))
                node = len(chain) - 1
            ends.append((node, n))

        size = len(chain)
        forks = bytearray(size)  # 1 where a node has edges in `branch`
        for node in branch_kids:
            forks[node] = 1
        fail = array("i", [0]) * size
        out = array("i", [0]) * size  # length of the longest stop ending at the node, or 0
        for node, n in ends:
            out[node] = n
        # Breadth first, so that the failure links of all shallower nodes are known. A node's
        # failure link is its parent's, followed by the node's edge (the step push() takes).
        level = [child for _, child in branch_kids.get(0, ())]
        if chain[0] >= 0:
            level.append(1)
        while level:
            parents, level = level, []
            append = level.append
            for node in parents:
                code = chain[node]
                if code >= 0:  # the chain child node + 1
                    state = fail[node + 1] = _step(chain, branch, forks, fail, fail[node], code)
                    if not out[node + 1]:
                        out[node + 1] = out[state]
                    append(node + 1)
                if forks[node]:
                    for code, child in branch_kids[node]:
                        state = _step(chain, branch, forks, fail, fail[node], code) if node else 0
                        fail[child] = state
                        if not out[child]:
                            out[child] = out[state]
                        append(child)

        self._chain, self._branch, self._forks, self._fail, self._depth, self._out = (
            chain, branch, forks, fail, depth, out)
        # From the root, only a stop's first character leaves it: skip to the next one in C.
        firsts = sorted({stop[0] for stop in self.stops})
        self._skip_to_first = (
            re.compile("[" + "".join(map(re.escape, firsts)) + "]").search if firsts else None)
        # Stream state. Positions are absolute indices into the text pushed since the last flush.
        self._state = 0
        self._pos = 0  # characters pushed
        self._emitted = 0  # characters returned; [_emitted, _pos) is held back
        self._best = -1  # smallest start of a stop already seen but not yet committed, or -1
        # The held text: these chunks, the first from index _head on.
        self._chunks: deque[str] = deque()
        self._head = 0
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been seen; further pushes then return ""."""
        return self._stopped

    def push(self, text: str) -> str:
        """Adds the next delta; returns the text that is now safe to emit."""
        if self._stopped or not text:
            return ""
        skip_to_first = self._skip_to_first
        if skip_to_first is None:
            return text  # no stops
        chain, branch, forks, fail, depth, out = (
            self._chain, self._branch, self._forks, self._fail, self._depth, self._out)
        state, best, base = self._state, self._best, self._pos
        self._chunks.append(text)
        i, n = 0, len(text)
        while i < n:
            if state == 0:
                found = skip_to_first(text, i)
                if found is None:
                    break
                i = found.start()
            code = ord(text[i])
            while True:
                if chain[state] == code:
                    state += 1
                    break
                if forks[state]:
                    nxt = branch.get((state << _CODE_BITS) | code)
                    if nxt is not None:
                        state = nxt
                        break
                if state == 0:
                    break
                state = fail[state]
            i += 1
            length = out[state]
            if length and (best < 0 or base + i - length < best):
                best = base + i - length
            # The held text starts at base + i - depth[state]; no stop can start earlier.
            if best >= 0 and best <= base + i - depth[state]:
                self._stopped = True
                return self._finish(best)
        self._state, self._best, self._pos = state, best, base + n
        return self._take(base + n - depth[state])

    def flush(self) -> str:
        """At the end of the stream: the held text up to a stop seen in it, else all of it.

        A stop may already have been seen while an earlier-starting one could still complete;
        at the end that one cannot, so the stream stops there (and `stopped` turns True).
        """
        if self._stopped:
            return ""
        if self._best >= 0:
            self._stopped = True
            return self._finish(self._best)
        return self._finish(self._pos)

    def _finish(self, end: int) -> str:
        """Emits the held text up to absolute position `end` and starts afresh from there."""
        text = self._take(end)
        self._chunks.clear()
        self._state, self._best, self._head = 0, -1, 0
        self._pos = self._emitted = end
        return text

    def _take(self, end: int) -> str:
        """Emits the held text up to absolute position `end`: O(its length) amortised."""
        count = end - self._emitted
        if count <= 0:
            return ""
        self._emitted = end
        chunks, head = self._chunks, self._head
        pieces = []
        while count:
            chunk = chunks[0]
            left = len(chunk) - head
            if left > count:
                pieces.append(chunk[head:head + count])
                head += count
                break
            pieces.append(chunk[head:] if head else chunk)
            chunks.popleft()
            count -= left
            head = 0
        if head and 2 * head > len(chunks[0]):
            # Mostly emitted: keep only the held tail, so memory stays O(held text). The copy
            # is shorter than what was emitted from this chunk since its last copy.
            chunks[0] = chunks[0][head:]
            head = 0
        self._head = head
        return pieces[0] if len(pieces) == 1 else "".join(pieces)

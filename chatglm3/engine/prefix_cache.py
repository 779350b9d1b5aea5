"""The prefix cache's bookkeeping: which spare KV cache rows hold which token ids.

ChatGLM3-6B-32K is used for long documents and long chats, and every prediction sends the whole
conversation again: turn n+1's input starts with turn n's prompt and answer, and requests about
one document share it. Recomputing that prefix is most of a turn's time to first token (seconds
for 20k tokens), so the engine keeps the keys and values of finished requests and reuses them.

Design (this module keeps the host-side records; rows.RowAllocator is its only caller and
decides every row move, the model runner does the tensor work):
- An entry is a KV cache row (kv_rows.KVRows) that no running request holds, with the token ids
  whose keys/values it holds at positions [0, len(ids)): a finished (or cancelled) request's
  prompt and answer, as far as they went through the model (the last sampled token has no
  keys/values yet, unless it was a stop token, which never enters the ids). The ids live on the
  host, as int32 arrays.
- Rows 0..B-1 are the B running requests' (decoding reads them side by side); entries live in
  rows B and above. A finished request's row becomes an entry where it is (the last running
  row, after a swap with the finished one: the rows stay contiguous).
- A new request looks for the entry sharing the longest prefix with its ids (one vectorised
  numpy comparison per entry, not a loop per token) and copies that prefix of the row into its
  own prefill cache; the chunked prefill then runs from there. The copy is cheap next to the
  forward passes it saves (bytes moved once against the weights read for every chunk), and it
  leaves the entry where it was, for the next request that shares the prefix: requests about
  one document each start from it. So no running request ever uses an entry's row, and an
  entry can be evicted at any time without harm to anyone.
- The reused length is rounded down to a multiple of ALIGN and stops one short of the input
  (the last input token's logits give the first output token, so at least one position runs).
- Eviction, least recently used first (a match counts as a use), happens only when a row is
  needed: a request that gets a row (running requests always win over entries), or an entry
  being stored. An entry whose ids are a prefix of a newer entry's is dropped at once: the new
  one offers everything it did (turn n's entry once turn n+1 has finished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Reused lengths are multiples of this (at most ALIGN - 1 positions recomputed). It bounds the
# prefill's attention shapes: a prefill from position L runs chunks at L, L + PREFILL_CHUNK, ...,
# so the key lengths are L + k x PREFILL_CHUNK + a bucket (multiples of 8: at most 15 x 2,048
# query/key pairs in a 32k context; the linear layers see the same 15 chunk lengths as without
# the cache; engine.PREFILL_BUCKETS says why that matters and what was measured). It also makes
# the few ids every chat prompt shares ([gMASK] sop <|user|> ...) a miss.
ALIGN = 16


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def as_ids(ids: Sequence[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


@dataclass
class Entry:
    """One cached row: `ids` are what its positions [0, len(ids)) hold."""

    ids: np.ndarray
    used: int  # the LRU clock at its last use


class PrefixCache:
    """Entries by row; the engine's worker thread alone calls it."""

    def __init__(self) -> None:
        self._entries: dict[int, Entry] = {}
        self._clock = 0

    def __contains__(self, row: int) -> bool:
        return row in self._entries

    def __len__(self) -> int:  # Engine.stats(), from any thread: one atomic read
        return len(self._entries)

    def length(self, row: int) -> int:
        return len(self._entries[row].ids)

    def lru_rows(self) -> list[int]:
        """Rows from least to most recently used."""
        return sorted(self._entries, key=lambda row: self._entries[row].used)

    def match(self, ids: np.ndarray) -> tuple[int, int]:
        """(row, n): the entry sharing the longest prefix with `ids`, n ids long; (-1, 0) when
        none shares any. Ties go to the most recently used."""
        best_row, best = -1, 0
        for row in sorted(self._entries, key=lambda r: -self._entries[r].used):
            entry = self._entries[row]
            if len(entry.ids) <= best:
                continue  # cannot beat the best so far
            n = common_prefix(entry.ids, ids)
            if n > best:
                best_row, best = row, n
        return best_row, best

    def touch(self, row: int) -> None:
        self._clock += 1
        self._entries[row].used = self._clock

    def insert(self, row: int, ids: np.ndarray) -> list[int]:
        """Records that `row` holds `ids`; returns the rows freed. An entry whose ids are a
        prefix of `ids` is dropped (its row freed); if `ids` are a prefix of an entry's, that
        one is used instead and `row` itself comes back as free."""
        freed = []
        for other, entry in list(self._entries.items()):
            n = common_prefix(entry.ids, ids)
            if n == len(ids):  # what row holds is already cached (same ids or longer)
                self.touch(other)
                return freed + [row]
            if n == len(entry.ids):
                del self._entries[other]
                freed.append(other)
        self._clock += 1
        self._entries[row] = Entry(ids, self._clock)
        return freed

    def pop(self, row: int) -> None:
        del self._entries[row]

    def move(self, src: int, dst: int) -> None:
        """The entry of row src now lives in row dst (its keys/values were copied there)."""
        self._entries[dst] = self._entries.pop(src)

    def clear(self) -> None:
        self._entries.clear()

"""The one owner of KV cache rows: which row each running request decodes in, which rows hold
prefix cache entries, which are spare, and every move between them. Host only (no torch): it
decides, and returns the row copies (`Move`s) the model runner then applies to the tensors, in
order, before the next step runs.

Invariants (`check()` asserts them; tests/engine/test_rows.py drives random sequences through it):
1. Rows 0..len(running)-1 are the running requests' and only theirs: `running[i]` decodes in
   row i (a decoding step reads rows [0, batch) side by side).
2. Every prefix entry lives in a row in [len(running), limit); no row holds two entries.
3. `limit` rows are the allocator's; the scratch row (`scratch`, the row just past them, or
   None with the prefix cache off) is nobody's: padding rows of a fixed-shape step write there,
   so no entry's positions are ever overwritten by padding.
4. An entry holds at least prefix_cache.ALIGN positions and at most `capacity`.
5. Contents change rows only through the `Move`s returned here; nothing else moves a row.

Entries never make a request wait: admitting a request into row len(running) moves an entry
there to a spare row (or evicts the least recently used entry to make one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from .prefix_cache import ALIGN, PrefixCache, as_ids


class RowHolder(Protocol):
    """What the allocator reads of a running request."""

    length: int  # ids so far (prompt + output): positions its row will hold after the step
    kv_len: int  # positions whose keys/values are written

    def ids(self) -> list[int]: ...


@dataclass(frozen=True)
class Move:
    """Copy row `src`'s first `length` positions to row `dst` (swap: exchange them with
    `dst`'s first `dst_length`). `history`: positions of the id history to copy too (a
    running request's row; 0 for an entry, whose ids live here, on the host)."""

    src: int
    dst: int
    length: int
    swap: bool = False
    dst_length: int = 0
    history: int = 0


_PAST_LIMIT = object()  # RowAllocator's default scratch row


class RowAllocator:
    """Rows of one KV cache. `limit`: rows it may hand out (a planned cache's rows less the
    scratch row; max_batch of a growing one); `existing`: how many rows the tensors have now
    (a growing cache has fewer than `limit` at first; rows past it are created by the runner
    when a Move or a store names them). `scratch`: where fixed-shape steps' padding rows write
    (None: they need none); by default the row past `limit` when entries are kept."""

    def __init__(self, limit: int, capacity: Callable[[], int], existing: Callable[[], int],
                 prefix_cache: bool, scratch: int | None | object = _PAST_LIMIT) -> None:
        self.limit = limit
        self.running: list[RowHolder] = []
        self.prefix = PrefixCache() if prefix_cache else None
        self._capacity, self._existing = capacity, existing
        self.scratch: int | None = ((limit if prefix_cache else None) if scratch is _PAST_LIMIT
                                    else scratch)  # type: ignore[assignment]

    # ---- running rows ----

    def admit(self, r: RowHolder) -> tuple[int, list[Move]]:
        """r's row (the next one) and the moves that clear it first."""
        row = len(self.running)
        assert row < self.limit, "admission past the rows there are"
        moves = self._vacate(row)
        self.running.append(r)
        return row, moves

    def release(self, i: int) -> list[Move]:
        """Takes row i's request out; the last running row moves into its place (rows stay
        contiguous). With the prefix cache the two rows swap, and the gone request's
        keys/values stay in the last row as an entry."""
        gone, last = self.running[i], self.running[-1]
        src = len(self.running) - 1
        keep = gone.kv_len if self.prefix is not None and gone.kv_len >= ALIGN else 0
        moves = []
        if last is not gone:
            moves.append(Move(src, i, last.length - 1, swap=bool(keep), dst_length=keep,
                              history=last.length))
            self.running[i] = last
        self.running.pop()
        if keep:
            self._insert(src, gone.ids(), keep)
        return moves

    def unadmit(self, r: RowHolder) -> None:
        """Takes back r's admission, which failed before its row was filled (so r was the
        last one admitted): no row moves, nothing kept."""
        assert self.running and self.running[-1] is r, "only the last admission goes back"
        self.running.pop()

    def clear_running(self) -> None:
        self.running.clear()

    def holds_entries(self) -> bool:
        """Whether any row keeps a prefix cache entry."""
        return self.prefix is not None and len(self.prefix) > 0

    # ---- prefix entries ----

    def lookup(self, prompt: Sequence[int]) -> tuple[int, int]:
        """(row, n): the entry to copy the first n positions of into a new prefill (n a
        multiple of ALIGN, one short of the prompt at most: its last token must run);
        (-1, 0) when none helps. Counts as a use of the entry."""
        if self.prefix is None:
            return -1, 0
        row, n = self.prefix.match(as_ids(prompt))
        n = min(n, len(prompt) - 1) // ALIGN * ALIGN
        if n <= 0:
            return -1, 0
        self.prefix.touch(row)
        return row, n

    def keep_prefill(self, ids: Sequence[int], n: int) -> int | None:
        """A row to store a prefill cache of n positions in as an entry (a request that
        finished or was cancelled before it got a row), or None to drop it."""
        if self.prefix is None or n < ALIGN:
            return None
        row = self._spare_row(len(self.running))
        if row is not None:
            self._insert(row, ids, n)
        return row

    def entries(self) -> list[tuple[int, int]]:
        """(row, positions held), least recently used first."""
        if self.prefix is None:
            return []
        return [(row, self.prefix.length(row)) for row in self.prefix.lru_rows()]

    def drop_entries(self) -> None:
        if self.prefix is not None:
            self.prefix.clear()

    def _insert(self, row: int, ids: Sequence[int], n: int) -> None:
        # n <= capacity: a planned row holds any request's prompt + max_tokens (admission
        # checks), and a growing cache reserves the row before storing into it.
        if n >= ALIGN:
            self.prefix.insert(row, as_ids(ids[:n]))

    def _spare_row(self, first: int, evict: bool = True) -> int | None:
        """A row at or past `first` holding nothing (an existing one, else one more row of a
        growing cache), else, if `evict`, the least recently used entry's row, its entry
        dropped; else None."""
        existing = min(self._existing(), self.limit)
        for row in range(first, existing):
            if row not in self.prefix:
                return row
        row = max(first, existing)
        if row < self.limit:
            return row
        oldest = [row for row in self.prefix.lru_rows() if row >= first]
        if not evict or not oldest:
            return None
        self.prefix.pop(oldest[0])
        return oldest[0]

    def _vacate(self, row: int) -> list[Move]:
        """Clears `row`: an entry in it moves to a spare row, or, with none spare, to the
        least recently used entry's (evicted), unless it is the least recently used one
        itself, which is then dropped."""
        if self.prefix is None or row not in self.prefix:
            return []
        dst = self._spare_row(row + 1, evict=False)
        if dst is None:
            if self.prefix.lru_rows()[0] == row:
                self.prefix.pop(row)
                return []
            dst = self._spare_row(row + 1)
        n = self.prefix.length(row)
        self.prefix.move(row, dst)
        return [Move(row, dst, n)]

    def check(self) -> None:
        """Asserts the invariants at the top of this module."""
        batch = len(self.running)
        assert batch <= self.limit
        assert len({id(r) for r in self.running}) == batch
        for row, n in self.entries():
            assert batch <= row < self.limit, f"entry in row {row}, running {batch}"
            assert ALIGN <= n <= self._capacity()
        assert self.scratch is None or self.scratch >= self.limit

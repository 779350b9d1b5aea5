"""The row allocator alone (no model, no torch): random admissions, releases and stored
prefills, with the row contents simulated from the Moves it returns; after every operation
its invariants hold and every row holds what the allocator says it holds."""

from __future__ import annotations

import random

import pytest

from chatglm3.engine.prefix_cache import ALIGN
from chatglm3.engine.rows import Move, RowAllocator


class Req:
    def __init__(self, ids: list[int]) -> None:
        self._ids = ids
        self.length = len(ids)
        self.kv_len = len(ids) - 1  # its last id is the one the next step feeds in

    def ids(self) -> list[int]:
        return self._ids


class Tensors:
    """What the model runner does with Moves, on lists: row -> the ids its positions hold."""

    def __init__(self, capacity: int) -> None:
        self.rows: dict[int, list[int]] = {}
        self.capacity = capacity

    def apply(self, moves: list[Move]) -> None:
        for m in moves:
            src = self.rows.get(m.src, [])[: m.length]
            if m.swap:
                self.rows[m.src] = self.rows.get(m.dst, [])[: m.dst_length]
            self.rows[m.dst] = src


@pytest.mark.parametrize("growable", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_random_sequences_keep_the_invariants(seed: int, growable: bool) -> None:
    rng = random.Random(seed)
    t = Tensors(capacity=400)
    existing = [2 if growable else 6]
    rows = RowAllocator(6, lambda: t.capacity, lambda: existing[0], prefix_cache=True)
    docs = [[rng.randrange(1000) for _ in range(rng.randrange(20, 300))] for _ in range(4)]
    for _ in range(60):
        op = rng.random()
        if op < 0.4 and len(rows.running) < rows.limit:
            ids = rng.choice(docs)[: rng.randrange(ALIGN + 2, 300)] + [rng.randrange(1000)]
            reuse_row, n = rows.lookup(ids)
            if n:
                assert t.rows[reuse_row][:n] == ids[:n]  # the entry holds what it claims
                assert n % ALIGN == 0 and n < len(ids)
            r = Req(ids)
            row, moves = rows.admit(r)
            t.apply(moves)
            existing[0] = max(existing[0], row + 1, *[m.dst + 1 for m in moves])
            t.rows[row] = ids[: r.kv_len]
        elif op < 0.8 and rows.running:
            t.apply(rows.release(rng.randrange(len(rows.running))))
        else:
            ids = rng.choice(docs)[: rng.randrange(1, 300)]
            row = rows.keep_prefill(ids, len(ids))
            if row is not None:
                existing[0] = max(existing[0], row + 1)
                t.rows[row] = list(ids)
        rows.check()
        for i, r in enumerate(rows.running):  # invariant 1, and the contents followed
            assert t.rows[i][: r.kv_len] == r.ids()[: r.kv_len]
        for row, n in rows.entries():
            assert row not in range(len(rows.running))
            assert len(t.rows[row]) >= n
            assert rows.prefix._entries[row].ids.tolist() == t.rows[row][:n]


def test_entries_never_make_a_request_wait() -> None:
    """Every row holds an entry: admitting moves or evicts them, least recently used first."""
    t = Tensors(capacity=400)
    rows = RowAllocator(3, lambda: t.capacity, lambda: 3, prefix_cache=True)
    for i in range(3):
        ids = [i] * 40
        assert rows.keep_prefill(ids, 40) == i
        t.rows[i] = ids
    assert rows.lookup([1] * 40 + [5])[1] == 32  # entry 1 is now the most recently used
    row, moves = rows.admit(Req([9] * 20))
    t.apply(moves)
    assert row == 0 and [r for r, _ in rows.entries()] == [2, 1]  # 0's entry (oldest) dropped
    row, moves = rows.admit(Req([8] * 20))
    t.apply(moves)
    assert row == 1 and moves == [Move(1, 2, 40)]  # 1 (recent) moves over 2 (evicted)
    assert rows.entries() == [(2, 40)] and t.rows[2] == [1] * 40
    rows.check()


def test_release_keeps_the_row_as_an_entry_and_swaps() -> None:
    t = Tensors(capacity=400)
    rows = RowAllocator(4, lambda: t.capacity, lambda: 4, prefix_cache=True)
    a, b = Req(list(range(50))), Req(list(range(100, 130)))
    for r in (a, b):
        row, _ = rows.admit(r)
        t.rows[row] = r.ids()[: r.kv_len]
    moves = rows.release(0)
    assert moves == [Move(1, 0, b.length - 1, swap=True, dst_length=a.kv_len,
                          history=b.length)]
    t.apply(moves)
    assert rows.running == [b] and rows.entries() == [(1, a.kv_len)]
    assert t.rows[1] == a.ids()[: a.kv_len] and t.rows[0] == b.ids()[: b.kv_len]


def test_scratch_row_is_nobodys() -> None:
    rows = RowAllocator(4, lambda: 400, lambda: 5, prefix_cache=True)
    assert rows.scratch == 4
    for i in range(10):
        row = rows.keep_prefill([i] * 40, 40)
        assert row is not None and row < 4
    assert RowAllocator(4, lambda: 400, lambda: 4, prefix_cache=False).scratch is None

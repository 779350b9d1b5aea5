"""A key/value cache with one row per running request, each row at its own length, and the
planner that sizes it once from the memory there is.

Decoding several requests in one forward pass needs their caches side by side although their
prompts differ in length: row i holds request i's keys and values in positions [0, length_i).

The `Cache` contract this relies on (checked in transformers 5.24's glm modeling code and
masking utils; tests/model/test_kv_rows.py checks it on the model): KVRows is no `Cache` subclass,
it is duck-typed, and a decoding forward pass touches nothing of it but `update()`:
- `GlmAttention.forward` calls `cache.update(key_states, value_states, self.layer_idx,
  kwargs=kwargs)` and attends over what it returns, nothing else.
- `GlmModel.forward` calls `cache.get_seq_length()` only when no `position_ids` are given
  (the engine always gives them) and makes a `DynamicCache` only when `cache` is None.
- `create_causal_mask`: `find_first_full_attention_index` answers 0 for an object that is no
  `Cache` (an isinstance test, no attribute read), and `_preprocess_mask_arguments` returns a
  4-D mask unchanged, before it reads anything of the cache (its "early exit").
- `sdpa_attention_forward`, one query token with a mask: `pack_gqa` folds the query heads onto
  the 2 key/value heads (no `repeat_kv` copy of the cache); a [batch, 1, 1, keys] mask passes
  unchanged.
So the [batch, 1, 1, read_len] boolean mask made by `prepare_step` is what attention uses, and
the key length is whatever `update()` returns: that is how a step reads only `read_len`
positions of a larger buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

# Capacities below the context are multiples of this many positions (and the fixed-shape
# decoder's smallest read length is as large: see decode_graphs.MIN_READ).
GRANULARITY = 256
# Share of the GPU's total memory the plan may fill (weights + activation peak + KV cache);
# the rest is never planned: CUDA context, cuBLAS workspaces, graph pools, sampling's
# temporaries, fragmentation. vLLM's gpu_memory_utilization defaults to the same 0.9.
MEMORY_UTILIZATION = 0.9


class KVRows:
    """Per-layer [rows, kv_heads, capacity, head_dim] buffers.

    growable (the CPU default): capacity doubles and rows are added as requests need them,
    reallocating every buffer. Planned (growable=False): allocated once at the planned size and
    never reallocated, so their addresses (which CUDA graphs hold) never change; asking for
    more is a bug in admission and raises.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, rows: int = 1, capacity: int = GRANULARITY,
                 growable: bool = True) -> None:
        self.shape = (kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.growable = growable
        self._initial = (rows, capacity)
        self.keys = [self._empty(rows, capacity) for _ in range(layers)]
        self.values = [self._empty(rows, capacity) for _ in range(layers)]
        self._write_at: torch.Tensor | None = None  # [batch] positions the next update writes
        self._write_rows: torch.Tensor | None = None  # [batch] rows it writes (None: 0..batch-1)
        self._read_len = 0
        # The row padding rows of a fixed-shape step write to (decode_graphs), set when rows
        # past the running ones hold prefix cache entries (rows.RowAllocator owns the choice).
        self.scratch_row: int | None = None
        self.version = 0  # bumped whenever the buffers are reallocated (their addresses change)

    def _empty(self, rows: int, capacity: int) -> torch.Tensor:
        # Zeros, not empty: masked positions still enter attention's weighted sum (with
        # weight 0), and 0 x NaN from uninitialised memory would be NaN.
        return torch.zeros(rows, self.shape[0], capacity, self.shape[1], device=self.device,
                           dtype=self.dtype)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one row takes, keys and values of all layers."""
        return kv_bytes_per_token(len(self.keys), *self.shape, self.keys[0].element_size())

    def reserve(self, rows: int, length: int) -> None:
        """Makes room for `rows` rows of `length` positions (growth by doubling: amortised O(1))."""
        if rows <= self.rows and length <= self.capacity:
            return
        if not self.growable:
            raise RuntimeError(f"KV cache: {rows} rows of {length} positions asked for, but it "
                               f"was planned once at {self.rows} rows of {self.capacity} "
                               "(admission should have made the request wait or refused it)")
        new_rows = max(rows, self.rows)
        new_cap = self.capacity
        while new_cap < length:
            new_cap *= 2
        # Every new buffer first, then the copies: an out-of-memory error halfway leaves the
        # old buffers as they were, all of the same shape.
        new_keys = [self._empty(new_rows, new_cap) for _ in self.keys]
        new_values = [self._empty(new_rows, new_cap) for _ in self.values]
        for new, old in zip(new_keys + new_values, self.keys + self.values):
            new[: old.shape[0], :, : old.shape[2]] = old
        self.keys, self.values = new_keys, new_values
        self.version += 1

    def reset(self) -> bool:
        """A growable cache back to its first, small size (frees what requests grew it to);
        call only with no row in use. A planned cache stays as it is. Returns whether it
        shrank."""
        if self.growable and (self.rows, self.capacity) != self._initial:
            self.keys = [self._empty(*self._initial) for _ in self.keys]
            self.values = [self._empty(*self._initial) for _ in self.values]
            self.version += 1
            return True
        return False

    def store_prefill(self, row: int, cache: DynamicCache) -> None:
        """Copies a single request's prefilled cache into `row`."""
        for layer, (k, v) in enumerate(zip(*_cache_tensors(cache))):
            n = k.shape[2]
            self.keys[layer][row, :, :n] = k[0]
            self.values[layer][row, :, :n] = v[0]

    def move_row(self, src: int, dst: int, length: int) -> None:
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[dst, :, :length] = buf[src, :, :length]

    def swap_rows(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchanges the first length_a positions of row a with the first length_b of row b,
        one layer's slice at a time (the temporary copy is that small)."""
        for buffers in (self.keys, self.values):
            for buf in buffers:
                held = buf[a, :, :length_a].clone()
                buf[a, :, :length_b] = buf[b, :, :length_b]
                buf[b, :, :length_a] = held

    def load_prefix(self, row: int, length: int, cache: DynamicCache) -> None:
        """Appends positions [0, length) of `row` to an empty single-request cache (a copy:
        DynamicCache.update concatenates)."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k[row : row + 1, :, :length], v[row : row + 1, :, :length], layer)

    def prepare_step(self, positions: torch.Tensor, read_len: int | None = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """Sets where the next forward pass writes (one token per row at `positions`, in
        `rows`: by default row i for batch row i) and returns the boolean attention mask
        [batch, 1, 1, read_len] it must use. The fixed-shape decoder's padding rows pass
        `scratch_row` there, so their writes never touch a row someone holds.

        `read_len`: how many positions attention reads; by default up to the furthest row
        (which costs a device sync: pass it when the caller knows it).
        """
        self._write_at = positions
        self._write_rows = rows
        self._read_len = int(positions.max()) + 1 if read_len is None else read_len
        span = torch.arange(self._read_len, device=self.device)
        return (span[None, :] <= positions[:, None])[:, None, None, :]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one method attention calls: writes this step's key/value of each row and
        returns the first `read_len` positions of the batch's rows (a view: fixed address)."""
        batch = key.shape[0]
        rows = (torch.arange(batch, device=self.device) if self._write_rows is None
                else self._write_rows)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf[rows, :, self._write_at] = key[:, :, 0]
        v_buf[rows, :, self._write_at] = value[:, :, 0]
        return k_buf[:batch, :, : self._read_len], v_buf[:batch, :, : self._read_len]


def _cache_tensors(cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


# ---- planning the cache once ----

class KVBudgetError(ValueError):
    """The memory there is cannot hold even one row of the cache; the message has the numbers."""


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Cache bytes per position of one row: keys and values (2) of every layer. ChatGLM3-6B in
    fp16: 2 x 28 x 2 x 128 x 2 = 28,672 B, so 0.875 GiB for a 32,768-position row."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class KVPlan:
    """The cache's size, decided once: `rows` requests at a time, each up to `capacity`
    positions (prompt + output)."""

    rows: int
    capacity: int
    bytes_per_token: int
    budget_bytes: int  # what the rows were allowed to take
    source: str = ""  # how that budget was found, for the log

    @property
    def bytes(self) -> int:
        return self.rows * self.capacity * self.bytes_per_token

    def __str__(self) -> str:
        return (f"{self.rows} rows x {self.capacity:,} positions = {_gib(self.bytes)} of KV "
                f"cache ({self.bytes_per_token:,} B per position; budget "
                f"{_gib(self.budget_bytes)}{': ' + self.source if self.source else ''})")


def kv_budget_from_memory(*, total_bytes: int, free_bytes: int, weight_bytes: int,
                          activation_bytes: int,
                          utilization: float = MEMORY_UTILIZATION) -> int:
    """Bytes the KV cache may take on a GPU: the smaller of
    - free memory (read with the weights loaded) less the activation peak and a margin of
      (1 - utilization) x total, and
    - utilization x total less the weights and the activation peak (the vLLM-style cap; it
      also holds when other processes hand memory back later).
    `activation_bytes`: the peak a prefill chunk adds, measured (its own prompt cache
    included). May be negative: then nothing fits."""
    margin = (1 - utilization) * total_bytes
    return int(min(free_bytes - activation_bytes - margin,
                   utilization * total_bytes - weight_bytes - activation_bytes))


def plan_rows(budget_bytes: int, bytes_per_token: int, max_batch: int, context: int,
              granularity: int = GRANULARITY) -> tuple[int, int]:
    """(rows, capacity) for a cache of at most `budget_bytes`.

    Rows that hold a whole context come first: then every request the model accepts can run,
    and a smaller budget means fewer requests at a time (up to `max_batch`), never a refused
    one. Below one whole-context row: one row of as many positions as fit (a multiple of
    `granularity`); longer requests are then refused at once, naming both numbers."""
    row_bytes = context * bytes_per_token
    if budget_bytes >= row_bytes:
        return min(max_batch, budget_bytes // row_bytes), context
    capacity = max(budget_bytes, 0) // bytes_per_token // granularity * granularity
    if capacity < min(granularity, context):
        raise KVBudgetError(
            f"KV cache budget of {budget_bytes:,} bytes ({_gib(budget_bytes)}) "
            f"holds less than one row of {granularity} positions "
            f"({granularity * bytes_per_token:,} bytes at {bytes_per_token:,} per position); a "
            f"whole {context:,}-token context needs {row_bytes:,} bytes ({_gib(row_bytes)}) "
            "per concurrent request")
    return 1, capacity


def plan_kv(*, total_bytes: int, free_bytes: int, weight_bytes: int, bytes_per_token: int,
            activation_bytes: int, max_batch: int, context: int,
            utilization: float = MEMORY_UTILIZATION) -> KVPlan:
    """The GPU plan: `kv_budget_from_memory`, then `plan_rows`. Pure arithmetic (tests call it
    with given numbers). KVBudgetError when not one row fits."""
    budget = kv_budget_from_memory(total_bytes=total_bytes, free_bytes=free_bytes,
                                   weight_bytes=weight_bytes, activation_bytes=activation_bytes,
                                   utilization=utilization)
    source = (f"{utilization:.0%} of {_gib(total_bytes)} total, {_gib(free_bytes)} free after "
              f"{_gib(weight_bytes)} of weights, prefill peak {_gib(activation_bytes)}")
    try:
        rows, capacity = plan_rows(budget, bytes_per_token, max_batch, context)
    except KVBudgetError as e:
        raise KVBudgetError(f"not enough GPU memory for the KV cache: {e} ({source})") from None
    return KVPlan(rows, capacity, bytes_per_token, budget, source)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"

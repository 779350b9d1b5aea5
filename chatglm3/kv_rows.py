"""A key/value cache with one row per running request, each row at its own length.

Decoding several requests in one forward pass needs their caches side by side although their
prompts differ in length: row i holds request i's keys and values in positions [0, length_i).
The model sees it through `update()`, the one method transformers' attention calls.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVRows:
    """Per-layer [rows, kv_heads, capacity, head_dim] buffers; capacity doubles as rows grow."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, rows: int = 1, capacity: int = 256) -> None:
        self.shape = (kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.keys = [self._empty(rows, capacity) for _ in range(layers)]
        self.values = [self._empty(rows, capacity) for _ in range(layers)]
        self._write_at: torch.Tensor | None = None  # [batch] positions the next update writes
        self._read_len = 0
        self.version = 0  # bumped whenever the buffers are reallocated (their addresses change)

    def _empty(self, rows: int, capacity: int) -> torch.Tensor:
        return torch.zeros(rows, self.shape[0], capacity, self.shape[1], device=self.device,
                           dtype=self.dtype)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, rows: int, length: int) -> None:
        """Makes room for `rows` rows of `length` positions (growth by doubling: amortised O(1))."""
        if rows <= self.rows and length <= self.capacity:
            return
        new_rows = max(rows, self.rows)
        new_cap = self.capacity
        while new_cap < length:
            new_cap *= 2
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = self._empty(new_rows, new_cap)
                new[: old.shape[0], :, : old.shape[2]] = old
                buffers[i] = new
        self.version += 1

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

    def prepare_step(self, positions: torch.Tensor, read_len: int | None = None) -> torch.Tensor:
        """Sets where the next forward pass writes (one token per row at `positions`) and
        returns the boolean attention mask [batch, 1, 1, read_len] it must use.

        `read_len`: how many positions attention reads; by default up to the furthest row
        (which costs a device sync: pass it when the caller knows it).
        """
        self._write_at = positions
        self._read_len = int(positions.max()) + 1 if read_len is None else read_len
        span = torch.arange(self._read_len, device=self.device)
        return (span[None, :] <= positions[:, None])[:, None, None, :]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = key.shape[0]
        rows = torch.arange(batch, device=self.device)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf[rows, :, self._write_at] = key[:, :, 0]
        v_buf[rows, :, self._write_at] = value[:, :, 0]
        return k_buf[:batch, :, : self._read_len], v_buf[:batch, :, : self._read_len]


def _cache_tensors(cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def decode_logits(model: torch.nn.Module, kv: KVRows, tokens: torch.Tensor,
                  positions: torch.Tensor, read_len: int) -> torch.Tensor:
    """One decoding step over the first rows of `kv`: `tokens` [batch, 1] at `positions`
    [batch], attention reading `read_len` positions; returns the logits [batch, vocab]."""
    mask = kv.prepare_step(positions, read_len=read_len)
    out = model(input_ids=tokens, position_ids=positions[:, None], attention_mask=mask,
                cache=kv, logits_to_keep=1)
    return out.logits[:, -1]

"""One forward pass over several requests at once: prompt chunks of different requests (each
with its own prefill cache) and the running requests' decoding tokens, packed one after the
other into a single sequence. Every layer's linear work (all but attention) then reads the
weights once for all of them; attention stays per request.

Why: on a CPU a forward pass reads all 12.5 GB of weights, so a decoding step beside a
prefill chunk cost a second pass (0.45 s at 28 layers here), and requests that arrived
together prefilled one pass each, with a decoding pass between them (docs/benchmarks.md,
"Packed steps"). vLLM's scheduler packs the same way (its token budget counts both).

`PackedStep` is the cache the model is called with (its `update` is the one method
attention calls, as with kv_rows.KVRows) and the `packed` keyword that attention.attention
hands over to `attend`. CPU only (model_runner.ModelRunner.packs): a GPU replays decoding
steps as CUDA graphs, which a packed pass cannot be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .kv_rows import KVRows


@dataclass
class Segment:
    """A prompt chunk's place in the packed sequence: positions [start, start + length) of it
    (the last segment's length includes the padding after its real tokens)."""

    cache: DynamicCache
    start: int
    length: int


class PackedStep:
    """The prompt `segments` first, then (when `kv` is given) one decoding token of each of
    `kv`'s first `batch` rows: prepare the rows with `kv.prepare_step` and pass its mask as
    `decode_mask`."""

    def __init__(self, segments: list[Segment], kv: KVRows | None = None, batch: int = 0,
                 decode_mask: torch.Tensor | None = None) -> None:
        self.segments, self.kv, self.batch, self.decode_mask = segments, kv, batch, decode_mask
        self._keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # this layer's, per segment
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends each segment's keys/values [1, kv_heads, n, d] to its own cache and writes
        the decoding tokens' into their rows; `attend` reads what they return."""
        self._keys = [s.cache.update(key[:, :, s.start : s.start + s.length],
                                     value[:, :, s.start : s.start + s.length], layer_idx)
                      for s in self.segments]
        if self.batch:
            tail = slice(key.shape[2] - self.batch, None)
            # [1, kv_heads, batch, d] -> [batch, kv_heads, 1, d]: a token per row
            self._rows = self.kv.update(key[:, :, tail].transpose(0, 2),
                                        value[:, :, tail].transpose(0, 2), layer_idx)
        return key, value

    def attend(self, module: torch.nn.Module, query: torch.Tensor, scaling: float | None,
               attention) -> torch.Tensor:
        """query [1, heads, total, d] -> [1, total, heads, d]: each segment against its own
        cache, each decoding row against its row, through `attention` (attention.attention)."""
        parts = [attention(module, query[:, :, s.start : s.start + s.length], k, v, None,
                           scaling=scaling)[0]
                 for s, (k, v) in zip(self.segments, self._keys)]
        if self.batch:
            q = query[:, :, query.shape[2] - self.batch :].transpose(0, 2)  # [batch, heads, 1, d]
            out = attention(module, q, *self._rows, self.decode_mask, scaling=scaling)[0]
            parts.append(out.transpose(0, 1))  # [batch, 1, heads, d] -> [1, batch, heads, d]
        return torch.cat(parts, dim=1)

"""Decoding steps of fixed shape, recorded once and replayed as CUDA graphs on a GPU.

A batch-1 decoding step of the 6B model reads ~12 GB of weights: ~2.5 ms on a current GPU,
less than Python takes to launch the step's ~1,000 kernels one by one. A CUDA graph records
the step once and replays it with one launch. Graphs need fixed shapes and addresses, so the
batch is padded up to a bucket (1, 2, 4, 8, ...), attention reads the cache's whole capacity
(the mask hides what lies past each row's length), and the graphs are recorded again whenever
the cache is reallocated (its capacity doubles). Without recording (CPU), the same
fixed-shape step runs eagerly: that is how the tests check everything but the recording.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .kv_rows import KVRows, decode_logits

log = logging.getLogger(__name__)


@dataclass
class _Step:
    """One bucket's static inputs, and the output its graph writes."""

    tokens: torch.Tensor  # [bucket, 1]
    positions: torch.Tensor  # [bucket]
    logits: torch.Tensor | None = None  # [bucket, vocab]
    graph: "torch.cuda.CUDAGraph | None" = None


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class FixedShapeDecoder:
    """Runs decoding steps on `kv` with padded, fixed shapes; records CUDA graphs if `record`."""

    def __init__(self, model: torch.nn.Module, kv: KVRows, max_batch: int, record: bool) -> None:
        self.model, self.kv, self.record = model, kv, record
        self.buckets = batch_buckets(max_batch)
        self._steps: dict[int, _Step] = {}
        self._kv_version = -1
        self._pool = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] for `tokens` [batch, 1] at `positions` [batch]; rows
        0..batch-1 of the cache are the requests', rows past them are scratch."""
        batch = tokens.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        self.kv.reserve(bucket, 1)
        if self.kv.version != self._kv_version:  # new buffers: the old graphs point at freed ones
            self._steps.clear()
            self._pool = None
            self._kv_version = self.kv.version
        step = self._steps.get(bucket)
        if step is None:
            step = self._steps[bucket] = _Step(
                torch.zeros(bucket, 1, dtype=torch.long, device=self.kv.device),
                torch.zeros(bucket, dtype=torch.long, device=self.kv.device))
        step.tokens[:batch] = tokens
        step.positions[:batch] = positions
        step.positions[batch:] = 0  # padding rows write position 0 of scratch rows
        if not self.record:
            step.logits = self._forward(step)
        elif step.graph is None:
            self._record_graph(step)  # its warm-up runs compute this step
        else:
            step.graph.replay()
        return step.logits[:batch]

    def _forward(self, step: _Step) -> torch.Tensor:
        return decode_logits(self.model, self.kv, step.tokens, step.positions, self.kv.capacity)

    def _record_graph(self, step: _Step) -> None:
        # The warm-up runs (which let cuBLAS and friends allocate outside the graph) use this
        # step's real inputs, so they only write the cache entries the step writes anyway.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step.logits = self._forward(step)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: requests arriving on other threads may touch the GPU meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            step.logits = self._forward(step)
        self._pool = graph.pool()
        step.graph = graph
        graph.replay()
        log.debug("recorded a decoding graph: batch %d, capacity %d", step.tokens.shape[0],
                  self.kv.capacity)

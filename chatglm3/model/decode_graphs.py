"""Decoding steps of fixed shape, recorded once and replayed as CUDA graphs on a GPU.

A batch-1 decoding step of the 6B model reads ~12 GB of weights: ~2.5 ms on a current GPU,
less than Python takes to launch the step's ~1,000 kernels one by one. A CUDA graph records
the step once and replays it with one launch. Graphs need fixed shapes and addresses, so each
step is padded up to a bucket of two sizes:
- the batch: 1, 2, 4, 8, ... up to max_batch (rows past the real ones are padding: they write
  to the KV cache's scratch row when rows past the running ones hold prefix cache entries);
- the positions attention reads: 256, 512, 1024, ... up to the cache's capacity, the smallest
  one that covers the furthest row (the mask hides what lies past each row's length). A step
  thus reads less than twice what its furthest row needs (at least 256 positions: 7 MB per row
  of the 6B model, nothing beside its 12.5 GB of weights), and a long request that has left no
  longer makes every later step read the whole cache. The reads are slices of one buffer
  allocated once, so each graph's addresses stay fixed.
Without recording (CPU), the same fixed-shape steps run eagerly: that is how the tests check
everything but the recording.

Cost: one graph per (batch bucket, read length): with max_batch 8 and a 32,768-position cache
4 x 8 = 32 graphs (32 streams: 6 x 8 = 48), recorded at setup (`record_all`). Each recording
runs the step three times and replays it once: ~4 steps of at most 12.5 GB of weights + the
batch's KV, so a few seconds on an A40 for all 32, about 1 s on an H200 (bench/gpu.py prints
it). They share one memory pool: one step's temporaries (the largest, batch 8 reading 32,768
positions: a few tens of MB) plus each graph's logits output ([batch, 65,024], ~15 MB in all
for the 32); the KV cache itself lives outside the pool. If the cache is reallocated (only a
growable, CPU-style cache is), every graph is dropped and recorded again on use.

Why not torch.compile(mode="reduce-overhead"), which records CUDA graphs too: it compiles
first, per shape (dynamo trace + inductor code generation of a 28-layer model, tens of seconds
each, more on a cold boot with no compile cache in the image), and 32 shapes would put minutes
on every setup; eager kernels recorded as they are cost only the recording. Why not
transformers' StaticCache: its layers write every row at one shared position
(`StaticLayer.update` keeps a single `cumulative_length`), so rows of different lengths
cannot decode together, and it returns the whole `max_cache_len` to attention every step
(the read-everything cost above).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .kv_rows import GRANULARITY, KVRows

log = logging.getLogger(__name__)

MIN_READ = GRANULARITY  # the smallest read-length bucket


def decode_logits(model: torch.nn.Module, kv: KVRows, tokens: torch.Tensor,
                  positions: torch.Tensor, read_len: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step over the first rows of `kv`: `tokens` [batch, 1] at `positions`
    [batch], attention reading `read_len` positions, writing into `rows` (by default row i for
    batch row i); returns the logits [batch, vocab]."""
    mask = kv.prepare_step(positions, read_len=read_len, rows=rows)
    out = model(input_ids=tokens, position_ids=positions[:, None], attention_mask=mask,
                cache=kv, logits_to_keep=1)
    return out.logits[:, -1]


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def read_buckets(capacity: int, smallest: int = MIN_READ) -> list[int]:
    """Powers of two from `smallest` below capacity, then capacity itself: the read lengths
    a step is padded to. Any length n <= capacity gets a bucket below max(2n, smallest)."""
    sizes, n = [], smallest
    while n < capacity:
        sizes.append(n)
        n *= 2
    return sizes + [capacity]


@dataclass
class _Inputs:
    """One batch bucket's static inputs, shared by its graphs of every read length."""

    tokens: torch.Tensor  # [bucket, 1]
    positions: torch.Tensor  # [bucket]
    rows: torch.Tensor  # [bucket] the row each writes: its own, or the scratch row (padding)


@dataclass
class _Step:
    """One (batch bucket, read length) step: its inputs, the output its graph writes."""

    inputs: _Inputs
    read_len: int
    logits: torch.Tensor | None = None  # [bucket, vocab]
    graph: "torch.cuda.CUDAGraph | None" = None


class FixedShapeDecoder:
    """Runs decoding steps on `kv` with padded, fixed shapes; records CUDA graphs if `record`."""

    def __init__(self, model: torch.nn.Module, kv: KVRows, max_batch: int, record: bool) -> None:
        self.model, self.kv, self.record = model, kv, record
        self.buckets = batch_buckets(max_batch)
        self._inputs: dict[int, _Inputs] = {}
        self._steps: dict[tuple[int, int], _Step] = {}
        self._kv_version = kv.version
        self._pool = None
        self._row_ids = torch.arange(max_batch, device=kv.device)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, read length) a step can take with the cache as it is."""
        return [(b, r) for b in self.buckets for r in read_buckets(self.kv.capacity)]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 furthest: int | None = None) -> torch.Tensor:
        """Logits [batch, vocab] for `tokens` [batch, 1] at `positions` [batch]; rows
        0..batch-1 of the cache are the requests', rows past them are scratch. `furthest`:
        the longest row's length after this step (max(positions) + 1; found with a device
        sync when not given)."""
        batch = tokens.shape[0]
        furthest = int(positions.max()) + 1 if furthest is None else furthest
        bucket = next(b for b in self.buckets if b >= batch)
        self.kv.reserve(bucket, furthest)
        self._check_kv_version()
        read = next(r for r in read_buckets(self.kv.capacity) if r >= furthest)
        step = self._step(bucket, read)
        step.inputs.tokens[:batch] = tokens
        step.inputs.positions[:batch] = positions
        step.inputs.positions[batch:] = 0
        if self.kv.scratch_row is not None:
            # Rows past the batch may hold prefix cache entries: padding rows write to the
            # scratch row instead (row i writes row i otherwise: rows[:batch] stay 0..batch-1).
            step.inputs.rows[:batch] = self._row_ids[:batch]
            step.inputs.rows[batch:] = self.kv.scratch_row
        if not self.record:
            step.logits = self._forward(step)
        elif step.graph is None:
            self._record_graph(step)  # its warm-up runs compute this step
        else:
            step.graph.replay()
        return step.logits[:batch]

    def record_all(self) -> int:
        """Records every shape's graph now (setup), so no user waits for one; returns how many
        were recorded. Only with no request running: the recordings write position 0 of
        every row they cover."""
        self._check_kv_version()
        done = 0
        for bucket, read in self.shapes():
            step = self._step(bucket, read)
            if step.graph is None:
                step.inputs.tokens.zero_()
                step.inputs.positions.zero_()
                step.inputs.rows.copy_(torch.arange(bucket, device=self.kv.device))
                self._record_graph(step)
                done += 1
        return done

    def _check_kv_version(self) -> None:
        if self.kv.version != self._kv_version:  # new buffers: the old graphs point at freed ones
            self._steps.clear()
            self._pool = None
            self._kv_version = self.kv.version

    def _step(self, bucket: int, read: int) -> _Step:
        step = self._steps.get((bucket, read))
        if step is None:
            inputs = self._inputs.get(bucket)
            if inputs is None:
                inputs = self._inputs[bucket] = _Inputs(
                    torch.zeros(bucket, 1, dtype=torch.long, device=self.kv.device),
                    torch.zeros(bucket, dtype=torch.long, device=self.kv.device),
                    torch.arange(bucket, device=self.kv.device))
            step = self._steps[bucket, read] = _Step(inputs, read)
        return step

    def _forward(self, step: _Step) -> torch.Tensor:
        return decode_logits(self.model, self.kv, step.inputs.tokens, step.inputs.positions,
                             step.read_len, step.inputs.rows)

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
        # One pool for all graphs: they never run at once, and every graph's output stays
        # referenced (step.logits), so no later recording reuses another graph's output.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            step.logits = self._forward(step)
        self._pool = graph.pool()
        step.graph = graph
        graph.replay()
        log.debug("recorded a decoding graph: batch %d, read length %d",
                  step.inputs.tokens.shape[0], step.read_len)

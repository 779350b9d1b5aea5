"""The model runner: every tensor the engine has. The KV cache (kv_rows.KVRows, planned once
from the memory there is, or growing on a CPU), the id history, prefill chunks, decoding steps
(eager, or fixed-shape / CUDA graphs: decode_graphs), the row moves the row allocator decides,
and the out-of-memory recovery. Warm-up and the graphs' self-check are in warmup.py.

It is told what to run (a scheduler.PrefillChunk, the running requests in row order, a list
of rows.Move) and hands back sampled token ids as Python ints; it decides nothing about who
runs. Only the engine's worker thread calls it.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from .decode_graphs import FixedShapeDecoder, decode_logits
from .kv_rows import KVPlan, KVRows, kv_bytes_per_token, plan_kv, plan_rows
from ..host_memory import release_freed_memory
from .packed_step import PackedStep, Segment
from ..engine.rows import Move
from .sampling import pick, prompt_logprobs, token_logprobs
from ..engine.scheduler import PrefillChunk, Request

from ..settings import DECODE_STEPS, PREFILL_CHUNK
from .step_outputs import ChunkOutput, FirstToken, PackedOutput, StepOutput


def _prefill_buckets(smallest: int = 16, largest: int = PREFILL_CHUNK) -> tuple[int, ...]:
    """Powers of two from `smallest` to `largest` and the midpoints between them (16, 24, 32,
    48, ..., 1536, 2048): padding to the next one adds at most 50% to the last chunk."""
    out, n = [], smallest
    while n < largest:
        out += [n, n * 3 // 2]
        n *= 2
    return tuple(b for b in out if b < largest) + (largest,)


# A chunk is padded up to one of these lengths. Why: without it every distinct prompt length
# is a new input shape, and torch's bf16 CPU matmul (oneDNN) keeps state for each new shape (and
# spends time creating it), so a server's memory grows with every new prompt length
# (bench/soak.py measures it; docs/benchmarks.md, "Prefill buckets"). With buckets the linear
# layers (where that state lives) see at most these 15 row counts in prefill, whatever the
# prompts (and 1..max_batch in decoding). Attention's key length for a chunk is its begin + its
# padded length: chunks begin where the prefix cache left off (a multiple of
# prefix_cache.ALIGN) plus whole chunks (the scheduler's PREFILL_CHUNK, or its smaller token
# budget while requests decode), so key lengths are multiples of 8 up to the context; SDPA
# keeps no per-shape state. Cost: at most 50% more work on the last chunk, and in fp32 the real
# positions' results move by rounding (SDPA's CPU kernel blocks the work by query length).
PREFILL_BUCKETS = _prefill_buckets()


def prefill_bucket(n: int) -> int:
    """The padded length for a chunk of n (1 <= n <= PREFILL_CHUNK) prompt tokens."""
    return next(b for b in PREFILL_BUCKETS if b >= n)


# What a user may choose is settings.DECODE_STEPS. "fixed" (the graphs' padded shapes, run
# eagerly, so that CPU tests check them) is a test-only keyword, accepted but not offered.
_TEST_DECODE_STEPS = ("fixed",)

log = logging.getLogger(__name__)


class _Prefill:
    """A prefilling request's tensors: its prompt on the device and its own DynamicCache."""

    def __init__(self, prompt: list[int], device: torch.device, config) -> None:
        self.prompt_ids = torch.tensor(prompt, device=device)[None]
        self.cache = DynamicCache(config=config)


class ModelRunner:
    """Runs the model. `rows_wanted`: the most KV rows a planned cache may take (running rows,
    prefix cache entries, the scratch row); `kv_budget_bytes`: its size (else planned from
    the GPU's free memory; on a CPU without it the cache grows on demand)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, max_batch: int, decode_step: str,
                 kv_budget_bytes: int | None, rows_wanted: int) -> None:
        self.model, self.pad_id = model, pad_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.context = model.config.max_position_embeddings
        if decode_step not in DECODE_STEPS + _TEST_DECODE_STEPS:
            raise ValueError(f"decode_step: expected one of {', '.join(DECODE_STEPS)}, "
                             f"got {decode_step!r}")
        if decode_step == "auto":
            decode_step = "graphs" if self.device.type == "cuda" else "eager"
        if decode_step == "graphs" and self.device.type != "cuda":
            raise ValueError("decode_step: graphs needs a CUDA device")
        self.wanted_step = decode_step
        cfg = model.config
        self.layout = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        self.bytes_per_token = kv_bytes_per_token(*self.layout, self.dtype.itemsize)
        self.kv_plan: KVPlan | None = None
        if kv_budget_bytes is not None:
            rows, capacity = plan_rows(kv_budget_bytes, self.bytes_per_token, rows_wanted,
                                       self.context)
            self.kv_plan = KVPlan(rows, capacity, self.bytes_per_token, kv_budget_bytes,
                                  "configured")
        elif self.device.type == "cuda":
            self.kv_plan = self.plan_from_gpu_memory(self.bytes_per_token, rows_wanted)
        if self.kv_plan is not None:
            log.info("KV cache planned: %s", self.kv_plan)
        self.max_batch = max_batch
        self.kv: KVRows | None = None
        self.fixed: FixedShapeDecoder | None = None

    def allocate(self, max_batch: int, scratch_row: int | None) -> None:
        """Allocates the cache (planned: all of it, once) and the id history, and sets up the
        fixed-shape decoder; `scratch_row`: where padding rows write (rows.RowAllocator)."""
        self.max_batch = max_batch
        if self.kv_plan is not None:
            self.kv = KVRows(*self.layout, self.device, self.dtype, rows=self.kv_plan.rows,
                             capacity=self.kv_plan.capacity, growable=False)
        else:
            rows = 1 if scratch_row is None else scratch_row + 1
            self.kv = KVRows(*self.layout, self.device, self.dtype, rows=rows)
        self.kv.scratch_row = scratch_row
        # Every running request's ids (prompt and output so far), row i for cache row i: the
        # repetition penalty reads them, and a step's new tokens go in with one device op.
        self.history = torch.zeros(max_batch, self.context, dtype=torch.long, device=self.device)
        self._row_index = torch.arange(max_batch, device=self.device)
        self.fixed = None if self.wanted_step == "eager" else FixedShapeDecoder(
            self.model, self.kv, max_batch, record=self.wanted_step == "graphs")

    @property
    def decode_step(self) -> str:
        if self.fixed is None:
            return "eager"
        return "graphs" if self.fixed.record else "fixed"

    # ---- prefill ----

    def begin(self, r: Request) -> None:
        """r's prefill tensors, at its first chunk: its prompt on the device and its own
        cache, holding the prefix cache entry's positions it reuses (r.reuse: (row, n))."""
        if r.tensors is None:
            r.tensors = _Prefill(r.prompt, self.device, self.model.config)
            row, n = r.reuse
            if n:
                self.kv.load_prefix(row, n, r.tensors.cache)

    def prefill(self, chunk: PrefillChunk) -> ChunkOutput:
        """Runs one chunk of a request's prompt: at its last chunk the first token picked
        from the prompt's logits (and its log-probabilities, if the request asks for them),
        and the prompt tokens' scores if it asks for those."""
        r = chunk.request
        self.begin(r)
        t: _Prefill = r.tensors
        logits = self.prefill_chunk(t.prompt_ids[:, chunk.begin : chunk.end], t.cache,
                                    chunk.begin, _scored(r))
        return self._chunk_output(chunk, logits)

    def _chunk_output(self, chunk: PrefillChunk, logits: torch.Tensor) -> ChunkOutput:
        """A chunk's output from its kept logits rows: every position's if it is scored,
        else the last one's (none for a chunk that neither scores nor ends its prompt)."""
        r = chunk.request
        scores = []
        if _scored(r):
            targets = r.prompt[chunk.begin + 1 : chunk.end + 1]
            scores = prompt_logprobs(logits, targets, r.sampling.params.prompt_logprobs)
        return ChunkOutput(self._first(r, logits[-1:]) if chunk.last else None, scores)

    def _first(self, r: Request, logits: torch.Tensor) -> FirstToken:
        """The first token from a prompt's last logits [1, vocab]."""
        token = pick(logits, [r.sampling], [r.tensors.prompt_ids])
        logprobs = token_logprobs(logits, token, [r.sampling])
        return FirstToken(token.item(), logprobs[0] if logprobs else None)

    def prefill_chunk(self, chunk: torch.Tensor, cache: DynamicCache, begin: int,
                      scored: bool = False) -> torch.Tensor:
        """Runs prompt tokens `chunk` [1, n] at positions begin.. into `cache`, padded to a
        PREFILL_BUCKETS length; returns the logits [1, vocab] of its last real position, or
        with `scored` those of every real position [n, vocab] (one chunk's, never a whole
        prompt's: prompt_logprobs turns them into scores a few rows at a time)."""
        real = chunk.shape[1]
        # Padding goes after the real tokens (see PREFILL_BUCKETS): attention is causal, so no
        # real position sees it, and its keys/values are cropped off below. Its positions go on
        # counting but stay inside the rotary range the model was made for.
        padded = prefill_bucket(real)
        if padded > real:
            chunk = torch.nn.functional.pad(chunk, (0, padded - real), value=self.pad_id)
        positions = torch.arange(begin, begin + padded, device=self.device).clamp_(
            max=self.context - 1)[None]
        # The last real position as an index tensor, not logits_to_keep=1: that slice keeps
        # the chunk's strides, and matmul then copies the whole lm_head weight (seconds on CPU).
        keep = torch.arange(real, device=self.device) if scored else torch.tensor(
            [real - 1], device=self.device)
        out = self.model(input_ids=chunk, cache=cache, position_ids=positions,
                         use_cache=True, logits_to_keep=keep)
        if padded > real:
            # transformers 5 crop(): a negative count removes that many positions from the end
            # (a positive one, the old "keep this many", raises).
            cache.crop(real - padded)
        return out.logits[0]

    # ---- packed steps ----

    @property
    def packs(self) -> bool:
        """Whether prompt chunks of several requests and the decoding rows may share a forward
        pass (`packed`): on a CPU, whose decoding steps run eagerly. A GPU keeps one prefill
        at a time beside decoding steps replayed as CUDA graphs (packed_step says why)."""
        return self.device.type == "cpu" and self.fixed is None

    def packed(self, chunks: list[PrefillChunk], running: list[Request]) -> PackedOutput:
        """One forward pass of `chunks` (of different requests) and a decoding step of
        `running` (running[i] in row i; may be empty): each chunk's first token if it ends
        its prompt (else None), and the decoding step's output (None without one)."""
        segments, ids, positions, keep, kept, at = [], [], [], [], [], 0
        for c in chunks:
            self.begin(c.request)
            n = c.end - c.begin
            ids.append(c.request.tensors.prompt_ids[0, c.begin : c.end])
            positions.append(torch.arange(c.begin, c.end, device=self.device))
            segments.append(Segment(c.request.tensors.cache, at, n))
            rows = range(at, at + n) if _scored(c.request) else [at + n - 1] if c.last else []
            keep += rows
            kept.append(len(rows))
            at += n
        batch = len(running)
        # Padded to a PREFILL_BUCKETS length as a lone chunk is: after the last chunk's real
        # tokens, into its cache (cropped below). Past PREFILL_CHUNK: a rare shape of its own.
        padded = at + batch if at + batch > PREFILL_CHUNK else prefill_bucket(at + batch)
        pad = padded - at - batch
        if pad:
            segments[-1].length += pad
            end = chunks[-1].end
            ids.append(torch.full((pad,), self.pad_id, device=self.device))
            positions.append(torch.arange(end, end + pad, device=self.device).clamp_(
                max=self.context - 1))
        step_positions = None
        if batch:
            tokens, step_positions, furthest = self._step_inputs(running)
            mask = self.kv.prepare_step(step_positions, read_len=furthest)
            ids.append(tokens)
            positions.append(step_positions)
        else:  # for transformers' mask builder (it returns a 4-D mask as it is); unused
            mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        step_cache = PackedStep(segments, self.kv if batch else None, batch, mask)
        keep += range(padded - batch, padded)
        out = self.model(input_ids=torch.cat(ids)[None], position_ids=torch.cat(positions)[None],
                         attention_mask=mask, cache=step_cache, use_cache=True,
                         logits_to_keep=torch.tensor(keep, device=self.device),
                         packed=step_cache)
        if pad:
            segments[-1].cache.crop(-pad)
        logits = out.logits[0]
        outputs, j = [], 0  # j: the next kept logits row (the chunks', in order, then the batch's)
        for c, n in zip(chunks, kept):
            outputs.append(self._chunk_output(c, logits[j : j + n]))
            j += n
        decoded = self._decoded(running, logits[j:], step_positions) if batch else None
        return PackedOutput(outputs, decoded)

    def admit(self, r: Request, row: int, moves: list[Move]) -> None:
        """Puts a prefilled request (its first token taken) into `row`, after `moves`."""
        self.apply(moves)
        n = len(r.prompt)
        self.kv.reserve(row + 1, r.length)
        self.kv.store_prefill(row, r.tensors.cache)
        self.history[row, :n] = r.tensors.prompt_ids[0]
        self.history[row, n] = r.last_token
        r.tensors = None

    def store_entry(self, r: Request, row: int) -> None:
        """Stores a prefill cache (of a request that never got a row) in `row`, as an entry."""
        cache = r.tensors.cache
        self.kv.reserve(row + 1, cache.get_seq_length())
        self.kv.store_prefill(row, cache)

    @staticmethod
    def prefill_length(r: Request) -> int:
        return 0 if r.tensors is None else r.tensors.cache.get_seq_length()

    # ---- decoding ----

    def decode(self, running: list[Request]) -> StepOutput:
        """One decoding step of the running requests (running[i] in row i): their next tokens,
        also written into the id history, and their log-probabilities (None when no request
        asks for them)."""
        step, positions, furthest = self._step_inputs(running)
        tokens = step[:, None]
        logits = None
        if self.fixed is not None:
            try:
                logits = self.fixed(tokens, positions, furthest)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - a GPU that cannot record graphs still serves
                if not self.fixed.record:
                    raise
                log.warning("CUDA graph decoding failed; decoding eagerly from now on",
                            exc_info=True)
                self.fixed = None
        if logits is None:
            logits = decode_logits(self.model, self.kv, tokens, positions, furthest)
        return self._decoded(running, logits, positions)

    def _step_inputs(self, running: list[Request]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A decoding step's inputs: each row's last token and its position (to the device in
        one copy), and the furthest length, which the cache is made room for."""
        step = torch.tensor([[r.last_token for r in running], [r.length - 1 for r in running]],
                            device=self.device)
        furthest = max(r.length for r in running)
        self.kv.reserve(len(running), furthest)
        return step[0], step[1], furthest

    def _decoded(self, running: list[Request], logits: torch.Tensor,
                 positions: torch.Tensor) -> StepOutput:
        """The running requests' next tokens from their logits [batch, vocab] (fed in at
        `positions`), written into the id history too."""
        batch = len(running)
        history = self.history[:batch]
        picked = pick(logits, [r.sampling for r in running],
                      [history[i : i + 1, : r.length] if r.sampling.needs_history
                       else None for i, r in enumerate(running)])
        # The batch's new tokens into the id history: one device op, whatever the batch.
        history[self._row_index[:batch], positions + 1] = picked
        return StepOutput(picked.tolist(),
                          token_logprobs(logits, picked, [r.sampling for r in running]))

    def apply(self, moves: list[Move]) -> None:
        """Carries out the row allocator's moves, in order."""
        for m in moves:
            self.kv.reserve(max(m.src, m.dst) + 1, max(m.length, m.dst_length, 1))
            if m.swap:
                self.kv.swap_rows(m.dst, m.src, m.dst_length, m.length)
            else:
                self.kv.move_row(m.src, m.dst, m.length)
            if m.history:
                self.history[m.dst, : m.history] = self.history[m.src, : m.history]

    # ---- memory ----

    def idle(self) -> None:
        """Nothing runs and no row holds a prefix cache entry: a growable cache goes back to
        its first size. Without this one long request would leave every row as long for
        good (the rows share one capacity: after an 8,192-token prompt, 8 streams took 8 rows
        of 16,384 positions, 3.8 GB, and each row added copied them all); regrowing costs
        the next long request one doubling copy of its own row."""
        if self.kv is not None and self.kv.reset():
            release_freed_memory()

    def out_of_memory(self, idle: bool) -> None:
        """After an out-of-memory error: gives back what the failed requests held (`idle`:
        nothing runs any more, so a grown cache goes back to its first size)."""
        if idle:
            self.kv.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def plan_from_gpu_memory(self, bytes_per_token: int, max_batch: int) -> KVPlan:
        """Measures the peak of the worst prefill chunk, then plans the cache from the free
        memory (kv_rows.plan_kv)."""
        dev = self.device
        from .quantize import weight_bytes

        weights = weight_bytes(self.model)  # int8/int4 as packed
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            self._worst_prefill_chunk()
        torch.cuda.synchronize(dev)
        activation = torch.cuda.max_memory_allocated(dev) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        return plan_kv(total_bytes=total, free_bytes=free, weight_bytes=weights,
                       bytes_per_token=bytes_per_token, activation_bytes=activation,
                       max_batch=max_batch, context=self.context)

    def _worst_prefill_chunk(self) -> None:
        """The prefill chunk that needs the most memory: a whole chunk at the end of the
        context, with the prompt's cache before it (a DynamicCache of zeros, as large as a real
        one: the engine holds one while it prefills)."""
        cfg = self.model.config
        begin = max(0, self.context - PREFILL_CHUNK) // PREFILL_CHUNK * PREFILL_CHUNK
        cache = DynamicCache(config=cfg)
        shape = (1, cfg.num_key_value_heads, begin, cfg.head_dim)
        if begin:
            for layer in range(cfg.num_hidden_layers):
                cache.update(torch.zeros(shape, dtype=self.dtype, device=self.device),
                             torch.zeros(shape, dtype=self.dtype, device=self.device), layer)
        chunk = torch.full((1, min(PREFILL_CHUNK, self.context)), self.pad_id,
                           device=self.device)
        self.prefill_chunk(chunk, cache, begin, scored=True)


def _scored(r: Request) -> bool:
    """Whether r's prompt tokens are scored (its prompt_logprobs)."""
    return r.sampling.params.prompt_logprobs is not None

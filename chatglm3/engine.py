"""The generation engine: chat messages in, a stream of text deltas and a final record out.

Why not transformers' own continuous batching (`model.init_continuous_batching()`, checked in
transformers 5.24, generation/continuous_batching/): it cannot serve this API's requests.
- No per-request seed: tokens are drawn with `torch.multinomial` on the process-wide generator
  (ModelRunner._sample), seeded once per manager (ContinuousBatchingConfig.seed ->
  DistributedHelper.set_tp_seed -> torch.manual_seed); a request's draws depend on what else
  runs, so a reported seed would not reproduce its output.
- Greedy and sampled requests cannot share a batch: `do_sample` is read once from the
  GenerationConfig (ContinuousBatchProcessor.do_sample) and ModelRunner._sample applies
  multinomial or argmax to every row.
- The repetition penalty is dropped: RepetitionPenaltyLogitsProcessor says
  `supports_continuous_batching = False`, and ContinuousBatchingLogitsProcessorList removes
  it (drop_unsupported_processors defaults to True); kept, it would be one value for all
  requests (only temperature, top-k and top-p have per-request versions, and only with
  per_request_processors=True).
Its paged cache and scheduler also replace what this engine plans and checks itself (one KV
budget sized at setup, admission, out-of-memory handling), and it switches attention to
flash-attention kernels where they are installed (auto_switch_to_flash), which the
official-output tests do not cover.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from .checkpoint import load_model
from .decode_graphs import FixedShapeDecoder, decode_logits
from .devices import resolve_device, resolve_dtype
from .kv_rows import KVPlan, KVRows, kv_bytes_per_token, plan_kv, plan_rows
from .params import SamplingParams
from .prefix_cache import ALIGN as PREFIX_ALIGN, PrefixCache, as_ids
from .sampling import RequestSampling, pick
from .streaming import IncrementalDetokenizer, StopMatcher
from .tokenizer import ChatGLMTokenizer, Message

PREFILL_CHUNK = 2048  # prompt tokens per forward pass: bounds activation memory, allows cancel


def _prefill_buckets(smallest: int = 16, largest: int = PREFILL_CHUNK) -> tuple[int, ...]:
    """Powers of two from `smallest` to `largest` and the midpoints between them (16, 24, 32,
    48, ..., 1536, 2048): padding to the next one adds at most 50% to the last chunk."""
    out, n = [], smallest
    while n < largest:
        out += [n, n * 3 // 2]
        n *= 2
    return tuple(b for b in out if b < largest) + (largest,)


# The last (partial) prefill chunk is padded up to one of these lengths. Why: without it every
# distinct prompt length is a new input shape, and torch's bf16 CPU matmul (oneDNN) keeps state
# for each new shape (and spends time creating it): 400 predictions of distinct lengths took a
# bf16 CPU server from 843 MB to 1.8 GB, flat in fp32 and flat when lengths repeat (bench/soak.py
# measures it; ~0.7 MB per new row count per weight shape). With buckets the linear layers
# (where that state lives) see at most these 15 row counts in prefill, whatever the prompts
# (and 1..max_batch in decoding); the attention's key length for a chunk is begin +
# its padded length, begin a multiple of PREFILL_CHUNK, so at most 15 x ceil(context /
# PREFILL_CHUNK) = 240 query/key shape pairs for a 32K context. (Decoding reads a new key length
# every step, but SDPA keeps no per-shape state: measured flat.) With the prefix cache a prefill
# starts at a reused length L, a multiple of prefix_cache.ALIGN (16), and its chunks at L + k x
# PREFILL_CHUNK: the linear layers still see only these 15 row counts; attention's key lengths
# become any multiple of 8 up to the context (15 x 2,048 query/key pairs at most), which SDPA
# also keeps no state for (bf16 CPU, 1,200 chunks at distinct key lengths: RSS within +-30 MB,
# no trend). Cost: at most 50% more work on the last chunk, and in fp32 the real positions'
# results move by rounding (~1e-6 relative): SDPA's CPU kernel blocks the work by query length.
PREFILL_BUCKETS = _prefill_buckets()


def prefill_bucket(n: int) -> int:
    """The padded length for a chunk of n (1 <= n <= PREFILL_CHUNK) prompt tokens."""
    return next(b for b in PREFILL_BUCKETS if b >= n)


DEFAULT_MAX_BATCH = 8
# With the prefix cache on, a planned KV cache takes up to this many rows beyond max_batch (as
# many as its budget holds) to keep finished requests' keys/values in; every lookup compares
# the input with each entry (numpy, ~30 us per 32k-id entry).
MAX_PREFIX_ROWS = 256
# What a user may choose. "fixed" (the graphs' padded shapes, run eagerly, so that CPU tests
# check them) is a test-only keyword, accepted but not offered.
DECODE_STEPS = ("auto", "eager", "graphs")
_TEST_DECODE_STEPS = ("fixed",)

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """The prompt does not fit the context window; carries both counts. `chars` set: the
    count is a lower bound from the text's length, found without tokenizing it."""

    def __init__(self, prompt_tokens: int, context: int, chars: int | None = None) -> None:
        self.prompt_tokens, self.context = prompt_tokens, context
        size = (f"is {prompt_tokens} tokens" if chars is None else
                f"is {chars} characters, so at least {prompt_tokens} tokens")
        super().__init__(
            f"prompt too long: the prompt {size}, but the model's context is "
            f"{context} tokens and needs room for at least one generated token "
            f"(shorten the prompt or history by {'at least ' if chars else ''}"
            f"{prompt_tokens - context + 1} tokens)"
        )


class RequestTooLarge(ValueError):
    """The request's worst case (prompt + max_tokens) exceeds a KV cache row as planned at
    setup: it could never run, even alone. Carries both numbers."""

    def __init__(self, prompt_tokens: int, max_tokens: int, capacity: int) -> None:
        self.worst_case, self.capacity = prompt_tokens + max_tokens, capacity
        fix = (f"lower max_tokens to at most {capacity - prompt_tokens}" if prompt_tokens < capacity
               else f"shorten the prompt to under {capacity} tokens")
        super().__init__(
            f"request too large for this server's KV cache: the prompt ({prompt_tokens} tokens) "
            f"plus max_tokens ({max_tokens}) needs up to {self.worst_case} positions, but a "
            f"cache row holds {capacity} (sized at setup from the memory there is); {fix}")


class OutOfMemory(RuntimeError):
    """The device ran out of memory during one request's prefill or one decoding step: those
    requests fail with this, the engine frees what they held and serves on."""


@dataclass
class GenerationResult:
    """What a finished (or cancelled) generation did."""

    text: str = ""
    input_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""  # stop_token | stop_sequence | max_tokens | cancelled | error
    input_token_count: int = 0
    cached_input_token_count: int = 0  # input positions reused from the prefix cache, not run
    output_token_count: int = 0
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0
    max_tokens: int = 0  # the limit applied, after cutting to the room left in the context
    max_tokens_cut: bool = False
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WarmUp:
    """What `Engine.warm_up` did and how long it took."""

    seconds: float = 0.0
    prefill_shapes: int = 0  # prefill chunk lengths run (one per PREFILL_BUCKETS length)
    prefill_seconds: float = 0.0
    graphs: int = 0  # decoding graphs recorded
    graph_seconds: float = 0.0
    graph_pool_bytes: int = 0  # GPU memory the recordings reserved (their shared pool)
    check: str = ""  # the graphs-vs-eager self-check's verdict; empty when not run
    decode_step: str = ""  # what serves from now on: graphs | fixed | eager
    kv: KVPlan | None = None

    def __str__(self) -> str:
        parts = [f"{self.seconds:.2f}s: {self.prefill_shapes} prefill shapes in "
                 f"{self.prefill_seconds:.2f}s"]
        if self.graphs:
            parts.append(f"{self.graphs} decoding graphs recorded in {self.graph_seconds:.2f}s "
                         f"({self.graph_pool_bytes / 2**20:.0f} MiB pool)")
        if self.check:
            parts.append(self.check)
        parts.append(f"decoding: {self.decode_step}")
        return "; ".join(parts)  # the KV plan has a line of its own at setup


class _Request:
    """One request's state, owned by the engine's worker thread once submitted."""

    def __init__(self, prompt: list[int], sampling: RequestSampling, result: GenerationResult,
                 tokenizer: ChatGLMTokenizer, device: torch.device) -> None:
        self.prompt, self.sampling, self.result = prompt, sampling, result
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(sampling.params.stop)
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # str deltas, then _END or an error
        self.cancelled = threading.Event()
        self.pieces: list[str] = []
        self.submitted = time.perf_counter()
        self.first_token_at = self.last_token_at = self.submitted
        self.device = device
        self.length = len(prompt)  # ids so far: the prompt and the output tokens taken
        self.last_token = prompt[-1]  # the id the next decoding step feeds in
        self.prompt_ids: torch.Tensor | None = None  # [1, prompt] on the device: see start()
        self.prefill_cache: DynamicCache | None = None
        self.prefilled = 0
        self.prefill_token: int | None = None  # the token picked from the prompt's logits
        self.kv_len = 0  # positions whose keys/values are written (set when a token is taken)
        self.wake: Callable[[], None] | None = None  # set by an asyncio consumer

    def start(self) -> None:
        """Puts the prompt on the device, from the worker thread (so no other thread touches
        the GPU while the worker records a CUDA graph). It lives until the request gets a
        cache row, where the engine's id history takes over."""
        self.prompt_ids = torch.tensor(self.prompt, device=self.device)[None]

    def emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.out.put(text)
            if self.wake is not None:
                self.wake()

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        r = self.result
        if not r.stop_reason:
            r.stop_reason = reason
        r.text = "".join(self.pieces)
        r.output_token_count = len(r.output_ids)
        decoded = r.output_token_count - 1
        span = self.last_token_at - self.first_token_at
        r.tokens_per_second = decoded / span if decoded > 0 and span > 0 else 0.0
        self.prefill_cache = None
        self.prompt_ids = None
        self.out.put(error if error is not None else _END)
        if self.wake is not None:
            self.wake()


_END = object()


class Generation:
    """One request's stream: iterate (or async-iterate) for text deltas; `result` when done."""

    def __init__(self, request: _Request) -> None:
        self._request = request
        self.result = request.result

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._request.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # a consumer that walks away stops the computation too
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        """Async iteration: the worker wakes this event loop; no thread waits per stream."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._request.wake = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                ready.clear()
                try:
                    item = self._request.out.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stops this request's forward passes before its next step, or takes it out of the
        queue if it is still waiting for a cache row (from any thread)."""
        self._request.cancelled.set()

    def text(self) -> str:
        """Runs to the end and returns the whole text."""
        return "".join(self)


class Engine:
    """Runs ChatGLM3 generations on one model; concurrent requests share each decoding step.

    A worker thread owns the model. Each step it runs one prefill chunk of a waiting request (so
    a long prompt does not stall the others) and one decoding step for every running request.
    `decode_step`: "eager" runs each decoding step as it comes; "graphs" replays it as a CUDA
    graph (padded to fixed shapes, see decode_graphs); "auto" is "graphs" on a GPU and "eager"
    elsewhere. (The test-only "fixed" runs the graphs' shapes without recording.)

    The KV cache: on a GPU it is planned once, here, from the memory left after the weights
    and a measured prefill peak (kv_rows.plan_kv), and allocated once; `kv_budget_bytes` sets
    its size instead (on any device). Without either (the CPU default) it grows on demand.
    With a planned cache, `max_batch` is at most its rows, and a request runs only once a row
    is free (every row holds a request's worst case, prompt + max_tokens; one that no row
    could hold is refused at once with RequestTooLarge). Waiting requests start in arrival
    order, strictly first in, first out: all rows are alike, so no request could start sooner
    by overtaking, and none is passed over.

    The prefix cache (`prefix_cache`; None = on with a CUDA device, off elsewhere): a finished
    or cancelled request's keys and values stay in its row, keyed by its token ids, and a later
    request reuses the longest cached prefix of its input instead of prefilling it (follow-up
    turns, shared system prompts and documents); GenerationResult.cached_input_token_count
    says how much. Entries only fill rows no request runs in, and are evicted, least recently
    used first, when a request needs the row: they never make a request wait. A planned cache
    then takes as many rows as its budget holds (up to max_batch + MAX_PREFIX_ROWS), max_batch of
    them running; a growing (CPU) cache keeps entries in up to max_batch rows. prefix_cache.py
    has the design.

    Call `warm_up()` once before serving (setup): it meets every prefill shape, records the
    decoding graphs and checks them against eager steps.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: ChatGLMTokenizer,
                 max_batch: int = DEFAULT_MAX_BATCH, decode_step: str = "auto",
                 kv_budget_bytes: int | None = None, prefix_cache: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
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
        cfg = model.config
        layout = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        per_token = kv_bytes_per_token(*layout, self.dtype.itemsize)
        if prefix_cache is None:
            # Off on a CPU: there a grown cache is never given back, and entries would keep up
            # to max_batch rows at the longest length seen (tests and benches turn it on).
            prefix_cache = self.device.type == "cuda"
        self._prefix = PrefixCache() if prefix_cache else None
        rows_wanted = max_batch + (MAX_PREFIX_ROWS if prefix_cache else 0)
        self.kv_plan: KVPlan | None = None
        if kv_budget_bytes is not None:
            rows, capacity = plan_rows(kv_budget_bytes, per_token, rows_wanted, self.context)
            self.kv_plan = KVPlan(rows, capacity, per_token, kv_budget_bytes, "configured")
        elif self.device.type == "cuda":
            self.kv_plan = self._plan_from_gpu_memory(per_token, rows_wanted)
        if self.kv_plan is not None:
            max_batch = min(max_batch, self.kv_plan.rows)
            self._kv = KVRows(*layout, self.device, self.dtype, rows=self.kv_plan.rows,
                              capacity=self.kv_plan.capacity, growable=False)
            log.info("KV cache planned: %s", self.kv_plan)
        else:
            self._kv = KVRows(*layout, self.device, self.dtype)
        self.max_batch = max_batch
        # Entries sit in rows past the running ones, where the fixed-shape decoder's padding
        # rows would write (see KVRows.prepare_step).
        self._kv.padding_to_scratch = self._prefix is not None
        # Every running request's ids (prompt and output so far), row i for cache row i: the
        # repetition penalty reads them, and a step's new tokens go in with one device op.
        self._history = torch.zeros(max_batch, self.context, dtype=torch.long, device=self.device)
        self._row_index = torch.arange(max_batch, device=self.device)
        self._fixed = None if decode_step == "eager" else FixedShapeDecoder(
            model, self._kv, max_batch, record=decode_step == "graphs")
        self._incoming: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._pending = 0
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()  # run by the worker
        self._worker: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, device: str | torch.device = "auto",
                        dtype: str | torch.dtype = "auto", progress: bool = False,
                        **kwargs) -> "Engine":
        """Loads a checkpoint; `progress`: download and per-shard progress on stderr.

        `model_dir` takes what the CLI's --weights takes: a checkpoint folder (relative to the
        current directory), None for the official 32k weights (fetched into the repository's
        weights/ if not there yet), a hub repo id "owner/name[@revision]", or the https URL of
        a .tar/.tar.gz. The device is checked before anything is fetched."""
        from .download import resolve_weights

        dev = device if isinstance(device, torch.device) else resolve_device(device)
        model_dir = resolve_weights(model_dir, progress=progress)
        model = load_model(model_dir, dev, resolve_dtype(dtype, dev), progress=progress)
        return cls(model, ChatGLMTokenizer.from_dir(model_dir), **kwargs)

    @property
    def prefix_cache(self) -> bool:
        """Whether finished requests' keys/values are kept for later requests to reuse."""
        return self._prefix is not None

    def prefix_cache_entries(self) -> list[tuple[int, int]]:
        """The cached entries as (cache row, positions held), least recently used first.
        Runs on the worker thread once no request is running or prefilling (for tests and
        debugging; it waits for the engine to be idle)."""
        if self._prefix is None:
            return []
        prefix = self._prefix
        return self._on_worker(lambda: [(row, prefix.length(row)) for row in prefix.lru_rows()])

    @property
    def decode_step(self) -> str:
        """What runs decoding steps now: graphs | fixed | eager (graphs fall back to eager
        when recording fails or their self-check disagrees)."""
        if self._fixed is None:
            return "eager"
        return "graphs" if self._fixed.record else "fixed"

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The chat input ids; PromptTooLong if they cannot fit the context. A text too long to
        fit is rejected from its length alone, before any tokenizing (which costs ~0.3 s/MB)."""
        bound = self.tokenizer.min_chat_tokens(messages)
        if bound >= self.context:
            chars = sum(len(m.content) + len(m.metadata) for m in messages)
            raise PromptTooLong(bound, self.context, chars=chars)
        ids = self.tokenizer.build_chat_input(messages)
        if len(ids) >= self.context:
            raise PromptTooLong(len(ids), self.context)
        return ids

    def generate(self, messages: Sequence[Message],
                 params: SamplingParams | None = None) -> Generation:
        """Validates the request now (raising PromptTooLong / SettingsError) and queues it."""
        params = params or SamplingParams()
        params.validate()
        return self.generate_ids(self.encode(messages), params)

    def generate_ids(self, ids: Sequence[int], params: SamplingParams | None = None) -> Generation:
        """Queues a request given as chat input ids (see `encode`); RequestTooLarge at once if
        no cache row as planned could ever hold it."""
        params = params or SamplingParams()
        params.validate()
        ids = list(ids)
        if not ids or not all(isinstance(i, int) and 0 <= i < self.tokenizer.vocab_size
                              for i in ids):
            raise ValueError(f"ids: expected a non-empty list of token ids below "
                             f"{self.tokenizer.vocab_size}")
        if len(ids) >= self.context:
            raise PromptTooLong(len(ids), self.context)
        room = self.context - len(ids)
        max_tokens = min(params.max_tokens, room)
        if self.kv_plan is not None and len(ids) + max_tokens > self.kv_plan.capacity:
            raise RequestTooLarge(len(ids), max_tokens, self.kv_plan.capacity)
        result = GenerationResult(input_ids=ids, input_token_count=len(ids),
                                  max_tokens=max_tokens, max_tokens_cut=params.max_tokens > room)
        sampling = RequestSampling(params, prompt_len=len(ids), stop_ids=self.tokenizer.stop_ids)
        result.seed = sampling.seed
        request = _Request(ids, sampling, result, self.tokenizer, self.device)
        self._start_worker()
        with self._wake:
            self._incoming.put(request)
            self._pending += 1
            self._wake.notify()
        return Generation(request)

    def warm_up(self, prefill: bool = True) -> WarmUp:
        """Setup's warm-up, on the worker thread, before (or between) requests: one prefill
        chunk of each PREFILL_BUCKETS length (so no request meets a prefill shape for the
        first time: a bf16 CPU worker's memory is then flat from the start), every decoding
        graph recorded, then a short greedy decode through the graphs (or fixed shapes) and
        through eager steps: if they disagree, decoding is eager from then on, with a warning
        that says why. Logs and returns what it did and how long each part took."""
        report = self._on_worker(lambda: self._warm_up(prefill))
        log.info("warm-up: %s", report)
        return report

    def _on_worker(self, fn: Callable[[], object]) -> object:
        """Runs fn on the worker thread when no request is running or prefilling."""
        job: Future = Future()
        self._start_worker()
        with self._wake:
            if self._closed:
                raise RuntimeError("engine closed")
            self._jobs.append((fn, job))
            self._wake.notify()
        return job.result()

    def close(self) -> None:
        """Stops the worker thread (requests still running or waiting end as cancelled)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._worker is not None:
            self._worker.join()
            atexit.unregister(self.close)

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name="chatglm3-engine",
                                            daemon=True)
            self._worker.start()
            # A daemon thread frozen inside a torch call at interpreter exit aborts the
            # process ("terminate called without an active exception"): stop it first.
            atexit.register(self.close)

    # ---- planning the KV cache (at construction) ----

    def _plan_from_gpu_memory(self, bytes_per_token: int, max_batch: int) -> KVPlan:
        """Measures the peak of the worst prefill chunk, then plans the cache from the free
        memory (kv_rows.plan_kv)."""
        dev = self.device
        weights = sum(t.numel() * t.element_size()
                      for t in [*self.model.parameters(), *self.model.buffers()])
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
        chunk = torch.full((1, min(PREFILL_CHUNK, self.context)), self.tokenizer.pad_id,
                           device=self.device)
        self._prefill_chunk(chunk, cache, begin)

    # ---- the worker thread ----

    def _serve(self) -> None:
        waiting: deque[_Request] = deque()  # in arrival order
        prefilling: _Request | None = None
        running: list[_Request] = []  # running[i] holds cache row i
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._pending or waiting or prefilling or running or self._jobs
                               or self._closed):
                        self._wake.wait()
                    if self._closed:
                        break
                    while self._pending:
                        waiting.append(self._incoming.get())
                        self._pending -= 1
                    job = self._jobs[0] if self._jobs else None
                # A request waiting for a row ends as soon as it is cancelled.
                for r in [r for r in waiting if r.cancelled.is_set()]:
                    waiting.remove(r)
                    r.finish("cancelled")
                if job is not None:
                    if prefilling is None and not running:  # jobs run on an idle engine
                        with self._wake:
                            self._jobs.popleft()
                        self._run_job(*job)
                        continue
                elif prefilling is None and waiting and len(running) < self.max_batch:
                    prefilling = waiting.popleft()  # a row is free: the next in line starts
                if prefilling is not None and self._prefill_turn(prefilling, running):
                    prefilling = None
                if running:
                    self._decode_turn(running)
        for r in running + list(waiting) + ([prefilling] if prefilling else []):
            r.finish("cancelled")
        while not self._incoming.empty():
            self._incoming.get().finish("cancelled")
        for _, job in self._jobs:
            job.set_exception(RuntimeError("engine closed"))

    @staticmethod
    def _run_job(fn: Callable[[], object], job: Future) -> None:
        try:
            job.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller waiting on it
            job.set_exception(e)

    def _prefill_turn(self, r: _Request, running: list[_Request]) -> bool:
        """One prefill chunk of r; True when r is done prefilling (running, finished, failed
        or cancelled). An error fails r alone; serving goes on."""
        try:
            if r.cancelled.is_set():
                self._keep_prefill(r.prompt, r.prefill_cache, len(running))
                r.finish("cancelled")
                return True
            if not self._prefill_step(r):
                return False
            cache = r.prefill_cache
            if not self._finished_after(r, r.prefill_token):
                self._admit(r, running)
            else:  # done at its first token (max_tokens 1, a stop token): still worth keeping
                self._keep_prefill(r.prompt, cache, len(running))
            return True
        except torch.OutOfMemoryError:
            log.warning("out of memory in a prefill chunk", exc_info=True)
        except Exception as e:  # noqa: BLE001 - reported to the request, serving goes on
            self._drop_prefix_cache()  # it may have failed halfway through moving an entry
            r.finish("error", e)
            return True
        # Out of memory, handled out here: inside the except block the error's traceback
        # still holds the forward pass's tensors.
        r.prefill_cache = r.prompt_ids = None
        error = self._out_of_memory(f"prefill of a {len(r.prompt):,}-token prompt", running)
        r.finish("error", OutOfMemory(error))
        return True

    def _decode_turn(self, running: list[_Request]) -> None:
        """One decoding step of every running request; an error fails them all (they share
        the step), and serving goes on."""
        try:
            self._decode_step(running)
            return
        except torch.OutOfMemoryError:
            log.warning("out of memory in a decoding step", exc_info=True)
        except Exception as e:  # noqa: BLE001
            for r in running:
                r.finish("error", e)
            running.clear()
            self._drop_prefix_cache()  # it may have failed halfway through a row swap
            return
        failed, n = list(running), len(running)
        running.clear()
        error = self._out_of_memory(f"a decoding step of {n} request{'s' if n != 1 else ''}",
                                    running)
        for r in failed:
            r.finish("error", OutOfMemory(error))

    def _out_of_memory(self, during: str, running: list[_Request]) -> str:
        """Frees what the failed requests held (they have let go of it); returns the message
        to fail each of them with."""
        if not running:
            self._drop_prefix_cache()
            self._kv.reset()  # a grown (CPU-style) cache back to its first size
        where = "GPU memory" if self.device.type == "cuda" else "memory"
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return (f"out of {where} during {during}; the request was dropped and the server goes "
                "on (a shorter prompt or fewer max_tokens may fit, or retry when it is less busy)")

    def _prefill_chunk(self, chunk: torch.Tensor, cache: DynamicCache, begin: int) -> torch.Tensor:
        """Runs prompt tokens `chunk` [1, n] at positions begin.. into `cache`, padded to a
        PREFILL_BUCKETS length; returns the logits [1, vocab] of its last real position."""
        real = chunk.shape[1]
        # Padding goes after the real tokens (see PREFILL_BUCKETS): attention is causal, so no
        # real position sees it, and its keys/values are cropped off below. Its positions go on
        # counting but stay inside the rotary range the model was made for.
        padded = prefill_bucket(real)
        if padded > real:
            chunk = torch.nn.functional.pad(chunk, (0, padded - real), value=self.tokenizer.pad_id)
        positions = torch.arange(begin, begin + padded, device=self.device).clamp_(
            max=self.context - 1)[None]
        # The last real position as an index tensor, not logits_to_keep=1: that slice keeps
        # the chunk's strides, and matmul then copies the whole lm_head weight (seconds on CPU).
        last = torch.tensor([real - 1], device=self.device)
        out = self.model(input_ids=chunk, cache=cache, position_ids=positions,
                         use_cache=True, logits_to_keep=last)
        if padded > real:
            # transformers 5 crop(): a negative count removes that many positions from the end
            # (a positive one, the old "keep this many", raises).
            cache.crop(real - padded)
        return out.logits[:, -1]

    def _prefill_step(self, r: _Request) -> bool:
        """Runs one chunk of r's prompt; True when the prompt is done and r.prefill_token
        chosen."""
        if r.prefill_cache is None:
            r.start()
            r.prefill_cache = DynamicCache(config=self.model.config)
            if self._prefix is not None:
                self._reuse_prefix(r)
        begin = r.prefilled
        chunk = r.prompt_ids[:, begin : min(begin + PREFILL_CHUNK, len(r.prompt))]
        logits = self._prefill_chunk(chunk, r.prefill_cache, begin)
        r.prefilled += chunk.shape[1]
        if r.prefilled < len(r.prompt):
            return False
        r.prefill_token = pick(logits, [r.sampling], [r.prompt_ids]).item()
        return True

    def _admit(self, r: _Request, running: list[_Request]) -> None:
        """Moves a prefilled request (its first token taken) into the next free cache row."""
        row, n = len(running), len(r.prompt)
        self._vacate(row)
        self._kv.reserve(row + 1, r.length)
        self._kv.store_prefill(row, r.prefill_cache)
        self._history[row, :n] = r.prompt_ids[0]
        self._history[row, n] = r.last_token
        r.prefill_cache = r.prompt_ids = None
        running.append(r)

    def _decode_step(self, running: list[_Request]) -> None:
        for i in reversed(range(len(running))):
            if running[i].cancelled.is_set():
                self._remove(running, i).finish("cancelled")
        if not running:
            return
        batch = len(running)
        # Each row's last token and its position, to the device in one copy.
        step = torch.tensor([[r.last_token for r in running], [r.length - 1 for r in running]],
                            device=self.device)
        tokens, positions = step[0][:, None], step[1]
        furthest = max(r.length for r in running)
        self._kv.reserve(batch, furthest)
        logits = None
        if self._fixed is not None:
            try:
                logits = self._fixed(tokens, positions, furthest)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - a GPU that cannot record graphs still serves
                if not self._fixed.record:
                    raise
                log.warning("CUDA graph decoding failed; decoding eagerly from now on",
                            exc_info=True)
                self._fixed = None
        if logits is None:
            logits = decode_logits(self.model, self._kv, tokens, positions, furthest)
        history = self._history[:batch]
        picked = pick(logits, [r.sampling for r in running],
                      [history[i : i + 1, : r.length] if r.sampling.needs_history else None
                       for i, r in enumerate(running)])
        # The batch's new tokens into the id history: one device op, whatever the batch.
        history[self._row_index[:batch], positions + 1] = picked
        for i, token in reversed(list(enumerate(picked.tolist()))):
            if self._finished_after(running[i], token):
                self._remove(running, i)

    def _remove(self, running: list[_Request], i: int) -> _Request:
        """Takes row i out; the last row moves into its place so the rows stay contiguous.
        With the prefix cache, the two rows swap instead, and the gone request's keys/values
        stay in the last row as an entry."""
        gone, last = running[i], running[-1]
        src = len(running) - 1
        keep = gone.kv_len if self._prefix is not None and gone.kv_len >= PREFIX_ALIGN else 0
        if last is not gone:
            if keep:
                self._kv.swap_rows(i, src, keep, last.length - 1)
            else:
                self._kv.move_row(src, i, last.length - 1)
            self._history[i, : last.length] = self._history[src, : last.length]
            running[i] = last
        running.pop()
        if keep:
            self._keep(src, gone.prompt + gone.result.output_ids, keep)
        return gone

    # ---- the prefix cache (prefix_cache.py has the design) ----

    def _reuse_prefix(self, r: _Request) -> None:
        """Starts r's prefill cache with the longest cached prefix of its prompt (a copy of
        the entry's positions), rounded down to a multiple of PREFIX_ALIGN and one short of the
        prompt at most: the last prompt token always runs, its logits give the first token."""
        row, n = self._prefix.match(as_ids(r.prompt))
        n = min(n, len(r.prompt) - 1) // PREFIX_ALIGN * PREFIX_ALIGN
        if n <= 0:
            return
        self._prefix.touch(row)
        self._kv.load_prefix(row, n, r.prefill_cache)
        r.prefilled = r.result.cached_input_token_count = n
        log.debug("prefix cache: %d of %d prompt positions from row %d", n, len(r.prompt), row)

    def _keep(self, row: int, ids: list[int], n: int) -> None:
        """Row `row`, out of the running rows now, holds the keys/values of ids[:n]: it
        becomes an entry (if that is long enough to be reused)."""
        # The last position is where padding rows write (KVRows.prepare_step): never cached.
        n = min(n, self._kv.capacity - 1)
        if n >= PREFIX_ALIGN:
            self._prefix.insert(row, as_ids(ids[:n]))

    def _keep_prefill(self, prompt: list[int], cache: DynamicCache | None, first: int) -> None:
        """Stores a request's prefill cache (a finished or cancelled request that never got a
        row) as an entry, in a spare row at or past `first` (the running rows' end)."""
        if self._prefix is None or cache is None:
            return
        n = cache.get_seq_length()
        if min(n, self._kv.capacity - 1) < PREFIX_ALIGN:
            return
        row = self._spare_row(first)
        if row is None:
            return
        self._kv.reserve(row + 1, n)
        self._kv.store_prefill(row, cache)
        self._keep(row, prompt, n)

    def _row_limit(self) -> int:
        """Rows entries may use: all of a planned cache; max_batch of a growing one."""
        return self._kv.rows if not self._kv.growable else self.max_batch

    def _spare_row(self, first: int, evict: bool = True) -> int | None:
        """A row at or past `first` holding nothing (a growing cache grows by one if it may),
        else, if `evict`, the least recently used entry's row, its entry dropped; else None."""
        limit = self._row_limit()
        for row in range(first, min(self._kv.rows, limit)):
            if row not in self._prefix:
                return row
        row = max(first, self._kv.rows)  # growable: one more row (or up to `first`)
        if row < limit:
            self._kv.reserve(row + 1, 1)
            return row
        oldest = [row for row in self._prefix.lru_rows() if row >= first]
        if not evict or not oldest:
            return None
        self._prefix.pop(oldest[0])
        return oldest[0]

    def _vacate(self, row: int) -> None:
        """Clears `row` for a request about to run there: an entry in it moves to a free row,
        or, with none free, to the least recently used entry's (evicted), unless it is the
        least recently used one itself, which is then dropped."""
        if self._prefix is None or row not in self._prefix:
            return
        dst = self._spare_row(row + 1, evict=False)
        if dst is None:
            if self._prefix.lru_rows()[0] == row:
                self._prefix.pop(row)
                return
            dst = self._spare_row(row + 1)
        self._kv.move_row(row, dst, self._prefix.length(row))
        self._prefix.move(row, dst)

    def _drop_prefix_cache(self) -> None:
        if self._prefix is not None:
            self._prefix.clear()

    def _finished_after(self, r: _Request, token: int) -> bool:
        """Takes r's next token; True when r has finished with it (its stream then closed)."""
        result = r.result
        r.kv_len = r.length  # the step that chose `token` ran every position up to here
        r.last_token_at = time.perf_counter()
        if not result.output_ids and not result.time_to_first_token:
            r.first_token_at = r.last_token_at
            result.time_to_first_token = r.first_token_at - r.submitted
        if token in self.tokenizer.stop_ids:
            return self._end(r, "stop_token")
        result.output_ids.append(token)
        r.last_token = token
        r.length += 1
        r.emit(r.stops.push(r.detok.push(token)))
        if r.stops.stopped:
            r.finish("stop_sequence")
            return True
        if len(result.output_ids) >= result.max_tokens:
            return self._end(r, "max_tokens")
        return False

    @staticmethod
    def _end(r: _Request, reason: str) -> bool:
        """Releases the text held back for UTF-8 or stop matching, then closes the stream."""
        tail = r.stops.push(r.detok.flush())
        r.emit(tail if r.stops.stopped else tail + r.stops.flush())
        r.finish("stop_sequence" if r.stops.stopped else reason)
        return True

    # ---- warm-up (a worker job, with no request running) ----

    def _warm_up(self, prefill: bool) -> WarmUp:
        self._drop_prefix_cache()  # the graphs' recording and the self-check write every row
        report = WarmUp(kv=self.kv_plan)
        start = time.perf_counter()
        if prefill:
            ids = torch.arange(PREFILL_BUCKETS[-1], device=self.device) % 1000 + 100
            for n in PREFILL_BUCKETS:
                self._prefill_chunk(ids[None, :n], DynamicCache(config=self.model.config), 0)
            report.prefill_shapes = len(PREFILL_BUCKETS)
            report.prefill_seconds = self._since(start)
        if self._fixed is not None:
            label = "graphs" if self._fixed.record else "fixed-shape steps"
            try:
                if self._fixed.record:
                    t = time.perf_counter()
                    reserved = torch.cuda.memory_reserved(self.device)
                    report.graphs = self._fixed.record_all()
                    report.graph_seconds = self._since(t)
                    report.graph_pool_bytes = torch.cuda.memory_reserved(self.device) - reserved
                differ = self._self_check()
                problem = differ and f"disagree with eager steps: {differ}"
            except Exception as e:  # noqa: BLE001 - a GPU that cannot record graphs still serves
                log.warning("setting up %s failed", label, exc_info=True)
                problem = f"failed to set up: {type(e).__name__}: {e}"
            if problem:
                # Wrong text must never be served: eager steps from now on, and say why.
                log.warning("decoding eagerly: %s %s", label, problem)
                report.check = f"{label} {problem}; decoding eagerly"
                self._fixed = None
            else:
                report.check = f"{label} give eager steps' greedy tokens"
        report.decode_step = self.decode_step
        report.seconds = self._since(start)
        return report

    def _since(self, t: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t

    def _self_check(self, steps: int = 8) -> str | None:
        """Greedy decoding of a few prompts of different lengths, eager steps first, then the
        fixed-shape path (graph replays on a GPU) fed the same tokens. None when every step
        agrees; else what differed. A step differs when the fixed path's token trails eager's
        by more than 1% of the logits' range (fp16 rounding moves logits by far less; near-ties
        may flip, a broken graph's token is far off) or its logits differ by over 5% (relative
        L2). Leaves the cache rows dirty: run with no request in them."""
        chat = self.tokenizer.build_chat_input
        prompts = [chat([Message("user", "你好")]),
                   chat([Message("user", "Write a long story about a fox. " * 12)]),
                   chat([Message("user", "讲一个很长的故事。" * 40)])][: self.max_batch]
        if not self._kv.growable:  # a planned cache may be shorter than these prompts
            prompts = [p[: max(1, self._kv.capacity - steps)] for p in prompts]
        first, lengths = [], [len(p) for p in prompts]
        for row, ids in enumerate(prompts):
            cache = DynamicCache(config=self.model.config)
            ids_dev = torch.tensor(ids, device=self.device)[None]
            for begin in range(0, len(ids), PREFILL_CHUNK):
                logits = self._prefill_chunk(ids_dev[:, begin : begin + PREFILL_CHUNK], cache,
                                             begin)
            self._kv.reserve(row + 1, len(ids) + steps)
            self._kv.store_prefill(row, cache)
            first.append(int(logits.argmax()))

        def inputs(step: int, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
            positions = [n + step for n in lengths]
            return (torch.tensor(tokens, device=self.device)[:, None],
                    torch.tensor(positions, device=self.device), max(positions) + 1)

        eager, tokens = [], first
        for step in range(steps):
            logits = decode_logits(self.model, self._kv, *inputs(step, tokens)).float()
            eager.append((tokens, logits))
            tokens = logits.argmax(-1).tolist()
        for step, (tokens, ref) in enumerate(eager):
            got = self._fixed(*inputs(step, tokens)).float()
            picked = got.argmax(-1)
            top = ref.max(-1).values
            trails = top - ref.gather(-1, picked[:, None])[:, 0]
            spread = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
            for row in range(len(prompts)):
                if (trails[row] > 0.01 * (top[row] - ref[row].min())
                        or spread[row] > 0.05 or not torch.isfinite(got[row]).all()):
                    return (f"step {step + 1}, row {row + 1}: token {int(picked[row])} where "
                            f"eager steps pick {int(ref[row].argmax())}, logits "
                            f"{float(spread[row]):.1%} apart")
        return None

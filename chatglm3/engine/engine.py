"""The generation engine: chat messages in, a stream of text deltas and a final record out.

The glue and the public API over scheduler.py (who runs), rows.py (which KV row holds what),
model_runner.py (every tensor) and output.py (text and stop rules); scheduler.py also says why
this is not transformers' own continuous batching.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..weights.checkpoint import load_model
from ..devices import resolve_device, resolve_dtype
from ..errors import InputError, OutOfMemory, PromptTooLong, RequestTooLarge
from ..model.kv_rows import KVPlan
from ..openmp import in_passing_thread
from ..model.model_runner import (DECODE_STEPS, PREFILL_BUCKETS, PREFILL_CHUNK, ModelRunner,
                           prefill_bucket)
from .output import Generation, GenerationResult, OutputProcessor, OutputStream
from ..params import SamplingParams
from ..model.quantize import compute_dtype, model_mode, weight_bytes
from .rows import RowAllocator
from ..model.grammar import Grammars
from ..model.sampling import RequestSampling
from .scheduler import Request, Scheduler
from .steps import Steps
from ..settings import DEFAULT_MAX_BATCH, PREFILL_BUDGET
from ..text.tokenizer import ChatGLMTokenizer, Message
from ..model.warmup import WarmUp, warm_up

__all__ = ["DECODE_STEPS", "DEFAULT_MAX_BATCH", "Engine", "EngineStats", "Generation",
           "GenerationResult", "OutOfMemory", "PREFILL_BUCKETS", "PREFILL_CHUNK",
           "PREFILL_BUDGET", "PromptTooLong", "RequestTooLarge", "WarmUp", "prefill_bucket"]

# With the prefix cache on, a planned KV cache takes up to this many rows beyond max_batch (as
# many as its budget holds) to keep finished requests' keys/values in; every lookup compares
# the input with each entry (numpy, ~30 us per 32k-id entry).
MAX_PREFIX_ROWS = 256

log = logging.getLogger("chatglm3.engine")  # the engine's log: what operators watch


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's sizes, for tests, benches and a server's stats view."""

    max_batch: int
    kv_rows: int  # rows the KV cache has now (a growing one adds them on demand)
    kv_capacity: int  # positions per row now
    kv_growable: bool
    decode_step: str
    waiting: int
    running: int
    prefix_entries: int
    decode_steps: int  # decoding steps run since the start
    decoded_tokens: int  # tokens those steps made: / decode_steps = the mean batch
    prefilling: int = 0  # requests whose prompts run (not counted in `running`)
    kv_used: int = 0  # KV positions held: the running requests' and the prefilled ones'


class Engine:
    """Runs ChatGLM3 generations on one model; concurrent requests share each decoding step.

    A worker thread runs every step: the scheduler (scheduler.py, host only) plans it, the
    model runner (model_runner.py, every tensor) runs it, the output processor (output.py)
    turns its tokens into text and stop decisions, and the row allocator (rows.py) owns which
    KV cache row holds what. This class is the glue and the public API.

    `decode_step`: "eager" runs each decoding step as it comes; "graphs" replays it as a CUDA
    graph (padded to fixed shapes, see decode_graphs); "auto" is "graphs" on a GPU and "eager"
    elsewhere. (The test-only "fixed" runs the graphs' shapes without recording.)
    `prefill_budget`: prompt tokens per step while other requests decode.

    The KV cache: on a GPU planned once from the memory left after the weights and a measured
    prefill peak (kv_rows.plan_kv); `kv_budget_bytes` sets its size instead; without either
    (the CPU default) it grows on demand. With a planned cache `max_batch` is at most its rows,
    a request runs once a row is free, first in, first out (scheduler.py), and one no row could
    hold is refused at once with RequestTooLarge.

    The prefix cache (`prefix_cache`; None = on with a CUDA device, off elsewhere): finished or
    cancelled requests' keys/values stay in their rows and later requests reuse the longest
    cached prefix (GenerationResult.cached_input_token_count says how much); a planned cache
    then takes up to max_batch + MAX_PREFIX_ROWS rows. rows.py and prefix_cache.py have the
    design.

    Call `warm_up()` once before serving (setup): it meets every prefill shape, records the
    decoding graphs and checks them against eager steps.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: ChatGLMTokenizer,
                 max_batch: int = DEFAULT_MAX_BATCH, decode_step: str = "auto",
                 kv_budget_bytes: int | None = None, prefix_cache: bool | None = None,
                 prefill_budget: int = PREFILL_BUDGET) -> None:
        if not isinstance(prefill_budget, int) or not 1 <= prefill_budget <= PREFILL_CHUNK:
            raise ValueError(f"prefill_budget: expected an integer from 1 to {PREFILL_CHUNK}, "
                             f"got {prefill_budget!r}")
        self.model = model
        self.tokenizer = tokenizer
        # The weights as stored (int8/int4 as packed): what the GPU's KV plan subtracts.
        self.quantize, self.weight_bytes = model_mode(model), weight_bytes(model)
        if prefix_cache is None:
            # Off on a CPU: there a grown cache is never given back, and entries would keep up
            # to max_batch rows at the longest length seen (tests and benches turn it on).
            prefix_cache = next(model.parameters()).device.type == "cuda"
        rows_wanted = max_batch + (MAX_PREFIX_ROWS + 1 if prefix_cache else 0)
        self.runner = ModelRunner(model, tokenizer.pad_id, max_batch, decode_step,
                                  kv_budget_bytes, rows_wanted)
        plan = self.runner.kv_plan
        limit = plan.rows if plan is not None else max_batch
        # Padding rows of fixed-shape steps need a row of their own once rows past the running
        # ones hold prefix cache entries: a planned cache gives up its last row for it, a
        # growing one adds one (rows.py, invariant 3). One row alone never pads.
        scratch = None
        if prefix_cache and self.runner.wanted_step != "eager" and min(max_batch, limit) > 1:
            if plan is not None:
                limit -= 1
            scratch = limit
        self.max_batch = min(max_batch, limit)
        # Off the caller's thread: its zero-filled tensors would give it an OpenMP team.
        in_passing_thread(lambda: self.runner.allocate(self.max_batch, scratch))
        kv = self.runner.kv
        self.rows = RowAllocator(limit, lambda: kv.capacity, lambda: kv.rows, prefix_cache,
                                 scratch=scratch)
        self.scheduler = Scheduler(self.rows, self.max_batch, PREFILL_CHUNK, prefill_budget,
                                   pack=self.runner.packs)
        self.output = OutputProcessor(tokenizer)
        self.grammars = Grammars(tokenizer)  # structured output's compiler (built on first use)
        self.steps = Steps(self.scheduler, self.rows, self.runner, self.output)
        self._incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._pending = 0
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()  # run by the worker
        self._worker: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, device: str | torch.device = "auto",
                        dtype: str | torch.dtype = "auto", progress: bool = False,
                        quantize: str = "none", **kwargs) -> "Engine":
        """Loads a checkpoint; `progress`: download and per-shard progress on stderr;
        `quantize`: none | int8 | int4 weight-only quantization at load (quantize.py).

        `model_dir` takes what the CLI's --weights takes: a checkpoint folder (relative to the
        current directory), None for the official 32k weights (fetched into the repository's
        weights/ if not there yet), a hub repo id "owner/name[@revision]", or the https URL of
        a .tar/.tar.gz. The device is checked before anything is fetched."""
        from ..weights.download import resolve_weights
        from ..model.quantize import check_mode

        dev = device if isinstance(device, torch.device) else resolve_device(device)
        dt = compute_dtype(check_mode(quantize), dev, resolve_dtype(dtype, dev))
        model_dir = resolve_weights(model_dir, progress=progress)
        model = load_model(model_dir, dev, dt, progress=progress, quantize=quantize)
        return cls(model, ChatGLMTokenizer.from_dir(model_dir), **kwargs)

    # ---- what it is ----

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def context(self) -> int:
        """The context window in tokens (the model's max_position_embeddings)."""
        return self.runner.context

    @context.setter
    def context(self, n: int) -> None:  # tests: the same arithmetic on a shorter context
        self.runner.context = n

    @property
    def kv_plan(self) -> KVPlan | None:
        """The KV cache as planned once (None: a cache that grows on demand)."""
        return self.runner.kv_plan

    @property
    def prefix_cache(self) -> bool:
        """Whether finished requests' keys/values are kept for later requests to reuse."""
        return self.rows.prefix is not None

    @property
    def decode_step(self) -> str:
        """What runs decoding steps now: graphs | fixed | eager (graphs fall back to eager
        when recording fails or their self-check disagrees)."""
        return self.runner.decode_step

    def stats(self) -> EngineStats:
        """Sizes now (from any thread; a snapshot, exact once the engine is idle)."""
        kv = self.runner.kv
        return EngineStats(self.max_batch, kv.rows, kv.capacity, kv.growable, self.decode_step,
                           len(self.scheduler.waiting) + self._pending,
                           len(self.scheduler.running),
                           len(self.rows.prefix) if self.rows.prefix is not None else 0,
                           self.steps.decode_steps, self.steps.decoded_tokens,
                           len(self.scheduler.prefilling),
                           sum(r.length for r in list(self.scheduler.running))
                           + sum(r.prefilled for r in list(self.scheduler.prefilling)))

    def prefix_cache_entries(self) -> list[tuple[int, int]]:
        """The cached entries as (cache row, positions held), least recently used first.
        Runs on the worker thread once no request is running or prefilling (for tests and
        debugging; it waits for the engine to be idle)."""
        if self.rows.prefix is None:
            return []
        return self._on_worker(self.rows.entries)

    # ---- requests ----

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The chat input ids; PromptTooLong if they cannot fit the context. A text too long to
        fit is rejected from its length alone, before any tokenizing (which costs ~0.3 s/MB)."""
        chars = sum(len(m.content) + len(m.metadata) for m in messages)
        return self._fitting(self.tokenizer.min_chat_tokens(messages), chars,
                             lambda: self.tokenizer.build_chat_input(messages))

    def encode_plain(self, text: str) -> list[int]:
        """A text's ids as the official `encode` gives them (`[gMASK] sop`, then the text; no
        chat format, for plain continuation), checked against the context as `encode` is."""
        return self._fitting(self.tokenizer.min_tokens(text), len(text),
                             lambda: self.tokenizer.encode(text))

    def _fitting(self, bound: int, chars: int, tokenize: Callable[[], list[int]]) -> list[int]:
        if bound >= self.context:
            raise PromptTooLong(bound, self.context, chars=chars)
        ids = tokenize()
        if len(ids) >= self.context:
            raise PromptTooLong(len(ids), self.context)
        return ids

    def generate(self, messages: Sequence[Message],
                 params: SamplingParams | None = None) -> Generation:
        """Validates the request now (raising PromptTooLong / SettingsError) and queues it."""
        return self.submit(self.prepare_messages(messages, params or SamplingParams()))

    def generate_ids(self, ids: Sequence[int], params: SamplingParams | None = None) -> Generation:
        """Queues a request given as chat input ids (see `encode`); RequestTooLarge at once if
        no cache row as planned could ever hold it."""
        return self.submit(self.prepare(ids, params or SamplingParams()))

    # A request's checks, in the one order every path takes: the settings (SamplingParams,
    # checked when built and immutable), the conversation's size, the KV row.
    # prepare*() may run on any thread (predict.py tokenizes off its event loop); submit()
    # queues what they made.

    def prepare_messages(self, messages: Sequence[Message], params: SamplingParams) -> Request:
        """A checked request for a conversation, not queued yet (see `submit`)."""
        return self._build(self.encode(messages), params)

    def prepare(self, ids: Sequence[int], params: SamplingParams) -> Request:
        """A checked request for chat input ids, not queued yet (see `submit`)."""
        return self._build(list(ids), params)

    def _build(self, ids: list[int], params: SamplingParams) -> Request:
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
        for name, token in params.token_ids():
            if token >= self.tokenizer.vocab_size:
                raise InputError(f"{name}: token id {token} is past the vocabulary (ids are 0 "
                                 f"to {self.tokenizer.vocab_size - 1})", name)
        result = GenerationResult(input_ids=ids, input_token_count=len(ids),
                                  max_tokens=max_tokens, max_tokens_cut=params.max_tokens > room)
        # What ends this answer: the model's end tokens (unless ignore_eos), and its own.
        stop_ids = frozenset(params.stop_token_ids).union(
            () if params.ignore_eos else self.tokenizer.stop_ids)
        constraint = None if params.structured is None else self.grammars.constraint(
            params.structured)
        sampling = RequestSampling(params, prompt_len=len(ids), stop_ids=stop_ids,
                                   constraint=constraint)
        result.seed = sampling.seed
        stream = OutputStream(self.tokenizer, result, params.stop, stop_ids)
        return Request(ids, stream, sampling, output_ids=result.output_ids,
                       whole_prompt=params.prompt_logprobs is not None)

    def submit(self, request: Request) -> Generation:
        """Queues a prepared request; its stream."""
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

        def job() -> WarmUp:
            self.rows.drop_entries()  # the recordings and the self-check write every row
            return warm_up(self.runner, self.tokenizer, prefill)

        report = self._on_worker(job)
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

    # ---- the worker thread ----

    def _serve(self) -> None:
        sched = self.scheduler
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._pending or sched.has_work() or self._jobs or self._closed):
                        self._wake.wait()
                    if self._closed:
                        break
                    while self._pending:
                        sched.add(self._incoming.get())
                        self._pending -= 1
                    job = self._jobs[0] if self._jobs else None
                plan = sched.schedule(start=job is None)  # jobs wait for an idle engine
                for r in plan.cancelled:
                    r.output.finish("cancelled")
                if job is not None and not sched.busy():
                    with self._wake:
                        self._jobs.popleft()
                    self._run_job(*job)
                    continue
                self.steps.run(plan)
                if not sched.has_work() and not self.rows.holds_entries():
                    self.runner.idle()
        for r in sched.drain():
            r.tensors = None
            r.output.finish("cancelled")
        while not self._incoming.empty():
            self._incoming.get().output.finish("cancelled")
        for _, job in self._jobs:
            job.set_exception(RuntimeError("engine closed"))

    @staticmethod
    def _run_job(fn: Callable[[], object], job: Future) -> None:
        try:
            job.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller waiting on it
            job.set_exception(e)

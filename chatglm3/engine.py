"""The generation engine: chat messages in, a stream of text deltas and a final record out."""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from .checkpoint import load_model
from .decode_graphs import FixedShapeDecoder
from .devices import resolve_device, resolve_dtype
from .kv_rows import KVRows, decode_logits
from .params import SamplingParams
from .sampling import Sampler, pick
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
# every step, but SDPA keeps no per-shape state: measured flat.) Cost: at most 50% more work on
# the last chunk, and in fp32 the real positions' results move by rounding (~1e-6 relative):
# SDPA's CPU kernel blocks the work by query length.
PREFILL_BUCKETS = _prefill_buckets()


def prefill_bucket(n: int) -> int:
    """The padded length for a chunk of n (1 <= n <= PREFILL_CHUNK) prompt tokens."""
    return next(b for b in PREFILL_BUCKETS if b >= n)


DEFAULT_MAX_BATCH = 8
DECODE_STEPS = ("auto", "eager", "fixed", "graphs")

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


@dataclass
class GenerationResult:
    """What a finished (or cancelled) generation did."""

    text: str = ""
    input_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""  # stop_token | stop_sequence | max_tokens | cancelled
    input_token_count: int = 0
    output_token_count: int = 0
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0
    max_tokens: int = 0  # the limit applied, after cutting to the room left in the context
    max_tokens_cut: bool = False
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class _Request:
    """One request's state, owned by the engine's worker thread once submitted."""

    def __init__(self, prompt: list[int], sampler: Sampler, result: GenerationResult,
                 tokenizer: ChatGLMTokenizer, device: torch.device) -> None:
        self.prompt, self.sampler, self.result = prompt, sampler, result
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(sampler.params.stop)
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # str deltas, then _END or an error
        self.cancelled = threading.Event()
        self.pieces: list[str] = []
        self.submitted = time.perf_counter()
        self.first = self.last = self.submitted
        self.device = device
        self.ids: torch.Tensor | None = None  # made by the worker: see start()
        self.n = len(prompt)
        self.prefill_cache: DynamicCache | None = None
        self.prefilled = 0
        self.first_token: int | None = None
        self.wake: Callable[[], None] | None = None  # set by an asyncio consumer

    def start(self) -> None:
        """Puts the prompt on the device, from the worker thread (so no other thread touches
        the GPU while the worker records a CUDA graph)."""
        # All ids so far, preallocated: the repetition penalty reads it without regrowing it.
        self.ids = torch.empty(1, self.n + self.result.max_tokens, dtype=torch.long,
                               device=self.device)
        self.ids[0, : self.n] = torch.tensor(self.prompt)

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
        span = self.last - self.first
        r.tokens_per_second = decoded / span if decoded > 0 and span > 0 else 0.0
        self.prefill_cache = None
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
        """Stops this request's forward passes before its next step (from any thread)."""
        self._request.cancelled.set()

    def text(self) -> str:
        """Runs to the end and returns the whole text."""
        return "".join(self)


class Engine:
    """Runs ChatGLM3 generations on one model; concurrent requests share each decoding step.

    A worker thread owns the model. Each step it runs one prefill chunk of a waiting request (so
    a long prompt does not stall the others) and one decoding step for every running request.
    `decode_step`: "eager" runs each decoding step as it comes; "graphs" replays it as a CUDA
    graph (padded to fixed shapes); "fixed" uses those fixed shapes without graphs (to test
    them on CPU); "auto" is "graphs" on a GPU and "eager" elsewhere.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: ChatGLMTokenizer,
                 max_batch: int = DEFAULT_MAX_BATCH, decode_step: str = "auto") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context = model.config.max_position_embeddings
        self.max_batch = max_batch
        cfg = model.config
        self._kv = KVRows(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                          self.device, next(model.parameters()).dtype)
        if decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step: expected one of {', '.join(DECODE_STEPS)}, "
                             f"got {decode_step!r}")
        if decode_step == "auto":
            decode_step = "graphs" if self.device.type == "cuda" else "eager"
        if decode_step == "graphs" and self.device.type != "cuda":
            raise ValueError("decode_step: graphs needs a CUDA device")
        self._fixed = None if decode_step == "eager" else FixedShapeDecoder(
            model, self._kv, max_batch, record=decode_step == "graphs")
        self._incoming: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._pending = 0
        self._worker: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "auto",
                        dtype: str | torch.dtype = "auto", **kwargs) -> "Engine":
        dev = resolve_device(device)
        model = load_model(model_dir, dev, resolve_dtype(dtype, dev))
        return cls(model, ChatGLMTokenizer.from_dir(model_dir), **kwargs)

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
        """Queues a request given as chat input ids (see `encode`)."""
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
        result = GenerationResult(input_ids=ids, input_token_count=len(ids),
                                  max_tokens=min(params.max_tokens, room),
                                  max_tokens_cut=params.max_tokens > room)
        sampler = Sampler(params)
        result.seed = sampler.seed
        request = _Request(ids, sampler, result, self.tokenizer, self.device)
        self._start_worker()
        with self._wake:
            self._incoming.put(request)
            self._pending += 1
            self._wake.notify()
        return Generation(request)

    def close(self) -> None:
        """Stops the worker thread (requests still running end as cancelled)."""
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
        prefilling: _Request | None = None
        running: list[_Request] = []
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._pending or prefilling or running or self._closed):
                        self._wake.wait()
                    if self._closed:
                        break
                    if prefilling is None and self._pending and len(running) < self.max_batch:
                        prefilling = self._incoming.get()
                        self._pending -= 1
                if prefilling is not None:
                    r = prefilling
                    try:
                        if r.cancelled.is_set():
                            prefilling = None
                            r.finish("cancelled")
                        elif self._prefill_step(r):
                            prefilling = None
                            if not self._accept(r, r.first_token):
                                self._admit(r, running)
                    except Exception as e:  # noqa: BLE001 - reported to the request, serving goes on
                        prefilling = None
                        r.finish("error", e)
                if running:
                    try:
                        self._decode_step(running)
                    except Exception as e:  # noqa: BLE001
                        for r in running:
                            r.finish("error", e)
                        running.clear()
        for r in running + ([prefilling] if prefilling else []):
            r.finish("cancelled")

    def _prefill_step(self, r: _Request) -> bool:
        """Runs one chunk of r's prompt; True when the prompt is done and r.first_token chosen."""
        if r.prefill_cache is None:
            r.start()
            r.prefill_cache = DynamicCache(config=self.model.config)
        begin = r.prefilled
        chunk = r.ids[:, begin : min(begin + PREFILL_CHUNK, len(r.prompt))]
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
        out = self.model(input_ids=chunk, cache=r.prefill_cache, position_ids=positions,
                         use_cache=True, logits_to_keep=last)
        if padded > real:
            # transformers 5 crop(): a negative count removes that many positions from the end
            # (a positive one, the old "keep this many", raises).
            r.prefill_cache.crop(real - padded)
        r.prefilled += real
        if r.prefilled < len(r.prompt):
            return False
        r.first_token = pick(out.logits[:, -1], [r.sampler], [r.ids[:, : r.n]])[0]
        return True

    def _admit(self, r: _Request, running: list[_Request]) -> None:
        """Moves a prefilled request into the next free row of the shared cache."""
        row = len(running)
        self._kv.reserve(row + 1, r.n)
        self._kv.store_prefill(row, r.prefill_cache)
        r.prefill_cache = None
        running.append(r)

    def _decode_step(self, running: list[_Request]) -> None:
        for i in reversed(range(len(running))):
            if running[i].cancelled.is_set():
                self._remove(running, i).finish("cancelled")
        if not running:
            return
        tokens = torch.stack([r.ids[0, r.n - 1] for r in running])[:, None]
        furthest = max(r.n for r in running)
        positions = torch.tensor([r.n - 1 for r in running], device=self.device)
        self._kv.reserve(len(running), furthest)
        logits = None
        if self._fixed is not None:
            try:
                logits = self._fixed(tokens, positions)
            except Exception:  # noqa: BLE001 - a GPU that cannot record graphs still serves
                if not self._fixed.record:
                    raise
                log.warning("CUDA graph decoding failed; decoding eagerly from now on",
                            exc_info=True)
                self._fixed = None
        if logits is None:
            logits = decode_logits(self.model, self._kv, tokens, positions, furthest)
        picked = pick(logits, [r.sampler for r in running],
                      [r.ids[:, : r.n] if r.sampler.penalty else None for r in running])
        for i in reversed(range(len(running))):
            if self._accept(running[i], picked[i]):
                self._remove(running, i)

    def _remove(self, running: list[_Request], i: int) -> _Request:
        """Takes row i out; the last row moves into its place so the rows stay contiguous."""
        gone, last = running[i], running[-1]
        if last is not gone:
            self._kv.move_row(len(running) - 1, i, last.n - 1)
            running[i] = last
        running.pop()
        return gone

    def _accept(self, r: _Request, token: int) -> bool:
        """Takes r's next token; True when r has finished (its stream is then closed)."""
        result = r.result
        r.last = time.perf_counter()
        if not result.output_ids and not result.time_to_first_token:
            r.first = r.last
            result.time_to_first_token = r.first - r.submitted
        if token in self.tokenizer.stop_ids:
            return self._end(r, "stop_token")
        result.output_ids.append(token)
        r.ids[0, r.n] = token
        r.n += 1
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

"""The output processor: sampled token ids in, streamed text and a final record out.

Per request it keeps the detokenizer, the stop-string matcher, the result (GenerationResult)
and its timings, and the queue its consumer reads. `take(request, token)` applies the stop
rules (stop tokens end a request without entering its output; stop strings cut the text right
before them; max_tokens) and says whether the request is done. (min_tokens acts earlier, on
the logits: sampling.RequestSampling.adjust holds stop tokens back until that many are out.)

Where it runs: on the engine's step thread, right after each decoding step, for every row.
Why not off it (vLLM's frontend process): its share of a step is small next to the step
itself (bench/output_share.py; the measured share is in docs/benchmarks.md), and a
separate thread would need a hand-off per token and still the GIL; running it inline keeps a
request's stop decision in the same step that sampled the token, so a stopped request never
runs one step more.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator, Sequence

from ..model.sampling import TokenLogprob
from ..text.streaming import IncrementalDetokenizer, StopMatcher
from ..text.tokenizer import ChatGLMTokenizer

if TYPE_CHECKING:
    from .scheduler import Request


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
    # Per output token (SamplingParams.logprobs set): its log-probability and alternatives.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Per prompt token (SamplingParams.prompt_logprobs set): None for the first (nothing
    # before it), then each one's log-probability given those before it.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Delta:
    """A piece of a request's text, and how many output tokens had been taken when it was
    released (the tokens behind the text so far: result.output_ids[:tokens], and
    result.logprobs[:tokens] when asked for)."""

    text: str
    tokens: int


_END = object()


class OutputStream:
    """One request's text on its way out: deltas in a queue its consumer reads (from any
    thread; an asyncio consumer sets `wake`), then _END or an error."""

    def __init__(self, tokenizer: ChatGLMTokenizer, result: GenerationResult,
                 stop: list[str], stop_ids: frozenset[int] | None = None) -> None:
        self.result = result
        # The ids that end it (default: the model's end tokens).
        self.stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(stop)
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.pieces: list[str] = []
        self.submitted = time.perf_counter()
        self.first_token_at = self.last_token_at = self.submitted
        self.wake: Callable[[], None] | None = None
        self.on_finish: list[Callable[[GenerationResult], None]] | None = []  # None: ended
        self.lock = threading.Lock()

    def emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.out.put(Delta(text, len(self.result.output_ids)))
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
        self.out.put(error if error is not None else _END)
        if self.wake is not None:
            self.wake()
        with self.lock:
            callbacks, self.on_finish = self.on_finish or [], None
        for fn in callbacks:
            fn(r)


class OutputProcessor:
    """Stop rules and text for every request (the step thread alone calls `take`)."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer

    @staticmethod
    def reused(r: "Request", n: int) -> None:
        """r's prefill starts from n prompt positions of the prefix cache (its result says so)."""
        r.output.result.cached_input_token_count = n

    @staticmethod
    def scored(r: "Request", scores: list[TokenLogprob]) -> None:
        """The next prompt tokens' log-probabilities (a prefill chunk's, in prompt order)."""
        done = r.output.result.prompt_logprobs
        if not done:
            done.append(None)
        done.extend(scores)

    def take(self, r: "Request", token: int, logprob: TokenLogprob | None = None) -> bool:
        """r's next token (with its log-probabilities if r asks for them); True when r has
        finished with it (its stream then closed)."""
        s: OutputStream = r.output
        result = s.result
        s.last_token_at = time.perf_counter()
        if not result.output_ids and not result.time_to_first_token:
            s.first_token_at = s.last_token_at
            result.time_to_first_token = s.first_token_at - s.submitted
        if result.max_tokens == 0:  # the prompt scored, nothing to generate
            return self._end(s, "max_tokens")
        if token in s.stop_ids:
            return self._end(s, "stop_token")
        r.take(token)  # into result.output_ids: the request's list is the result's
        if logprob is not None:
            result.logprobs.append(logprob)
        s.emit(s.stops.push(s.detok.push(token)))
        if s.stops.stopped:
            s.finish("stop_sequence")
            return True
        if len(result.output_ids) >= result.max_tokens:
            return self._end(s, "max_tokens")
        return False

    @staticmethod
    def _end(s: OutputStream, reason: str) -> bool:
        """Releases the text held back for UTF-8 or stop matching, then closes the stream."""
        tail = s.stops.push(s.detok.flush())
        s.emit(tail if s.stops.stopped else tail + s.stops.flush())
        s.finish("stop_sequence" if s.stops.stopped else reason)
        return True


class Generation:
    """One request's stream: iterate (or async-iterate) for text deltas; `result` when done."""

    def __init__(self, request: "Request") -> None:
        self._request = request
        self._stream: OutputStream = request.output
        self.result = self._stream.result
        self.done = False  # the end has been read (by `ready`)
        self._error: BaseException | None = None  # read, to raise on the next `ready`

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._stream.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item.text
        finally:  # a consumer that walks away stops the computation too
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        """Async iteration over the text deltas (see `deltas`)."""
        async with aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                yield delta.text

    async def deltas(self) -> AsyncIterator[Delta]:
        """The deltas with their token counts, on an event loop (see `merge`)."""
        async with aclosing(merge([self])) as events:
            async for _, delta in events:
                if delta is not None:
                    yield delta

    def notify(self, wake: Callable[[], None]) -> None:
        """Calls `wake` (from the worker thread) whenever something new is ready; for consumers
        that wait on many generations at once (a server's n choices)."""
        self._stream.wake = wake
        if not self._stream.out.empty():
            wake()

    def ready(self) -> list[Delta]:
        """The deltas released since the last call, without waiting; `done` is True once the
        end has been read. Raises the request's error at its end, if it failed."""
        out: list[Delta] = []
        while not self.done:
            item = self._error
            if item is None:
                try:
                    item = self._stream.out.get_nowait()
                except queue.Empty:
                    break
            if isinstance(item, BaseException):
                if out:  # the text before the error first; the error on the next call
                    self._error = item
                    break
                self.done = True
                raise item
            if item is _END:
                self.done = True
            else:
                out.append(item)
        return out

    def add_done_callback(self, fn: Callable[[GenerationResult], None]) -> None:
        """Calls fn(result) once the request has ended (on the worker thread: keep it short)."""
        s = self._stream
        with s.lock:
            if s.on_finish is not None:
                s.on_finish.append(fn)
                return
        fn(self.result)

    def cancel(self) -> None:
        """Stops this request's forward passes before its next step, or takes it out of the
        queue if it is still waiting for a cache row (from any thread)."""
        self._request.cancelled.set()

    def text(self) -> str:
        """Runs to the end and returns the whole text."""
        return "".join(self)


async def merge(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Delta | None]]:
    """The deltas of one or many generations (a server's n choices) as they come, on an event
    loop: (index, delta), then (index, None) at each one's end. The worker thread wakes one
    event for all of them; no thread waits per stream. Every generation is cancelled when the
    consumer stops early (a client gone); a failed one raises its error."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    for g in gens:
        g.notify(lambda: loop.call_soon_threadsafe(ready.set))
    live = set(range(len(gens)))
    try:
        while live:
            ready.clear()
            got = False
            for i in sorted(live):
                for delta in gens[i].ready():
                    got = True
                    yield i, delta
                if gens[i].done:
                    got = True
                    live.discard(i)
                    yield i, None
            if not got:
                await ready.wait()
    finally:
        for g in gens:
            g.cancel()

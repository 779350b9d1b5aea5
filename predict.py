"""Cog entry point: a thin adapter from Cog's HTTP inputs to `chatglm3.engine.Engine`.

The work (weights, tokenizer, batching, sampling, stop strings, limits) lives in `chatglm3/`;
this file only maps inputs, streams the engine's text deltas and records metrics.

How run() is shaped, and why (coglet 0.23.1, the server inside the image):
  * more than one prediction at a time needs an `async def` run();
  * but coglet collects an async *generator* into a list and sends it when it ends, so nothing
    would stream; what it streams item by item is a plain generator. So run() is a coroutine
    that checks the request, queues it in the engine and returns a plain generator, which
    coglet drains in the prediction's own slot thread (blocking there, not on the event loop);
  * coglet cancels an async prediction only through the future of that coroutine, which is
    already done by then. `_relay_cancel()` makes that cancel() also stop the engine's
    generation (see there); a CancelationException or a closed generator stops it as well;
  * the generator runs in a copy of the coroutine's context, which carries this prediction's
    log and metric routing (coglet keeps them in context variables).

Environment (besides what chatglm3.download reads: CHATGLM3_REVISION, CHATGLM3_WEIGHTS_DIR,
HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE):
  COG_WEIGHTS          checkpoint: a directory, hub repo id "owner/name[@rev]" or .tar URL
                       (Cog passes it to setup(weights=...); unset = the default hub repo)
  COG_MAX_CONCURRENCY  predictions at once = the engine's batch size (default CONCURRENCY)
  CHATGLM3_DEVICE      auto | cpu | cuda (default auto)
  CHATGLM3_DTYPE       auto | float16 | bfloat16 | float32 (default auto: fp16 on GPU)
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import time
from typing import Callable, Iterator, Optional

import cog
from cog import BaseRunner, CancelationException, ConcatenateIterator, Input

from chatglm3.download import resolve_weights
from chatglm3.engine import Engine, Generation
from chatglm3.messages import build_messages
from chatglm3.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingParams

CONCURRENCY = 8  # keep equal to cog.yaml's concurrency.max (tests/test_cog_schema.py checks)
CONTEXT = 32768  # ChatGLM3-6B-32K's context window, in tokens
SEED_MAX = 2**63 - 1

HISTORY_HELP = (
    "Earlier turns as JSON text, oldest first; empty = none. Either a list of messages "
    '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "...", '
    '"metadata": "..."}] (roles: system, user, assistant, observation; "metadata" is optional; '
    'only a first system message may carry "tools"), or a list of [question, answer] pairs '
    '[["q1", "a1"], ["q2", "a2"]]. The two forms may be mixed item by item.'
)
STOP_HELP = (
    "Comma-separated strings that end the answer where they first appear (they are not part "
    "of the output), e.g. 'Observation:,User:'. Escapes: \\, is a comma inside a stop "
    "string, \\n a newline, \\t a tab, \\\\ a backslash; anything else, spaces included, "
    "is kept as typed. Empty = none (the model's own end tokens always stop it)."
)


def parse_stop_sequences(text: str) -> list[str]:
    """'a,b\\,c' -> ['a', 'b,c']. Commas split; backslash escapes: \\, \\n \\t \\\\.

    A backslash before any other character is kept as is; empty items are dropped.
    """
    escapes = {",": ",", "n": "\n", "t": "\t", "\\": "\\"}
    items, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in escapes:
            cur.append(escapes[text[i + 1]])
            i += 2
            continue
        if ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return [s for s in items if s]


def _concurrency() -> int:
    raw = os.environ.get("COG_MAX_CONCURRENCY", "").strip()
    try:
        return max(1, int(raw)) if raw else CONCURRENCY
    except ValueError:
        print(f"COG_MAX_CONCURRENCY={raw!r} is not an integer; using {CONCURRENCY}", flush=True)
        return CONCURRENCY


# Cancel callbacks of the prediction whose coroutine is being submitted (see _relay_cancel).
_CANCEL_HOOKS: contextvars.ContextVar[list[Callable[[], object]] | None] = contextvars.ContextVar(
    "chatglm3_cancel_hooks", default=None)


def _relay_cancel() -> None:
    """Lets a cancel request reach a prediction whose run() coroutine has already returned.

    coglet submits each async prediction with `asyncio.run_coroutine_threadsafe(coro, loop)` and
    cancels it with `future.cancel()` on the future that returns; once run() has returned its
    generator that future is done and cancel() does nothing. Wrapped here (once per process):
    each future gets a list of callbacks, visible to run() through a context variable (the task
    running the coroutine starts from a copy of the submitting thread's context), and its
    cancel() calls them before doing what it did. If a coglet version submits another way, the
    hooks stay unset and nothing else changes.
    """
    original = asyncio.run_coroutine_threadsafe
    if getattr(original, "_chatglm3_relay", False):
        return

    def run_coroutine_threadsafe(coro, loop):
        hooks: list[Callable[[], object]] = []
        token = _CANCEL_HOOKS.set(hooks)
        try:
            future = original(coro, loop)
        finally:
            _CANCEL_HOOKS.reset(token)
        plain_cancel = future.cancel

        def cancel() -> bool:
            for hook in list(hooks):
                hook()
            return plain_cancel()

        future.cancel = cancel
        return future

    run_coroutine_threadsafe._chatglm3_relay = True  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe = run_coroutine_threadsafe


def _in_context(ctx: contextvars.Context, items: Iterator[str]) -> Iterator[str]:
    """`items`, with every step (and the final close) run inside `ctx`."""
    try:
        while True:
            try:
                item = ctx.run(next, items)
            except StopIteration:
                return
            yield item
    finally:
        ctx.run(items.close)


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        """Fetches/verifies the checkpoint, loads it, and runs a 2-token warm-up."""
        _relay_cancel()
        t0 = time.perf_counter()
        source = weights or None
        print(f"weights: {source or 'default hub repository'}", flush=True)
        path = resolve_weights(source, progress=sys.stderr.isatty())
        t1 = time.perf_counter()
        max_batch = _concurrency()
        self.engine = Engine.from_pretrained(
            path,
            device=os.environ.get("CHATGLM3_DEVICE", "auto"),
            dtype=os.environ.get("CHATGLM3_DTYPE", "auto"),
            max_batch=max_batch,
            decode_step=os.environ.get("CHATGLM3_DECODE_STEP", "auto"),
        )
        t2 = time.perf_counter()
        warm = self.engine.generate(build_messages("你好"), SamplingParams(max_tokens=2, temperature=0.0))
        warm.text()
        param = next(self.engine.model.parameters())
        print(
            f"ready: {path} on {param.device} ({param.dtype}), batch {max_batch}; "
            f"weights {t1 - t0:.1f}s, load {t2 - t1:.1f}s, warm-up {time.perf_counter() - t2:.2f}s",
            flush=True,
        )

    @cog.streaming
    @cog.concurrent(max=CONCURRENCY)
    async def run(
        self,
        prompt: str = Input(description="The user's message."),
        system_prompt: str = Input(
            default="",
            description="System message that opens the conversation; empty = none.",
        ),
        history: str = Input(default="", description=HISTORY_HELP),
        max_tokens: int = Input(
            default=2048, ge=1, le=CONTEXT,
            description=f"Most tokens to generate. Cut (with a log line) to what the "
                        f"{CONTEXT}-token context has left after the prompt.",
        ),
        temperature: float = Input(
            default=DEFAULT_TEMPERATURE, ge=0.0, le=5.0,
            description="Sampling temperature; 0 = greedy (always the most likely token).",
        ),
        top_p: float = Input(
            default=DEFAULT_TOP_P, ge=0.0, le=1.0,
            description="Nucleus sampling: keep the most likely tokens whose probabilities add "
                        "up to top_p; 1 = off; 0 = only the most likely token (greedy).",
        ),
        top_k: int = Input(
            default=0, ge=0,
            description="Keep only the k most likely tokens; 0 = off.",
        ),
        repetition_penalty: float = Input(
            default=1.0, ge=0.01, le=10.0,
            description="Penalty for tokens already in the conversation; 1 = off, above 1 "
                        "repeats less.",
        ),
        seed: Optional[int] = Input(
            default=None, ge=0, le=SEED_MAX,
            description="Random seed for sampling; leave out for a random one (the seed used "
                        "is in the logs).",
        ),
        stop_sequences: str = Input(default="", description=STOP_HELP),
    ) -> ConcatenateIterator[str]:
        temperature, top_p = float(temperature), float(top_p)
        if top_p == 0.0:  # the limit of nucleus sampling: only the top token remains
            temperature, top_p = 0.0, 1.0
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=float(repetition_penalty), seed=seed,
            stop=parse_stop_sequences(stop_sequences),
        )
        try:
            messages = build_messages(prompt, system_prompt or None, history or None)
            gen = self.engine.generate(messages, params)
        except ValueError as e:  # HistoryError, SettingsError, PromptTooLong: say what and why
            raise ValueError(str(e)) from None

        r = gen.result
        self.record_metric("input_token_count", r.input_token_count)
        if r.max_tokens_cut:
            print(
                f"max_tokens cut from {max_tokens} to {r.max_tokens}: the prompt is "
                f"{r.input_token_count} tokens of the {self.engine.context}-token context",
                flush=True,
            )
        hooks = _CANCEL_HOOKS.get()
        if hooks is not None:
            hooks.append(gen.cancel)
        return _in_context(contextvars.copy_context(), self._stream(gen))

    def _stream(self, gen: Generation) -> Iterator[str]:
        """The text deltas (coglet pulls them in the slot's thread), then the metrics."""
        r = gen.result
        try:
            for piece in gen:
                yield piece
        except (CancelationException, GeneratorExit):
            gen.cancel()  # stops the forward passes before the next step
            print(f"cancelled after {len(r.output_ids)} tokens", flush=True)
            raise
        except BaseException:
            gen.cancel()
            raise
        if r.stop_reason == "cancelled":  # cancel() reached the engine: the stream just ended
            print(f"cancelled after {r.output_token_count} tokens", flush=True)
            return
        self.record_metric("output_token_count", r.output_token_count)
        self.record_metric("time_to_first_token", round(r.time_to_first_token, 4))
        self.record_metric("tokens_per_second", round(r.tokens_per_second, 2))
        print(
            f"stop_reason={r.stop_reason} input_tokens={r.input_token_count} "
            f"output_tokens={r.output_token_count} max_tokens={r.max_tokens} seed={r.seed}",
            flush=True,
        )

"""Cog entry point: a thin adapter from Cog's inputs to `chatglm3.engine.Engine`.

The work (weights, tokenizer, batching, sampling, stop strings, limits) lives in `chatglm3/`;
this file maps inputs, streams the engine's text deltas and records metrics.

`cog build` writes the image's input schema with a static parser that never imports this file
(cog 0.23.1, pkg/schema/python/): it reads only literal decorator arguments and bounds, and
defaults and descriptions that are literals or constants of this module bound to one plain
literal, taking strings as the raw text between their quotes. So every value below is spelled
out here, although chatglm3.params holds the same defaults and limits: tests/test_cog_static.py
keeps this file inside that subset and its values equal to chatglm3's.

run() is a coroutine that returns a plain generator: more than one prediction at a time needs
an async run(), but coglet 0.23.1 streams only plain generators (it collects async ones);
chatglm3.coglet_cancel explains how cancel still reaches the engine.

Environment (besides what chatglm3.download reads: CHATGLM3_REVISION, CHATGLM3_WEIGHTS_DIR,
HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DOWNLOAD_TIMEOUT):
  COG_WEIGHTS          checkpoint: a directory, hub repo id "owner/name[@rev]" or .tar URL
                       (Cog passes it to setup(weights=...); unset = the default hub repo)
  COG_MAX_CONCURRENCY  predictions at once = the engine's batch size (cog build bakes in the
                       @cog.concurrent max)
  CHATGLM3_DEVICE      auto | cpu | cuda (cog.yaml sets cuda: no silent CPU fallback)
  CHATGLM3_DTYPE       auto | float16 | bfloat16 | float32 (default auto: fp16 on GPU)
  CHATGLM3_DECODE_STEP auto | eager | graphs
  CHATGLM3_KV_BUDGET   KV cache size, planned once (e.g. 7GiB; default: on a GPU, from the memory
                       left after the weights; on a CPU the cache grows)
  CHATGLM3_PREFIX_CACHE 0 = keep no finished requests' keys/values (default: kept with a GPU,
                       not on a CPU)
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from typing import Iterator, Optional

import cog
from cog import BaseRunner, CancelationException, ConcatenateIterator, Input

from chatglm3 import coglet_cancel
from chatglm3.devices import resolve_device
from chatglm3.download import resolve_weights
from chatglm3.engine import Engine, Generation
from chatglm3.messages import build_messages
from chatglm3.params import SamplingParams

HISTORY_HELP = 'Earlier turns as JSON text, oldest first; empty = none. Either a list of messages [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...", "metadata": "..."}] (roles: system, user, assistant, observation; "metadata" is optional; a system message may only come first), or a list of [question, answer] pairs [["q1", "a1"], ["q2", "a2"]]. The two forms may be mixed item by item. At most 8388608 characters and 32 levels of nesting.'
STOP_HELP = r"Comma-separated strings that end the answer where they first appear (they are not part of the output), e.g. 'Observation:,User:'. Escapes: \, is a comma inside a stop string, \n a newline, \t a tab, \\ a backslash; anything else, spaces included, is kept as typed. At most 16 strings of at most 256 characters. Empty = none (the model's own end tokens always stop it)."


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


def _batch_size() -> int:
    """COG_MAX_CONCURRENCY, which cog build sets from @cog.concurrent(max=...)."""
    raw = os.environ.get("COG_MAX_CONCURRENCY", "").strip()
    declared = Predictor.run.__cog_concurrent_max__
    try:
        return max(1, int(raw)) if raw else declared
    except ValueError:
        print(f"COG_MAX_CONCURRENCY={raw!r} is not an integer; using {declared}", flush=True)
        return declared


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        """Checks the device, fetches/verifies the checkpoint, loads it, warms up; logs each
        part's time. Without a usable GPU (cog.yaml asks for cuda) it fails at once."""
        t0 = time.perf_counter()
        coglet_cancel.install()
        warning = coglet_cancel.check_coglet_version()
        if warning:
            print(f"warning: {warning}", flush=True)
        device = resolve_device(os.environ.get("CHATGLM3_DEVICE", "auto"))
        t1 = time.perf_counter()
        source = weights or None
        print(f"device {device}; weights: {source or 'default hub repository'}", flush=True)
        path = resolve_weights(source, knob="COG_WEIGHTS")
        t2 = time.perf_counter()
        batch = _batch_size()
        # CHATGLM3_KV_BUDGET (e.g. 7GiB, 8e9): the KV cache's size, planned once; unset: on a
        # GPU it is planned from the memory left after the weights, on a CPU it grows.
        raw_budget = os.environ.get("CHATGLM3_KV_BUDGET", "").strip()
        kv_budget = None
        if raw_budget:
            from chatglm3.kv_rows import parse_bytes

            try:
                kv_budget = parse_bytes(raw_budget)
            except ValueError as e:
                raise ValueError(f"CHATGLM3_KV_BUDGET: {e}") from None
        # CHATGLM3_PREFIX_CACHE: 0/1 (also off/on, false/true); unset = on with a GPU only.
        raw_prefix = os.environ.get("CHATGLM3_PREFIX_CACHE", "").strip().lower()
        prefix_cache = None
        if raw_prefix:
            if raw_prefix not in ("0", "1", "off", "on", "false", "true"):
                raise ValueError(f"CHATGLM3_PREFIX_CACHE: expected 0 or 1, got {raw_prefix!r}")
            prefix_cache = raw_prefix in ("1", "on", "true")
        self.engine = Engine.from_pretrained(
            path, device=str(device), dtype=os.environ.get("CHATGLM3_DTYPE", "auto"),
            max_batch=batch, decode_step=os.environ.get("CHATGLM3_DECODE_STEP", "auto"),
            kv_budget_bytes=kv_budget, prefix_cache=prefix_cache)
        plan = self.engine.kv_plan
        print(f"KV cache: {plan or 'grows on demand (CPU, no CHATGLM3_KV_BUDGET)'}", flush=True)
        on = bool(self.engine.prefix_cache)
        why = (f"CHATGLM3_PREFIX_CACHE={raw_prefix}" if raw_prefix else
               f"the default on a {'GPU' if device.type == 'cuda' else 'CPU'}; "
               f"CHATGLM3_PREFIX_CACHE={'0' if on else '1'} turns it {'off' if on else 'on'}")
        print(f"prefix cache: {'on' if on else 'off'} ({why})", flush=True)
        if plan is not None and plan.rows < batch:
            print(f"KV cache holds {plan.rows} requests at a time; the other predictions of "
                  f"the {batch} allowed wait for a row, in order", flush=True)
        t3 = time.perf_counter()
        # Every prefill shape, the decoding graphs recorded and checked against eager steps,
        # then one short request through the whole path.
        report = self.engine.warm_up()
        print(f"warm-up: {report}", flush=True)
        warm = self.engine.generate(build_messages("你好"),
                                    SamplingParams(max_tokens=2, temperature=0.0))
        warm.text()
        t4 = time.perf_counter()
        param = next(self.engine.model.parameters())
        print(f"ready: {path} on {param.device} ({param.dtype}), batch {batch}; "
              f"device check {t1 - t0:.1f}s, weights (fetch + verify) {t2 - t1:.1f}s, "
              f"load {t3 - t2:.1f}s, warm-up {t4 - t3:.2f}s, total {t4 - t0:.1f}s", flush=True)

    @cog.streaming
    @cog.concurrent(max=8)
    async def run(
        self,
        prompt: str = Input(description="The user's message."),
        system_prompt: str = Input(
            default="", description="System message that opens the conversation; empty = none."),
        history: str = Input(default="", max_length=8388608, description=HISTORY_HELP),
        max_tokens: int = Input(
            default=2048, ge=1, le=32768,
            description="Most tokens to generate. Cut (with a log line) to what the 32768-token context has left after the prompt."),
        temperature: float = Input(
            default=0.8, ge=0.0, le=5.0,
            description="Sampling temperature; 0 (or below 0.0001) = greedy: always the most likely token."),
        top_p: float = Input(
            default=0.8, ge=0.0, le=1.0,
            description="Nucleus sampling: keep the most likely tokens whose probabilities add up to top_p; 1 = off; 0 = only the most likely token (greedy)."),
        top_k: int = Input(default=0, ge=0, description="Keep only the k most likely tokens; 0 = off."),
        repetition_penalty: float = Input(
            default=1.0, ge=0.01, le=10.0,
            description="Penalty for tokens already in the conversation; 1 = off, above 1 repeats less."),
        seed: Optional[int] = Input(
            default=None, ge=0, le=9007199254740991,
            description="Random seed for sampling; leave out for a random one (the seed used is in the logs)."),
        stop_sequences: str = Input(default="", max_length=16384, description=STOP_HELP),
        min_tokens: int = Input(
            default=0, ge=0, le=32768,
            description="Fewest tokens to generate: the model's end tokens are held back until then (stop_sequences still apply); 0 = off."),
        presence_penalty: float = Input(
            default=0.0, ge=-2.0, le=2.0,
            description="Subtracted once from the score of every token already generated; above 0 brings new topics, 0 = off."),
        frequency_penalty: float = Input(
            default=0.0, ge=-2.0, le=2.0,
            description="Subtracted from a token's score once per time it was already generated; above 0 repeats less, 0 = off."),
    ) -> ConcatenateIterator[str]:
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                                    min_tokens=min_tokens, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty)
            # Off the event loop: tokenizing up to ~0.5 M characters takes a while, and other
            # predictions start meanwhile. A cancel here leaves nothing queued.
            ids = await asyncio.to_thread(self._prepare, prompt, system_prompt, history,
                                          stop_sequences, params)
            gen = self.engine.generate_ids(ids, params)
        except ValueError as e:  # HistoryError, SettingsError, PromptTooLong: say what and why
            raise ValueError(str(e)) from None

        r = gen.result
        self.record_metric("input_token_count", r.input_token_count)
        if r.max_tokens_cut:
            print(f"max_tokens cut from {max_tokens} to {r.max_tokens}: the prompt is "
                  f"{r.input_token_count} tokens of the {self.engine.context}-token context",
                  flush=True)
        coglet_cancel.on_cancel(gen.cancel)
        return coglet_cancel.in_context(contextvars.copy_context(), self._stream(gen))

    def _prepare(self, prompt: str, system_prompt: str, history: str, stop_sequences: str,
                 params: SamplingParams) -> list[int]:
        """Checks the settings and the conversation and tokenizes it (in a worker thread)."""
        params.stop = parse_stop_sequences(stop_sequences)
        params.validate()
        messages = build_messages(prompt, system_prompt or None, history or None)
        return self.engine.encode(messages)

    def _stream(self, gen: Generation) -> Iterator[str]:
        """The text deltas (coglet pulls them in the slot's thread), then the metrics."""
        r = gen.result
        try:
            for piece in gen:
                yield piece
        except (CancelationException, GeneratorExit):
            gen.cancel()  # stops the forward passes before the next step
            for _ in gen:  # the engine ends the request before its next step: wait for that,
                pass       # so the metrics below hold the final counts and speed
            self._record_metrics(gen)
            print(f"cancelled after {len(r.output_ids)} tokens", flush=True)
            raise
        except BaseException:
            gen.cancel()
            raise
        self._record_metrics(gen)
        if r.stop_reason == "cancelled":  # cancel() reached the engine: the stream just ended
            print(f"cancelled after {r.output_token_count} tokens", flush=True)
            return
        print(f"stop_reason={r.stop_reason} input_tokens={r.input_token_count} "
              f"cached_input_tokens={r.cached_input_token_count} "
              f"output_tokens={r.output_token_count} max_tokens={r.max_tokens} seed={r.seed}",
              flush=True)

    def _record_metrics(self, gen: Generation) -> None:
        """Every metric, also for a cancelled prediction (its counts so far)."""
        r = gen.result
        self.record_metric("cached_input_token_count", r.cached_input_token_count)
        self.record_metric("output_token_count", len(r.output_ids))
        self.record_metric("time_to_first_token", round(r.time_to_first_token, 4))
        self.record_metric("tokens_per_second", round(r.tokens_per_second, 2))

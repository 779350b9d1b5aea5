"""Cog entry point: a thin adapter from Cog's inputs to `chatglm3.engine.engine.Engine` (the work
lives in `chatglm3/`); it maps inputs, streams the engine's text deltas and records metrics.

`cog build` writes the input schema with a static parser that never imports this file (cog
0.23.1, pkg/schema/python/): it reads only literals (and module constants bound to one plain
literal), strings as the raw text between their quotes. So every value below is spelled out,
although chatglm3.params holds the same ones: tests/cog/test_cog_static.py keeps them equal.
run() is a coroutine returning a plain generator: concurrency needs an async run(), coglet
0.23.1 streams only plain generators; chatglm3.coglet_cancel says how cancel reaches the engine.
Environment: COG_WEIGHTS (Cog's setup(weights=...)), the load-time settings of
chatglm3/settings.py (CHATGLM3_DEVICE, ..., COG_MAX_CONCURRENCY) and chatglm3/weights/download.py's.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Iterator, Optional

import cog
from cog import BaseRunner, CancelationException, ConcatenateIterator, Input

from chatglm3 import coglet_cancel
from chatglm3.engine import Generation
from chatglm3.text.messages import build_messages, parse_stop_sequences
from chatglm3.errors import InputError
from chatglm3.params import SamplingParams, Structured
from chatglm3.settings import Settings
from chatglm3.startup import start_engine

HISTORY_HELP = 'Earlier turns as JSON text, oldest first; empty = none. Either a list of messages [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...", "metadata": "..."}] (roles: system, user, assistant, observation; "metadata" is optional; a system message may only come first), or a list of [question, answer] pairs [["q1", "a1"], ["q2", "a2"]]. The two forms may be mixed item by item. At most 8388608 characters and 32 levels of nesting.'
STOP_HELP = r"Comma-separated strings that end the answer where they first appear (they are not part of the output), e.g. 'Observation:,User:'. Escapes: \, is a comma inside a stop string, \n a newline, \t a tab, \\ a backslash; anything else, spaces included, is kept as typed. At most 16 strings of at most 256 characters. Empty = none (the model's own end tokens always stop it)."
JSON_SCHEMA_HELP = 'A JSON Schema the answer must follow, as JSON text, e.g. {"type": "object", "properties": {"revenue": {"type": "number"}, "auditor": {"type": "string"}}, "required": ["revenue", "auditor"], "additionalProperties": false}. The answer is then compact JSON that parses and validates (unless max_tokens cuts it: stop_reason=max_tokens in the logs). {"type": "object"} = any JSON object. Empty = free text. At most 65536 characters.'


def _say(line: str) -> None:
    print(line, flush=True)


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        """Checks the device, fetches/verifies the checkpoint, loads it, warms up; logs each
        part's time. Without a usable GPU (cog.yaml asks for cuda) it fails at once."""
        t0 = time.perf_counter()
        coglet_cancel.install()
        warning = coglet_cancel.check_coglet_version()
        if warning:
            print(f"warning: {warning}", flush=True)
        # Every load-time choice from the environment, checked before anything loads.
        settings = Settings.from_env(max_batch=Predictor.run.__cog_concurrent_max__)
        started = start_engine(weights or None, settings, say=_say, progress=True,
                               knob="COG_WEIGHTS")
        self.engine = started.engine
        print(f"ready: {started.weights} on {started.device} ({self.engine.dtype}), "
              f"batch {settings.max_batch}; device check {started.check_s:.1f}s, weights (fetch + verify) "
              f"{started.fetch_s:.1f}s, load {started.load_s:.1f}s, warm-up "
              f"{started.warm_s:.2f}s, total {time.perf_counter() - t0:.1f}s", flush=True)

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
        min_p: float = Input(
            default=0.0, ge=0.0, le=1.0,
            description="Keep only the tokens at least min_p times as likely as the most likely one; 0 = off."),
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
        json_schema: str = Input(default="", max_length=65536, description=JSON_SCHEMA_HELP),
    ) -> ConcatenateIterator[str]:
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, min_p=min_p,
                                    repetition_penalty=repetition_penalty, seed=seed,
                                    min_tokens=min_tokens, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty,
                                    stop=parse_stop_sequences(stop_sequences),
                                    structured=Structured("json", json_schema)
                                    if json_schema.strip() else None)
            # Off the event loop: tokenizing up to ~0.5 M characters takes a while, and other
            # predictions start meanwhile. A cancel here leaves nothing queued.
            request = await asyncio.to_thread(lambda: self.engine.prepare_messages(
                build_messages(prompt, system_prompt or None, history or None), params))
            gen = self.engine.submit(request)
        except ValueError as e:  # HistoryError, SettingsError, PromptTooLong: say what and why
            # the engine calls the constraint `structured`; here it is the json_schema input
            raise ValueError(e.renamed({"structured": "json_schema"})
                             if isinstance(e, InputError) else str(e)) from None

        r = gen.result
        self.record_metric("input_token_count", r.input_token_count)
        if r.max_tokens_cut:
            print(f"max_tokens cut from {max_tokens} to {r.max_tokens}: the prompt is "
                  f"{r.input_token_count} tokens of the {self.engine.context}-token context",
                  flush=True)
        coglet_cancel.on_cancel(gen.cancel)
        return coglet_cancel.in_context(contextvars.copy_context(), self._stream(gen))

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

"""The server-sent chunks of a streamed chat or text completion, in OpenAI's shapes."""

from __future__ import annotations

from typing import AsyncIterator

from ..engine.output import Generation
from .protocol import ChatRequest, CompletionRequest
from .responses import FINISH_REASONS, Echo, LogprobWriter, now, timings, usage
from .streams import merged


async def chat_chunks(logprobs_writer: LogprobWriter, rid: str, req: ChatRequest,
                      gens: list[Generation]) -> AsyncIterator[dict]:
    """A chat completion's stream: the role, content deltas, each choice's end, the usage."""
    created, logprobs = now(), req.logprobs is not None
    base = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": req.model}
    if req.include_usage:
        base["usage"] = None

    def chunk(i: int, delta: dict, entries=None, finish: str | None = None,
              ids: list[int] | None = None) -> dict:
        lp = logprobs_writer.chat(entries) if logprobs and entries is not None else None
        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        if req.token_ids and ids is not None:
            choice["token_ids"] = ids
        return {**base, "choices": [choice]}

    for i in range(len(gens)):
        first = chunk(i, {"role": "assistant", "content": ""})
        if req.token_ids and i == 0:  # vLLM's place for them: the first chunk (one prompt)
            first["prompt_token_ids"] = gens[0].result.input_ids
        yield first
    async for i, delta, entries, ids in merged(gens):
        if delta is not None:
            yield chunk(i, {"content": delta.text}, entries, ids=ids)
        else:
            result = gens[i].result
            yield chunk(i, {}, entries or None, FINISH_REASONS.get(result.stop_reason), ids)
    if req.include_usage:
        results = [g.result for g in gens]
        yield {**base, "choices": [], "usage": usage(results), "timings": timings(results)}


async def completion_chunks(logprobs_writer: LogprobWriter, rid: str, req: CompletionRequest,
                            gens: list[Generation], echo: Echo) -> AsyncIterator[dict]:
    """A text completion's stream: each echo once scored, text deltas, each end, the usage."""
    base = {"id": rid, "object": "text_completion", "created": now(), "model": req.model}
    offsets = [len(e) for e in echo.texts]  # where each choice's next text starts

    def chunk(k: int, text: str, entries=None, finish: str | None = None,
              ids: list[int] | None = None) -> dict:
        lp = None
        if req.logprobs is not None and entries is not None:
            lp = logprobs_writer.legacy(entries, offsets[k])
        offsets[k] += len(text)
        choice = {"index": k, "text": text, "logprobs": lp, "finish_reason": finish}
        if req.token_ids:
            if not started[k]:  # vLLM's place for them: each choice's first chunk
                started[k] = True
                choice["prompt_token_ids"] = gens[k].result.input_ids
            choice["token_ids"] = ids or []
        return {**base, "choices": [choice]}

    # Each echo goes once its scores are in: at the choice's first token or its end.
    unsent = [bool(e) for e in echo.texts]
    started = [False] * len(gens)
    async for k, delta, entries, ids in merged(gens):
        if unsent[k]:
            unsent[k] = False
            yield {**base, "choices": [{
                "index": k, "text": echo.texts[k], "finish_reason": None,
                "logprobs": echo.logprobs(k, gens[k].result) if req.logprobs is not None
                else None}]}
        if delta is not None:
            yield chunk(k, delta.text, entries, ids=ids)
        else:
            yield chunk(k, "", entries or None,
                        FINISH_REASONS.get(gens[k].result.stop_reason), ids)
    if req.include_usage:
        results = [g.result for g in gens]
        yield {**base, "choices": [], "usage": usage(results, len(req.prompts)),
               "timings": timings(results)}

"""Waiting on generations from the event loop: one or many (n choices) at once, cancelled when
their consumer goes; and writing chunks as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..errors import OutOfMemory
from ..engine.output import Generation, GenerationResult, merge
from .protocol import ApiError

log = logging.getLogger("chatglm3.api.app")

RETRY_AFTER_SECONDS = 1


async def merged(gens: list[Generation]) -> AsyncIterator[tuple]:
    """output.merge with each delta's tokens: (choice, delta, their logprobs, their ids), then
    (choice, None, the rest of its logprobs, the rest of its ids) at its end; out of memory as
    a 503. The logprobs are empty unless asked for."""
    seen = [0] * len(gens)
    try:
        async with aclosing(merge(gens)) as events:
            async for i, delta in events:
                result = gens[i].result
                end = len(result.output_ids) if delta is None else delta.tokens
                start, seen[i] = seen[i], end
                yield i, delta, result.logprobs[start:end], result.output_ids[start:end]
    except OutOfMemory as e:
        raise ApiError(503, str(e), code="out_of_memory",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from e


async def collect(request: Request, gens: list[Generation]) -> list[GenerationResult]:
    """Runs the choices to their ends; a client that disconnects first cancels them."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for g in gens:
            g.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for _ in merged(gens):
            pass
    finally:
        watcher.cancel()
    return [g.result for g in gens]


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`; an error mid-stream
    is one `data: {"error": ...}` event (the openai SDK raises it), and the stream ends."""
    async def events() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False, separators=(',', ':'))}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
            return
        except Exception:  # noqa: BLE001 - a failed step: said in words, logged in full
            log.exception("generation failed mid-stream")
            body = ApiError(500, "the generation failed (internal error, logged on the "
                                 "server); the server goes on").body()
            yield f"data: {json.dumps(body)}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

"""Waiting on generations from the event loop: one or many (n choices) at once, cancelled when
their consumer goes; and writing chunks as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..errors import OutOfMemory
from ..output import Generation, GenerationResult
from .protocol import ApiError

log = logging.getLogger("chatglm3.api.app")

RETRY_AFTER_SECONDS = 1


async def merged(gens: list[Generation]) -> AsyncIterator[tuple]:
    """(choice, delta, its tokens' logprobs) as they come, then (choice, None, the rest
    of its logprobs) at its end; every choice cancelled if the consumer stops early (a
    client gone). A failed generation raises (OutOfMemory, or an internal error)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    for g in gens:
        g.notify(lambda: loop.call_soon_threadsafe(ready.set))
    seen = [0] * len(gens)
    live = set(range(len(gens)))
    try:
        while live:
            ready.clear()
            got = False
            for i in sorted(live):
                g = gens[i]
                try:
                    batch = g.ready()
                except OutOfMemory as e:
                    raise ApiError(503, str(e), code="out_of_memory",
                                   headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from e
                for d in batch:
                    got = True
                    entries = g.result.logprobs[seen[i]:d.tokens]
                    seen[i] = d.tokens
                    yield i, d, entries
                if g.done:
                    got = True
                    live.discard(i)
                    yield i, None, g.result.logprobs[seen[i]:]
            if not got:
                await ready.wait()
    finally:
        for g in gens:
            g.cancel()

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

"""The OpenAI-compatible application (Starlette; uvicorn serves it: serve.py).

One engine serves every request, so concurrent requests (and a request's n choices) share its
decoding steps. What this layer adds: the API key (constant-time compare), a body size cap
checked before parsing, parsing and tokenizing off the event loop (an 8 MB body takes ~2 s to
tokenize; other streams go on meanwhile), a bounded wait queue (429 with Retry-After beyond
it), OpenAI's response and error shapes, server-sent events, and cancellation: a client that
disconnects (streaming or not) cancels its generations, which the engine drops before its next
step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import webchat
from ..errors import InputError, PromptTooLong, RequestTooLarge
from ..engine.output import Generation, GenerationResult
from ..engine.scheduler import Request as EngineRequest
from .protocol import (DEFAULT_MODEL_NAME, MAX_BODY_BYTES, ApiError, ChatRequest,
                       CompletionRequest, bad, parse_chat, parse_completion, parse_json)
from .errors import check_api_key
from .responses import FINISH_REASONS, Echo, LogprobWriter, new_id, now, timings, usage
from .chunks import chat_chunks, completion_chunks
from .streams import RETRY_AFTER_SECONDS, collect, sse
from .metrics import Metrics
from .tokens import parse_detokenize, parse_tokenize, tokenize, tokenizer_info

log = logging.getLogger(__name__)

# How much of an oversized body is read (and dropped) so that its client gets to read the 413.
DRAIN_BYTES = 256 * 2**20

@dataclass(frozen=True)
class ServerConfig:
    model_name: str = DEFAULT_MODEL_NAME
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    # Requests (each choice counts) accepted beyond the ones decoding; past it: 429.
    max_waiting: int = 64
    web: bool = True
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(engine, config: ServerConfig = ServerConfig()) -> Starlette:
    """The application serving `engine` (a chatglm3.engine.engine.Engine)."""
    api = Api(engine, config)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/stats", api.stats, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
        Route("/tokenizer_info", api.tokenizer_info, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
    ]
    api_paths = [r.path for r in routes if "{" not in r.path]  # what a 404 lists
    if config.web:
        routes += webchat.routes(config.model_name, config.api_key is not None)
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.api_paths = api_paths
    app.state.metrics = api.metrics
    return app


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, e: Exception) -> JSONResponse:
    request.app.state.metrics.http_error(e.status)  # type: ignore[attr-defined]
    return error_response(e)  # type: ignore[arg-type]


async def _http_error(request: Request, e: Exception) -> JSONResponse:
    status = getattr(e, "status_code", 404)
    request.app.state.metrics.http_error(status)
    if status == 405:  # with starlette's Allow header (the route's methods)
        return error_response(ApiError(405, f"{request.method} is not allowed on "
                                            f"{request.url.path}", code="method_not_allowed",
                                       headers=getattr(e, "headers", None)))
    paths = ", ".join(request.app.state.api_paths)
    return error_response(ApiError(
        status, f"no such route: {request.method} {request.url.path} (this server has "
                f"{paths})", code="not_found"))


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.error("internal error on %s", request.url.path, exc_info=e)
    request.app.state.metrics.http_error(500)
    return error_response(ApiError(500, "internal server error (logged on the server)"))


class Api:
    """The routes' state: the engine, the configuration, the wait-queue count and stats."""

    def __init__(self, engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.logprobs = LogprobWriter(engine.tokenizer)
        self.created = now()
        self._lock = threading.Lock()  # in_flight and the counters: the worker thread too
        self.in_flight = 0  # choices accepted and not ended
        self.finished: Counter[str] = Counter()
        self.recent: deque[dict] = deque(maxlen=64)  # the last ended choices, for /stats
        self.metrics = Metrics(engine, config.model_name)

    # ---- plain routes ----

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def stats(self, request: Request) -> JSONResponse:
        self.authorize(request)
        s = self.engine.stats()
        with self._lock:
            finished, recent, in_flight = dict(self.finished), list(self.recent), self.in_flight
        return JSONResponse({
            "model": self.config.model_name, "max_batch": s.max_batch, "running": s.running,
            "waiting": s.waiting, "in_flight": in_flight, "decode_steps": s.decode_steps,
            "decoded_tokens": s.decoded_tokens, "decode_step": s.decode_step,
            "finished": {k: finished.get(k, 0) for k in ("stop", "length", "cancelled",
                                                          "error")},
            "recent": recent})

    async def metrics_text(self, request: Request) -> Response:
        self.authorize(request)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created,
                "owned_by": "chatglm3"}

    async def models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> JSONResponse:
        self.authorize(request)
        name = request.path_params["model"]
        if name != self.config.model_name:
            raise ApiError(404, f"model: {name[:100]!r} is not served here; this server serves "
                                f"{self.config.model_name!r}", "model", "model_not_found")
        return JSONResponse(self._model_card())

    async def tokenize(self, request: Request) -> JSONResponse:
        req = await self._parsed(request, parse_tokenize)
        return JSONResponse(await run_in_threadpool(tokenize, self.engine.tokenizer, req,
                                                    self.engine.context))

    async def detokenize(self, request: Request) -> JSONResponse:
        tok = self.engine.tokenizer
        ids = await self._parsed(request, lambda body, served: parse_detokenize(
            body, served, tok.vocab_size))
        return JSONResponse({"prompt": await run_in_threadpool(tok.decode, ids)})

    async def tokenizer_info(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse(tokenizer_info(self.engine.tokenizer, self.engine.context))

    # ---- checks every request with a body passes ----

    def authorize(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization", ""), self.config.api_key)

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) once it passes the cap, before it is parsed. Past the cap
        the rest is read and dropped (up to DRAIN_BYTES, no memory kept): a server that answers
        while the client is still sending closes on it, and the client sees a connection reset
        instead of the 413 (the openai SDK, curl and urllib all did, with a 64 MB body)."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = ApiError(413, f"body: over the limit of {limit:,} bytes (no request that "
                                "fits the model's context is that large)", code="body_too_large")
        declared = int(length) if length.isdigit() else 0
        if declared > DRAIN_BYTES:
            raise too_big  # not worth reading: the client may see a reset
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_BYTES:
                break
            if size <= limit:
                chunks.append(chunk)
        if size > limit or declared > limit:
            raise too_big
        return b"".join(chunks)

    async def _parsed(self, request: Request, parse: Callable[[dict, str], object]):
        """A request's body, after the key and the size cap, parsed off the event
        loop by `parse` (protocol.parse_chat or parse_completion)."""
        self.authorize(request)
        raw = await self.read_body(request)
        return await run_in_threadpool(lambda: parse(parse_json(raw), self.config.model_name))

    def _reserve(self, count: int) -> None:
        limit = self.engine.max_batch + self.config.max_waiting
        with self._lock:
            if self.in_flight + count > limit:
                busy = self.in_flight
            else:
                self.in_flight += count
                return
        raise ApiError(429, f"server busy: {busy} requests in flight, the limit is {limit} "
                            f"({self.engine.max_batch} decoding + {self.config.max_waiting} "
                            "waiting); retry shortly", code="server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def _release(self, count: int) -> None:
        with self._lock:
            self.in_flight -= count

    def _ended(self, rid: str, index: int, arrived: float) -> Callable[[GenerationResult], None]:
        def done(result: GenerationResult) -> None:  # on the engine's worker thread
            self.metrics.ended(result, arrived)
            reason = FINISH_REASONS.get(result.stop_reason, result.stop_reason or "cancelled")
            with self._lock:
                self.in_flight -= 1
                self.finished[reason] += 1
                self.recent.append({"id": rid, "index": index, "finish": reason,
                                    "completion_tokens": result.output_token_count})
        return done

    async def _start(self, rid: str, params: Sequence, inputs: Callable[[], list[list[int]]],
                     names: dict[str, str]) -> list[Generation]:
        """Reserves room in the queue, builds the input ids off the event loop, checks each
        choice and queues them all (or none). `names`: the request's own names for the
        engine's fields in errors ("input": the prompt's field)."""
        count, arrived = len(params), time.perf_counter()
        self._reserve(count)
        try:
            requests = await run_in_threadpool(self._prepare, params, inputs, names)
        except BaseException:
            self._release(count)
            raise
        gens = []
        for i, r in enumerate(requests):
            gen = self.engine.submit(r)
            gen.add_done_callback(self._ended(rid, i, arrived))
            gens.append(gen)
        return gens

    def _prepare(self, params: Sequence, inputs: Callable[[], list[list[int]]],
                 names: dict[str, str]) -> list[EngineRequest]:
        try:
            prompts = inputs()
            per = len(params) // len(prompts)
            return [self.engine.prepare(prompts[i // per], p) for i, p in enumerate(params)]
        except PromptTooLong as e:
            raise bad(str(e), names["input"], "context_length_exceeded") from None
        except RequestTooLarge as e:
            raise bad(str(e), "max_tokens", "context_length_exceeded") from None
        except ValueError as e:
            ours = getattr(e, "field", None) or str(e).split(":")[0].split("[")[0] or None
            message = e.renamed(names) if isinstance(e, InputError) else str(e)
            raise bad(message, names.get(ours, ours)) from None

    # ---- chat completions ----

    async def chat_completions(self, request: Request):
        req: ChatRequest = await self._parsed(request, parse_chat)
        rid = new_id("chatcmpl")
        def ids() -> list[list[int]]:  # [:-1]: without the closing <|assistant|>
            prompt = self.engine.encode(req.messages)
            return [prompt if req.add_generation_prompt else prompt[:-1]]

        gens = await self._start(rid, req.params, ids,
                                 {"input": "messages", "structured": req.structured_field})
        if req.stream:
            return sse(chat_chunks(self.logprobs, rid, req, gens))
        results = await collect(request, gens)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text,
                                            "refusal": None},
                    "logprobs": self.logprobs.chat(r.logprobs) if req.logprobs is not None
                    else None, "finish_reason": FINISH_REASONS.get(r.stop_reason)}
                   for i, r in enumerate(results)]
        body = {"id": rid, "object": "chat.completion", "created": now(), "model": req.model,
                "choices": choices, "usage": usage(results), "timings": timings(results)}
        if req.token_ids:  # vLLM's return_token_ids: the prompt's once (one prompt), each answer's
            body["prompt_token_ids"] = results[0].input_ids
            for choice, r in zip(choices, results):
                choice["token_ids"] = r.output_ids
        if req.prompt_logprobs is not None:  # vLLM's place for it: the response's (one prompt)
            body["prompt_logprobs"] = self.logprobs.prompt(results[0].prompt_logprobs,
                                                           req.prompt_logprobs)
        return JSONResponse(body)

    # ---- completions ----

    async def completions(self, request: Request):
        req: CompletionRequest = await self._parsed(request, parse_completion)
        rid = new_id("cmpl")
        params = [p for _ in req.prompts for p in req.params]
        vocab = self.engine.tokenizer.vocab_size
        for i, p in enumerate(req.prompts):
            if isinstance(p, list) and max(p) >= vocab:
                raise bad(f"prompt[{i}]: token id {max(p)} is past the vocabulary (ids are 0 to "
                          f"{vocab - 1})", "prompt")
        gens = await self._start(rid, params, lambda: [
            p if isinstance(p, list) else self.engine.encode_plain(p) for p in req.prompts],
            {"input": "prompt", "structured": req.structured_field})
        echo = Echo(self.logprobs, req.prompts, len(req.params), req.echo, req.logprobs)
        if req.stream:
            return sse(completion_chunks(self.logprobs, rid, req, gens, echo))
        results = await collect(request, gens)
        choices = []
        for k, r in enumerate(results):
            lp = None
            if req.logprobs is not None:
                lp = echo.logprobs(k, r, self.logprobs.legacy(r.logprobs, len(echo.texts[k])))
            choice = {"index": k, "text": echo.texts[k] + r.text, "logprobs": lp,
                      "finish_reason": FINISH_REASONS.get(r.stop_reason)}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.logprobs.prompt(r.prompt_logprobs,
                                                                 req.prompt_logprobs)
            if req.token_ids:  # vLLM's return_token_ids
                choice.update(prompt_token_ids=r.input_ids, token_ids=r.output_ids)
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "text_completion", "created": now(),
                             "model": req.model, "choices": choices,
                             "usage": usage(results, len(req.prompts)),
                             "timings": timings(results)})

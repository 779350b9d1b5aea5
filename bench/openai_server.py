"""The OpenAI-compatible server's overhead: tokens/s through `serve`'s app vs the engine called
directly, on the same engine, 1 and 8 concurrent streams, greedy, at two answer lengths.

The server runs as `serve` runs it (uvicorn and the engine's worker in one process); the
clients are stdlib HTTP streams in threads of this process (they only split SSE lines), so their
own cost counts against the server: the overhead shown is an upper bound. Every answer has
exactly its length (min_tokens = max_tokens). Rounds alternate direct / server; the table shows
each configuration's best round, then the ratio. A per-token cost that grows with the answer's
length would show as an overhead that grows from the short to the long answers.

With --hidden 256 (a tiny model: a step takes ~2 ms) the server's own cost per token is
magnified; the last column turns the difference into microseconds per token.

Usage: python bench/openai_server.py [--layers 2] [--hidden 4096] [--lengths 64,256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TOKENIZER, random_model  # noqa: E402

from chatglm3.api.app import ServerConfig, create_app  # noqa: E402
from chatglm3.engine.engine import Engine  # noqa: E402
from chatglm3.text.messages import build_messages  # noqa: E402
from chatglm3.params import SamplingParams  # noqa: E402
from chatglm3.text.tokenizer import ChatGLMTokenizer  # noqa: E402

MODEL = "bench"


def direct(engine: Engine, prompts: list[str], n: int) -> float:
    """Seconds for every prompt's answer of n tokens, the engine called directly."""
    gens = [engine.generate(build_messages(p), SamplingParams(max_tokens=n, min_tokens=n,
                                                              temperature=0.0))
            for p in prompts]
    start = time.perf_counter()
    threads = [threading.Thread(target=g.text) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g.result.output_token_count == n for g in gens)
    return time.perf_counter() - start


def through_server(port: int, prompts: list[str], n: int) -> float:
    """The same through HTTP streams: seconds until every stream's [DONE]."""
    counts = [0] * len(prompts)

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompts[i]}],
                "stream": True, "temperature": 0, "max_tokens": n, "min_tokens": n,
                "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        for line in conn.getresponse():
            if line.startswith(b'data: {"id"') and b'"usage":{' in line:
                counts[i] = json.loads(line[6:])["usage"]["completion_tokens"]
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [n] * len(prompts), counts
    return time.perf_counter() - start


def start_server(engine: Engine) -> int:
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    app = create_app(engine, ServerConfig(model_name=MODEL, web=False))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return sock.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096, help="4096 = real width")
    ap.add_argument("--lengths", default="64,256")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    sizes = {} if args.hidden == 4096 else dict(
        hidden_size=args.hidden, num_attention_heads=args.hidden // 64, kv_channels=64,
        ffn_hidden_size=args.hidden * 2)
    model = random_model(num_layers=args.layers, **sizes)
    engine = Engine(model, ChatGLMTokenizer(TOKENIZER), max_batch=8)
    port = start_server(engine)
    lengths = [int(x) for x in args.lengths.split(",")]
    streams = [int(x) for x in args.streams.split(",")]
    prompts = [f"Question {i}: tell me about the number {i * 37}." for i in range(max(streams))]
    direct(engine, prompts[:1], 4)  # first shapes met before timing
    through_server(port, prompts[:1], 4)
    best: dict[tuple[str, int, int], float] = {}
    for _ in range(args.rounds):
        for s in streams:
            for n in lengths:
                for way in ("direct", "server"):
                    t = (direct(engine, prompts[:s], n) if way == "direct"
                         else through_server(port, prompts[:s], n))
                    key = (way, s, n)
                    best[key] = min(best.get(key, float("inf")), t)
    width = "real width" if args.hidden == 4096 else f"hidden {args.hidden}"
    print(f"{args.layers} layers at {width}, bf16, {torch.get_num_threads()} threads; best "
          f"of {args.rounds} alternating rounds")
    print(f"{'streams':>7} {'tokens':>6} {'direct tok/s':>12} {'server tok/s':>12} "
          f"{'server/direct':>13} {'server us/token':>15}")
    for s in streams:
        for n in lengths:
            d, v = s * n / best[("direct", s, n)], s * n / best[("server", s, n)]
            extra = (best[("server", s, n)] - best[("direct", s, n)]) / (s * n) * 1e6
            print(f"{s:>7} {n:>6} {d:>12.1f} {v:>12.1f} {v / d:>13.3f} {extra:>15.0f}")
    engine.close()


if __name__ == "__main__":
    main()

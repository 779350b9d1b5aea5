"""The output processor's share of a decoding step (detokenizer, stop strings, stop rules,
results), on the step thread where it runs: `streams` greedy streams with 16 stop strings of
256 characters each (the API's cap: the matcher's worst case) decode together; prints the time
in `OutputProcessor.take` against the time in the model runner's decoding steps.

Usage: python bench/output_share.py [--layers 2] [--streams 8] [--tokens 48]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TOKENIZER, random_model  # noqa: E402

from chatglm3.engine.engine import Engine  # noqa: E402
from chatglm3.params import SamplingParams  # noqa: E402
from chatglm3.text.tokenizer import ChatGLMTokenizer  # noqa: E402


def timed(obj, name: str, total: list[float]) -> None:
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    model = random_model(num_layers=args.layers, dtype=getattr(torch, args.dtype))
    tokenizer = ChatGLMTokenizer(TOKENIZER)
    tokenizer.stop_ids = frozenset()  # every stream runs its tokens
    engine = Engine(model, tokenizer, max_batch=args.streams)
    rng = random.Random(0)
    stops = ["".join(rng.choices("的一是不了人我在有他这", k=255)) + "。" for _ in range(16)]
    take, decode = [0.0], [0.0]
    timed(engine.output, "take", take)
    timed(engine.runner, "decode", decode)
    try:
        gens = [engine.generate_ids(tokenizer.build_chat_input([]) + [100 + i, 200 + i],
                                    SamplingParams(max_tokens=args.tokens, temperature=0.0,
                                                   stop=stops))
                for i in range(args.streams)]
        threads = [threading.Thread(target=g.text) for g in gens]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.close()
    tokens = sum(g.result.output_token_count for g in gens)
    print(f"{args.layers} layers at real width, {args.dtype}, {args.streams} streams x "
          f"{args.tokens} tokens, 16 stop strings x 256 characters each")
    print(f"decoding steps (model runner): {decode[0]:.2f} s; output processor: "
          f"{take[0] * 1e3:.1f} ms ({take[0] / tokens * 1e6:.0f} us per token), "
          f"{take[0] / (decode[0] + take[0]):.2%} of a step")


if __name__ == "__main__":
    main()

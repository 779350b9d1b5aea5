"""Scheduling benchmark: one stream decoding while a long prompt arrives.

A running stream used to wait for a whole PREFILL_CHUNK (2,048 tokens) of another request's
prompt between two of its tokens; the scheduler's prefill token budget (Engine(prefill_budget=
...)) caps the prompt tokens per step while requests decode. For each budget this prints the
running stream's longest gap between tokens while the prompt prefills, and the total tokens/s
(the prompt's tokens and every generated token, from the prompt's arrival to its last token),
also per CPU second of this process (steadier than wall time when other processes share the
machine). Compare the rows of one run.

Usage: python bench/scheduling.py [--layers 2] [--prompt 8192] [--budgets 2048,512]
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

from chatglm3.engine import Engine  # noqa: E402
from chatglm3.params import SamplingParams  # noqa: E402
from chatglm3.tokenizer import ChatGLMTokenizer  # noqa: E402

GREEDY = dict(temperature=0.0)


def run(engine: Engine, prompt: list[int], lead: int,
        after: int) -> tuple[float, float, float, int]:
    """(longest gap of the running stream while `prompt` prefills, total tokens/s, total tokens
    per CPU second of this process, the stream's tokens during the prefill)."""
    stamps: list[float] = []
    take = engine.output.take
    stream_ids = engine.tokenizer.build_chat_input([]) + [100 + i for i in range(32)]
    running = engine.generate_ids(stream_ids, SamplingParams(max_tokens=30000, **GREEDY))

    def timed(r, token, logprob=None):  # the running stream's token times, as taken
        if r.output.result is running.result:
            stamps.append(time.perf_counter())
        return take(r, token, logprob)

    engine.output.take = timed
    reader = threading.Thread(target=running.text, daemon=True)
    reader.start()
    while len(stamps) < lead:
        time.sleep(0.01)
    arrived, cpu = time.perf_counter(), time.process_time()
    long = engine.generate_ids(prompt, SamplingParams(max_tokens=after, **GREEDY))
    long.text()
    done, cpu = time.perf_counter(), time.process_time() - cpu
    first = arrived + long.result.time_to_first_token
    running.cancel()
    reader.join()
    engine.output.take = take
    during = [t for t in stamps if arrived <= t <= first + 1e-3]
    edges = [max(t for t in stamps if t < arrived)] + during
    gap = max(b - a for a, b in zip(edges, edges[1:])) if len(edges) > 1 else done - arrived
    window = [t for t in stamps if arrived <= t <= done]
    tokens = len(prompt) + long.result.output_token_count + len(window)
    return gap, tokens / (done - arrived), tokens / cpu, len(during)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--budgets", default="2048,512")
    ap.add_argument("--dtype", default="float32", help="bf16 matmul is slow on CPUs without "
                                                        "AMX (the CI machine: 6x fp32's time)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = random_model(num_layers=args.layers, dtype=getattr(torch, args.dtype))
    tokenizer = ChatGLMTokenizer(TOKENIZER)
    rng = random.Random(0)
    prompt = tokenizer.build_chat_input([]) + [rng.randrange(100, 60000)
                                               for _ in range(args.prompt)]
    print(f"{args.layers} layers at real width, {args.dtype}, CPU threads "
          f"{torch.get_num_threads()}; one stream decoding while a {len(prompt):,}-token "
          "prompt arrives")
    print(f"{'prefill budget':>15} {'longest gap s':>14} {'tokens/s':>9} "
          f"{'tokens/CPU s':>13} {'stream tokens':>14}")
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        engine = Engine(model, tokenizer, prefill_budget=budget)
        try:
            gap, rate, per_cpu, n = run(engine, prompt, lead=3, after=4)
        finally:
            engine.close()
        rows.append((budget, gap, rate, per_cpu))
        print(f"{budget:>15} {gap:>14.2f} {rate:>9.1f} {per_cpu:>13.1f} {n:>14}", flush=True)
    base = rows[0]
    for budget, gap, rate, per_cpu in rows[1:]:
        print(f"budget {budget} vs {base[0]}: longest gap x{gap / base[1]:.2f}, "
              f"throughput x{rate / base[2]:.3f} (per CPU second x{per_cpu / base[3]:.3f})")


if __name__ == "__main__":
    main()

"""Scheduling benchmark: one stream decoding while a long prompt arrives.

A running stream used to wait for a whole PREFILL_CHUNK (2,048 tokens) of another request's
prompt between two of its tokens; the scheduler's prefill token budget (Engine(prefill_budget=
...)) caps the prompt tokens per step while requests decode. For each budget this prints the
running stream's longest gap between tokens while the prompt prefills, and the throughput of
the same work (the prompt, its answer and the stream's tokens after the prompt's arrival, until
both are done: see `run`), per wall second and per CPU second of this process (steadier when
other processes share the machine). Budgets alternate; each row of another budget is
compared with the mean of the first budget's rows just before and after it.

Usage: python bench/scheduling.py [--layers 2] [--prompt 8192] [--budgets 2048,512,2048,512,2048]
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

GREEDY = dict(temperature=0.0)


def run(engine: Engine, prompt: list[int], lead: int, after: int,
        rest: int) -> tuple[float, float, float, int]:
    """(longest gap of the running stream while `prompt` prefills, total tokens/s, total tokens
    per CPU second of this process, the stream's tokens during the prefill).

    The throughput is of a fixed amount of work, whatever the budget: from the prompt's arrival
    until both requests are done, the prompt's prefill and its `after` tokens, and the stream's
    last `rest` tokens (it has exactly lead + rest). (An earlier version counted the tokens
    made until the prompt's last token: a smaller budget then ran more of the stream's costly
    batch-1 decoding steps inside that window, a different mix of work, and its tokens/s fell
    though no work was done slower.)"""
    stamps: list[float] = []
    take = engine.output.take
    stream_ids = engine.tokenizer.build_chat_input([]) + [100 + i for i in range(32)]
    n = lead + rest
    running = engine.generate_ids(stream_ids, SamplingParams(max_tokens=n, min_tokens=n,
                                                             **GREEDY))

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
    long = engine.generate_ids(prompt, SamplingParams(max_tokens=after, min_tokens=after,
                                                      **GREEDY))
    long.text()
    reader.join()
    done, cpu = time.perf_counter(), time.process_time() - cpu
    first = arrived + long.result.time_to_first_token
    engine.output.take = take
    assert running.result.output_token_count == n, "the stream ended before the prompt did"
    during = [t for t in stamps if arrived <= t <= first + 1e-3]
    edges = [max(t for t in stamps if t < arrived)] + during
    gap = max(b - a for a, b in zip(edges, edges[1:])) if len(edges) > 1 else done - arrived
    tokens = len(prompt) + long.result.output_token_count + rest
    return gap, tokens / (done - arrived), tokens / cpu, len(during)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--budgets", default="2048,512,2048,512,2048")
    ap.add_argument("--rest", type=int, default=40,
                    help="the stream's tokens after the prompt arrives (outlasting its prefill)")
    ap.add_argument("--dtype", default="float32", help="bf16 matmul is slow on CPUs without "
                    "AMX or AVX-512 (this 2-core AVX2 EPYC: 6x fp32's time)")
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
            gap, rate, per_cpu, n = run(engine, prompt, lead=3, after=4, rest=args.rest)
        finally:
            engine.close()
        rows.append((budget, gap, rate, per_cpu))
        print(f"{budget:>15} {gap:>14.2f} {rate:>9.1f} {per_cpu:>13.1f} {n:>14}", flush=True)
    first = rows[0][0]
    for i, (budget, gap, rate, per_cpu) in enumerate(rows):
        if budget == first:
            continue
        # Against the first budget's runs on both sides (when there are two), so that a
        # machine getting faster or slower over the run cancels out of the ratio.
        near = [r for r in (rows[i - 1], rows[i + 1] if i + 1 < len(rows) else None)
                if r is not None and r[0] == first]
        base = [sum(r[k] for r in near) / len(near) for k in (1, 2, 3)]
        print(f"budget {budget} vs {first} ({len(near)} neighbouring run(s)): longest gap "
              f"x{gap / base[0]:.2f}, throughput x{rate / base[1]:.3f} "
              f"(per CPU second x{per_cpu / base[2]:.3f})")

if __name__ == "__main__":
    main()

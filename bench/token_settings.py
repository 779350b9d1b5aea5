"""Cost of the per-request token settings in a decoding step: `sampling.pick` over a batch of
real-vocabulary logits (65,024), greedy, with no row, one row or every row carrying a
logit_bias of N entries (OpenAI's limit is 300; each biased row is one index_add on its row),
or every row an allowed_token_ids list of N (one add of a mask made once per request).
stop_token_ids and ignore_eos cost nothing per step (a set lookup per taken token).
Runs alternate, best of rounds. Usage: python bench/token_settings.py [--batch 8] [--entries 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from chatglm3.params import SamplingParams
from chatglm3.model.sampling import RequestSampling, pick

VOCAB = 65024


def timed(logits: torch.Tensor, samplings: list[RequestSampling], reps: int) -> float:
    pick(logits, samplings, [None] * len(samplings))  # warm: device tensors made once
    start = time.perf_counter()
    for _ in range(reps):
        pick(logits, samplings, [None] * len(samplings))
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--entries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    logits = torch.randn(args.batch, VOCAB)
    bias = {i * 7: 1.0 for i in range(args.entries)}
    plain = SamplingParams(temperature=0)
    biased = SamplingParams(temperature=0, logit_bias=bias)
    allowed = SamplingParams(temperature=0, allowed_token_ids=list(bias))
    cases = {"no row biased": [plain] * args.batch,
             "one row biased": [biased] + [plain] * (args.batch - 1),
             "every row biased": [biased] * args.batch,
             "every row allowed": [allowed] * args.batch}
    best = {name: float("inf") for name in cases}
    for _ in range(args.rounds):
        for name, params in cases.items():
            best[name] = min(best[name], timed(logits, [RequestSampling(p) for p in params],
                                               args.reps))
    print(f"pick() at batch {args.batch}, {args.entries} bias entries per biased row, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':<20}{'µs per step':>14}{'added':>10}")
    for name, t in best.items():
        print(f"{name:<20}{t * 1e6:>14.1f}{(t - best['no row biased']) * 1e6:>10.1f}")


if __name__ == "__main__":
    main()

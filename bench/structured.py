"""Cost of structured output (chatglm3/model/grammar.py): the grammar mask per constrained row
per decoding step, at batch 1 and 8 over real-vocabulary logits, against the same `pick` with no
constraint; and the time to compile typical constraints (what a request waits before queueing).
Against a 28-layer decoding step here (400-450 ms, docs/benchmarks.md) the mask must stay under
5 %. Random logits: the grammar alone decides what is legal, as with weak weights.
Usage: python bench/structured.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from chatglm3.model.grammar import Grammars
from chatglm3.model.sampling import RequestSampling, pick
from chatglm3.params import SamplingParams, Structured
from chatglm3.text.tokenizer import ChatGLMTokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "chatglm3-tokenizer" / "tokenizer.model"
VOCAB = 65024
REPORT = {"type": "object", "additionalProperties": False,
          "required": ["company", "revenue", "net_profit", "auditor", "segments"],
          "properties": {
              "company": {"type": "string", "maxLength": 40},
              "revenue": {"type": "number"}, "net_profit": {"type": "number"},
              "auditor": {"enum": ["KPMG", "Deloitte", "EY", "PwC", "其他"]},
              "segments": {"type": "array", "maxItems": 4, "items": {
                  "type": "object", "additionalProperties": False, "required": ["name", "share"],
                  "properties": {"name": {"type": "string", "maxLength": 20},
                                 "share": {"type": "number", "minimum": 0, "maximum": 1}}}}}}
CONSTRAINTS = {
    "any JSON object": Structured("json", '{"type": "object"}'),
    "financial report schema": Structured("json", json.dumps(REPORT)),
    "regex (a date)": Structured("regex", r"\d{4}-\d{2}-\d{2}"),
    "choice of 3": Structured("choice", choices=("positive", "negative", "neutral")),
}


def step_times(grammars: Grammars, batch: int, structured: Structured | None, steps: int,
               logits: torch.Tensor) -> list[float]:
    """Seconds per pick() of `batch` rows, each constrained (restarted when its answer ends)."""
    def fresh() -> RequestSampling:
        c = None if structured is None else grammars.constraint(structured)
        return RequestSampling(SamplingParams(temperature=0), constraint=c)  # greedy: the
        # pick itself is one argmax, so what is added is the mask

    rows = [fresh() for _ in range(batch)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens = pick(logits, rows, [None] * batch).tolist()
        times.append(time.perf_counter() - start)
        for i, t in enumerate(tokens):
            if rows[i].constraint is not None and (rows[i].constraint.complete
                                                   or t in grammars.tokenizer.stop_ids):
                rows[i] = fresh()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    tok = ChatGLMTokenizer(TOKENIZER)
    grammars = Grammars(tok)
    start = time.perf_counter()
    grammars.constraint(CONSTRAINTS["any JSON object"])
    print(f"tokenizer description built in {time.perf_counter() - start:.2f} s (once per process)")
    print(f"{'constraint':<26}{'compile ms':>11}")
    for name, s in CONSTRAINTS.items():
        start = time.perf_counter()
        grammars.constraint(s)
        print(f"{name:<26}{(time.perf_counter() - start) * 1e3:>11.2f}")
    g = torch.Generator().manual_seed(0)
    print(f"\ngreedy pick() per step, median of {args.steps} ({torch.get_num_threads()} threads); "
          "share of a 420 ms decoding step")
    print(f"{'constraint':<26}{'batch':>6}{'ms':>9}{'added ms':>10}{'share':>8}")
    for batch in (1, 8):
        logits = torch.randn(batch, VOCAB, generator=g) * 3
        base = statistics.median(step_times(grammars, batch, None, args.steps, logits))
        print(f"{'none':<26}{batch:>6}{base * 1e3:>9.3f}{'':>10}{'':>8}")
        for name, s in CONSTRAINTS.items():
            t = statistics.median(step_times(grammars, batch, s, args.steps, logits))
            print(f"{name:<26}{batch:>6}{t * 1e3:>9.3f}{(t - base) * 1e3:>10.3f}"
                  f"{(t - base) / 0.420:>8.2%}")


if __name__ == "__main__":
    main()

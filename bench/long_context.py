"""Long-context benchmark: prefill time and peak memory for 1k-32k token prompts.

Each length runs in a fresh process on the shared tiny checkpoint (2 layers, 2 KV groups of 64,
the real vocabulary and rope), so the growth with length is what is measured: the KV cache is
linear in the prompt, and attention must not add an n×n matrix (SDPA, chunked prefill).
`--prompt-logprobs K`: each length also runs scored (every prompt token's log-probability and
K alternatives, as /v1/completions with echo and logprobs computes them), in alternation with
the plain run, so the cost of scoring is its own column: its memory must not grow with the
prompt (one chunk's logits at a time, never [prompt x vocab]).
Usage: python bench/long_context.py [--lengths 1024 4096 16384 32000] [--dtype float32]
       [--prompt-logprobs 1] [--ckpt DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT.parent / "shared" / "golden" / "tiny-32k" / "ckpt"

CHILD = r"""
import json, sys, torch
from chatglm3.engine.engine import Engine
from chatglm3.params import SamplingParams

def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024

n, dtype = int(sys.argv[2]), getattr(torch, sys.argv[3])
scored = None if sys.argv[4] == "none" else int(sys.argv[4])
engine = Engine.from_pretrained(sys.argv[1], "cpu", dtype)
text = engine.tokenizer.encode_text("The quick brown fox 跳过了懒狗. " * (n // 8 + 1))
ids = engine.encode([])[:-1] + text[: n - 3] + engine.encode([])[-1:]
engine.generate_ids(ids[:64], SamplingParams(max_tokens=1, temperature=0)).text()  # warm-up
base = hwm()
gen = engine.generate_ids(ids, SamplingParams(max_tokens=1, temperature=0,
                                              prompt_logprobs=scored))
gen.text()
assert scored is None or len(gen.result.prompt_logprobs) == len(ids)
cfg = engine.model.config
kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * len(ids)
kv *= next(engine.model.parameters()).element_size()
print(json.dumps(dict(n=len(ids), ttft=gen.result.time_to_first_token, grown=hwm() - base,
                      kv=kv)))
engine.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, default=CKPT)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32000])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-logprobs", type=int, default=None, metavar="K")
    args = ap.parse_args()
    variants = ["none"] + ([] if args.prompt_logprobs is None else [str(args.prompt_logprobs)])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    print(f"checkpoint: {args.ckpt} ({args.dtype}, CPU)")
    print(f"{'prompt':>8}{'scored':>8}{'prefill s':>11}{'tok/s':>8}{'peak growth MiB':>17}"
          f"{'KV cache MiB':>14}{'growth/token KiB':>18}")
    for n in args.lengths:
        # Alternating (plain, scored) in fresh processes: the second of a pair runs on the
        # same warm page cache as the first.
        for variant in variants:
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.ckpt), str(n),
                                  args.dtype, variant],
                                 env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            k = "-" if variant == "none" else f"k={variant}"
            print(f"{r['n']:>8}{k:>8}{r['ttft']:>11.2f}{r['n'] / r['ttft']:>8.0f}"
                  f"{r['grown'] / 2**20:>17.1f}{r['kv'] / 2**20:>14.1f}"
                  f"{r['grown'] / r['n'] / 1024:>18.2f}", flush=True)


if __name__ == "__main__":
    main()

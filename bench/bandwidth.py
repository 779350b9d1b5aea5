"""The machine's limit for decoding one stream: the bytes a decoding step reads over the memory
bandwidth measured here.

A batch-1 decoding step reads every linear weight once (the embedding only one row of it), so
its time cannot go below weight bytes / read bandwidth. Read bandwidth is measured the way
torch reads memory: a bf16 reduction over a buffer far larger than the caches, with this
process's threads (best of rounds). The packed oneDNN product of one real-size layer is timed
the same way, cycling through several layers so that no weight stays in cache.

Usage: python bench/bandwidth.py [--gib 2] [--rounds 5] [--decode-tok-s 2.2 ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from chatglm3.model.packed_linear import PackedLinear

# ChatGLM3-6B(-32K): hidden 4096, ffn 13696, 32 heads + 2 x 2 key/value heads of 128, 28
# layers, vocabulary 65,024 (the output layer is read whole every step)
HIDDEN, FFN, LAYERS, VOCAB, QKV = 4096, 13696, 28, 65024, (32 + 2 * 2) * 128
LAYER_SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN), (HIDDEN, FFN)]


def step_bytes(dtype_bytes: int = 2) -> int:
    """Weight bytes one decoding step reads (bf16/fp16)."""
    per_layer = sum(n * k for n, k in LAYER_SHAPES)
    return (LAYERS * per_layer + VOCAB * HIDDEN) * dtype_bytes


def read_bandwidth(gib: float, rounds: int) -> float:
    buf = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16)
    buf.sum()  # touch every page first
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 2 / (time.perf_counter() - t))
    return best


def packed_layer_bandwidth(rounds: int, copies: int = 4) -> float:
    """GB/s of batch-1 products through a real layer's four packed weights, `copies` layers
    in turn (together larger than the caches)."""
    layers = [[PackedLinear(torch.randn(n, k).bfloat16(), None) for n, k in LAYER_SHAPES]
              for _ in range(copies)]
    xs = {k: torch.randn(1, k).bfloat16() for _, k in LAYER_SHAPES}
    nbytes = copies * sum(n * k for n, k in LAYER_SHAPES) * 2
    best = 0.0
    for _ in range(rounds + 1):
        t = time.perf_counter()
        for layer in layers:
            for lin in layer:
                lin(xs[lin.in_features])
        best = max(best, nbytes / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tok-s", type=float, nargs="*", default=[],
                    help="measured batch-1 decoding rates to set against the limit")
    args = ap.parse_args()
    read = read_bandwidth(args.gib, args.rounds)
    packed = packed_layer_bandwidth(args.rounds)
    nbytes = step_bytes()
    print(f"threads: {torch.get_num_threads()}")
    print(f"weights read per decoding step: {nbytes / 1e9:.2f} GB (bf16)")
    print(f"read bandwidth (bf16 reduction over {args.gib} GiB): {read / 1e9:.1f} GB/s "
          f"-> at most {read / nbytes:.2f} tok/s at one stream")
    print(f"packed oneDNN products, batch 1, real layer shapes: {packed / 1e9:.1f} GB/s "
          f"({packed / read:.0%} of it) -> {packed / nbytes:.2f} tok/s")
    for rate in args.decode_tok_s:
        print(f"measured {rate:.3f} tok/s = {rate * nbytes / 1e9:.1f} GB/s = "
              f"{rate * nbytes / read:.0%} of the read bandwidth")


if __name__ == "__main__":
    main()

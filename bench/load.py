"""Load benchmark: time and peak RSS of loading a checkpoint, against its bytes on disk.

Each load runs in a fresh process (peak RSS is per process). By default a random checkpoint with
the real width and vocabulary and a few layers is written under bench/out/ first.
Usage: python bench/load.py [--layers 4] [--ckpt DIR] [--dtype bfloat16 float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
from chatglm3.weights.checkpoint import load_model

def hwm():  # VmHWM, unlike ru_maxrss, is not inherited from the parent across exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024

base = hwm()
dtype = getattr(torch, sys.argv[2])
t = time.perf_counter()
model = load_model(sys.argv[1], "cpu", dtype)
seconds = time.perf_counter() - t
peak = hwm()
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(seconds=seconds, base=base, peak=peak, model_bytes=size)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    ckpt = args.ckpt
    if ckpt is None:
        from synthetic import write_checkpoint

        ckpt = ROOT / "bench" / "out" / f"ckpt-{args.layers}l"
        if not (ckpt / "pytorch_model.bin.index.json").exists():
            write_checkpoint(ckpt, num_layers=args.layers)
    disk = sum(p.stat().st_size for p in ckpt.glob("pytorch_model*.bin"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    print(f"checkpoint: {ckpt} ({disk / 2**30:.2f} GiB of .bin shards)")
    print(f"{'dtype':<10}{'load s':>8}{'model GiB':>11}{'peak RSS GiB':>14}"
          f"{'peak-base GiB':>15}{'(peak-base)/model':>19}")
    for dtype in args.dtype:
        out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), dtype], env=env,
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        grown = r["peak"] - r["base"]
        print(f"{dtype:<10}{r['seconds']:>8.2f}{r['model_bytes'] / 2**30:>11.2f}"
              f"{r['peak'] / 2**30:>14.2f}{grown / 2**30:>15.2f}{grown / r['model_bytes']:>19.2f}")


if __name__ == "__main__":
    main()

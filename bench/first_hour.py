"""How fast the command line answers a new user: time to its first stderr line, and to the
error of a mistyped path, flag or value (each before torch is imported), against a run that
loads the model. Prints a table of medians; commands alternate within each round.

    python bench/first_hour.py [--rounds 5] [--weights DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "golden" / "tiny-32k" / "ckpt"


def first_line_and_end(args: list[str]) -> tuple[float, float, str]:
    """(s to the first stderr line, s to the exit, that line) of `python -m chatglm3 ARGS`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "chatglm3", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    t_first = time.perf_counter() - t0
    proc.stderr.read()
    proc.wait()
    return t_first, time.perf_counter() - t0, first.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", default=str(TINY), help="a checkpoint for the run that loads")
    args = ap.parse_args()
    cases = {
        "mistyped --weights": ["generate", "--prompt", "hi", "--weights", "./weigths"],
        "misspelled flag (--promt)": ["generate", "--promt", "hi"],
        "value out of range (--temperature 9)": ["generate", "--prompt", "hi", "--temperature", "9"],
        "generate, 2 tokens (loads the model)": ["generate", "--prompt", "hi", "--max-tokens", "2",
                                                 "--weights", args.weights],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    said: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, argv in cases.items():
            first, end, line = first_line_and_end(argv)
            times[name].append((first, end))
            said[name] = line
    print(f"python -m chatglm3, {args.rounds} rounds, medians ({os.cpu_count()} CPUs)\n")
    print("| command | first stderr line s | exit s | the first line |")
    print("|---|---|---|---|")
    for name, runs in times.items():
        first = statistics.median(r[0] for r in runs)
        end = statistics.median(r[1] for r in runs)
        print(f"| {name} | {first:.2f} | {end:.2f} | {said[name][:70]} |")


if __name__ == "__main__":
    main()

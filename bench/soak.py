"""Soak benchmark: memory and latency of the real Cog server over many distinct prompt lengths.

Starts `python -m cog.server.http` on predict.py (as the image does, and as
tests/cog/test_cog_server.py does) on CPU in bfloat16, runs N greedy predictions one after another,
each with a prompt of a length not seen before, and samples the RSS of the server's process tree
and of its worker (the process running the model) after every one. A bf16 CPU server once grew
from 843 MB to 1.8 GB over 400 such predictions (one oneDNN state per new input shape); the
targets are RSS growth <= 5% and median latency drift <= 20% after warm-up.

With the prefill buckets the RSS still grows a little during the first ~80 predictions: each
bucket shape costs its oneDNN state once, on first use (in-process, after one prompt per bucket
shape, 400 new lengths leave the RSS flat to the MB). "growth over the second half" shows the
steady state. Wall-clock latencies on a small shared machine follow whatever else runs: the
table reports other processes' CPU use meanwhile and the worker's own CPU time per prediction.

Usage: python bench/soak.py [--n 400] [--weights DIR] [--dtype bfloat16] [--no-buckets]
  --no-buckets: the engine pads no prefill chunk (every prompt length its own shape), for the
  before/after comparison. Bench-only: a sitecustomize on the server's PYTHONPATH sets
  PREFILL_BUCKETS to every length from 1 to PREFILL_CHUNK when chatglm3.engine.engine is imported.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from cogserver import _create, running_server  # noqa: E402 - the tests' server harness
PAGE = os.sysconf("SC_PAGE_SIZE")

NO_BUCKETS_HOOK = '''
"""Bench-only (bench/soak.py --no-buckets): no prefill padding in chatglm3.engine.engine."""
import importlib.abc
import importlib.util
import sys


class _NoBuckets(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "chatglm3.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.PREFILL_BUCKETS = tuple(range(1, module.PREFILL_CHUNK + 1))

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoBuckets())
'''


# ---- processes ----

def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += tree.get(p, [])
    return out


def rss(pid: int) -> int:
    """Resident bytes of one process (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle or waiting for I/O), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def find_worker(server: int) -> int | None:
    """The worker: the largest python process below the server (coglet starts it as a child)."""
    below = [p for p in descendants(server) if p != server and "python" in cmdline(p)]
    return max(below, key=rss, default=None)


# ---- HTTP ----

def server_env(weights: Path, dtype: str, no_buckets: bool, hook_dir: Path) -> dict[str, str]:
    """The server's environment on top of what running_server sets (PATH, PORT, the stub)."""
    env = dict(COG_WEIGHTS=str(weights), CHATGLM3_DEVICE="cpu", CHATGLM3_DTYPE=dtype)
    if no_buckets:
        (hook_dir / "sitecustomize.py").write_text(NO_BUCKETS_HOOK)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir),
                                                          os.environ.get("PYTHONPATH", "")]))
    return env


# ---- the soak ----

def prompt_sizes(n: int, warm: int, lo: int, hi: int, seed: int) -> list[int]:
    """n distinct repeat counts for "x " in [lo, hi], in the order to run them.

    The `warm` predictions right after the warm-up and the last `warm` ones are matched: k
    there, k + 1 here, in the same order, so their latencies compare although every length
    is new. The others are random, in a random order.
    """
    bases = range((lo + 1) // 2, (hi - 1) // 2 + 1)  # base b gives 2b and 2b + 1
    if n < 3 * warm or len(bases) < n - warm:
        raise SystemExit("need --n >= 3 x warm-up and (--max-len - --min-len) / 2 >= --n")
    rng = random.Random(seed)
    picked = rng.sample(bases, n - warm)
    matched, single = picked[:warm], [2 * b + rng.randrange(2) for b in picked[warm:]]
    return (single[:warm] + [2 * b for b in matched] + single[warm:]
            + [2 * b + 1 for b in matched])


def mb(b: float) -> str:
    return f"{b / 1e6:,.0f} MB"


def pct(a: float, b: float) -> str:
    return f"{(b / a - 1) * 100:+.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="predictions (default 400)")
    ap.add_argument("--weights", type=Path, default=ROOT.parent / "shared/golden/tiny-32k/ckpt",
                    help="checkpoint directory (default ../shared/golden/tiny-32k/ckpt)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--min-len", type=int, default=8, help="fewest 'x ' repeats in a prompt")
    ap.add_argument("--max-len", type=int, default=3000, help="most 'x ' repeats in a prompt")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="fraction of predictions counted as warm-up (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-buckets", action="store_true",
                    help="no prefill padding (the behaviour before the buckets), to compare")
    ap.add_argument("--csv", type=Path, default=None, help="also write every sample here")
    args = ap.parse_args()

    warm = max(1, round(args.n * args.warmup))
    sizes = prompt_sizes(args.n, warm, args.min_len, args.max_len, args.seed)
    with tempfile.TemporaryDirectory() as tmp, running_server(
            Path(tmp) / "server.log", startup_s=300,
            **server_env(args.weights.resolve(), args.dtype, args.no_buckets, Path(tmp))) as srv:
        if srv.health.get("status") != "READY":
            raise SystemExit(f"server not ready: {srv.health}\n{srv.log_tail(30)}")
        server, base = srv.pid, srv.base
        worker = find_worker(server)
        if worker is None:
            raise SystemExit("no worker process found below the server")
        ready_tree = sum(rss(p) for p in descendants(server))
        ready_worker = rss(worker)
        rows = []  # (prompt tokens, seconds, worker RSS, tree RSS, worker CPU seconds)
        t_start = time.monotonic()
        busy_start, ours_start = busy_cpu_seconds(), sum(map(cpu_seconds, (server, worker)))
        for i, k in enumerate(sizes):
            t, cpu = time.perf_counter(), cpu_seconds(worker)
            code, body = _create("POST", base + "/predictions", {"input": {
                "prompt": "x " * k, "max_tokens": args.max_tokens, "temperature": 0}},
                retry_s=5.0)
            seconds = time.perf_counter() - t
            if code != 200 or body.get("status") != "succeeded":
                raise SystemExit(f"prediction {i} (k={k}) failed: {code} {body}")
            tokens = body["metrics"]["input_token_count"]
            rows.append((tokens, seconds, rss(worker),
                         sum(rss(p) for p in descendants(server)),
                         cpu_seconds(worker) - cpu))
            if (i + 1) % max(1, args.n // 10) == 0:
                print(f"  {i + 1:>4}/{args.n}  worker {mb(rows[-1][2])}  tree "
                      f"{mb(rows[-1][3])}  {time.monotonic() - t_start:.0f} s", flush=True)
        wall = time.monotonic() - t_start
        # Other processes' CPU use meanwhile, in cores: wall-clock latencies on a small
        # shared machine mean little when this is not near 0.
        others = (busy_cpu_seconds() - busy_start
                  - (sum(map(cpu_seconds, (server, worker))) - ours_start)) / wall

    if args.csv:
        args.csv.write_text("prompt_tokens,seconds,worker_rss,tree_rss,worker_cpu_s\n" + "".join(
            f"{t},{s:.4f},{w},{r},{c:.2f}\n" for t, s, w, r, c in rows))
    lengths = {r[0] for r in rows}
    after_warm, half, end = rows[warm - 1], rows[len(rows) // 2 - 1], rows[-1]
    first = [r[1] for r in rows[warm : 2 * warm]]  # the first 10% after warm-up ...
    last = [r[1] for r in rows[-warm:]]  # ... and the last 10%: the same lengths, +1 token
    lat_first, lat_last = statistics.median(first), statistics.median(last)
    growth = end[2] / after_warm[2] - 1
    drift = lat_last / lat_first - 1
    print()
    print(f"soak: {args.n} greedy predictions, {len(lengths)} distinct prompt lengths "
          f"({min(lengths)}-{max(lengths)} tokens), max_tokens {args.max_tokens}, "
          f"{args.dtype} on CPU, prefill buckets {'off' if args.no_buckets else 'on'}")
    print(f"{'':<36}{'worker':>12}{'server tree':>14}")
    for label, a, b in (("RSS when ready", ready_worker, ready_tree),
                        (f"RSS after warm-up ({warm} preds)", after_warm[2], after_warm[3]),
                        (f"RSS half-way ({len(rows) // 2} preds)", half[2], half[3]),
                        (f"RSS at the end ({args.n} preds)", end[2], end[3])):
        print(f"{label:<36}{mb(a):>12}{mb(b):>14}")
    for label, a, b in (("growth after warm-up", after_warm, end),
                        ("growth over the second half", half, end)):
        print(f"{label:<36}{pct(a[2], b[2]):>12}{pct(a[3], b[3]):>14}")
    print(f"{'growth from ready':<36}{pct(ready_worker, end[2]):>12}{pct(ready_tree, end[3]):>14}")
    print(f"{f'median latency, preds {warm + 1}-{2 * warm}':<36}{lat_first * 1e3:>9.0f} ms")
    print(f"{f'median latency, preds {args.n - warm + 1}-{args.n}':<36}{lat_last * 1e3:>9.0f} ms")
    print(f"{'latency drift':<36}{drift * 100:>+10.1f}%")
    print(f"{'mean latency, all preds':<36}{statistics.fmean(r[1] for r in rows) * 1e3:>9.0f} ms")
    # CPU time is less sensitive than wall time to other work on a small shared machine
    # (though coarse: clock ticks, and OpenMP threads spinning while descheduled still count).
    cpu_first = statistics.fmean(r[4] for r in rows[warm : 2 * warm])
    cpu_last = statistics.fmean(r[4] for r in rows[-warm:])
    print(f"{'worker CPU per pred, same windows':<36}{cpu_first * 1e3:>9.0f} ms"
          f" -> {cpu_last * 1e3:.0f} ms ({pct(cpu_first, cpu_last)})")
    print(f"{'other processes meanwhile':<36}{others:>8.2f} cores of {os.cpu_count()}")
    verdict = "PASS" if growth <= 0.05 and drift <= 0.20 else "FAIL"
    print(f"{verdict} (targets after warm-up: worker RSS growth <= +5%, latency drift <= +20%)")


if __name__ == "__main__":
    main()

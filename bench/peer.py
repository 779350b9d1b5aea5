"""This project's server against vLLM's on the same machine, one server at a time, alternating.

Each round starts one server, measures every row, stops it, then does the same for the other
(the order flips each round, so a machine that warms up or slows down over the run hits both).
Both get the same checkpoint, dtype, thread count and requests: prompts as token ids to
/v1/completions, answers of exactly the asked length, prefix caches off.

Rows:
- start to ready: from launching the process until GET /v1/models answers 200.
- time to first token for prompts of N tokens: a streamed request of 2 tokens, until the first
  chunk with a token arrives (one request at a time; each prompt's ids are new random ones, so
  no cache could help).
- decoding, 1 stream: (tokens - 1) / (last chunk - first chunk) of one streamed answer, the
  best of --decode-repeats answers per server start.
- 8 streams x T tokens, aggregate: 8 x T / wall time of 8 concurrent answers (short prompts).
  Where it goes, two more rows: the seconds until every stream has its first token (how the
  arrivals' prefills were scheduled) and the median time between two token chunks of a
  stream once all run (the decoding step at batch 8).
- peak memory: the largest sum of VmRSS over the server's process group, sampled every 0.2 s.

vLLM runs from its own virtual environment (never this project's requirements): see
docs/benchmarks.md for how it was installed. Its CPU build is started as its docs advise, with
TCMalloc and Intel OpenMP preloaded where present, the compute threads bound to the cores.

Ours runs as `scripts/run serve` (what a user runs; it preloads TCMalloc where installed).

Quantized: `--quantize int4 --vllm-weights AWQ_DIR` (bench/awq_checkpoint.py makes an AWQ int4
copy of the checkpoint: vLLM's CPU int4 path reads only pre-quantized checkpoints).

Usage: python bench/peer.py --weights DIR [--vllm-python PATH] [--rounds 2]
       [--prompts 512,2048,8192] [--decode-tokens 32] [--decode-repeats 3] [--streams 8]
       [--stream-tokens 128]
       [--only ours|vllm]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ChatGLM3's end tokens: vLLM without a tokenizer learns none of them from the checkpoint.
STOP_IDS = [2, 64795, 64797]
VOCAB_FOR_PROMPTS = (100, 60000)  # ordinary pieces: no special token lands in a prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rss(pgid: int) -> int:
    """Bytes of VmRSS summed over every process in the group."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    extra: dict  # request fields this server needs for exact lengths
    port: int = 0
    proc: subprocess.Popen | None = None
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, log_path: Path, timeout: float = 1200) -> float:
        """Launches the server; returns seconds until it answers."""
        self.peak_rss, self._stop = 0, threading.Event()
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._sample_rss, daemon=True).start()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {log_path}")
            try:
                status, _ = request(self.port, "GET", "/v1/models", timeout=5)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{self.name} not ready after {timeout} s; see {log_path}")
            time.sleep(0.25)

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, group_rss(self.proc.pid))

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        time.sleep(2)  # let the kernel take the memory back before the next server starts


def request(port: int, method: str, path: str, body: dict | None = None,
            timeout: float = 3600) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stream(server: Server, prompt: list[int], tokens: int) -> tuple[float, list[float], int]:
    """One streamed completion of exactly `tokens` tokens: (seconds to the first token chunk,
    arrival time of every token chunk, completion tokens from usage)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **server.extra}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{server.name}: {resp.status} {resp.read()[:500]!r}")
    arrivals, used = [], 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        now = time.perf_counter()
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            used = chunk["usage"]["completion_tokens"]
        if chunk.get("choices"):
            arrivals.append(now)
    conn.close()
    if not arrivals:
        raise RuntimeError(f"{server.name}: no token chunk")
    return arrivals[0] - t0, arrivals, used


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB_FOR_PROMPTS) for _ in range(n)]


def measure(server: Server, args: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    out: dict[str, float] = {}
    stream(server, random_prompt(rng, 16), 2)  # the first request of a fresh server: untimed
    for n in args.prompts:
        ttft, _, _ = stream(server, random_prompt(rng, n), 2)
        out[f"ttft_{n}"] = ttft
        print(f"  {server.name}: time to first token, {n} tokens: {ttft:.2f} s", flush=True)
    rates = []
    for _ in range(args.decode_repeats):  # cheap next to a start: the best of a few
        _, arrivals, used = stream(server, random_prompt(rng, 32), args.decode_tokens)
        if used != args.decode_tokens:
            raise RuntimeError(f"{server.name}: {used} tokens, asked {args.decode_tokens}")
        # Chunks, not tokens, are timed: a server may hold back an incomplete character.
        # The first and last chunk carry the first and last token either way.
        rates.append((used - 1) / (arrivals[-1] - arrivals[0]))
    out["decode_1"] = max(rates)
    print(f"  {server.name}: decoding, 1 stream: {' '.join(f'{r:.3f}' for r in rates)} tok/s",
          flush=True)
    prompts = [random_prompt(rng, 32) for _ in range(args.streams)]
    counts = [0] * args.streams
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]

    def one(i: int) -> None:
        _, arrivals[i], counts[i] = stream(server, prompts[i], args.stream_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if counts != [args.stream_tokens] * args.streams:
        raise RuntimeError(f"{server.name}: token counts {counts}")
    out["decode_n"] = args.streams * args.stream_tokens / wall
    all_in = max(a[0] for a in arrivals)
    out["all_started"] = all_in - t0
    gaps = sorted(b - a for times in arrivals for a, b in zip(times, times[1:]) if a > all_in)
    if gaps:
        out["step_n"] = gaps[len(gaps) // 2] * 1000
    print(f"  {server.name}: {args.streams} streams: {out['decode_n']:.2f} tok/s (all started "
          f"after {out['all_started']:.2f} s)", flush=True)
    return out


def servers(args: argparse.Namespace) -> dict[str, Server]:
    threads = str(args.threads)
    ours_env = dict(os.environ, OMP_NUM_THREADS=threads)
    ours_env.pop("CHATGLM3_DEVICE", None)
    ours_port, vllm_port = free_port(), free_port()
    # scripts/run: the user's command (it preloads TCMalloc where the system has it)
    ours = Server("ours", [str(ROOT / "scripts" / "run"), "serve", "--weights",
                           str(args.weights), "--port", str(ours_port), "--device", "cpu",
                           "--dtype", args.dtype, "--max-batch", str(args.streams),
                           "--quantize", args.quantize, "--no-web", "--model-name", "m"],
                  ours_env, {}, ours_port)
    venv = Path(args.vllm_python).parent.parent
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           str(venv / "lib" / "libiomp5.so")) if Path(p).exists()]
    vllm_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib),
                    VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
                    LD_PRELOAD=":".join(preload))
    vllm = Server("vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                           "--model", str(args.vllm_weights or args.weights),
                           "--served-model-name", "m",
                           "--skip-tokenizer-init", "--dtype", args.dtype,
                           "--max-num-seqs", str(args.streams), "--no-enable-prefix-caching",
                           "--port", str(vllm_port), "--host", "127.0.0.1"]
                  + (["--quantization", args.vllm_quantization] if args.vllm_quantization
                     else []),
                  vllm_env, {"ignore_eos": True, "stop_token_ids": STOP_IDS}, vllm_port)
    return {"ours": ours, "vllm": vllm}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f} " in flags]
    except OSError:
        isa = []
    return f"{model}, {os.cpu_count()} cores, ISA {'/'.join(isa)}, {platform.python_version()}"


ROWS = [("start", "start to ready (s)", "lower"), ("peak_rss", "peak memory (GiB)", "lower"),
        ("decode_1", "decoding, 1 stream (tok/s)", "higher"),
        ("decode_n", "{streams} streams x {stream_tokens} tokens (tok/s)", "higher"),
        ("all_started", "{streams} streams: all started after (s)", "lower"),
        ("step_n", "{streams} streams: median time between tokens (ms)", "lower")]


def table(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    rows = ROWS[:2] + [(f"ttft_{n}", f"time to first token, {n:,} tokens (s)", "lower")
                       for n in args.prompts] + ROWS[2:]
    lines = [f"machine: {machine()}", f"rounds: {args.rounds}, dtype {args.dtype}, "
             f"{args.threads} threads, quantize {args.quantize}"
             + (f", vLLM reads {args.vllm_weights}" if args.vllm_weights else ""), "",
             "| metric | ours (best; all) | vLLM (best; all) | ours / vLLM (best; per round) |",
             "|---|---|---|---|"]
    for key, label, better in rows:
        pick = min if better == "lower" else max
        ours = [r[key] for r in results["ours"] if key in r]
        peer = [r[key] for r in results["vllm"] if key in r]
        if not ours or not peer:
            continue
        scale = 2**30 if key == "peak_rss" else 1
        fmt = ((lambda v: f"{v:.3f}") if key == "decode_1" else (lambda v: f"{v:.0f}")
               if key == "step_n" else (lambda v: f"{v / scale:.2f}"))
        per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(ours, peer))
        lines.append(f"| {label.format(**vars(args))} | {fmt(pick(ours))}; "
                     f"{' '.join(fmt(v) for v in ours)} | {fmt(pick(peer))}; "
                     f"{' '.join(fmt(v) for v in peer)} | {pick(ours) / pick(peer):.2f}; "
                     f"{per_round} ({better} is better) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--vllm-python", default=str(ROOT.parent / "vllm-venv" / "bin" / "python"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")],
                    default=[512, 2048, 8192])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quantize", default="none", help="ours: none | int8 | int4")
    ap.add_argument("--vllm-quantization", default=None,
                    help="vLLM's --quantization for its closest mode, if any")
    ap.add_argument("--vllm-weights", type=Path, default=None,
                    help="vLLM's checkpoint, if not --weights: e.g. an AWQ copy made by "
                         "bench/awq_checkpoint.py, its closest mode to --quantize int4")
    ap.add_argument("--vllm-kv-gib", type=int, default=4)
    ap.add_argument("--only", choices=("ours", "vllm"), default=None)
    ap.add_argument("--log-dir", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    srv = servers(args)
    names = [args.only] if args.only else ["ours", "vllm"]
    results: dict[str, list[dict[str, float]]] = {n: [] for n in ("ours", "vllm")}
    rng = random.Random(0)
    print(machine(), flush=True)
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            s = srv[name]
            print(f"round {rnd + 1}: {name}", flush=True)
            try:
                start = s.start(args.log_dir / f"peer-{name}-{rnd + 1}.log")
                print(f"  {name}: ready in {start:.1f} s", flush=True)
                res = {"start": start, **measure(s, args, rng)}
                res["peak_rss"] = s.peak_rss
                results[name].append(res)
            finally:
                s.stop()
    print()
    if args.only:
        print(json.dumps(results[args.only], indent=1))
    else:
        print(table(results, args))


if __name__ == "__main__":
    main()

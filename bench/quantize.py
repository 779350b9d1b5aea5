"""Weight-only quantization (chatglm3/model/quantize.py): speed, memory and quality per mode.

speed: a random checkpoint at the real width and vocabulary with --layers layers (default 4;
  28 is the whole 6.2B model: 12.5 GB on disk, 12 GiB RSS for `none`), loaded in
  bfloat16 by each mode in a process of its own (peak RSS is per process), the modes
  alternating over --rounds rounds; per mode the best round of: load time, peak RSS, prefill
  time of a --prefill-token prompt, decode tokens/s at batch 1 and batch 8 (engine streaming
  path, greedy). Ratios against `none`.
quality: the golden tiny checkpoint and a random real-width checkpoint (--quality-layers
  layers): against fp32 without quantization, the last-token logits' relative L2, top-1
  agreement over every position of a --text-tokens text, and how many greedy tokens match
  fp32's continuation (of --greedy tokens), for bf16 without quantization and each mode.
parts: what the embedding and the output layer would cost and give, on the real-width
  checkpoint (bf16 compute): last-token logits' relative L2 vs fp32 and top-1 agreement over a
  --parts-tokens text with the output layer unquantized, int8 or int4 (layers int4), and with
  the embedding rounded to int8 per row; the output layer's share of a batch-1 step.
kernels: one linear layer of the real MLP (27,392 x 4,096), ms per call for 1 to 512 rows
  (decoding batches to prefill chunks), bf16 and fp32 activations: unquantized, aten's int8
  and int4 kernels (int4 at group sizes 32, 64, 128), and qlinear's Int8Linear / Int4Linear,
  which take the kernel for a few rows and widen the weights for more; torchao's
  Int8WeightOnlyConfig at 1 row.
Usage: python bench/quantize.py [speed|quality|parts|kernels|all] [--layers 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The text the quality rows are measured on: a long document of ours (the README was, until it
# moved its depth into docs/; the numbers in docs/benchmarks.md say which text they used).
QUALITY_TEXT = ROOT / "docs" / "benchmarks.md"
MODES = ("none", "int8", "int4")

SPEED_CHILD = r"""
import json, re, sys, threading, time
import torch
from chatglm3.engine.engine import Engine
from chatglm3.params import SamplingParams

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

ckpt, mode, prefill_tokens, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode != "none":
    from chatglm3.model.quantize import import_torchao
    import_torchao()  # imports outside the timed load
t = time.perf_counter()
engine = Engine.from_pretrained(ckpt, "cpu", "bfloat16", quantize=mode)
load_s = time.perf_counter() - t
peak = status("VmHWM")
tok = engine.tokenizer
ids = tok.build_chat_input([]) + (tok.encode_text("A fox learns to fly. 狐狸学飞。 " * 400))
prompt = ids[:prefill_tokens]

def run(n_streams, max_tokens):
    gens = [engine.generate_ids(prompt[:64] + [100 + i], SamplingParams(max_tokens=max_tokens, temperature=0))
            for i in range(n_streams)]
    stamps = [[] for _ in gens]
    def consume(g, log):
        for _ in g:
            log.append(time.perf_counter())
    threads = [threading.Thread(target=consume, args=(g, s)) for g, s in zip(gens, stamps)]
    [th.start() for th in threads]; [th.join() for th in threads]
    t0 = max(s[0] for s in stamps); t1 = min(s[-1] for s in stamps)
    counted = sum(sum(1 for x in s if t0 < x <= t1) for s in stamps)
    return counted / (t1 - t0)

run(1, 4)  # first calls of each shape
g = engine.generate_ids(prompt, SamplingParams(max_tokens=1, temperature=0))
t = time.perf_counter(); g.text(); prefill_s = time.perf_counter() - t
b1 = run(1, tokens)
b8 = run(8, max(8, tokens // 2))
print(json.dumps(dict(load_s=load_s, peak=peak, weights=engine.weight_bytes, prefill_s=prefill_s,
                      b1=b1, b8=b8, peak_end=status("VmHWM"))))
engine.close()
"""


def speed(args: argparse.Namespace) -> None:
    from synthetic import write_checkpoint

    ckpt = args.ckpt or ROOT / "bench" / "out" / f"ckpt-{args.layers}l"
    if not (ckpt / "pytorch_model.bin.index.json").exists():
        write_checkpoint(ckpt, num_layers=args.layers)
    shard = max(p.stat().st_size for p in ckpt.glob("pytorch_model-*.bin"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    best: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(ckpt), mode,
                                  str(args.prefill_tokens), str(args.tokens)], env=env,
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode}: {out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {rnd + 1} {mode}: {json.dumps(r)}", flush=True)
            b = best.setdefault(mode, dict(r))
            for key in ("load_s", "peak", "prefill_s", "peak_end"):
                b[key] = min(b[key], r[key])
            for key in ("b1", "b8"):
                b[key] = max(b[key], r[key])
    base = best["none"]
    print(f"\n{args.layers} layers at real width, bf16 compute, {args.rounds} alternating "
          f"rounds (best of each); largest shard {shard / 2**30:.2f} GiB")
    print("| mode | weights GiB | load s | peak RSS in load GiB (ratio) | peak RSS at end GiB (ratio) | prefill "
          f"{args.prefill_tokens} tok s (ratio) | decode b1 tok/s (ratio) | decode b8 tok/s (ratio) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        r = best[mode]
        print(f"| {mode} | {r['weights'] / 2**30:.2f} | {r['load_s']:.1f} | "
              f"{r['peak'] / 2**30:.2f} ({r['peak'] / base['peak']:.2f}x) | "
              f"{r['peak_end'] / 2**30:.2f} ({r['peak_end'] / base['peak_end']:.2f}x) | "
              f"{r['prefill_s']:.2f} ({base['prefill_s'] / r['prefill_s']:.2f}x faster) | "
              f"{r['b1']:.2f} ({r['b1'] / base['b1']:.2f}x) | {r['b8']:.2f} "
              f"({r['b8'] / base['b8']:.2f}x) |")


def quality_of(ckpt: Path, ids: list[int], greedy: int, label: str) -> list[str]:
    """Rows of the quality table for one checkpoint: each (mode, dtype) against fp32 none."""
    import gc

    import torch

    from chatglm3.weights.checkpoint import load_model
    from chatglm3.model.quantize import release_freed_memory

    def run(mode: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        model = load_model(ckpt, "cpu", dtype, quantize=mode)
        with torch.inference_mode():
            out = model.model(input_ids=torch.tensor(ids)[None], use_cache=False)
            hidden = out.last_hidden_state[0]
            top1 = torch.cat([model.lm_head(h).float().argmax(-1)
                              for h in hidden.split(256)])  # in slices: [2000, 65024] fp32 is big
            last = model.lm_head(hidden[-1:]).float()[0]
            del out, hidden
            seq = torch.tensor(ids[-64:])[None]  # a short context keeps the greedy loop cheap
            cont = []
            for _ in range(greedy):
                nxt = int(model(input_ids=seq, logits_to_keep=1).logits[0, -1].argmax())
                cont.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        del model
        gc.collect()
        release_freed_memory()
        return top1, last, cont

    ref_top1, ref_last, ref_cont = run("none", torch.float32)
    rows = []
    for mode, dtype in (("none", torch.bfloat16), ("int8", torch.bfloat16),
                        ("int4", torch.bfloat16), ("int8", torch.float32),
                        ("int4", torch.float32)):
        if dtype == torch.float32 and label != "golden tiny":
            continue  # fp32 rows on the golden checkpoint only (CPU users run bf16)
        top1, last, cont = run(mode, dtype)
        rel = float((last - ref_last).norm() / ref_last.norm())
        agree = float((top1 == ref_top1).float().mean())
        match = next((i for i, (a, b) in enumerate(zip(cont, ref_cont)) if a != b), greedy)
        rows.append(f"| {label} | {mode} | {str(dtype).removeprefix('torch.')} | {rel:.4f} | "
                    f"{agree:.2%} | {match}/{greedy} |")
        print(rows[-1], flush=True)
    return rows


def quality(args: argparse.Namespace) -> None:
    from synthetic import write_checkpoint

    from chatglm3.text.tokenizer import ChatGLMTokenizer

    golden = ROOT.parent / "shared" / "golden" / "tiny-32k" / "ckpt"
    tok = ChatGLMTokenizer.from_dir(golden)
    text = QUALITY_TEXT.read_text()
    ids = tok.build_chat_input([]) + tok.encode_text(text)
    ids = ids[: args.text_tokens]
    assert len(ids) == args.text_tokens, len(ids)
    wide = ROOT / "bench" / "out" / f"ckpt-{args.quality_layers}l"
    if not (wide / "pytorch_model.bin.index.json").exists():
        write_checkpoint(wide, num_layers=args.quality_layers)
    print(f"text: the first {len(ids)} tokens of {QUALITY_TEXT.name}; greedy continuation of its last 64")
    print("| checkpoint | mode | compute | last-token logits rel. L2 vs fp32 | top-1 = fp32 "
          "(every position) | greedy tokens = fp32 |")
    print("|---|---|---|---|---|---|")
    rows = quality_of(golden, ids, args.greedy, "golden tiny")
    rows += quality_of(wide, ids, args.greedy, f"random, real width, {args.quality_layers} layers")
    print("\n" + "\n".join(rows))


def parts(args: argparse.Namespace) -> None:
    import time

    import torch

    import chatglm3.model.quantize as Q
    from chatglm3.weights.checkpoint import load_model
    from chatglm3.text.tokenizer import ChatGLMTokenizer
    from synthetic import write_checkpoint

    wide = ROOT / "bench" / "out" / f"ckpt-{args.quality_layers}l"
    if not (wide / "pytorch_model.bin.index.json").exists():
        write_checkpoint(wide, num_layers=args.quality_layers)
    tok = ChatGLMTokenizer.from_dir(wide)
    ids = (tok.build_chat_input([]) + tok.encode_text(QUALITY_TEXT.read_text()))
    ids = torch.tensor(ids[: args.parts_tokens])[None]

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
            return torch.cat([model.lm_head(h).float() for h in hidden.split(128)])

    ref = logits(load_model(wide, "cpu", torch.float32))
    print(f"{args.quality_layers} layers at real width, {ids.shape[1]} tokens; layers int4, "
          "bf16 compute, against fp32 without quantization")
    print("| output layer | embedding | last-token logits rel. L2 | top-1 = fp32 | output layer "
          "ms per batch-1 step | output layer bytes |")
    print("|---|---|---|---|---|---|")
    for output, embed in (("none", "bf16"), ("int8", "bf16"), ("int4", "bf16"),
                          ("int8", "int8 (rounded per row)")):
        Q.Quantizer.output_mode = output
        model = load_model(wide, "cpu", torch.bfloat16, quantize="int4")
        if embed != "bf16":
            with torch.no_grad():
                w = model.model.embed_tokens.weight
                s = (w.float().abs().amax(1, keepdim=True) / 127).to(w.dtype).float()
                w.copy_((w.float() / s).round().clamp(-127, 127) * s)
        out = logits(model)
        rel = float((out[-1] - ref[-1]).norm() / ref[-1].norm())
        top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        x = torch.randn(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
        with torch.inference_mode():
            model.lm_head(x)
            t = time.perf_counter()
            for _ in range(10):
                model.lm_head(x)
            ms = (time.perf_counter() - t) * 100
        head = Q.weight_bytes(model.lm_head)
        print(f"| {output} | {embed} | {rel:.4f} | {top1:.2%} | {ms:.1f} | "
              f"{head / 2**20:.0f} MiB |", flush=True)
        del model
        Q.release_freed_memory()
    Q.Quantizer.output_mode = "int8"


def kernels(args: argparse.Namespace) -> None:
    import copy
    import time

    import torch

    import chatglm3.model.qlinear as L
    import chatglm3.model.quantize as Q

    with Q._quiet_torchao_import():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def best_ms(fn, x, n: int) -> float:
        fn(x)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(n):
                fn(x)
            times.append((time.perf_counter() - t) / n)
        return min(times) * 1000

    def variants(lin: torch.nn.Linear) -> dict:
        w = lin.weight.detach()
        i8 = L.Int8Linear.from_linear(lin)
        out = {"unquantized": lin,
               "aten _weight_int8pack_mm": i8.kernel,
               f"Int8Linear (kernel up to {i8.kernel_max_rows} rows, widened above)": i8}
        for g in (32, 64, 128):
            saved, Q.INT4_GROUP_SIZE = Q.INT4_GROUP_SIZE, g
            i4 = L.Int4Linear.from_weight(Q.int4_cpu_weight(w), None)
            Q.INT4_GROUP_SIZE = saved
            out[f"aten _weight_int4pack_mm_for_cpu, group {g}"] = i4.kernel
        out[f"Int4Linear, group 128 (kernel up to {i4.kernel_max_rows} rows, widened above)"] = i4
        return out

    rows = (1, 8, 16, 32, 64, 128, 512)
    torch.manual_seed(0)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, AMX: "
          f"{torch.cpu._is_amx_tile_supported()}, threads: {torch.get_num_threads()}")
    for dtype in (torch.bfloat16, torch.float32):
        lin = torch.nn.Linear(4096, 27392, bias=False).to(dtype).requires_grad_(False)
        print(f"\none 27,392 x 4,096 layer, {dtype} activations, ms per call by rows (best of 3)")
        print("| weights | " + " | ".join(str(r) for r in rows) + " |")
        print("|---" * (len(rows) + 1) + "|")
        with torch.inference_mode():
            for name, fn in variants(lin).items():
                if dtype == torch.float32 and ("group 32" in name or "group 64" in name):
                    continue
                cells = [best_ms(fn, torch.randn(r, 4096, dtype=dtype), max(1, 8 // r))
                         for r in rows]
                print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in cells) + " |", flush=True)
            ao8 = copy.deepcopy(lin)
            quantize_(ao8, Int8WeightOnlyConfig(set_inductor_config=False))
            print(f"(torchao Int8WeightOnlyConfig, 1 row: "
                  f"{best_ms(ao8, torch.randn(1, 4096, dtype=dtype), 2):.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("what", nargs="?", default="all",
                    choices=("speed", "quality", "parts", "kernels", "all"))
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--quality-layers", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=2000)
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--parts-tokens", type=int, default=512)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    if args.what in ("speed", "all"):
        speed(args)
    if args.what in ("quality", "all"):
        quality(args)
    if args.what in ("parts", "all"):
        parts(args)
    if args.what in ("kernels", "all"):
        kernels(args)


if __name__ == "__main__":
    main()

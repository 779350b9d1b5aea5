"""GPU benchmark, ready for one call on a lent GPU (no download: random full-size weights).

Builds ChatGLM3-6B-32K's exact shapes with random fp16 weights on the GPU and prints:
0. setup: the KV cache each engine planned (rows x positions, from the free memory) and what
   its warm-up did: prefill shapes, decoding graphs recorded and how long that took, the
   graphs-vs-eager self-check;
1. batch-1 decode tokens/s (bare forward loop, the engine decoding eagerly, the engine
   replaying CUDA graphs) and the share of the memory-bandwidth floor each reaches (target:
   graphs >= 90%);
2. whether graphs give the same greedy tokens as eager steps;
3. aggregate decode tokens/s at 8 and 32 streams (eager and graphs);
4. time to first token at 1k, 8k and 32k prompt tokens;
5. each --quantize mode (int8, int4; chatglm3/model/quantize.py) on the same random weights: weight
   bytes, the KV plan, the warm-up's graphs self-check, batch-1 and 8-stream decode tokens/s
   (ratios against the unquantized engine), and quality against the unquantized model:
   last-token logits' relative L2, top-1 agreement over every position of a 2,000-token
   text, and greedy tokens matching its continuation.
Usage (device machine, ~3 minutes on an H200): python bench/gpu.py [--layers 28] [--tokens 128]
  or, where that Python lacks our pinned transformers: bench/gpu_prepare here, then
  bench/gpu_run there (carrying .device/).
Smoke test here (CPU, a 1-layer model, the graphs' fixed shapes without recording, a KV budget
of two whole-context rows): python bench/gpu.py --device cpu --dtype bfloat16 --layers 1
    --tokens 4 --streams 2 --ttft 256 --bandwidth 20e9 --compare fixed --kv-budget 64MiB
    --quality-tokens 64 --skip-prefill-warm-up
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from chatglm3.engine.engine import Engine  # noqa: E402
from chatglm3.settings import parse_bytes  # noqa: E402
from chatglm3.params import SamplingParams  # noqa: E402
from chatglm3.text.tokenizer import ChatGLMTokenizer  # noqa: E402
from decode import PROMPT, bare_loop, engine_streams  # noqa: E402
from synthetic import TOKENIZER, random_model  # noqa: E402

# Peak memory bandwidth (bytes/s) by device name, from the vendors' data sheets.
BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12,
             "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
             "A100": 1.94e12, "A40": 0.696e12, "L40S": 0.864e12, "A10G": 0.6e12}


def peak_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, value in BANDWIDTH.items():
        if key in name:
            return name, value
    return name, None


def greedy_ids(engine: Engine, prompt: list[int], tokens: int) -> list[int]:
    gen = engine.generate_ids(prompt, SamplingParams(max_tokens=tokens, temperature=0))
    gen.text()
    return gen.result.output_ids


def section(title: str, run) -> None:
    """Runs one part of the report; a failure is printed and the others still run."""
    print(f"\n{title}")
    try:
        run()
    except Exception as e:  # noqa: BLE001 - a one-call run should report all it can
        print(f"  FAILED: {type(e).__name__}: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per stream")
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--ttft", type=int, nargs="+", default=[1024, 8192, 32000])
    ap.add_argument("--bandwidth", type=float, default=None, help="peak bytes/s override")
    ap.add_argument("--compare", default="graphs", choices=["graphs", "fixed"],
                    help="decoding steps to set against eager ones (fixed: graphs' shapes, no "
                         "recording; runs on CPU)")
    ap.add_argument("--kv-budget", type=parse_bytes, default=None,
                    help="KV cache bytes per engine, e.g. 8GiB (default: planned from the free "
                         "GPU memory; on CPU, grown on demand)")
    ap.add_argument("--skip-prefill-warm-up", action="store_true",
                    help="warm up without the 15 prefill shapes (CPU smoke tests: minutes each)")
    ap.add_argument("--quantize", nargs="*", default=["int8", "int4"],
                    help="quantized modes to measure after the rest (none: skip)")
    ap.add_argument("--quality-tokens", type=int, default=2000,
                    help="text length for the quantized modes' top-1 agreement")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = random_model(args.device, getattr(torch, args.dtype), num_layers=args.layers)
    built = time.perf_counter() - t0
    tokenizer = ChatGLMTokenizer(TOKENIZER)
    max_batch = max(args.streams + [1])
    labels = ["eager"] + ([args.compare] if device.type == "cuda" or args.compare == "fixed"
                          else [])
    engines: dict[str, Engine] = {}
    setups: dict[str, str] = {}
    for label in labels:  # one after the other: each plans from what the last one left free
        t = time.perf_counter()
        try:
            # no prefix cache: it would take the whole KV budget from the next engine, and
            # the TTFT prompts share prefixes (they would measure cache hits)
            engine = Engine(model, tokenizer, max_batch=max_batch, decode_step=label,
                            kv_budget_bytes=args.kv_budget, prefix_cache=False)
        except Exception as e:  # noqa: BLE001 - report it, go on with what can run
            setups[label] = f"FAILED to start: {type(e).__name__}: {e}"
            continue
        planned = time.perf_counter() - t
        engines[label] = engine
        setups[label] = (f"KV cache {engine.kv_plan or 'grown on demand'}; engine built in "
                         f"{planned:.2f} s (on a GPU: measuring the worst prefill chunk, "
                         f"allocating the cache); max_batch {engine.max_batch}")
    name, bandwidth = peak_bandwidth(device)
    bandwidth = args.bandwidth or bandwidth
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # A decode step reads every weight except the embedding table (one row of it).
    step_bytes = weights - model.model.embed_tokens.weight.numel() * model.dtype.itemsize
    print(f"device: {name}; {args.layers} layers, {args.dtype}, {weights / 2**30:.2f} GiB of "
          f"weights, built in {built:.1f} s; torch {torch.__version__}")
    prompt = tokenizer.build_chat_input([]) + tokenizer.encode_text(PROMPT)

    def setup() -> None:
        for label, line in setups.items():
            print(f"  {label}: {line}")
            if label in engines:
                report = engines[label].warm_up(prefill=not args.skip_prefill_warm_up)
                print(f"  {label} warm-up: {report}")

    def batch_one() -> None:
        for engine in engines.values():
            engine_streams(engine, 1, 8)  # warm-up of the whole streaming path
        rates = [("bare forward loop (eager)", bare_loop(model, prompt, args.tokens))]
        rates += [(f"engine, {label} steps", engine_streams(engine, 1, args.tokens)[0])
                  for label, engine in engines.items()]
        print(f"{'batch-1 decode':<28}{'tokens/s':>10}{'ms/token':>10}{'of floor':>10}")
        for label, rate in rates:
            share = f"{rate * step_bytes / bandwidth:.0%}" if bandwidth else "n/a"
            print(f"{label:<28}{rate:>10.1f}{1000 / rate:>10.2f}{share:>10}")
        if bandwidth:
            print(f"(floor: {step_bytes / 2**30:.2f} GiB per step at {bandwidth / 1e12:.2f} TB/s "
                  f"= {bandwidth / step_bytes:.1f} tokens/s)")

    def same_tokens() -> None:
        if args.compare not in engines:
            print(f"  no {args.compare} steps on this device")
            return
        other = engines[args.compare]
        eager = greedy_ids(engines["eager"], prompt, args.tokens)
        ids = greedy_ids(other, prompt, args.tokens)
        same = next((i for i, (a, b) in enumerate(zip(eager, ids)) if a != b), len(eager))
        fell_back = other.decode_step == "eager"
        print(f"  {args.compare}: greedy tokens identical to eager for the first {same} of "
              f"{len(eager)}{' (FELL BACK to eager steps)' if fell_back else ''}")

    def streams() -> None:
        print(f"{'streams':<10}{'steps':<8}{'decode tok/s':>14}{'wall tok/s':>12}")
        for n in args.streams:
            for label, engine in engines.items():
                rate, wall = engine_streams(engine, n, args.tokens)
                waited = " (more streams than KV rows: some waited)" if n > engine.max_batch else ""
                print(f"{n:<10}{label:<8}{rate:>14.1f}{wall:>12.1f}{waited}")

    def ttft() -> None:
        engine = engines.get(args.compare) or engines["eager"]
        print(f"{'prompt tokens':<15}{'TTFT s':>8}{'prefill tok/s':>15}")
        filler = tokenizer.encode_text("The quick brown fox 跳过了懒狗. " * 4000)
        for n in args.ttft:
            ids = (prompt[:-1] + filler * (n // len(filler) + 1))[: n - 1] + prompt[-1:]
            gen = engine.generate_ids(ids, SamplingParams(max_tokens=1, temperature=0))
            gen.text()
            took = gen.result.time_to_first_token
            print(f"{n:<15}{took:>8.2f}{n / took:>15.0f}")

    section("0. setup: KV cache plan and warm-up (prefill shapes, graph recording, self-check)",
            setup)
    section("1. batch-1 decode vs the bandwidth floor (target: graphs >= 90%)", batch_one)
    section(f"2. {args.compare} vs eager steps, greedy tokens", same_tokens)
    section("3. concurrent streams (aggregate while all decode; wall incl. prefills)", streams)
    section("4. time to first token", ttft)
    if device.type == "cuda":
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    base_rates = {}

    def base_speed() -> None:  # the unquantized engine's numbers, for the ratios of 5.
        engine = engines.get(args.compare) or engines["eager"]
        base_rates["b1"] = engine_streams(engine, 1, args.tokens)[0]
        base_rates["b8"] = engine_streams(engine, min(8, engine.max_batch), args.tokens)[0]

    if args.quantize:
        section("5a. unquantized decode for the ratios (batch 1, 8 streams or max_batch)",
                base_speed)
    for engine in engines.values():
        engine.close()
    engines.clear()
    if args.quantize:
        text = tokenizer.build_chat_input([]) + tokenizer.encode_text(
            (ROOT / "docs" / "benchmarks.md").read_text())  # a long text of ours, as bench/quantize.py
        reference = logits_summary(model, text[: args.quality_tokens], prompt, args.tokens)
        del model
        for mode in args.quantize:
            section(f"5. quantize={mode}", lambda mode=mode: quantized_report(
                args, mode, tokenizer, text[: args.quality_tokens], prompt, reference,
                base_rates, labels))


def logits_summary(model, text: list[int], prompt: list[int], greedy: int):
    """(top-1 id at every position of `text`, its last position's logits, greedy ids after
    `prompt`) of a model, all without the engine (the reference for 5.)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        hidden = model.model(input_ids=torch.tensor(text, device=device)[None],
                             use_cache=False).last_hidden_state[0]
        top1 = torch.cat([model.lm_head(h).argmax(-1) for h in hidden.split(256)]).cpu()
        last = model.lm_head(hidden[-1:]).float()[0].cpu()
        del hidden
        seq, cont = torch.tensor(prompt, device=device)[None], []
        for _ in range(greedy):
            nxt = model(input_ids=seq, logits_to_keep=1).logits[0, -1].argmax()
            cont.append(int(nxt))
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return top1, last, cont


def quantized_report(args, mode: str, tokenizer, text, prompt, reference, base_rates,
                     labels) -> None:
    from chatglm3.model.quantize import compute_dtype, quantize_model

    device = torch.device(args.device)
    dtype = compute_dtype(mode, device, getattr(torch, args.dtype))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t = time.perf_counter()
    # The same random weights as above (same seed), in the mode's compute dtype.
    model = quantize_model(random_model(args.device, dtype, pack=False, num_layers=args.layers), mode)
    print(f"  built and quantized in {time.perf_counter() - t:.1f} s, compute "
          f"{str(dtype).removeprefix('torch.')}")
    top1, last, cont = logits_summary(model, text, prompt, args.tokens)
    ref_top1, ref_last, ref_cont = reference
    match = next((i for i, (a, b) in enumerate(zip(cont, ref_cont)) if a != b), len(cont))
    print(f"  vs unquantized {args.dtype}: last-token logits rel. L2 "
          f"{float((last - ref_last).norm() / ref_last.norm()):.4f}; top-1 agreement "
          f"{float((top1 == ref_top1).float().mean()):.2%} over {len(text)} positions; greedy "
          f"tokens matching {match}/{len(cont)}")
    for label in labels:
        engine = Engine(model, tokenizer, max_batch=max(args.streams + [1]), decode_step=label,
                        kv_budget_bytes=args.kv_budget, prefix_cache=False)
        print(f"  {label}: weights {engine.weight_bytes / 2**30:.2f} GiB; KV cache "
              f"{engine.kv_plan or 'grown on demand'}")
        print(f"  {label} warm-up: "
              f"{engine.warm_up(prefill=not args.skip_prefill_warm_up)}")
        engine_streams(engine, 1, 8)
        b1 = engine_streams(engine, 1, args.tokens)[0]
        b8 = engine_streams(engine, min(8, engine.max_batch), args.tokens)[0]
        ratio = lambda key, v: (f" ({v / base_rates[key]:.2f}x unquantized)"  # noqa: E731
                                if key in base_rates else "")
        print(f"  {label} ({engine.decode_step}): batch 1 {b1:.1f} tokens/s{ratio('b1', b1)}; "
              f"{min(8, engine.max_batch)} streams {b8:.1f}{ratio('b8', b8)}")
        if device.type == "cuda":
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        engine.close()


if __name__ == "__main__":
    main()

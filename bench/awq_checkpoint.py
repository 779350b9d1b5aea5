"""An AWQ copy of a ChatGLM3 checkpoint: int4, groups of 128, with zero points (AutoAWQ's GEMM
layout), for measuring vLLM's closest CPU mode to our `--quantize int4` (bench/peer.py
--vllm-weights). Benchmark only: the product never reads this format.

Every linear layer of the blocks (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) is
quantized as ours is (asymmetric, min/max per group of 128 inputs); the embedding and the
output layer stay fp16, as AutoAWQ leaves them. Layout: `qweight` int32 [in, out/8] and
`qzeros` int32 [in/128, out/8], eight 4-bit values per int32 in AWQ's order (0 2 4 6 1 3 5 7),
`scales` fp16 [in/128, out]; written as safetensors shards, one per source shard.

    python bench/awq_checkpoint.py SRC_DIR DST_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

GROUP = 128
LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] of 0..15 -> int32 [rows, cols/8], AWQ's order within each int32."""
    rows, cols = values.shape
    v = values.to(torch.int32).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for i in range(8):
        out |= v[..., i] << (4 * i)
    return out


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A [out, in] weight -> AWQ's qweight, qzeros, scales."""
    w = weight.float().t().contiguous()  # [in, out]
    n_in, n_out = w.shape
    g = w.reshape(n_in // GROUP, GROUP, n_out)
    lo, hi = g.amin(dim=1), g.amax(dim=1)  # [groups, out]
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = (-lo / scales).round().clamp(0, 15)
    q = (g / scales[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(n_in, n_out)
    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales.half()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    args.dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((args.src / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        tensors = torch.load(args.src / shard, map_location="cpu", mmap=True, weights_only=True)
        out = {}
        for name, t in tensors.items():
            stem, _, kind = name.rpartition(".")
            if kind == "weight" and stem.rsplit(".", 1)[-1] in LINEARS:
                out.update({f"{stem}.{k}": v for k, v in quantize(t).items()})
            else:
                out[name] = t.contiguous()
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(out, args.dst / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in out})
        print(f"{shard} -> {file}: {len(out)} tensors", flush=True)
    (args.dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = json.loads((args.src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                     "zero_point": True, "version": "gemm"}
    (args.dst / "config.json").write_text(json.dumps(config, indent=1))
    for extra in ("tokenizer.model", "tokenizer_config.json"):
        if (args.src / extra).exists():
            shutil.copy(args.src / extra, args.dst / extra)


if __name__ == "__main__":
    main()

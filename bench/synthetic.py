"""Random checkpoints in the exact layout of the official ChatGLM3-6B-32K snapshot.

Used by the benchmarks: same file names, tensor names and fp16 `.bin` shards as the real one,
with sizes chosen by the caller (the real ones by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from chatglm3.params import CONTEXT

REAL = dict(num_layers=28, hidden_size=4096, num_attention_heads=32, kv_channels=128,
            multi_query_group_num=2, ffn_hidden_size=13696, padded_vocab_size=65024)
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path(os.environ.get("CHATGLM3_TOKENIZER")
                 or ROOT.parent / "shared" / "chatglm3-tokenizer" / "tokenizer.model")


def chatglm_config(**sizes: int) -> dict:
    cfg = dict(REAL, **sizes)
    # architectures as in the real config.json: vLLM picks its ChatGLM model by it
    cfg.update(model_type="chatglm", architectures=["ChatGLMModel"], add_bias_linear=False,
               add_qkv_bias=True,
               apply_residual_connection_post_layernorm=False, layernorm_epsilon=1e-5,
               multi_query_attention=True, original_rope=True, post_layer_norm=True,
               rmsnorm=True, rope_ratio=50, seq_length=CONTEXT, torch_dtype="float16",
               eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return cfg


def random_tensors(cfg: dict, layer: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official tensors of one layer (or, with layer None, the embedding/output/norm)."""
    g = torch.Generator().manual_seed(seed + (layer or 0) * 7919)
    h, ffn, vocab = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * cfg["kv_channels"]
    attn_out = cfg["num_attention_heads"] * cfg["kv_channels"]

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).half()

    if layer is None:
        rot = cfg["kv_channels"] // 2
        return {
            "transformer.embedding.word_embeddings.weight": rand(vocab, h, scale=1.0),
            "transformer.rotary_pos_emb.inv_freq":
                (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half(),
            "transformer.encoder.final_layernorm.weight": torch.ones(h).half(),
            "transformer.output_layer.weight": rand(vocab, h),
        }
    p = f"transformer.encoder.layers.{layer}."
    return {
        p + "input_layernorm.weight": torch.ones(h).half(),
        p + "self_attention.query_key_value.weight": rand(qkv, h),
        p + "self_attention.query_key_value.bias": rand(qkv),
        p + "self_attention.dense.weight": rand(h, attn_out),
        p + "post_attention_layernorm.weight": torch.ones(h).half(),
        p + "mlp.dense_h_to_4h.weight": rand(2 * ffn, h),
        p + "mlp.dense_4h_to_h.weight": rand(h, ffn),
    }


def write_checkpoint(out: Path, shards: int = 7, seed: int = 0, **sizes: int) -> Path:
    """Writes config, tokenizer and `pytorch_model-0000N-of-0000M.bin` shards with their index."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = chatglm_config(**sizes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "synthetic"}))
    groups: list[list[int | None]] = [[] for _ in range(shards)]
    units: list[int | None] = [None, *range(cfg["num_layers"])]
    for i, unit in enumerate(units):
        groups[min(i * shards // len(units), shards - 1)].append(unit)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        tensors: dict[str, torch.Tensor] = {}
        for unit in group:
            tensors.update(random_tensors(cfg, unit, seed))
        torch.save(tensors, out / name)
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def random_model(device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 pack: bool = True, **sizes: int):
    """A GlmForCausalLM of the given sizes with random weights, built straight on `device`
    (no checkpoint on disk), rotary frequencies in fp32 and (`pack`) CPU linear layers packed,
    as `load_model` leaves them. pack=False for a model that is to be quantized."""
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    from chatglm3.weights.checkpoint import glm_config
    from transformers import GlmForCausalLM

    config = glm_config(chatglm_config(**sizes))
    config.dtype = dtype
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                scale = 1.0 if "embed_tokens" in name else 0.02
                p.normal_(0.0, scale, generator=g)
    model.model.rotary_emb = GlmRotaryEmbedding(config).to(device)
    model.eval().requires_grad_(False)
    if pack:
        from chatglm3.model.packed_linear import pack_linears

        pack_linears(model)
    return model


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=7)
    args = ap.parse_args()
    print(write_checkpoint(args.out, shards=args.shards, num_layers=args.layers))

"""Prefill attention over a cache without a materialized mask, on the CPU.

A prompt is prefilled in chunks (model_runner.PREFILL_CHUNK tokens): every chunk after the
first attends to the cache before it and, causally, to itself. transformers' SDPA path builds
that as a [chunk, cache + chunk] boolean mask, and with a mask torch's fused CPU attention
kernel computes every query-key pair, masked ones included, and copies the two key/value
heads out to all 32 query heads first (repeat_kv). Here the same result comes in two parts
of torch's CPU flash kernel, merged by their log-sum-exps:
- the chunk against the cache before it: no mask at all, and the 16 query heads that share a
  key/value head go through as one (queries stacked), so no key/value copy;
- the chunk against itself: the kernel's own causal mode, which skips the masked half.
Only causal pairs are computed; docs/benchmarks.md has the measured gain.

The model uses `IMPLEMENTATION` as its attention (checkpoint.glm_config). Everything else goes
to transformers' SDPA functions unchanged: decoding steps (they bring their own mask,
kv_rows.KVRows.prepare_step), a chunk with no cache before it, any call with a padding mask,
and every device other than the CPU (a GPU keeps transformers' SDPA masks and kernels).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

IMPLEMENTATION = "chatglm3_sdpa"


def _mask(*args, device: torch.device | str = "cpu", mask_function: Callable = causal_mask_function,
          attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
          **kwargs) -> torch.Tensor | None:
    """No mask for plain causal attention on the CPU (`attention` knows the shape: the
    queries are the last keys); transformers' SDPA mask otherwise."""
    if (torch.device(device).type == "cpu" and attention_mask is None and allow_is_causal_skip
            and mask_function is causal_mask_function):
        return None
    return sdpa_mask(*args, device=device, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip,
                     **kwargs)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, packed=None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, heads, q, d], key/value [b, kv_heads, k, d] with the queries at the last q
    key positions; returns [b, q, heads, d] as transformers' attention functions do.
    `packed` (a packed_step.PackedStep, passed to the model as a keyword): several requests in
    one sequence, each attended to on its own (key, value and mask are then its to give)."""
    if packed is not None:
        return packed.attend(module, query, scaling, attention), None
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None or q_len >= k_len or query.device.type != "cpu" or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    return chunk_attention(query, key, value, scaling), None


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
    """Causal attention of q queries, the last q of k > q keys: [b, q, heads, d]."""
    b, heads, q_len, d = query.shape
    kv_heads, past = key.shape[1], key.shape[2] - q_len
    share = heads // kv_heads
    # The cache before the chunk, seen whole by every query: the heads sharing a key/value
    # head stacked along the queries (one copy of the chunk's queries, none of the cache).
    stacked = query.reshape(b, kv_heads, share * q_len, d)
    out_past, lse_past = _flash(stacked, key[:, :, :past], value[:, :, :past], scale=scale)
    out_past = out_past.reshape(b, heads, q_len, d)
    lse_past = lse_past.reshape(b, heads, q_len)
    # The chunk against itself, causally: its q keys copied out to every head (small).
    own_k = key[:, :, past:, None].expand(b, kv_heads, q_len, share, d)
    own_v = value[:, :, past:, None].expand(b, kv_heads, q_len, share, d)
    own_k = own_k.transpose(2, 3).reshape(b, heads, q_len, d)
    own_v = own_v.transpose(2, 3).reshape(b, heads, q_len, d)
    out_own, lse_own = _flash(query, own_k, own_v, is_causal=True, scale=scale)
    # softmax over both parts = each part's softmax weighted by its share of the total mass
    lse = torch.logaddexp(lse_past, lse_own)
    merged = (out_past.float() * (lse_past - lse).exp_()[..., None]
              + out_own.float() * (lse_own - lse).exp_()[..., None])
    return merged.to(query.dtype).transpose(1, 2)


AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, _mask)

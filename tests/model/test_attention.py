"""Prefill attention over a cache (chatglm3/model/attention.py): the two-part, unmasked computation
equals masked attention, a chunked prefill equals the whole prompt at once, and decoding steps
and GPUs keep transformers' SDPA path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from chatglm3.model import attention as attn
from chatglm3.weights.checkpoint import load_model

from conftest import TINY_CKPT


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain math: every head, an explicit bottom-right causal mask, fp64."""
    share = q.shape[1] // k.shape[1]
    q_len, k_len = q.shape[2], k.shape[2]
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(share, 1),
                                         v.double().repeat_interleave(share, 1), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,q_len,k_len", [
    (4, 2, 5, 9), (32, 2, 64, 200), (8, 8, 33, 34), (6, 1, 100, 1000)])
def test_chunk_attention_equals_masked_attention(heads, kv_heads, q_len, k_len) -> None:
    g = torch.Generator().manual_seed(heads * q_len + k_len)
    q = torch.randn(1, q_len, heads, 64, generator=g).transpose(1, 2)  # the model's strides
    k = torch.randn(1, kv_heads, k_len, 64, generator=g)
    v = torch.randn(1, kv_heads, k_len, 64, generator=g)
    got = attn.chunk_attention(q, k, v, None)
    assert got.shape == (1, q_len, heads, 64)
    torch.testing.assert_close(got.double(), masked_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_the_mask_is_left_out_only_for_plain_causal_attention_on_the_cpu() -> None:
    common = dict(batch_size=1, q_length=4, kv_length=10, q_offset=6)
    assert attn._mask(**common, device="cpu") is None
    padding = torch.ones(1, 10, dtype=torch.bool)
    padding[0, 0] = False
    assert attn._mask(**common, device="cpu", attention_mask=padding) is not None
    assert attn._mask(**common, device="meta") is not None  # other devices: SDPA's mask


def test_decoding_steps_and_masks_go_to_sdpa(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(attn, "sdpa_attention_forward",
                        lambda *a, **k: calls.append(a[4]) or ("sdpa", None))
    module = torch.nn.Module()
    q = torch.randn(1, 4, 1, 8)
    k = v = torch.randn(1, 2, 6, 8)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    assert attn.attention(module, q, k, v, mask)[0] == "sdpa"  # a decoding step's own mask
    q = torch.randn(1, 4, 6, 8)
    assert attn.attention(module, q, k, v, None)[0] == "sdpa"  # no cache before: is_causal
    assert len(calls) == 2 and calls[0] is mask and calls[1] is None


@pytest.mark.shared
def test_a_chunked_prefill_equals_the_whole_prompt() -> None:
    model = load_model(TINY_CKPT, "cpu", torch.float32)
    assert model.config._attn_implementation == attn.IMPLEMENTATION
    ids = torch.randint(100, 60000, (1, 700), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(ids).logits[0]
        cache, parts = DynamicCache(config=model.config), []
        for begin in range(0, 700, 256):
            positions = torch.arange(begin, min(700, begin + 256))[None]
            parts.append(model(ids[:, begin:begin + 256], cache=cache,
                               position_ids=positions).logits[0])
    chunked = torch.cat(parts)
    assert float((chunked - whole).norm() / whole.norm()) < 1e-5

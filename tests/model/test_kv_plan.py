"""The KV cache planner: given memory numbers in, (rows, capacity) out. No GPU needed.

The real model's sizes (ChatGLM3-6B-32K, fp16): 28 layers, hidden 4096, 32 query heads and 2
key/value heads of 128, ffn 13,696, vocabulary 65,024, context 32,768. Cards as nvidia-smi
reports their memory: A40 46,068 MiB ("48 GB"), A10G 23,028 MiB and L4 23,034 MiB ("24 GB"),
T4 15,360 MiB, H200 143,771 MiB. Two numbers are estimates until measured on a GPU (setup
measures the first, and it is part of the free memory it reads): the prefill peak, 2 GiB (the
worst chunk's own prompt cache, 0.875 GiB, + its activations: the [2048, 27392] MLP
intermediate, K/V repeated to 32 heads over 32,768 keys, the mask), and the CUDA context,
0.5 GiB.
"""

from __future__ import annotations

import pytest

from chatglm3.model.kv_rows import (
    GRANULARITY,
    KVBudgetError,
    KVPlan,
    kv_budget_from_memory,
    kv_bytes_per_token,
    plan_kv,
    plan_rows,
)
from chatglm3.settings import parse_bytes

GiB, MiB = 2**30, 2**20
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 28, 4096, 32, 2, 128, 13696, 65024
CONTEXT = 32768
PER_TOKEN = kv_bytes_per_token(LAYERS, KV_HEADS, HEAD_DIM, 2)
PREFILL_PEAK = 2 * GiB
CUDA_CONTEXT = GiB // 2


def weight_bytes() -> int:
    """fp16 bytes of the real checkpoint's tensors (GlmForCausalLM after conversion)."""
    qkv = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + (HEADS + 2 * KV_HEADS) * HEAD_DIM
    layer = qkv + HEADS * HEAD_DIM * HIDDEN + HIDDEN * 2 * FFN + FFN * HIDDEN + 2 * HIDDEN
    return 2 * (LAYERS * layer + 2 * VOCAB * HIDDEN + HIDDEN)


def card(total_mib: int, max_batch: int = 8, prefill_peak: int = PREFILL_PEAK) -> KVPlan:
    """The plan setup makes on a card of `total_mib` with the real model loaded."""
    total = total_mib * MiB
    free = total - CUDA_CONTEXT - weight_bytes()
    return plan_kv(total_bytes=total, free_bytes=free, weight_bytes=weight_bytes(),
                   bytes_per_token=PER_TOKEN, activation_bytes=prefill_peak,
                   max_batch=max_batch, context=CONTEXT)


def test_real_model_sizes() -> None:
    assert PER_TOKEN == 28_672  # 2 (k, v) x 28 x 2 x 128 x 2 bytes
    assert CONTEXT * PER_TOKEN == 0.875 * GiB
    assert 12.4e9 < weight_bytes() < 12.6e9  # ~6.24 B parameters: "12.5 GB", 11.63 GiB


def test_a40_holds_eight_whole_context_rows() -> None:
    plan = card(46_068)
    assert (plan.rows, plan.capacity) == (8, 32768)
    assert plan.bytes == 7 * GiB
    # The budget it was allowed (26.4 GiB) holds 30 such rows; max_batch caps it at 8.
    assert plan.budget_bytes // (CONTEXT * PER_TOKEN) == 30
    assert "8 rows x 32,768 positions = 7.00 GiB" in str(plan)


def test_24_gb_card_holds_fewer_rows() -> None:
    """A10G/L4: 10.4 GiB free after the weights, less 2 GiB of prefill peak and a 2.25 GiB
    margin (10% of the card): 6.1 GiB, six whole-context rows."""
    for total in (23_028, 23_034):
        plan = card(total)
        assert (plan.rows, plan.capacity) == (6, 32768)
        assert plan.bytes == 5.25 * GiB <= plan.budget_bytes


def test_a_larger_prefill_peak_leaves_fewer_rows() -> None:
    assert card(23_028, prefill_peak=4 * GiB).rows == 4  # 4.1 GiB left


def test_h200_holds_as_many_rows_as_asked() -> None:
    assert (card(143_771).rows, card(143_771, max_batch=32).rows) == (8, 32)


def test_16_gb_card_cannot_serve_and_says_why() -> None:
    with pytest.raises(KVBudgetError) as info:
        card(15_360)
    message = str(info.value)
    assert "not enough GPU memory for the KV cache" in message
    assert "15.00 GiB total" in message and "11.63 GiB of weights" in message


def test_budget_is_the_smaller_bound() -> None:
    # Free memory read before other processes took some: the free bound wins.
    assert kv_budget_from_memory(total_bytes=100, free_bytes=50, weight_bytes=20,
                                 activation_bytes=5, utilization=0.9) == 35
    # Plenty free but the share of the card is the limit.
    assert kv_budget_from_memory(total_bytes=100, free_bytes=95, weight_bytes=20,
                                 activation_bytes=5, utilization=0.9) == 65


@pytest.mark.parametrize("budget, expected", [
    (CONTEXT * 2048 * 5, (4, CONTEXT)),  # capped by max_batch
    (CONTEXT * 2048 * 2 + 12345, (2, CONTEXT)),
    (CONTEXT * 2048, (1, CONTEXT)),  # exactly one whole row
    (CONTEXT * 2048 - 1, (1, CONTEXT - GRANULARITY)),  # less: one shorter row
    (1000 * 2048, (1, 768)),  # multiples of 256 positions
    (GRANULARITY * 2048, (1, GRANULARITY)),
])
def test_tiny_budgets(budget: int, expected: tuple[int, int]) -> None:
    """The tiny test checkpoint in fp32: 2 x 2 layers x 2 heads x 64 x 4 = 2,048 B/position."""
    assert kv_bytes_per_token(2, 2, 64, 4) == 2048
    assert plan_rows(budget, 2048, max_batch=4, context=CONTEXT) == expected


@pytest.mark.parametrize("budget", [GRANULARITY * 2048 - 1, 0, -5 * GiB])
def test_budget_below_one_row_is_refused_with_the_numbers(budget: int) -> None:
    with pytest.raises(KVBudgetError, match="less than one row of 256 positions") as info:
        plan_rows(budget, 2048, max_batch=4, context=CONTEXT)
    assert "524,288 bytes" in str(info.value) and "67,108,864 bytes" in str(info.value)


def test_short_context_rows() -> None:
    assert plan_rows(100 * 2048, 2048, max_batch=4, context=40) == (2, 40)


@pytest.mark.parametrize("text, value", [
    ("7GiB", 7 * GiB), ("7.5 GB", 7_500_000_000), ("512MiB", 512 * MiB), ("8e9", 8_000_000_000),
    ("1073741824", GiB), (" 2 gib ", 2 * GiB), ("100k", 100_000),
])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "7 GiBs", "-1GB", "1,000"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="KV budget"):
        parse_bytes(text)

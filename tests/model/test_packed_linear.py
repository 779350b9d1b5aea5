"""CPU linear layers packed once for oneDNN (chatglm3/model/packed_linear.py): the same products as
plain nn.Linear, every plain layer of a loaded model packed, and no packing where it is not
meant to happen."""

from __future__ import annotations

import pytest
import torch

from chatglm3.weights.checkpoint import load_model
from chatglm3.model.packed_linear import (PackedLinear, layers_summary, pack_linears, packing_works,
                                    packs)
from chatglm3.model.qlinear import native_bf16_matmul

from conftest import TINY_CKPT

DTYPES = [torch.float32] + ([torch.bfloat16] if native_bf16_matmul() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (7,), (2, 5), (1, 300)])
def test_packed_equals_plain(dtype: torch.dtype, bias: bool, rows: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(rows) * 31 + rows[-1])
    linear = torch.nn.Linear(192, 320, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.normal_(generator=g)
        if bias:
            linear.bias.normal_(generator=g)
    x = torch.randn(*rows, 192, generator=g).to(dtype)
    want = linear(x)
    got = PackedLinear.from_linear(linear)(x)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.shared
def test_a_loaded_model_is_packed_and_gives_the_same_logits() -> None:
    ids = torch.tensor([[64790, 64792, *range(1000, 1100)]])
    packed = load_model(TINY_CKPT, "cpu", torch.float32)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    # 2 layers x (q, k, v, o, gate_up, down) + the output layer; no plain Linear left
    assert len(layers) == 13
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert layers_summary(packed) == "linear layers: 13 packed once for oneDNN (CPU)"
    plain = load_model(TINY_CKPT, "cpu", torch.float32)
    for parent in list(plain.modules()):  # unpack: the same weights, plain layers
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                linear = torch.nn.Linear(child.in_features, child.out_features,
                                         bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.packed.to_dense())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    with torch.inference_mode():
        a, b = packed(ids).logits, plain(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-6


def test_no_packing_where_it_does_not_belong() -> None:
    assert not packs(torch.float16, torch.device("cpu"))  # oneDNN fp16 needs AVX-512 FP16
    assert not packs(torch.float32, torch.device("meta"))
    assert packs(torch.float32, torch.device("cpu")) and packing_works(torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).half())
    assert pack_linears(model) == 0 and type(model[0]) is torch.nn.Linear
    assert layers_summary(model) is None


@pytest.mark.shared
def test_quantized_layers_are_left_alone() -> None:
    model = load_model(TINY_CKPT, "cpu", torch.bfloat16, quantize="int8")
    from chatglm3.model.qlinear import Int8Linear

    assert sum(isinstance(m, Int8Linear) for m in model.modules()) >= 12
    assert layers_summary(model).startswith("int8 layers")

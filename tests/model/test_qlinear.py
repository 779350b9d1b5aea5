"""The quantized CPU linear layers (chatglm3/model/qlinear.py): the kernel for few rows, the weights
widened block by block for many, the same products either way, and aten's int4 packing read
back on every CPU capability torch dispatches to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chatglm3.model.qlinear as L
from chatglm3.model.quantize import int4_cpu_weight

ROOT = Path(__file__).resolve().parents[2]


def _layers(out_features: int, in_features: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(out_features, generator=gen))
    lin = lin.to(dtype).requires_grad_(False)
    int8 = L.Int8Linear.from_linear(lin)
    int4 = L.Int4Linear.from_weight(int4_cpu_weight(lin.weight.detach()), lin.bias)
    return lin, int8, int4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _fresh_choices():
    L.native_bf16_matmul.cache_clear()
    L.int4_unpack_works.cache_clear()
    yield
    L.native_bf16_matmul.cache_clear()
    L.int4_unpack_works.cache_clear()


@pytest.mark.parametrize("out_features", [64 * 5, 64 * 5 + 32, 48])  # whole and short blocks
def test_widened_weights_are_the_kernels_weights(out_features: int) -> None:
    """Widening a layer reproduces, value for value, the weights the kernel multiplies with:
    the kernel's product with the identity is its dequantized weight (one weight x 1 each)."""
    _, int8, int4 = _layers(out_features, 256, torch.bfloat16)
    eye = torch.eye(256, dtype=torch.bfloat16)
    for layer in (int8, int4):
        buf = torch.empty(out_features * 256, dtype=torch.float32)
        widened = layer.widen_t(0, out_features, buf).to(torch.bfloat16)
        assert torch.equal(widened, layer.kernel(eye)), layer.kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_paths_give_the_same_product(monkeypatch, dtype: torch.dtype) -> None:
    """Rows in several blocks (a small block size), 3-d input, bias: the widened product is
    the kernel's within the compute dtype's rounding, and close to the unquantized layer."""
    monkeypatch.setattr(L, "DEQUANT_BLOCK_ELEMENTS", 256 * 64)  # 64 rows a block: 6 blocks
    lin, int8, int4 = _layers(64 * 5 + 32, 256, dtype, seed=1)
    x = torch.randn(3, 40, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    tol = 0.01 if dtype == torch.bfloat16 else 1e-5
    with torch.inference_mode():
        for layer, quant_err in ((int8, 0.02), (int4, 0.2)):
            widened = layer(x)
            x2 = x.reshape(-1, 256)
            kernel = (layer.kernel(x2) + layer.bias).reshape(3, 40, -1)
            assert widened.shape == (3, 40, layer.out_features) and widened.dtype == dtype
            assert _rel(widened, kernel) < tol, layer.kind
            assert _rel(widened, lin(x)) < quant_err, layer.kind  # lin itself unchanged


def _paths(monkeypatch, layer) -> list[str]:
    taken: list[str] = []
    kernel, widen_t = layer.kernel, layer.widen_t
    monkeypatch.setattr(layer, "kernel", lambda x: taken.append("kernel") or kernel(x))
    monkeypatch.setattr(layer, "widen_t", lambda *a: taken.append("widened") or widen_t(*a))
    return taken


@pytest.mark.parametrize("native", [True, False])
def test_bf16_takes_the_kernel_for_few_rows_and_widens_for_many(monkeypatch, native) -> None:
    """bf16: decoding batches (up to kernel_max_rows) take the kernel; longer prefill chunks
    widen, where bf16 matmuls are native; elsewhere every call takes the kernel."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    _, int8, int4 = _layers(128, 256, torch.bfloat16)
    for layer in (int8, int4):
        taken = _paths(monkeypatch, layer)
        for rows in (1, layer.kernel_max_rows, layer.kernel_max_rows + 1, 2048):
            taken.clear()
            layer(torch.randn(rows, 256, dtype=torch.bfloat16))
            want = "widened" if native and rows > layer.kernel_max_rows else "kernel"
            assert set(taken) == {want}, (layer.kind, rows)
    assert int8.kernel_max_rows >= 8 and int4.kernel_max_rows >= 8  # the default batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_and_fp16_always_widen(monkeypatch, dtype) -> None:
    """The int kernels' fp32 and fp16 paths are slow at any size: every call widens."""
    _, int8, int4 = _layers(128, 256, dtype)
    for layer in (int8, int4):
        taken = _paths(monkeypatch, layer)
        layer(torch.randn(1, 256, dtype=dtype))
        assert taken and set(taken) == {"widened"}, layer.kind


def test_an_unknown_int4_packing_falls_back_to_the_kernel(monkeypatch, caplog) -> None:
    """Where unpack_int4_t does not read the CPU's packing (here: told the wrong one), the
    self-check says so once and every int4 call takes the kernel: never a wrong product."""
    block, halves = L.int4_packing()
    monkeypatch.setattr(L, "int4_packing", lambda: (block, not halves))
    _, _, int4 = _layers(64 * 3, 256, torch.float32)
    taken = _paths(monkeypatch, int4)
    with caplog.at_level("WARNING", logger="chatglm3.model.qlinear"):
        assert not L.int4_unpack_works()
        int4(torch.randn(300, 256))
    assert set(taken) == {"kernel"}
    assert "packing" in caplog.text


def test_widening_holds_one_block_not_the_layer(monkeypatch) -> None:
    """The widened weights live in one reused buffer of at most DEQUANT_BLOCK_ELEMENTS
    (aligned to the int4 packing's blocks), whatever the layer's size."""
    sizes: list[int] = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(t.numel())
        return t

    _, int8, int4 = _layers(64 * 9, 512, torch.float32)  # fp32: always widened
    monkeypatch.setattr(L, "DEQUANT_BLOCK_ELEMENTS", 512 * 128)
    monkeypatch.setattr(L.torch, "empty", spy)
    x = torch.randn(100, 512)
    for layer in (int8, int4):
        sizes.clear()
        layer(x)
        # the block buffer (128 rows x 512) and the output (100 x 576), nothing larger
        assert sorted(sizes)[-2:] == [100 * 576, 128 * 512], layer.kind


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_int4_packing_is_read_on_every_cpu_capability(capability: str) -> None:
    """aten packs int4 differently per CPU capability (blocks of 64 rows in halves on AVX-512,
    32 in halves on AVX2, 32 in pairs in the scalar build): forced with ATEN_CPU_CAPABILITY,
    each is read back exactly (the self-check) and the widened product matches the kernel's."""
    code = (
        "import torch, chatglm3.model.qlinear as L\n"
        "from chatglm3.model.quantize import int4_cpu_weight\n"
        "print(torch.backends.cpu.get_cpu_capability(), L.int4_unpack_works())\n"
        "w = torch.randn(64 * 3 + 32, 256, dtype=torch.bfloat16)\n"
        "layer = L.Int4Linear.from_weight(int4_cpu_weight(w), None)\n"
        "x = torch.randn(5, 256)\n"
        "a = L._widened_linear(x.bfloat16(), layer.out_features, layer.row_align, layer.widen_t)\n"
        "b = layer.kernel(x.bfloat16())\n"
        "print(((a.float() - b.float()).norm() / b.float().norm()).item())\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if out[0].lower() != capability:
        pytest.skip(f"this CPU runs {out[0]}, not {capability}")
    assert out[1] == "True"
    assert float(out[2]) < 0.01


def test_the_setup_line_says_how_the_layers_multiply(monkeypatch) -> None:
    """summary(model): the setup log's line, from the layers the model really has and its
    compute dtype; none for an unquantized model."""
    from chatglm3.weights.checkpoint import load_model
    from conftest import TINY_CKPT

    assert L.summary(load_model(TINY_CKPT, "cpu", torch.bfloat16)) is None
    fp32 = L.summary(load_model(TINY_CKPT, "cpu", torch.float32, quantize="int4"))
    assert fp32 == ("int4 layers: widened to float32 a block at a time for every call "
                    "(aten's int4 kernel is slow in float32)")
    model = load_model(TINY_CKPT, "cpu", torch.bfloat16, quantize="int8")
    rows = L.Int8Linear.kernel_max_rows
    for native, says in ((True, f"aten's int8 kernel up to {rows} rows (decoding), widened to "
                                "bfloat16 a block at a time above (prefill)"),
                         (False, "aten's int8 kernel for every call")):
        L.native_bf16_matmul.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        assert L.summary(model) == "int8 layers: " + says

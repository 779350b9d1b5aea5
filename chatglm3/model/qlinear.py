"""The CPU linear layers of the quantized modes: int8 and int4 weights, activations in the compute
dtype. quantize.py builds them at load; this module holds how they multiply.

Two ways to multiply, chosen per call by the number of activation rows (`widen_above`):
- few rows (decoding: a batch of streams), in bf16: aten's weight-only kernels,
  `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`, which read the small weights once
  per 4 rows, so their cost grows with the rows.
- many rows (prefill chunks), and every call in fp32 or fp16 (where those kernels are slow at
  any size): the weights are widened to the compute dtype a block of output rows at a time
  (`DEQUANT_BLOCK_ELEMENTS` weights, a few MB that stay in cache, never the whole layer) and
  multiplied by the compute dtype's own matmul (oneDNN). In bf16 only where the CPU multiplies
  it natively; elsewhere the kernel serves every call.
The crossovers (`kernel_max_rows`) and the timings behind them: docs/benchmarks.md,
"Quantized layers".

The int4 weights stay in aten's packed layout (what its kernel reads); `unpack_int4_t` reads
that layout back, which differs by CPU (blocks of 64 output rows on AVX-512, 32 elsewhere), and
is checked once per process against the kernel itself (`int4_unpack_works`): where it
disagrees, every call takes the kernel.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Weights widened at a time: 4M (8 MB in bf16) keeps the block in this CPU's 4 MB L2 + L3 and
# the layer's memory growth to one block (a whole 27,392 x 4,096 layer would be 224 MB).
DEQUANT_BLOCK_ELEMENTS = 1 << 22
INT4_MIDPOINT = 8  # aten's int4 kernels: weight = (q - 8) * scale + zero, q in 0..15


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def _block_rows(in_features: int, align: int) -> int:
    rows = max(align, DEQUANT_BLOCK_ELEMENTS // in_features)
    return rows // align * align


def _widened_linear(x: torch.Tensor, out_features: int, align: int,
                    widen_t: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [m, in] @ W.T, with W.T widened `_block_rows` output rows at a time by
    widen_t(begin, end, buffer) into a reused buffer (flat, one block's size)."""
    step = _block_rows(x.shape[1], align)
    buf = torch.empty(min(step, out_features) * x.shape[1], dtype=x.dtype)
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    for begin in range(0, out_features, step):
        end = min(out_features, begin + step)
        torch.matmul(x, widen_t(begin, end, buf[: (end - begin) * x.shape[1]]),
                     out=out[:, begin:end])
    return out


class _QuantLinear(torch.nn.Module):
    """Shared by both: flattening, the choice of path, the bias."""

    in_features: int
    out_features: int
    kind: str
    row_align = 1  # widened blocks start at multiples of this many rows
    # bf16 calls of up to this many rows take the kernel where bf16 matmuls are native: the
    # crossover measured on a 27,392 x 4,096 layer (bench/quantize.py kernels; docs/benchmarks.md)
    kernel_max_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        widen_above = self.widen_above(x2.dtype)
        if widen_above is not None and x2.shape[0] > widen_above:
            y = _widened_linear(x2, self.out_features, self.row_align, self.widen_t)
        else:
            y = self.kernel(x2)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @classmethod
    def widen_above(cls, dtype: torch.dtype) -> int | None:
        """Rows above which a call in `dtype` widens the weights (None: never). The kernels
        are fast only in bf16; there they win for few rows, and the widened path for more
        only where the CPU multiplies bf16 natively (docs/benchmarks.md, "Quantized layers")."""
        if dtype != torch.bfloat16:
            return 0
        return cls.kernel_max_rows if native_bf16_matmul() else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8Linear(_QuantLinear):
    """A linear layer with an int8 weight [out, in] and one scale per output channel."""

    kind = "int8"
    kernel_max_rows = 32  # the measured crossover (docs/benchmarks.md, "Quantized layers")

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.nn.Parameter | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias  # may still be on the meta device: load_model assigns it later
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rows: int = 4096) -> "Int8Linear":
        """Symmetric per-row int8 of the linear's weight, `rows` rows at a time: the fp32
        temporaries of a whole output layer would be 1 GB each (65,024 x 4096)."""
        w = linear.weight.detach()
        qweight = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        for begin in range(0, w.shape[0], rows):
            part = w[begin : begin + rows].to(torch.float32, copy=True)  # never w itself
            # The scale as stored (the compute dtype), so the weights are rounded with it.
            s = (part.abs().amax(dim=1).clamp_(min=1e-12) / 127).to(w.dtype).float()
            qweight[begin : begin + rows] = part.div_(s[:, None]).round_().clamp_(-127, 127)
            scale[begin : begin + rows] = s
        return cls(qweight, scale, linear.bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)

    def widen_t(self, begin: int, end: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows begin:end of the weight in buf's dtype, transposed ([in, rows], a view)."""
        w = buf.view(end - begin, self.in_features).copy_(self.qweight[begin:end])
        return w.mul_(self.scale[begin:end, None]).t()


def int4_packing() -> tuple[int, bool]:
    """aten's CPU int4 packing on this CPU: output rows per block (its kernels' vector width:
    64 with AVX-512, 32 otherwise) and whether whole blocks are stored in halves (AVX-512 and
    AVX2) rather than in pairs of rows (the scalar build)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return (64 if capability.startswith("AVX512") else 32), capability.startswith("AVX")


def unpack_int4_t(packed: torch.Tensor, rows: int, in_features: int,
                  out: torch.Tensor) -> torch.Tensor:
    """The 4-bit values minus 8 (-8..7) of `rows` output rows of aten's CPU packing, given
    their bytes (the rows start at a block boundary), written transposed into `out` [in, rows],
    which the packing's order makes the cheap way: for each input column a block of B rows stores
    B/2 bytes, byte d holding row d (low nibble) and row B/2 + d (high) on AVX-512 and AVX2
    ("halves"; the scalar build, and every CPU for a last, shorter block: rows 2d and 2d + 1)."""
    block, halves = int4_packing()
    flat = packed.reshape(-1)
    whole = rows // block * block
    if whole:
        b = flat[: whole * in_features // 2].view(whole // block, in_features, block // 2)
        _nibbles_t(b.transpose(0, 1), halves, out[:, :whole].view(in_features, -1, block))
    if rows > whole:
        b = flat[whole * in_features // 2 :].view(in_features, 1, (rows - whole) // 2)
        _nibbles_t(b, False, out[:, whole:].view(in_features, 1, rows - whole))
    return out


def _nibbles_t(b: torch.Tensor, halves: bool, out: torch.Tensor) -> None:
    """Packed bytes [in, blocks, B/2] -> their values - 8 in out [in, blocks, B]."""
    # centred on the byte temporaries (a quarter of the widened bytes), not on the output
    lo = (b & 0xF).view(torch.int8).sub_(INT4_MIDPOINT)
    hi = (b >> 4).view(torch.int8).sub_(INT4_MIDPOINT)
    if halves:
        out[..., : b.shape[-1]].copy_(lo)
        out[..., b.shape[-1] :].copy_(hi)
    else:
        pairs = out.unflatten(-1, (-1, 2))
        pairs[..., 0].copy_(lo)
        pairs[..., 1].copy_(hi)


class Int4Linear(_QuantLinear):
    """A linear layer with int4 weights in aten's CPU packing (torchao's Int4OpaqueTensor's
    qdata) and a bf16/fp16/fp32 scale and zero per group of `group_size` inputs."""

    kind = "int4"
    kernel_max_rows = 64  # the measured crossover (docs/benchmarks.md, "Quantized layers")

    def __init__(self, qdata: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int,
                 out_features: int, in_features: int, bias: torch.nn.Parameter | None) -> None:
        super().__init__()
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale_and_zero", scale_and_zero)  # [in / group, out, 2]
        self.group_size, self.bias = group_size, bias
        self.in_features, self.out_features = in_features, out_features
        self.row_align = int4_packing()[0]

    @classmethod
    def from_weight(cls, weight, bias: torch.nn.Parameter | None) -> "Int4Linear":
        """From torchao's Int4OpaqueTensor (quantize.int4_cpu_weight)."""
        out_features, in_features = weight.shape
        return cls(weight.qdata, weight.scale_and_zero, weight.block_size[1], out_features,
                   in_features, bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qdata, self.group_size,
                                                          self.scale_and_zero)

    @classmethod
    def widen_above(cls, dtype: torch.dtype) -> int | None:
        return super().widen_above(dtype) if int4_unpack_works() else None

    def widen_t(self, begin: int, end: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows begin:end of the weight in buf's dtype, transposed ([in, rows])."""
        k, g, rows = self.in_features, self.group_size, end - begin
        w = unpack_int4_t(self.qdata.reshape(-1)[begin * k // 2 : end * k // 2], rows, k,
                          buf.view(k, rows))
        sz = self.scale_and_zero[:, begin:end]  # [in / g, rows, 2]: small, but interleaved
        # contiguous copies: broadcasting the interleaved ones was 5x slower (docs/benchmarks.md)
        scale, zero = (sz[..., i].to(buf.dtype).contiguous() for i in (0, 1))
        grouped = w.view(k // g, g, rows)
        grouped.mul_(scale[:, None]).add_(zero[:, None])  # (q - 8) * scale + zero
        return w


@functools.cache
def int4_unpack_works() -> bool:
    """Whether `unpack_int4_t` reads this CPU's packing: a random int4 layer of whole and
    shorter blocks, widened, against the kernel's own product with the identity (each output
    is one weight times 1: exact). Once per process, ~1 ms."""
    # Loaded by now (int4 layers are made by quantize.int4_cpu_weight), so no import cost or
    # noise; packed whole here (quantize's row blocks join into the same packing).
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    gen = torch.Generator().manual_seed(0)
    group = 128  # any group size exercises the layout
    w = torch.randn(3 * int4_packing()[0] + 16, 2 * group, generator=gen)
    layer = Int4Linear.from_weight(
        Int4OpaqueTensor.from_hp(w.to(torch.bfloat16), [1, group]), None)
    in_features = layer.in_features
    want = layer.kernel(torch.eye(in_features, dtype=torch.bfloat16))
    # widened in fp32 and rounded once, as the kernel computes its weights
    buf = torch.empty(want.numel(), dtype=torch.float32)
    got = layer.widen_t(0, layer.out_features, buf).to(torch.bfloat16)
    if torch.equal(got, want):
        return True
    log.warning("int4: this CPU's weight packing (%s) is not the one unpack_int4_t reads: "
                "prefill runs aten's int4 kernel (slower)", torch.backends.cpu.get_cpu_capability())
    return False


def summary(model: torch.nn.Module) -> str | None:
    """One line for the setup log: how the model's quantized CPU layers multiply (None where
    it has none)."""
    kinds = {type(m) for m in model.modules() if isinstance(m, _QuantLinear)}
    layer = Int4Linear if Int4Linear in kinds else Int8Linear if kinds else None
    if layer is None:
        return None
    dtype = model.get_input_embeddings().weight.dtype
    above, name = layer.widen_above(dtype), str(dtype).removeprefix("torch.")
    if above is None:
        return f"{layer.kind} layers: aten's {layer.kind} kernel for every call"
    if above == 0:
        return (f"{layer.kind} layers: widened to {name} a block at a time for every call "
                f"(aten's {layer.kind} kernel is slow in {name})")
    return (f"{layer.kind} layers: aten's {layer.kind} kernel up to {above} rows (decoding), "
            f"widened to {name} a block at a time above (prefill)")

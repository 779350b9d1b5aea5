"""Unquantized CPU linear layers with their weights packed once in oneDNN's own layout.

`torch.nn.functional.linear` hands oneDNN a plain [out, in] weight on every call, and for few
activation rows (decoding) oneDNN's kernel for that layout reads it well below the memory's
pace. Packed once at load (`torch.ops.mkldnn._reorder_linear_weight`, the packing torch's own
inductor uses when it freezes a CPU model) the same product reads the weights up to twice as
fast and gives the same numbers; docs/benchmarks.md has the measurements. Prefill gains a few
percent too. The packed weight replaces the plain one (same bytes), so memory does not grow.

Only on the CPU, for float32, and for bfloat16 where the CPU multiplies it natively (AVX-512
BF16 or AMX); float16 and the quantized modes keep their layers. `pack_linears` checks the
packed product against the plain one once per process (`packing_works`) and leaves the model
as it is, with a warning, where they disagree.
"""

from __future__ import annotations

import functools
import logging

import torch

from .qlinear import native_bf16_matmul, summary
from ..host_memory import release_freed_memory

log = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (an opaque mkldnn tensor)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Not parameters: nothing trains, and state_dict() could not hold an opaque tensor.
        self.register_buffer("packed", _pack(weight), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "PackedLinear":
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.weight.detach(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # The batch-size hint only picks the layout; one packing serves 1 row and 2,048 alike
    # (measured within noise of the best hint at 1, 8 and 2,048 rows).
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `pack_linears` packs a model of this dtype on this device."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16_matmul())


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether packed products equal plain ones here (once per process and dtype)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(3, 160, generator=g).to(dtype)
    try:
        got = PackedLinear(w, b)(x)
    except RuntimeError:
        log.warning("oneDNN weight packing failed on this CPU (%s): plain linear layers",
                    dtype, exc_info=True)
        return False
    want = torch.nn.functional.linear(x, w, b)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        return True
    log.warning("oneDNN packed linear disagrees with the plain product (%s): plain layers", dtype)
    return False


def pack_linears(model: torch.nn.Module) -> int:
    """Replaces the model's plain nn.Linear layers by PackedLinear where `packs` and
    `packing_works` allow; returns how many were packed. One layer at a time, each plain
    weight freed as soon as its packed copy exists: the peak is one layer more."""
    param = next(model.parameters())
    if not packs(param.dtype, param.device) or not packing_works(param.dtype):
        return 0
    # (parent, name) pairs, not the layers: a list holding them would keep every plain
    # weight alive until the end (twice the model's memory).
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children()
              if type(child) is torch.nn.Linear]  # exactly: quantized layers are not Linear
    for parent, name in places:
        setattr(parent, name, PackedLinear.from_linear(getattr(parent, name)))
    release_freed_memory()
    return len(places)


def layers_summary(model: torch.nn.Module) -> str | None:
    """One line for the setup log on how the CPU linear layers multiply: quantized
    (qlinear.summary) or packed (None where they are plain)."""
    if (quantized := summary(model)) is not None:
        return quantized
    n = sum(isinstance(m, PackedLinear) for m in model.modules())
    return f"linear layers: {n} packed once for oneDNN (CPU)" if n else None

"""Weight-only int8 / int4 quantization of the model's linear layers, applied at load time.

Modes (`MODES`): "none" (the weights as loaded, today's numbers), "int8" (per-output-channel
symmetric int8) and "int4" (asymmetric int4 in groups of `INT4_GROUP_SIZE` along the input
dimension). Activations stay in the compute dtype; only the weights shrink, so a decoding step,
which reads every weight once, reads 1/2 (int8) or ~1/4 (int4) of the bytes.

What runs (the measurements behind each choice: docs/benchmarks.md, "Quantized layers"):
- int4, CPU: torchao's int4 CPU quantization (what its `PrototypeInt4WeightOnlyConfig` makes,
  `Int4OpaqueTensor`, packed in row blocks: `int4_cpu_weight`), run by `qlinear.Int4Linear`:
  aten's `_weight_int4pack_mm_for_cpu` for a few rows, the weights widened block by block for
  many (qlinear.py says why and when). torchao's default `Int4WeightOnlyConfig` packing
  ("plain") needs the mslk/fbgemm kernels, which are not built for this CPU.
- int4, CUDA: torchao's `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`, whose
  linear is aten's tinygemm `_weight_int4pack_mm` (bfloat16 activations only, compute
  capability 8.0 or newer: so int4 on CUDA computes in bfloat16).
- int8, CPU: `qlinear.Int8Linear`: aten's `_weight_int8pack_mm` for a few rows, widened
  blocks for many (as int4). Not torchao's `Int8WeightOnlyConfig`: in 0.18 its only version
  (2; version 1, which dispatched to this aten op, was removed) converts the whole int8 weight
  to the activation dtype on every call and then runs a bf16 matmul, several times slower
  than bf16 itself at batch 1.
- int8, CUDA: torchao's `Int8WeightOnlyConfig` (the same convert-then-matmul; on a GPU without
  torch.compile it is expected to save memory, not time; not measured: no GPU here, and
  whether aten's `_weight_int8pack_mm` has a fast CUDA kernel could not be checked). Offered
  because it is what fits a 16 GB card that cannot run int4's tinygemm (no bfloat16: T4).

What is quantized: every linear layer of attention (q, k, v, o) and the MLP (gate_up, down),
and the output layer (lm_head) in int8 in both modes: a visible share of a batch-1 step's
bytes, where int8 adds no measurable error and int4 adds error without being faster. The
embedding stays in the compute dtype: a lookup reads one row per token (no speed to win); int8 rows would save 0.25 GB (measured harmless,
not done: torchao's int8 embedding dequantizes the whole table per call).

Quantizing at load (checkpoint.load_model calls `Quantizer.apply` for each weight as it
arrives): the unquantized copy of one tensor lives only until its module is quantized, and
the loader hands back the shard's pages of each tensor it has copied, so the peak is the
quantized model plus one tensor's copy and its quantizing temporaries (int4 packs in row
blocks to keep those small: `int4_cpu_weight`).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Iterator

import torch

from ..host_memory import release_freed_memory
from .qlinear import Int4Linear, Int8Linear

MODES = ("none", "int8", "int4")
# int4 group size: 128 divides every input width of the model (4096, 13696; the tiny test
# checkpoint's 256 and 512); smaller groups cost bytes and speed and buy little accuracy
# (docs/benchmarks.md, "Quantized layers").
INT4_GROUP_SIZE = 128

log = logging.getLogger(__name__)

_LAYER_LINEAR = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.gate_up_proj|mlp\.down_proj)\.weight")
_OUTPUT = "lm_head.weight"


def check_mode(mode: str) -> str:
    """The mode, or a ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"quantize: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def compute_dtype(mode: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a mode computes in on `device`: int4 on CUDA needs bfloat16 (tinygemm);
    a float16 request there becomes bfloat16 (logged), float32 is refused."""
    if mode == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
        if dtype == torch.float32:
            raise ValueError("quantize: int4 on CUDA computes in bfloat16 (tinygemm kernel); "
                             "use --dtype auto or bfloat16, or --quantize int8")
        log.info("int4 on CUDA computes in bfloat16 (tinygemm kernel), not %s", dtype)
        return torch.bfloat16
    return dtype


@contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """torchao logs a warning per optional CUDA/mxfp8 extension its wheel cannot load on this
    torch build; none of them is used here."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_torchao():
    """torchao.quantization (its import takes seconds: benchmarks and tests call this before
    what they time or measure)."""
    with _quiet_torchao_import():
        import torchao.quantization as q
    return q


def _torchao_config(mode: str):
    """The torchao configuration of int8 (CPU is Int8Linear's) and of int4 on CUDA."""
    q = import_torchao()
    if mode == "int8":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    return q.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, set_inductor_config=False,
                                  int4_packing_format="tile_packed_to_4d")


# Output rows packed at a time by `int4_cpu_weight`: a multiple of the CPU packing's row blocks
# (aten's int4 packing works in blocks of 64 output rows on AVX-512 CPUs, 32 on AVX2 and
# others; pieces of other sizes do not join into the whole's packing).
INT4_PACK_ROWS = 4096


def int4_cpu_weight(w: torch.Tensor) -> torch.Tensor:
    """torchao's `Int4OpaqueTensor` of the weight `w` [out, in] (what its
    PrototypeInt4WeightOnlyConfig makes), packed INT4_PACK_ROWS output rows at a time.

    Why not the config on the whole weight: packing holds fp32 and int32 copies of what it
    packs, ~0.9 GB for one 27,392 x 4,096 gate_up, on top of the model during the load. Each
    row is quantized alone (its groups run along the input) and the CPU packing works in
    blocks of rows, so the pieces joined are exactly the whole's packing (tests/model/test_quantize.py
    compares them byte for byte)."""
    with _quiet_torchao_import():
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    block = [1, INT4_GROUP_SIZE]
    parts = [Int4OpaqueTensor.from_hp(w[i : i + INT4_PACK_ROWS], block)
             for i in range(0, w.shape[0], INT4_PACK_ROWS)]
    if len(parts) == 1:
        return parts[0]
    return Int4OpaqueTensor(torch.cat([p.qdata for p in parts]),
                            torch.cat([p.scale_and_zero for p in parts], dim=1), block, w.shape)


class Quantizer:
    """Quantizes the model's linear layers one by one as load_model fills them."""

    # The output layer's mode whatever the layers' (see the module docstring; bench/quantize.py
    # sets it to compare "none", "int8" and "int4").
    output_mode = "int8"

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.device = check_mode(mode), torch.device(device)
        self._config = None

    def targets(self, name: str) -> bool:
        """Whether the weight `name` (a GlmForCausalLM state-dict name) gets quantized."""
        if self.mode == "none":
            return False
        if name == _OUTPUT:
            return self.output_mode != "none"
        return _LAYER_LINEAR.fullmatch(name) is not None

    def apply(self, model: torch.nn.Module, name: str) -> None:
        """Quantizes the linear layer whose weight `name` has just been loaded into `model`."""
        path = name.removesuffix(".weight")
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        mode = self.output_mode if name == _OUTPUT else self.mode
        if mode == "int8" and self.device.type == "cpu":
            setattr(parent, child, Int8Linear.from_linear(linear))
        elif self.device.type == "cpu":
            setattr(parent, child, Int4Linear.from_weight(int4_cpu_weight(linear.weight.detach()),
                                                          linear.bias))
        else:
            import_torchao().quantize_(linear, _torchao_config(mode))
        del linear
        if self.device.type == "cpu":
            release_freed_memory()  # the unquantized copy and the packing's temporaries


def quantize_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Quantizes a model already in memory, layer by layer (benchmarks build random models on
    the device without a checkpoint); load_model(quantize=...) does the same while loading."""
    device = next(model.parameters()).device
    quantizer = Quantizer(mode, device)
    for name in [n for n, _ in model.named_parameters() if quantizer.targets(n)]:
        quantizer.apply(model, name)
    model.quantize_mode = mode
    return model


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, also for torchao's tensor subclasses (their inner tensors)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (quantized ones as packed)."""
    return sum(_storage_bytes(t) for t in [*model.parameters(), *model.buffers()])


def model_mode(model: torch.nn.Module) -> str:
    """The mode a loaded model was quantized with (load_model records it)."""
    return getattr(model, "quantize_mode", "none")

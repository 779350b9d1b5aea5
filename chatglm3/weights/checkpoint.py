"""Loads a ChatGLM3 checkpoint into transformers' native `GlmForCausalLM`, shard by shard.

ChatGLM3 and GLM are the same architecture under other names: this module maps the config and
tensor names, and loads the official fp16 shards without the repository's remote code.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import GlmConfig, GlmForCausalLM
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

from ..model.attention import IMPLEMENTATION as ATTENTION
from .checkpoint_files import LAYOUTS
from ..errors import SetupError
from ..host_memory import process_library
from ..openmp import in_passing_thread
from ..model.packed_linear import pack_linears
from ..model.quantize import Quantizer
from ..text.tokenizer import STOP_IDS


class CheckpointError(SetupError):
    """The checkpoint does not match what the model needs; the message says what and where."""


# ChatGLM3 options this mapping assumes; any other value means another architecture.
REQUIRED_OPTIONS = {
    "rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False, "original_rope": True,
}


def glm_config(cfg: dict) -> GlmConfig:
    """The `GlmConfig` equivalent to a ChatGLM3 `config.json`."""
    for key, want in REQUIRED_OPTIONS.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"config.json: {key}={cfg[key]!r} is not supported (need {want!r})")
    try:
        heads = cfg["num_attention_heads"]
        groups = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else heads
        return GlmConfig(
            vocab_size=cfg["padded_vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["ffn_hidden_size"],
            num_hidden_layers=cfg["num_layers"],
            num_attention_heads=heads,
            num_key_value_heads=groups,
            head_dim=cfg["kv_channels"],
            rms_norm_eps=cfg["layernorm_epsilon"],
            attention_bias=cfg.get("add_qkv_bias", True),
            max_position_embeddings=cfg["seq_length"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0 * cfg.get("rope_ratio", 1),
                "partial_rotary_factor": 0.5,
            },
            pad_token_id=cfg.get("pad_token_id", 0),
            eos_token_id=sorted(STOP_IDS),
            tie_word_embeddings=False,
            attn_implementation=ATTENTION,  # SDPA, with chunked prefill unmasked on the CPU
        )
    except KeyError as e:
        raise CheckpointError(f"config.json: missing {e.args[0]!r}") from None


_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def map_tensor(name: str, tensor: torch.Tensor, config: GlmConfig) -> dict[str, torch.Tensor]:
    """The GLM tensors for one ChatGLM3 tensor (the fused qkv becomes three)."""
    if name in _TOP_NAMES:
        return {_TOP_NAMES[name]: tensor}
    if name.endswith("rotary_pos_emb.inv_freq"):
        return {}  # recomputed in fp32 from the config
    m = _LAYER.fullmatch(name)
    if m is None:
        raise CheckpointError(f"unexpected tensor {name!r}: not a ChatGLM3 weight")
    prefix, rest = f"model.layers.{m[1]}.", m[2]
    if rest in _LAYER_NAMES:
        return {prefix + _LAYER_NAMES[rest]: tensor}
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = rest.rsplit(".", 1)[1]
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        if tensor.shape[0] != q + 2 * kv:
            raise CheckpointError(
                f"{name}: shape {tuple(tensor.shape)} does not match config.json "
                f"({config.num_attention_heads} heads + 2×{config.num_key_value_heads} groups "
                f"of {config.head_dim} = {q + 2 * kv} rows)"
            )
        parts = torch.split(tensor, [q, kv, kv])
        return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", parts)}
    raise CheckpointError(f"unexpected tensor {name!r}: not a ChatGLM3 weight")


def shard_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint, from its index when sharded."""
    for index_name, single in LAYOUTS:
        index = model_dir / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / n for n in names]
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(f"{model_dir}: no weights (no *.safetensors or pytorch_model*.bin index)")


@contextmanager
def _open_shard(path: Path) -> Iterator[dict[str, torch.Tensor]]:
    """A shard's tensors, memory-mapped so that only one shard is read at a time."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or corrupt file: say which one
        raise CheckpointError(f"{path.name}: cannot be read ({type(e).__name__}: {e})") from None
    try:
        yield tensors
    finally:
        tensors.clear()


_MADV_DONTNEED = 4  # Linux


def _drop_file_pages(tensor: torch.Tensor) -> None:
    """Hands back the pages of a memory-mapped shard that hold `tensor`, once it is copied.

    The pages of a mapped shard count in the process's RSS from the first read until the whole
    shard is closed, so without this the load peak is the loaded weights plus the whole shard
    (1 GiB for the first one: embedding and output layer). The mapping is the file's, private
    and never written, so dropped pages would only be read again from the file if touched (the
    three views of a fused qkv are each copied before their storage is dropped). Only for
    torch.load(mmap=True) shards: on anonymous memory MADV_DONTNEED would zero the data."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return  # not Linux
    storage = tensor.untyped_storage()
    begin, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    lo, hi = -(-begin // page) * page, (begin + size) // page * page  # whole pages inside it
    if hi > lo:
        process_library().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _shards_with_progress(paths: list[Path], progress: bool) -> Iterator[Path]:
    """The shards, reported on stderr as each one starts: a tqdm bar on a terminal, else one
    line per shard (a log file or a pipe would fill with a bar's carriage returns)."""
    if not progress:
        yield from paths
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=len(paths), desc="loading shards", unit="shard", file=sys.stderr) as bar:
            for path in paths:
                bar.set_postfix_str(path.name)  # the shard being read now
                yield path
                bar.update()
        return
    for i, path in enumerate(paths, 1):
        print(f"loading shard {i}/{len(paths)}: {path.name}", file=sys.stderr, flush=True)
        yield path


def load_model(
    model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
    progress: bool = False, quantize: str = "none",
) -> GlmForCausalLM:
    """Builds the model empty, then fills it one shard at a time on `device` in `dtype`, on a
    thread of its own (openmp.in_passing_thread says why).
    `progress`: report each shard on stderr as it loads (see `_shards_with_progress`).
    `quantize`: none | int8 | int4 (chatglm3/model/quantize.py): each linear layer is quantized as
    soon as its weight is loaded, so no more than one unquantized tensor exists at a time."""
    return in_passing_thread(  # type: ignore[return-value]
        lambda: _load_model(model_dir, device, dtype, progress, quantize))


def _load_model(model_dir: str | Path, device: torch.device | str, dtype: torch.dtype,
                progress: bool, quantize: str) -> GlmForCausalLM:
    model_dir = Path(model_dir)
    device = torch.device(device)
    quantizer = Quantizer(quantize, device)
    try:
        raw_config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from None
    config = glm_config(raw_config)
    config.dtype = dtype
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected = dict(model.state_dict())
    missing = set(expected)
    for path in _shards_with_progress(shard_files(model_dir), progress):
        with _open_shard(path) as shard:
            converted: dict[str, torch.Tensor] = {}
            mapped = path.suffix != ".safetensors"  # torch.load(mmap=True): file pages
            for name in list(shard):
                raw = shard.pop(name)
                parts = {}  # the model's tensors made of `raw`, copied to device and dtype
                for new_name, tensor in map_tensor(name, raw, config).items():
                    want = expected.get(new_name)
                    if want is None:
                        raise CheckpointError(f"{path.name}: {name} has no place in the model")
                    if tensor.shape != want.shape:
                        raise CheckpointError(
                            f"{path.name}: {name} has shape {tuple(tensor.shape)}, but config.json "
                            f"implies {tuple(want.shape)}"
                        )
                    parts[new_name] = tensor.to(device=device, dtype=dtype, copy=True)
                if mapped and raw.device.type == "cpu":
                    _drop_file_pages(raw)  # all copied (copy=True): its pages can go before
                del raw                    # quantizing, whose temporaries come on top
                for new_name in list(parts):
                    tensor = parts.pop(new_name)  # held by nothing else once quantized
                    if quantizer.targets(new_name):  # in, quantized, and its copy freed now
                        model.load_state_dict({new_name: tensor}, strict=False, assign=True)
                        del tensor
                        quantizer.apply(model, new_name)
                        missing.discard(new_name)
                    else:
                        converted[new_name] = tensor
            model.load_state_dict(converted, strict=False, assign=True)
            missing -= converted.keys()
            del converted
    if missing:
        raise CheckpointError(
            f"{model_dir}: {len(missing)} tensors missing from the weights, e.g. {sorted(missing)[0]}"
        )
    # The rotary frequencies were built on the meta device: rebuild them in fp32 (never cast).
    model.model.rotary_emb = GlmRotaryEmbedding(config).to(device)
    model.eval().requires_grad_(False)
    pack_linears(model)  # CPU: the plain linear layers' weights in oneDNN's layout
    model.quantize_mode = quantize
    return model

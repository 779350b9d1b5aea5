"""Shared test fixtures: paths into ../shared and the real ChatGLM3 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatglm3.tokenizer import ChatGLMTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER_MODEL = SHARED / "chatglm3-tokenizer" / "tokenizer.model"
GOLDEN = SHARED / "golden" / "tiny-32k"
TINY_CKPT = GOLDEN / "ckpt"


@pytest.fixture(scope="session")
def tokenizer() -> ChatGLMTokenizer:
    return ChatGLMTokenizer(TOKENIZER_MODEL)


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((GOLDEN / "reference.json").read_text())


def convert_to_safetensors(src: Path, dst: Path) -> Path:
    """A copy of a `.bin` checkpoint in the sharded safetensors layout (the hub's other format)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    weight_map = {}
    shards = sorted(set(index["weight_map"].values()))
    for i, shard in enumerate(shards, 1):
        out = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = torch.load(src / shard, map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / out)
        weight_map.update({k: out for k in tensors})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="session")
def tiny_model_fp32():
    """The shared tiny checkpoint, loaded once in fp32 (the dtype the references were made in)."""
    import torch

    from chatglm3.checkpoint import load_model

    return load_model(TINY_CKPT, "cpu", torch.float32)

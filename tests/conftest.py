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

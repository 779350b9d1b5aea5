"""Shared test fixtures: paths into ../shared and the real ChatGLM3 tokenizer; the test tiers.

Layout: the folders mirror the package (engine/, model/, weights/, text/) and its doors (api/,
webchat/, cli/, cog/); tests of the whole package (architecture, packaging, README commands,
settings) sit at the top; helpers/ holds what tests share and is not a test (server launchers,
the fake hub, injected faults), imported as `helpers.NAME` (this folder is on sys.path).

Tiers: `scripts/test` runs everything (what CI runs); `scripts/test -m "not slow"` is the fast
tier for the edit-test loop (unit and golden tests: no server, no subprocess, no long prompt).
Each slow test, or module (`pytestmark`), is marked `@pytest.mark.slow` where it is defined.
Tests that read ../shared (the real tokenizer, the tiny checkpoint and the official outputs) are
marked `shared`; without that folder they are skipped with the reason, except under CI
(CI=true), where a missing ../shared is an error.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import pytest

from chatglm3.params import SamplingParams
from chatglm3.text.tokenizer import ChatGLMTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHATGLM3_TEST_SHARED", ROOT.parent / "shared"))  # override: tests
TOKENIZER_MODEL = SHARED / "chatglm3-tokenizer" / "tokenizer.model"
GOLDEN = SHARED / "golden" / "tiny-32k"
TINY_CKPT = GOLDEN / "ckpt"

# Tests that take one of these fixtures read ../shared; modules that read it otherwise say so
# with `pytestmark = pytest.mark.shared`. Slow tests carry `@pytest.mark.slow` themselves.
SHARED_FIXTURES = {"tokenizer", "no_stop_tokenizer", "reference", "tiny_model_fp32"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: servers, subprocesses or long prompts (not in the "
                                       'fast tier: -m "not slow")')
    config.addinivalue_line("markers", "shared: reads the test data in ../shared")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SHARED_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.shared)
    if SHARED.is_dir():
        return
    if os.environ.get("CI") == "true":
        raise pytest.UsageError(f"{SHARED} is missing: CI must run with the shared test data")
    skip = pytest.mark.skip(reason=f"needs the test data folder {SHARED} (real tokenizer, tiny "
                                   "checkpoint, official outputs); see docs/testing.md")
    for item in items:
        if item.get_closest_marker("shared"):
            item.add_marker(skip)


def consume_together(gens: Iterable, timeout_s: float = 120) -> None:
    """Reads each generation to its end on a thread of its own, all at once (so they share
    decoding steps); fails, rather than hangs, if one is not done within `timeout_s`."""
    threads = [threading.Thread(target=g.text, daemon=True) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), f"a generation did not end within {timeout_s} s"


def assert_official_greedy(engine, prompts: Sequence[dict], lengths: Sequence[int]) -> None:
    """Queues reference prompts at once, request i greedy for lengths[i] tokens, and reads them
    together: each must give the first lengths[i] tokens of its official greedy continuation."""
    gens = [engine.generate_ids(p["input_ids"], SamplingParams(max_tokens=n, temperature=0.0))
            for p, n in zip(prompts, lengths, strict=True)]
    consume_together(gens)
    assert [g.result.output_ids for g in gens] == [
        p["greedy_generate"]["new_ids"][:n] for p, n in zip(prompts, lengths)]


@pytest.fixture(scope="session")
def tokenizer() -> ChatGLMTokenizer:
    return ChatGLMTokenizer(TOKENIZER_MODEL)


@pytest.fixture(scope="session")
def no_stop_tokenizer(tokenizer: ChatGLMTokenizer) -> ChatGLMTokenizer:
    """The tokenizer with no stop ids: the random tiny model often picks one on a random
    prompt, and tests that want every run to decode (and reach decoding at all) use this."""
    import copy

    tok = copy.copy(tokenizer)
    tok.stop_ids = frozenset()
    return tok


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

    from chatglm3.weights.checkpoint import load_model

    return load_model(TINY_CKPT, "cpu", torch.float32)

"""Prefill pads its last chunk to a few bucket lengths: a bounded set of shapes, same outputs.

Every distinct prompt length used to be a new input shape for the model, and bf16 matmul on
CPU keeps state per shape (memory grew with each new length). These tests check that the
shapes prefill shows the model stay within the buckets, that the padding changes nothing a
caller can see (tokens, first logits, the cache handed to decoding) and that none of the
padded positions reach the decoding cache.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

import chatglm3.model.model_runner as engine_module
from chatglm3.engine.engine import PREFILL_BUCKETS, PREFILL_CHUNK, Engine, prefill_bucket
from chatglm3.params import SamplingParams

from conftest import GOLDEN

pytestmark = pytest.mark.shared

GREEDY = dict(temperature=0.0)
NO_BUCKETS = tuple(range(1, PREFILL_CHUNK + 1))  # every length its own "bucket": no padding


@pytest.fixture(scope="module")
def engine(tiny_model_fp32, no_stop_tokenizer):
    engine = Engine(tiny_model_fp32, no_stop_tokenizer)
    yield engine
    engine.close()


class PrefillRecorder:
    """Hooks the model's forward passes that get a DynamicCache (prefill chunks, not decoding
    steps): records each one's input_ids shape, its attention key length and its logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.key_lengths: list[int] = []
        self.logits: list[torch.Tensor] = []
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    @staticmethod
    def _is_prefill(kwargs: dict) -> bool:
        return isinstance(kwargs.get("cache"), DynamicCache)

    def _before(self, _module, _args, kwargs: dict) -> None:
        if self._is_prefill(kwargs):
            shape = tuple(kwargs["input_ids"].shape)
            self.shapes.append(shape)
            self.key_lengths.append(kwargs["cache"].get_seq_length() + shape[1])

    def _after(self, _module, _args, kwargs: dict, out) -> None:
        if self._is_prefill(kwargs):
            self.logits.append(out.logits[0, -1].clone())

    def __enter__(self) -> "PrefillRecorder":
        return self

    def __exit__(self, *_exc) -> None:
        for handle in self._handles:
            handle.remove()


def random_prompt(n: int, seed: int) -> list[int]:
    """n ordinary token ids (no special tokens), the same for the same seed."""
    rng = random.Random(seed)
    return [rng.randrange(100, 60000) for _ in range(n)]


def greedy(engine: Engine, ids: list[int], max_tokens: int) -> list[int]:
    gen = engine.generate_ids(ids, SamplingParams(max_tokens=max_tokens, **GREEDY))
    gen.text()
    assert gen.result.stop_reason == "max_tokens"
    return gen.result.output_ids


def run_recorded(engine: Engine, ids: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids and the logits the prefill picked the first token from."""
    with PrefillRecorder(engine.model) as rec:
        out = greedy(engine, ids, max_tokens)
    return out, rec.logits[-1]


def test_buckets() -> None:
    assert PREFILL_BUCKETS[-1] == PREFILL_CHUNK
    assert list(PREFILL_BUCKETS) == sorted(set(PREFILL_BUCKETS))
    assert len(PREFILL_BUCKETS) <= 16
    for n in range(1, PREFILL_CHUNK + 1):
        b = prefill_bucket(n)
        assert b >= n and b in PREFILL_BUCKETS
        assert b <= max(PREFILL_BUCKETS[0], 1.5 * n)  # padding adds at most half


@pytest.mark.slow  # 40 prompts up to ~5,000 tokens
def test_prefill_shapes_are_bounded(engine: Engine) -> None:
    """40 prompt lengths from 5 to ~5000 tokens, each with a different last-chunk length."""
    lengths = [5 + 127 * i for i in range(40)]
    unpadded = {(n - 1) % PREFILL_CHUNK + 1 for n in lengths}  # last-chunk lengths, no buckets
    assert len(unpadded) == len(lengths)
    with PrefillRecorder(engine.model) as rec:
        for i, n in enumerate(lengths):
            greedy(engine, random_prompt(n, seed=i), max_tokens=1)
    shapes = set(rec.shapes)
    assert shapes <= {(1, b) for b in PREFILL_BUCKETS}
    assert len(shapes) <= len(PREFILL_BUCKETS) < len(lengths) / 2
    # Chunks start at multiples of PREFILL_CHUNK, so key lengths are begin + bucket.
    chunks_max = math.ceil(max(lengths) / PREFILL_CHUNK)
    assert len(set(zip(rec.shapes, rec.key_lengths))) <= len(PREFILL_BUCKETS) * chunks_max
    assert all((k - q[1]) % PREFILL_CHUNK == 0 for q, k in zip(rec.shapes, rec.key_lengths))


@pytest.mark.parametrize("n", [5, 16, 337, 1536, 2048, *[pytest.param(n, marks=pytest.mark.slow)
                                                       for n in (2049, 3000)]])
def test_padded_equals_unpadded(engine: Engine, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Lengths below the smallest bucket, exactly at buckets (16, 1536), at the chunk size and
    one past it (the last chunk is 1 token, padded to 16): the same tokens and first logits."""
    ids = random_prompt(n, seed=n)
    padded_ids, padded_logits = run_recorded(engine, ids, max_tokens=12)
    monkeypatch.setattr(engine_module, "PREFILL_BUCKETS", NO_BUCKETS)
    plain_ids, plain_logits = run_recorded(engine, ids, max_tokens=12)
    assert padded_ids == plain_ids
    torch.testing.assert_close(padded_logits, plain_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1, pytest.param(2, marks=pytest.mark.slow)])  # 2: 6,118 tokens
def test_padded_first_logits_match_official(engine: Engine, reference: dict, index: int) -> None:
    """The official prompts (8, 337 and 6,118 tokens: every one ends in a padded chunk)."""
    prompt = reference["prompts"][index]
    assert prefill_bucket((len(prompt["input_ids"]) - 1) % PREFILL_CHUNK + 1) > (
        (len(prompt["input_ids"]) - 1) % PREFILL_CHUNK + 1)
    expected = prompt["greedy_generate"]["new_ids"]
    ids, logits = run_recorded(engine, prompt["input_ids"], max_tokens=len(expected))
    assert ids == expected
    ref = load_file(GOLDEN / "reference_logits.safetensors")[f"{prompt['name']}.last"]
    assert float((logits - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.slow  # a 2,900-token prompt
def test_positions_clamped_to_context(tiny_model_fp32, no_stop_tokenizer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With a context that is no multiple of the chunk size, a padded last chunk runs past it:
    its positions are clamped, and the real tokens' results do not change."""
    engine = Engine(tiny_model_fp32, no_stop_tokenizer)
    try:
        engine.context = 3000
        ids = random_prompt(2900, seed=7)  # last chunk 852 tokens, padded to 1024: up to 3072
        assert PREFILL_CHUNK + prefill_bucket(len(ids) - PREFILL_CHUNK) > engine.context
        positions: list[int] = []
        handle = engine.model.register_forward_pre_hook(
            lambda _m, _a, kw: positions.append(int(kw["position_ids"].max())), with_kwargs=True)
        try:
            padded = run_recorded(engine, ids, max_tokens=8)
        finally:
            handle.remove()
        assert max(positions) == engine.context - 1
        monkeypatch.setattr(engine_module, "PREFILL_BUCKETS", NO_BUCKETS)
        plain = run_recorded(engine, ids, max_tokens=8)
    finally:
        engine.close()
    assert padded[0] == plain[0]
    torch.testing.assert_close(padded[1], plain[1], rtol=1e-5, atol=1e-5)


def _admitted_caches(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Captures (prompt length, per-layer keys, per-layer values) of each prefilled cache as
    the engine hands it to decoding."""
    seen: list[tuple] = []
    admit = engine.runner.admit

    def spy(r, row, moves) -> None:
        layers = r.tensors.cache.layers
        seen.append((len(r.prompt), [layer.keys.clone() for layer in layers],
                     [layer.values.clone() for layer in layers]))
        admit(r, row, moves)

    monkeypatch.setattr(engine.runner, "admit", spy)
    return seen


@pytest.mark.parametrize("n", [7, 1000, 2049])
def test_cache_holds_exactly_the_prompt(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                        n: int) -> None:
    """After prefill the cache has the prompt's length, with the keys/values of an unpadded
    prefill: no padded position reaches decoding."""
    ids = random_prompt(n, seed=100 + n)
    assert prefill_bucket((n - 1) % PREFILL_CHUNK + 1) > (n - 1) % PREFILL_CHUNK + 1
    seen = _admitted_caches(engine, monkeypatch)
    greedy(engine, ids, max_tokens=2)
    monkeypatch.setattr(engine_module, "PREFILL_BUCKETS", NO_BUCKETS)
    greedy(engine, ids, max_tokens=2)
    assert len(seen) == 2
    (length, keys, values), (_, plain_keys, plain_values) = seen
    assert length == n
    assert len(keys) == engine.model.config.num_hidden_layers
    for k, v, pk, pv in zip(keys, values, plain_keys, plain_values):
        assert k.shape[2] == v.shape[2] == n
        torch.testing.assert_close(k, pk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, pv, rtol=1e-5, atol=1e-5)


def test_warm_up_meets_every_prefill_shape(tiny_model_fp32, no_stop_tokenizer) -> None:
    """Setup's warm-up runs one chunk of each bucket length, so no request meets a prefill
    shape for the first time; the engine then serves as before."""
    engine = Engine(tiny_model_fp32, no_stop_tokenizer)
    try:
        with PrefillRecorder(engine.model) as rec:
            report = engine.warm_up()
        assert sorted(rec.shapes) == [(1, b) for b in PREFILL_BUCKETS]
        assert report.prefill_shapes == len(PREFILL_BUCKETS)
        assert report.decode_step == "eager" and report.graphs == 0 and not report.check
        assert f"{len(PREFILL_BUCKETS)} prefill shapes" in str(report)
        with PrefillRecorder(engine.model) as rec:
            greedy(engine, random_prompt(300, seed=1), max_tokens=3)
        assert set(rec.shapes) <= {(1, b) for b in PREFILL_BUCKETS}
    finally:
        engine.close()

"""Fixed-shape decoding (the shapes CUDA graphs record) gives the official outputs.

CUDA graphs cannot be recorded without a GPU, so these tests run the same padded, whole-capacity
steps eagerly ("fixed"), and check the fallback a GPU takes when recording fails.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from chatglm3.decode_graphs import batch_buckets
from chatglm3.engine import Engine
from chatglm3.params import SamplingParams

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def fixed(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=4, decode_step="fixed")
    yield engine
    engine.close()


def run_all(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> list:
    gens = [engine.generate(ids, SamplingParams(max_tokens=n, **GREEDY))
            for ids, n in zip(prompts, lengths)]
    threads = [threading.Thread(target=g.text) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return gens


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_alone_equals_official(fixed: Engine, reference: dict, index: int) -> None:
    prompt = reference["prompts"][index]
    expected = prompt["greedy_generate"]["new_ids"]
    gen = fixed.generate(prompt["input_ids"], SamplingParams(max_tokens=len(expected), **GREEDY))
    gen.text()
    assert gen.result.output_ids == expected


def test_padded_batches_join_and_leave(fixed: Engine, reference: dict) -> None:
    """Three requests (padded to a batch of 4), one of 6,118 tokens that grows the cache
    while the others decode, leaving at different times: each gives its official tokens."""
    prompts = reference["prompts"]
    lengths = (24, 12, 18)
    gens = run_all(fixed, [p["input_ids"] for p in prompts], list(lengths))
    for gen, p, n in zip(gens, prompts, lengths):
        assert gen.result.output_ids == p["greedy_generate"]["new_ids"][:n]
    assert fixed._kv.rows == 4  # the padded shape ran (eager steps reserve 3 rows)


def test_more_requests_than_rows(fixed: Engine, reference: dict) -> None:
    """Six requests on a 4-row engine: the queued ones start as rows free up."""
    prompt = reference["prompts"][0]
    expected = prompt["greedy_generate"]["new_ids"]
    lengths = [24, 5, 17, 9, 24, 1]
    gens = run_all(fixed, [prompt["input_ids"]] * 6, lengths)
    assert [g.result.output_ids for g in gens] == [expected[:n] for n in lengths]


def test_bad_decode_step_is_named(tiny_model_fp32, tokenizer) -> None:
    with pytest.raises(ValueError, match="decode_step"):
        Engine(tiny_model_fp32, tokenizer, decode_step="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="decode_step: graphs needs a CUDA device"):
            Engine(tiny_model_fp32, tokenizer, decode_step="graphs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="recording must fail, so no CUDA")
def test_failed_recording_falls_back_to_eager(tiny_model_fp32, tokenizer, reference,
                                              caplog) -> None:
    """Recording needs CUDA, so on CPU it fails for real: the request still gets the official
    tokens and the engine says it decodes eagerly from then on."""
    engine = Engine(tiny_model_fp32, tokenizer, decode_step="fixed")
    engine._fixed.record = True
    prompt = reference["prompts"][1]
    expected = prompt["greedy_generate"]["new_ids"]
    try:
        with caplog.at_level(logging.WARNING, logger="chatglm3.engine"):
            gen = engine.generate(prompt["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
            gen.text()
        assert gen.result.output_ids == expected
        assert engine._fixed is None
        assert "decoding eagerly" in caplog.text
    finally:
        engine.close()

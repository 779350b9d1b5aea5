"""Out of memory fails the requests of that step with a clear message; the engine frees what
they held and serves on. The error is injected: the model's forward raises
torch.OutOfMemoryError once."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from chatglm3.engine.engine import Engine, OutOfMemory
from chatglm3.model.kv_rows import KVRows
from chatglm3.model.packed_step import PackedStep
from chatglm3.params import SamplingParams
from helpers.faults import FailOnce

pytestmark = pytest.mark.slow  # long prompts

GREEDY = dict(temperature=0.0)


def is_prefill(kwargs: dict) -> bool:
    """A pass with prompt tokens: a lone chunk, or chunks packed with decoding tokens."""
    cache = kwargs.get("cache")
    return isinstance(cache, DynamicCache) or isinstance(cache, PackedStep) and bool(cache.segments)


def official(engine: Engine, prompt: dict, n: int = 24) -> None:
    gen = engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=n, **GREEDY))
    gen.text()
    assert gen.result.output_ids == prompt["greedy_generate"]["new_ids"][:n]


@pytest.mark.parametrize("decode_step", ["eager", "fixed"])
def test_out_of_memory_in_prefill_fails_that_request(tiny_model_fp32, tokenizer, reference,
                                                     monkeypatch, decode_step: str) -> None:
    """The 6,118-token prompt runs out of memory in its second chunk, while another request
    decodes: only the long one fails, naming its size; the other and the next succeed."""
    engine = Engine(tiny_model_fp32, tokenizer, decode_step=decode_step)
    try:
        chunks = []
        FailOnce(engine.model, monkeypatch,
                 lambda kw: is_prefill(kw) and kw["position_ids"].shape[1] >= 512  # its chunks
                 and chunks.append(1) is None and len(chunks) == 2)
        short, long = reference["prompts"][0], reference["prompts"][2]
        keep = engine.generate_ids(short["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
        stream = iter(keep)
        first = next(stream)
        failing = engine.generate_ids(long["input_ids"], SamplingParams(max_tokens=5, **GREEDY))
        with pytest.raises(OutOfMemory, match=r"out of memory during prefill of a 6,118-token "
                                              r"prompt; the request was dropped"):
            failing.text()
        assert failing.result.stop_reason == "error" and failing.result.output_ids == []
        assert first + "".join(stream) == tokenizer.decode(short["greedy_generate"]["new_ids"])
        official(engine, long)
    finally:
        engine.close()


@pytest.mark.parametrize("decode_step", ["eager", "fixed"])
def test_out_of_memory_in_a_decoding_step_fails_its_requests(tiny_model_fp32, tokenizer,
                                                             reference, monkeypatch,
                                                             decode_step: str) -> None:
    """Two requests decode together when a step runs out of memory: both fail with a message
    naming the step's size, the grown cache is given back, and the next request succeeds."""
    engine = Engine(tiny_model_fp32, tokenizer, decode_step=decode_step)
    try:
        FailOnce(engine.model, monkeypatch,
                 lambda kw: isinstance(kw.get("cache"), KVRows) and kw["input_ids"].shape[0] == 2)
        prompts = reference["prompts"][:2]
        gens = [engine.generate_ids(p["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
                for p in prompts]
        errors = [None, None]

        def consume(i: int) -> None:
            try:
                gens[i].text()
            except OutOfMemory as e:
                errors[i] = str(e)

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for gen, error, p in zip(gens, errors, prompts):
            assert error and "out of memory during a decoding step of 2 requests" in error
            assert gen.result.stop_reason == "error"
            done = gen.result.output_ids  # the tokens before the step that failed
            assert done == p["greedy_generate"]["new_ids"][: len(done)]
        assert (engine.stats().kv_rows, engine.stats().kv_capacity) == (1, 256)  # what they grew is freed
        official(engine, prompts[1])
        official(engine, reference["prompts"][2], 12)
    finally:
        engine.close()


def test_out_of_memory_with_a_planned_cache(tiny_model_fp32, tokenizer, reference,
                                            monkeypatch) -> None:
    """One request alone, planned rows: the message says 1 request, the rows stay allocated,
    the next request gets the row and its official tokens."""
    engine = Engine(tiny_model_fp32, tokenizer, kv_budget_bytes=2 * 32768 * 2048)
    try:
        addresses = [t.data_ptr() for t in engine.runner.kv.keys]
        FailOnce(engine.model, monkeypatch, lambda kw: isinstance(kw.get("cache"), KVRows))
        gen = engine.generate_ids(reference["prompts"][1]["input_ids"],
                                  SamplingParams(max_tokens=24, **GREEDY))
        with pytest.raises(OutOfMemory, match="during a decoding step of 1 request;"):
            gen.text()
        assert [t.data_ptr() for t in engine.runner.kv.keys] == addresses
        official(engine, reference["prompts"][1])
    finally:
        engine.close()

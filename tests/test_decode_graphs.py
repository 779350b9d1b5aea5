"""Fixed-shape decoding (the shapes CUDA graphs record) gives the official outputs.

CUDA graphs cannot be recorded without a GPU, so these tests run the same padded, whole-capacity
steps eagerly ("fixed"), and check the fallback a GPU takes when recording fails.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from chatglm3.decode_graphs import FixedShapeDecoder, batch_buckets
from chatglm3.engine import Engine
from chatglm3.kv_rows import KVRows
from chatglm3.params import SamplingParams

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def fixed(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=4, decode_step="fixed")
    yield engine
    engine.close()


def run_all(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> list:
    gens = [engine.generate_ids(ids, SamplingParams(max_tokens=n, **GREEDY))
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
    gen = fixed.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=len(expected), **GREEDY))
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
            gen = engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
            gen.text()
        assert gen.result.output_ids == expected
        assert engine._fixed is None
        assert "decoding eagerly" in caplog.text
    finally:
        engine.close()


class OpLog(TorchDispatchMode):
    """Records every aten op a block of code runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Ops that read device memory on the host or copy host data in: recording a CUDA graph fails
# (or silently freezes a value) on any of them.
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select",
                 "unique", "_unique2", "equal", "lift_fresh"}


def test_fixed_step_has_no_host_round_trips(tiny_model_fp32) -> None:
    """The step a graph records must not make the host wait on the device or feed it Python
    values; the same forward with a default cache and mask does (so the check can fail)."""
    cfg = tiny_model_fp32.config
    kv = KVRows(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                torch.device("cpu"), torch.float32)
    decoder = FixedShapeDecoder(tiny_model_fp32, kv, max_batch=4, record=False)
    with torch.inference_mode():
        decoder(torch.tensor([[5], [6], [7]]), torch.tensor([3, 4, 5]))  # makes the bucket-4 step
        with OpLog() as fixed_ops:
            decoder._forward(decoder._steps[4])
        with OpLog() as default_ops:
            kv.prepare_step(torch.tensor([3, 4, 5]))  # no read_len: must sync to find it
    assert "linear" in fixed_ops.ops and "scaled_dot_product_attention" in fixed_ops.ops
    assert not fixed_ops.ops & HOST_SYNC_OPS
    assert default_ops.ops & HOST_SYNC_OPS

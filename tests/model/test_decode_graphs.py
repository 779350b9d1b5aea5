"""Fixed-shape decoding (the shapes CUDA graphs record) gives the official outputs.

CUDA graphs cannot be recorded without a GPU, so these tests run the same padded steps (batch and
read length in buckets) eagerly ("fixed"): they check the tokens, what a step reads, and the
fallbacks a GPU takes when recording fails or graphs disagree with eager steps at setup.
"""

from __future__ import annotations

import logging

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from chatglm3.model.decode_graphs import MIN_READ, FixedShapeDecoder, batch_buckets, read_buckets
from chatglm3.engine.engine import PREFILL_CHUNK, Engine
from chatglm3.model.kv_rows import KVRows
from chatglm3.params import SamplingParams
from conftest import assert_official_greedy

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def fixed(tiny_model_fp32, tokenizer):
    # Whole prefill chunks beside decoding: the 6,118-token prompt then joins the others while
    # they still decode, so the batches this module checks (3 padded to 4) form.
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=4, decode_step="fixed",
                    prefill_budget=PREFILL_CHUNK)
    yield engine
    engine.close()


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("index", [0, 1, pytest.param(2, marks=pytest.mark.slow)])  # 2: 6,118 tokens
def test_alone_equals_official(fixed: Engine, reference: dict, index: int) -> None:
    prompt = reference["prompts"][index]
    expected = prompt["greedy_generate"]["new_ids"]
    gen = fixed.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=len(expected), **GREEDY))
    gen.text()
    assert gen.result.output_ids == expected


@pytest.mark.slow  # the 6,118-token prompt
def test_padded_batches_join_and_leave(fixed: Engine, reference: dict, monkeypatch) -> None:
    """Three requests (padded to a batch of 4), one of 6,118 tokens that grows the cache
    while the others decode, leaving at different times: each gives its official tokens."""
    kv, most = fixed.runner.kv, []
    reserve = kv.reserve

    def spy(*args, **kwargs):  # the rows the cache held at its largest (an idle engine's
        reserve(*args, **kwargs)  # cache goes back to its first size afterwards)
        most.append(kv.rows)

    monkeypatch.setattr(kv, "reserve", spy)
    assert_official_greedy(fixed, reference["prompts"], (24, 12, 18))
    assert max(most) == 4  # the padded shape ran (eager steps reserve 3 rows)


def test_more_requests_than_rows(fixed: Engine, reference: dict) -> None:
    """Six requests on a 4-row engine: the queued ones start as rows free up."""
    assert_official_greedy(fixed, [reference["prompts"][0]] * 6, [24, 5, 17, 9, 24, 1])


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
    engine.runner.fixed.record = True
    prompt = reference["prompts"][1]
    expected = prompt["greedy_generate"]["new_ids"]
    try:
        with caplog.at_level(logging.WARNING, logger="chatglm3.engine"):
            gen = engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
            gen.text()
        assert gen.result.output_ids == expected
        assert engine.runner.fixed is None
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
            decoder._forward(decoder._steps[4, 256])
        with OpLog() as default_ops:
            kv.prepare_step(torch.tensor([3, 4, 5]))  # no read_len: must sync to find it
    # the model's ops were seen (linear layers: packed for oneDNN on the CPU, plain elsewhere)
    assert {"linear", "_linear_pointwise"} & fixed_ops.ops
    assert "scaled_dot_product_attention" in fixed_ops.ops
    assert not fixed_ops.ops & HOST_SYNC_OPS
    assert default_ops.ops & HOST_SYNC_OPS


def test_public_decode_steps_leave_out_the_test_mode(tiny_model_fp32, tokenizer) -> None:
    from chatglm3.engine.engine import DECODE_STEPS

    assert DECODE_STEPS == ("auto", "eager", "graphs")
    with pytest.raises(ValueError, match=r"one of auto, eager, graphs, got 'fast'"):
        Engine(tiny_model_fp32, tokenizer, decode_step="fast")
    engine = Engine(tiny_model_fp32, tokenizer, decode_step="fixed")  # still a test keyword
    assert engine.decode_step == "fixed"
    engine.close()


def test_graph_count_is_batch_buckets_times_read_lengths() -> None:
    """The planned A40 cache (8 rows x 32,768) gives 4 x 8 = 32 graphs; 32 streams, 48."""
    kv = KVRows(28, 2, 128, torch.device("meta"), torch.float16, rows=8, capacity=32768,
                growable=False)
    assert read_buckets(32768) == [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert len(FixedShapeDecoder(None, kv, max_batch=8, record=False).shapes()) == 32
    assert read_buckets(20000)[-2:] == [16384, 20000]
    big = KVRows(28, 2, 128, torch.device("meta"), torch.float16, rows=32, capacity=32768)
    assert len(FixedShapeDecoder(None, big, max_batch=32, record=False).shapes()) == 48
    for n in range(1, 20001, 7):
        b = next(r for r in read_buckets(20000) if r >= n)
        assert n <= b <= max(2 * n - 1, MIN_READ)


@pytest.mark.slow  # the 6,118-token prompt
def test_steps_read_what_their_furthest_row_needs(fixed: Engine, reference: dict) -> None:
    """Long and short requests come and go on the fixed-shape path (the graphs' shapes): every
    step reads at most twice its furthest row (256 positions at least), not the whole cache,
    which the 6,118-token prompt grew to 8,192 positions; and every request still gives its
    official tokens."""
    kv = fixed.runner.kv
    steps: list[tuple[int, int, int]] = []  # (furthest row, positions read, capacity)
    prepare = kv.prepare_step

    def counting(positions: torch.Tensor, read_len: int | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        mask = prepare(positions, read_len, rows)
        steps.append((int(positions.max()) + 1, kv._read_len, kv.capacity))
        return mask

    kv.prepare_step = counting
    try:
        prompts = reference["prompts"]
        short, medium, long = prompts
        first = [fixed.generate_ids(p["input_ids"], SamplingParams(max_tokens=n, **GREEDY))
                 for p, n in ((short, 24), (long, 4), (medium, 6))]
        for g in first[1:]:
            g.text()
        later = fixed.generate_ids(medium["input_ids"], SamplingParams(max_tokens=12, **GREEDY))
        later.text()
        first[0].text()
    finally:
        del kv.prepare_step
    for gen, p, n in zip(first + [later], (short, long, medium, medium), (24, 4, 6, 12)):
        assert gen.result.output_ids == p["greedy_generate"]["new_ids"][:n]
    assert all(furthest <= read <= max(2 * furthest, MIN_READ) for furthest, read, _ in steps)
    assert max(read for _, read, _ in steps) == 8192  # while the long one decoded
    short_after_long = [read for furthest, read, cap in steps if cap >= 8192 and furthest < 400]
    assert short_after_long and max(short_after_long) <= 512


def test_warm_up_checks_fixed_steps_against_eager(tiny_model_fp32, tokenizer, reference):
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=4, decode_step="fixed")
    try:
        report = engine.warm_up(prefill=False)
        assert report.check == "fixed-shape steps give eager steps' greedy tokens"
        assert report.decode_step == "fixed" and engine.runner.fixed is not None
        assert_official_greedy(engine, [reference["prompts"][1]], [24])
    finally:
        engine.close()


def test_warm_up_falls_back_to_eager_when_graph_tokens_differ(tiny_model_fp32, tokenizer,
                                                              reference, caplog) -> None:
    """A fixed path (on a GPU: graphs) that picks other tokens than eager steps must never
    serve: warm-up switches to eager steps and says why."""
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=4, decode_step="fixed")
    decoder = engine.runner.fixed
    real = decoder._forward
    decoder._forward = lambda step: real(step).roll(1, dims=-1)  # wrong tokens, as a bad graph
    try:
        with caplog.at_level(logging.WARNING, logger="chatglm3.engine"):
            report = engine.warm_up(prefill=False)
        assert engine.runner.fixed is None and report.decode_step == engine.decode_step == "eager"
        assert "disagree with eager steps" in report.check and "step 1, row 1" in report.check
        assert "decoding eagerly: fixed-shape steps disagree with eager steps" in caplog.text
        assert_official_greedy(engine, [reference["prompts"][1]], [24])
    finally:
        engine.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="recording must fail, so no CUDA")
def test_warm_up_falls_back_when_recording_fails(tiny_model_fp32, tokenizer, caplog) -> None:
    engine = Engine(tiny_model_fp32, tokenizer, decode_step="fixed")
    engine.runner.fixed.record = True  # on CPU recording fails for real
    try:
        with caplog.at_level(logging.WARNING, logger="chatglm3.engine"):
            report = engine.warm_up(prefill=False)
        assert engine.runner.fixed is None and report.decode_step == "eager"
        assert report.check.startswith("graphs failed to set up: ")
        assert report.check.endswith("; decoding eagerly")
        assert "decoding eagerly: graphs failed to set up" in caplog.text
    finally:
        engine.close()

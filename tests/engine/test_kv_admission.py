"""A KV cache planned once (Engine(kv_budget_bytes=...)): admission in arrival order, requests
that could never fit refused at once, cancelling a waiting request, official outputs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from chatglm3.engine.engine import Engine, RequestTooLarge
from chatglm3.model.kv_rows import KVBudgetError
from chatglm3.params import SamplingParams
from conftest import assert_official_greedy

pytestmark = pytest.mark.slow  # long prompts

GREEDY = dict(temperature=0.0)
PER_TOKEN = 2048  # the tiny checkpoint in fp32: 2 (k, v) x 2 layers x 2 heads x 64 x 4 bytes
ROW = 32768 * PER_TOKEN  # one whole-context row


class AdmitLog:
    """Records, in order, each request's prompt as it gets a cache row, and the most rows in
    use at once."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prompts: list[list[int]] = []
        self.most_running = 0
        admit = engine.runner.admit

        def spy(r, row, moves) -> None:
            self.prompts.append(r.prompt)
            admit(r, row, moves)
            self.most_running = max(self.most_running, len(engine.scheduler.running))

        monkeypatch.setattr(engine.runner, "admit", spy)


def test_planned_cache_is_allocated_once_and_bounds_the_batch(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=8, kv_budget_bytes=3 * ROW + 5)
    try:
        assert (engine.kv_plan.rows, engine.kv_plan.capacity) == (3, 32768)
        assert engine.max_batch == 3
        stats = engine.stats()
        assert (stats.kv_rows, stats.kv_capacity, stats.kv_growable) == (3, 32768, False)
        assert "3 rows x 32,768 positions = 0.19 GiB" in str(engine.kv_plan)
    finally:
        engine.close()
    with pytest.raises(KVBudgetError, match="less than one row"):
        Engine(tiny_model_fp32, tokenizer, kv_budget_bytes=1000)


@pytest.mark.parametrize("decode_step", ["eager", "fixed"])
def test_official_outputs_with_a_planned_cache(tiny_model_fp32, tokenizer, reference,
                                               decode_step: str) -> None:
    """The three official prompts (8, 337 and 6,118 tokens) at once on 2 planned rows: the
    third waits for a row, and every one gives its official greedy tokens."""
    engine = Engine(tiny_model_fp32, tokenizer, kv_budget_bytes=2 * ROW, decode_step=decode_step)
    try:
        assert_official_greedy(engine, reference["prompts"], (24, 12, 18))
    finally:
        engine.close()


def test_waiting_requests_start_in_arrival_order(tiny_model_fp32, no_stop_tokenizer, reference,
                                                 monkeypatch) -> None:
    """Two rows, five requests, the first the largest (6,118 prompt tokens): they get rows in
    the order they came, never more than two at a time, and none is passed over."""
    engine = Engine(tiny_model_fp32, no_stop_tokenizer, kv_budget_bytes=2 * ROW)
    admitted = AdmitLog(engine, monkeypatch)
    try:
        big = reference["prompts"][2]["input_ids"]
        small = [reference["prompts"][0]["input_ids"] + [100 + i] for i in range(4)]
        gens = [engine.generate_ids(ids, SamplingParams(max_tokens=6, **GREEDY))
                for ids in [big] + small]
        for g in gens:
            g.text()
        assert admitted.prompts == [big] + small
        assert admitted.most_running == 2
        assert all(g.result.stop_reason == "max_tokens" for g in gens)
    finally:
        engine.close()


def test_a_request_no_row_could_hold_fails_at_once(tiny_model_fp32, tokenizer, reference):
    """One row of 512 positions: 337 prompt tokens + 200 to generate need 537: refused on
    submission, naming both numbers; with 24 to generate it runs, with the official tokens."""
    engine = Engine(tiny_model_fp32, tokenizer, kv_budget_bytes=512 * PER_TOKEN)
    try:
        assert (engine.kv_plan.rows, engine.kv_plan.capacity) == (1, 512)
        prompt = reference["prompts"][1]
        with pytest.raises(RequestTooLarge) as info:
            engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=200))
        assert info.value.worst_case == 537 and info.value.capacity == 512
        assert "537" in str(info.value) and "512" in str(info.value)
        assert "lower max_tokens to at most 175" in str(info.value)
        with pytest.raises(RequestTooLarge, match="shorten the prompt"):
            engine.generate_ids(list(range(100, 700)), SamplingParams(max_tokens=1))
        gen = engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
        gen.text()
        assert gen.result.output_ids == prompt["greedy_generate"]["new_ids"]
    finally:
        engine.close()


def test_cancelling_a_waiting_request(tiny_model_fp32, no_stop_tokenizer, reference) -> None:
    """One row, held by a long request: a second one waits; cancelled, its stream ends at
    once (the first still running), and it never gets a row."""
    engine = Engine(tiny_model_fp32, no_stop_tokenizer, kv_budget_bytes=ROW)
    try:
        ids = reference["prompts"][0]["input_ids"]
        long = engine.generate_ids(ids, SamplingParams(max_tokens=5000, **GREEDY))
        long_stream = iter(long)
        next(long_stream)  # it has the row now
        waiting = engine.generate_ids(ids, SamplingParams(max_tokens=5, **GREEDY))
        time.sleep(0.2)  # a few decoding steps of the long one
        assert waiting.result.stop_reason == ""  # still waiting
        waiting.cancel()
        ended = threading.Event()
        threading.Thread(target=lambda: (list(waiting), ended.set()), daemon=True).start()
        assert ended.wait(30)
        assert waiting.result.stop_reason == "cancelled" and waiting.result.output_ids == []
        assert waiting.result.time_to_first_token == 0.0  # it never ran
        assert long.result.stop_reason == ""  # the long one still runs
        long.cancel()
        list(long_stream)
        assert long.result.stop_reason == "cancelled"
        after = engine.generate_ids(ids, SamplingParams(max_tokens=24, **GREEDY))
        after.text()
        assert after.result.output_ids == reference["prompts"][0]["greedy_generate"]["new_ids"]
    finally:
        engine.close()


def test_closing_ends_waiting_requests(tiny_model_fp32, no_stop_tokenizer, reference) -> None:
    engine = Engine(tiny_model_fp32, no_stop_tokenizer, kv_budget_bytes=ROW)
    ids = reference["prompts"][0]["input_ids"]
    running = engine.generate_ids(ids, SamplingParams(max_tokens=5000, **GREEDY))
    stream = iter(running)
    next(stream)
    waiting = engine.generate_ids(ids, SamplingParams(max_tokens=5, **GREEDY))
    engine.close()
    assert list(waiting) == [] and waiting.result.stop_reason == "cancelled"
    list(stream)
    assert running.result.stop_reason == "cancelled"


def test_cpu_default_still_grows(tiny_model_fp32, tokenizer) -> None:
    engine = Engine(tiny_model_fp32, tokenizer)
    try:
        assert engine.kv_plan is None and engine.stats().kv_growable
        assert engine.device == torch.device("cpu")
    finally:
        engine.close()


def test_gpu_plan_measures_the_worst_prefill_chunk(tiny_model_fp32, tokenizer, monkeypatch):
    """The GPU planning path with torch.cuda's memory calls faked (no GPU here): it runs the
    worst prefill chunk (a whole chunk at the end of the context, after a full prompt cache),
    takes its peak as the activation bytes, and plans from the free memory it then reads."""
    from transformers import DynamicCache

    from chatglm3.model.kv_rows import plan_kv

    engine = Engine(tiny_model_fp32, tokenizer)
    engine.context = 4096  # the same chunk arithmetic as 32,768, quicker
    calls, peak = [], 300 * 2**20
    fake = dict(synchronize=lambda *a: None, empty_cache=lambda: calls.append("empty"),
                memory_allocated=lambda *a: 10 * 2**30,
                reset_peak_memory_stats=lambda *a: calls.append("reset"),
                max_memory_allocated=lambda *a: 10 * 2**30 + peak,
                mem_get_info=lambda *a: (30 * 2**30, 48 * 2**30))
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    chunks = []
    hook = engine.model.register_forward_pre_hook(
        lambda _m, _a, kw: chunks.append((tuple(kw["input_ids"].shape),
                                          kw["cache"].get_seq_length()))
        if isinstance(kw.get("cache"), DynamicCache) else None, with_kwargs=True)
    try:
        plan = engine.runner.plan_from_gpu_memory(2048, max_batch=8)
    finally:
        hook.remove()
        engine.close()
    assert chunks == [((1, 2048), 2048)]  # 2,048 new tokens after 2,048 cached: keys to 4,096
    assert calls[:2] == ["empty", "reset"] and calls[-1] == "empty"
    weights = sum(t.numel() * t.element_size()
                  for t in [*tiny_model_fp32.parameters(), *tiny_model_fp32.buffers()])
    assert plan == plan_kv(total_bytes=48 * 2**30, free_bytes=30 * 2**30, weight_bytes=weights,
                           bytes_per_token=2048, activation_bytes=peak, max_batch=8,
                           context=4096)
    assert (plan.rows, plan.capacity) == (8, 4096)

"""The generation engine on the shared tiny checkpoint: exactness, sampling, stops, limits, cancel."""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch

from chatglm3.engine.engine import Engine, PromptTooLong
from chatglm3.text.messages import build_messages
from chatglm3.params import SamplingParams, SettingsError
from conftest import assert_official_greedy

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer)
    yield engine
    engine.close()


class ForwardCounter:
    """Counts the model's forward passes (a forward hook on the top module)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.seen_first = threading.Event()
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1
        self.seen_first.set()

    def __enter__(self) -> "ForwardCounter":
        return self

    def __exit__(self, *_exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("index", [0, 1, pytest.param(2, marks=pytest.mark.slow)])  # 2: 6,118 tokens
def test_greedy_equals_official_generate(engine: Engine, reference: dict, index: int) -> None:
    prompt = reference["prompts"][index]
    expected = prompt["greedy_generate"]["new_ids"]
    gen = engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=len(expected), **GREEDY))
    text = gen.text()
    assert gen.result.output_ids == expected
    assert text == engine.tokenizer.decode(expected)
    assert gen.result.stop_reason == "max_tokens"


def test_greedy_chat_transcripts(engine: Engine, reference: dict) -> None:
    """The official chat() runs, including one that ends on <|observation|>."""
    cases = reference["chat"]["cases"]
    assert any(c["ended_on_stop_id"] for c in cases)
    for case in cases:
        messages = build_messages(case["query"], history=case["history"])
        raw = case["raw_generated_ids"]
        budget = case["max_length"] - case["prompt_len"]
        gen = engine.generate(messages, SamplingParams(max_tokens=budget, **GREEDY))
        text = gen.text()
        assert gen.result.input_ids == case["prompt_ids"]
        if case["ended_on_stop_id"]:
            assert raw[-1] in engine.tokenizer.stop_ids
            assert gen.result.output_ids == raw[:-1]
            assert gen.result.stop_reason == "stop_token"
            assert text == case["chat_response"]  # chat() drops exactly the stop token here
        else:
            assert gen.result.output_ids == raw
            assert gen.result.stop_reason == "max_tokens"
            assert text.startswith(case["chat_response"])


def test_seeded_sampling_repeats(engine: Engine) -> None:
    messages = build_messages("Tell me a story")
    def run(seed: int) -> list[int]:
        gen = engine.generate(messages, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95,
                                                       top_k=50, seed=seed))
        gen.text()
        assert gen.result.seed == seed
        return gen.result.output_ids
    a, b, c = run(1234), run(1234), run(99)
    assert a == b and len(a) == 16
    assert a != c


def test_unseeded_sampling_reports_seed_that_reproduces(engine: Engine) -> None:
    messages = build_messages("hello")
    params = SamplingParams(max_tokens=8, temperature=1.5, top_p=1.0)
    first = engine.generate(messages, params)
    first.text()
    again = engine.generate(messages, SamplingParams(max_tokens=8, temperature=1.5, top_p=1.0,
                                                     seed=first.result.seed))
    again.text()
    assert again.result.output_ids == first.result.output_ids


def test_temperature_zero_is_greedy_whatever_the_seed(engine: Engine) -> None:
    messages = build_messages("hello")
    outs = []
    for seed in (1, 2):
        gen = engine.generate(messages, SamplingParams(max_tokens=8, temperature=0, seed=seed))
        gen.text()
        outs.append(gen.result.output_ids)
    assert outs[0] == outs[1]


def test_repetition_penalty_reaches_the_logits(engine: Engine, reference: dict) -> None:
    """A penalty below 1 multiplies the (positive) logits of seen tokens: greedy then only
    repeats; the plain greedy continuation of this prompt repeats nothing."""
    ids = reference["prompts"][0]["input_ids"]
    plain = engine.generate_ids(ids, SamplingParams(max_tokens=12, **GREEDY))
    plain.text()
    assert not set(plain.result.output_ids) & set(ids)
    repeating = engine.generate_ids(ids, SamplingParams(max_tokens=12, repetition_penalty=0.02,
                                                    **GREEDY))
    repeating.text()
    assert repeating.result.output_ids != plain.result.output_ids
    assert set(repeating.result.output_ids) <= set(ids) - engine.tokenizer.stop_ids


def test_stop_token_is_never_text(engine: Engine, reference: dict) -> None:
    """Any stop id ends the stream without text; here a copy of the tokenizer treats a token the
    model is known to produce at step 6 as a stop id."""
    prompt = reference["prompts"][0]
    expected = prompt["greedy_generate"]["new_ids"]
    tok = copy.copy(engine.tokenizer)
    tok.stop_ids = engine.tokenizer.stop_ids | {expected[6]}
    other = Engine(engine.model, tok)
    gen = other.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
    text = gen.text()
    other.close()
    assert gen.result.output_ids == expected[:6]
    assert gen.result.stop_reason == "stop_token"
    assert text == tok.decode(expected[:6])


def test_stop_sequence_split_across_tokens(engine: Engine, reference: dict) -> None:
    prompt = reference["prompts"][0]
    ids = prompt["greedy_generate"]["new_ids"]
    tok = engine.tokenizer
    full = tok.decode(ids)
    boundary = len(tok.decode(ids[:5]))  # a token boundary inside the text
    stop = full[boundary - 2 : boundary + 2]
    assert len(stop) == 4
    gen = engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=24, stop=["zzzz", stop],
                                                              **GREEDY))
    deltas = list(gen)
    assert "".join(deltas) == full[: full.index(stop)]
    assert gen.result.stop_reason == "stop_sequence"
    assert len(gen.result.output_ids) < 24


def test_prompt_too_long_names_both_counts(engine: Engine) -> None:
    ids = [64790, 64792] + [30910] * 32766
    with pytest.raises(PromptTooLong) as info:
        engine.generate_ids(ids, SamplingParams(max_tokens=1))
    assert info.value.prompt_tokens == 32768 and info.value.context == 32768
    assert "32768" in str(info.value) and "prompt" in str(info.value)


def test_max_tokens_cut_to_fit(engine: Engine, tokenizer) -> None:
    small = Engine(engine.model, tokenizer)
    small.context = 40  # the same mechanism as 32,768, without a 32k prefill in a unit test
    messages = build_messages("hello there")
    n = len(tokenizer.build_chat_input(messages))
    gen = small.generate(messages, SamplingParams(max_tokens=1000, **GREEDY))
    gen.text()
    assert gen.result.max_tokens == 40 - n and gen.result.max_tokens_cut
    assert gen.result.output_token_count == 40 - n
    assert gen.result.stop_reason == "max_tokens"
    with pytest.raises(PromptTooLong):
        small.generate_ids(list(range(40)), SamplingParams())
    small.close()


def test_bad_settings_name_the_field(engine: Engine) -> None:
    for field, value in [("max_tokens", 0), ("max_tokens", 32769), ("max_tokens", 2.5),
                         ("temperature", -1.0), ("temperature", 5.01), ("top_p", -0.1),
                         ("top_p", 1.5), ("top_k", -3), ("top_k", 1.5),
                         ("repetition_penalty", 0.0), ("repetition_penalty", 10.5),
                         ("seed", -1), ("seed", 2**53), ("seed", 1.5)]:
        with pytest.raises(SettingsError, match=field):
            engine.generate(build_messages("x"), SamplingParams(**{field: value}))


def test_cancel_from_another_thread_stops_within_one_step(engine: Engine) -> None:
    """The stream is consumed on one thread and cancelled from another (as a server's cancel
    arrives): at most the forward pass under way when cancel() came runs after it."""
    gen = engine.generate(build_messages("go on"), SamplingParams(max_tokens=500, **GREEDY))
    third = threading.Event()
    received = []

    def consume() -> None:
        for delta in gen:
            received.append(delta)
            if len(received) == 3:
                third.set()

    with ForwardCounter(engine.model) as counter:
        consumer = threading.Thread(target=consume)
        consumer.start()
        assert third.wait(60)
        gen.cancel()
        calls_at_cancel = counter.calls
        consumer.join(60)
        assert not consumer.is_alive()
    assert counter.calls - calls_at_cancel <= 1
    assert len(received) >= 3 and "".join(received) == gen.result.text
    assert gen.result.stop_reason == "cancelled"
    assert gen.result.output_token_count < 500
    after = engine.generate(build_messages("again"), SamplingParams(max_tokens=4, **GREEDY))
    after.text()
    assert after.result.output_token_count == 4 and after.result.stop_reason == "max_tokens"


def test_cancel_during_long_prefill(engine: Engine, tokenizer) -> None:
    ids = tokenizer.build_chat_input(build_messages("长文本 long text " * 2200))
    assert len(ids) > 8000
    gen = engine.generate_ids(ids, SamplingParams(max_tokens=5, **GREEDY))
    with ForwardCounter(engine.model) as counter:
        def cancel_after_first_chunk() -> None:
            counter.seen_first.wait(60)
            gen.cancel()
        t = threading.Thread(target=cancel_after_first_chunk)
        t.start()
        assert list(gen) == []
        t.join()
    assert counter.calls <= 2  # the prompt needs more than 4 chunks; at most one ran after cancel
    assert gen.result.stop_reason == "cancelled" and gen.result.output_ids == []


def test_metrics(engine: Engine) -> None:
    gen = engine.generate(build_messages("hi"), SamplingParams(max_tokens=6, **GREEDY))
    gen.text()
    r = gen.result
    assert r.input_token_count == len(r.input_ids) == len(engine.encode(build_messages("hi")))
    assert r.output_token_count == len(r.output_ids) == 6
    assert 0 < r.time_to_first_token < 60 and r.tokens_per_second > 0


@pytest.mark.slow  # a 16k-token prompt
def test_sixteen_thousand_token_prompt(engine: Engine, tokenizer) -> None:
    text = "The quick brown fox 跳过了懒狗 🦊. " * 1200
    ids = tokenizer.build_chat_input(build_messages(text))
    ids = ids[:16000] + ids[-1:]
    assert len(ids) >= 16000
    gen = engine.generate_ids(ids, SamplingParams(max_tokens=3, **GREEDY))
    gen.text()
    assert gen.result.output_token_count == 3 and gen.result.input_token_count == len(ids)


def test_async_iteration_of_concurrent_requests(engine: Engine, reference: dict) -> None:
    """Several requests consumed from one event loop: each equals its run alone."""
    import asyncio

    prompts = [p["input_ids"] for p in reference["prompts"][:2]] * 3
    alone = []
    for ids in prompts[:2]:
        gen = engine.generate_ids(ids, SamplingParams(max_tokens=10, **GREEDY))
        alone.append(gen.text())

    async def consume(ids: list[int]) -> str:
        gen = engine.generate_ids(ids, SamplingParams(max_tokens=10, **GREEDY))
        return "".join([delta async for delta in gen])

    async def main() -> list[str]:
        return await asyncio.gather(*(consume(ids) for ids in prompts))

    assert asyncio.run(main()) == alone * 3


@pytest.mark.slow  # the 6,118-token prompt
def test_batched_greedy_equals_alone_with_different_lengths(engine: Engine, reference: dict):
    """Requests of different prompt lengths decode in one batch, joining and leaving it at
    different times, and each still gives the official greedy continuation."""
    assert_official_greedy(engine, reference["prompts"], (24, 12, 18))


def test_cancelling_one_request_leaves_the_others(engine: Engine, reference: dict) -> None:
    prompt = reference["prompts"][0]
    keep = engine.generate_ids(prompt["input_ids"], SamplingParams(max_tokens=24, **GREEDY))
    drop = engine.generate(build_messages("stop me"), SamplingParams(max_tokens=2000, **GREEDY))
    it = iter(drop)
    first = next(it)
    drop.cancel()
    assert keep.text() == engine.tokenizer.decode(prompt["greedy_generate"]["new_ids"])
    rest = list(it)  # what was streamed before the cancel took effect; then the stream ends
    assert drop.result.stop_reason == "cancelled"
    assert first + "".join(rest) == drop.result.text
    assert 1 <= drop.result.output_token_count < 2000


def test_per_step_device_work_does_not_grow_with_the_batch(engine: Engine, reference) -> None:
    """A decoding step runs the same number of device ops for 1 request as for 4 (the batch's
    tokens go to the device, and into the id history, in one op each; they used to be
    written one request at a time), driven here on the test's thread without the worker:
    the scheduler plans, the model runner runs, the output processor takes the tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view  # views are metadata, no device work
            return func(*args, **(kwargs or {}))

    def ops_for(batch: int) -> int:
        other = Engine(engine.model, engine.tokenizer, max_batch=4)
        sched, runner, output = other.scheduler, other.runner, other.output

        def step() -> None:
            tokens, logprobs = runner.decode(sched.running)
            assert logprobs is None  # none asked for: no work for them
            assert not any(output.take(r, t) for r, t in zip(sched.running, tokens))

        with torch.inference_mode():
            for i in range(batch):
                ids = reference["prompts"][0]["input_ids"] + [100 + i]
                sched.add(other.prepare(ids, SamplingParams(max_tokens=10, **GREEDY)))
                first = None
                while first is None:
                    [chunk] = sched.schedule().prefills
                    first = runner.prefill(chunk).first
                    sched.prefilled(chunk)
                assert not output.take(chunk.request, *first)
                runner.admit(chunk.request, *sched.end_prefill(chunk.request, admit=True))
            step()  # shapes met once
            with CountOps() as count:
                step()
        assert [len(r.output_ids) for r in sched.running] == [3] * batch
        other.close()
        return count.ops

    assert ops_for(1) == ops_for(4)


def test_prefill_beside_decoding_runs_in_budget_chunks(tiny_model_fp32, no_stop_tokenizer) -> None:
    """While a request decodes, a 2,000-token prompt prefills in passes of 512 tokens, the
    decoding token among them (a running stream then waits a quarter as long); alone it runs
    whole chunks; either way its tokens are those of whole-chunk scheduling."""
    from transformers import DynamicCache

    from chatglm3.model.packed_step import PackedStep

    rng = random.Random(4)
    long = [rng.randrange(100, 60000) for _ in range(2000)]
    short = [rng.randrange(100, 60000) for _ in range(20)]
    outputs = {}
    for budget in (512, 2048):
        engine = Engine(tiny_model_fp32, no_stop_tokenizer, prefill_budget=budget)
        assert engine.scheduler.pack  # a CPU: chunks and decoding tokens share passes
        passes: list[tuple[int, int]] = []  # (tokens, of them decoding) of each prefill pass

        def seen(_m, _a, kw) -> None:
            cache = kw.get("cache")
            if isinstance(cache, DynamicCache):
                passes.append((kw["input_ids"].shape[1], 0))
            elif isinstance(cache, PackedStep):
                passes.append((kw["input_ids"].shape[1], cache.batch))

        hook = engine.model.register_forward_pre_hook(seen, with_kwargs=True)
        try:
            alone = engine.generate_ids(long, SamplingParams(max_tokens=2, **GREEDY))
            alone.text()
            assert passes == [(2048, 0)]  # alone: one whole chunk (2,000 tokens, padded)
            passes.clear()
            running = engine.generate_ids(short, SamplingParams(max_tokens=30000, **GREEDY))
            it = iter(running)
            next(it)  # it decodes now, for as long as the test needs
            beside = engine.generate_ids(long, SamplingParams(max_tokens=2, **GREEDY))
            beside.text()
            running.cancel()
            list(it)
            assert passes[0] == (24, 0)  # the short prompt alone, padded
            # beside the decoding request: 511 + 1 tokens a pass (the last one padded)
            assert passes[1:] == ([(2048, 1)] if budget == 2048 else [(512, 1)] * 4)
            outputs[budget] = (alone.result.output_ids, beside.result.output_ids)
        finally:
            hook.remove()
            engine.close()
    assert outputs[512] == outputs[2048]


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_a_grown_cache_shrinks_once_idle_unless_it_holds_entries(tiny_model_fp32, tokenizer,
                                                                 prefix_cache: bool) -> None:
    """The rows share one capacity: a long request grows every row. Once nothing runs the
    cache goes back to its first size, unless rows keep prefix cache entries."""
    engine = Engine(tiny_model_fp32, tokenizer, prefix_cache=prefix_cache)
    try:
        first = engine.stats()
        long_prompt = [64790, 64792, *random.Random(3).choices(range(100, 60000), k=700)]
        gens = [engine.generate_ids(long_prompt, SamplingParams(max_tokens=4, temperature=0)),
                engine.generate_ids(long_prompt[:40], SamplingParams(max_tokens=4,
                                                                     temperature=0))]
        for g in gens:
            g.text()
        # on the worker thread, after the step that finished them (jobs wait for idle)
        after = engine._on_worker(engine.stats)
        if prefix_cache:
            assert after.kv_capacity >= 1024 and after.prefix_entries > 0
        else:
            assert (after.kv_rows, after.kv_capacity) == (first.kv_rows, first.kv_capacity)
            assert first.kv_capacity < 704
        again = engine.generate_ids(long_prompt, SamplingParams(max_tokens=4, temperature=0))
        again.text()  # regrows as needed, same answer
        assert again.result.output_ids == gens[0].result.output_ids
    finally:
        engine.close()

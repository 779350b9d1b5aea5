"""Packed steps (chatglm3/model/packed_step.py): on a CPU, requests that arrive together prefill in
one forward pass, and a prompt's chunk shares its pass with the running requests' decoding
tokens. Each request's tokens and log-probabilities are those it gets alone; failures and
cancellations stay with the requests they concern."""

from __future__ import annotations

import random

import pytest

from chatglm3.engine.engine import Engine
from chatglm3.model.packed_step import PackedStep
from chatglm3.params import SamplingParams
from chatglm3.engine.rows import RowAllocator
from chatglm3.engine.scheduler import Request, Scheduler

from helpers.engines import Passes, held

GREEDY = dict(temperature=0.0)


def prompts(n: int, seed: int = 7) -> list[list[int]]:
    """n random prompts of different lengths (some past one prefill bucket)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 60000) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model_fp32, no_stop_tokenizer):
    engine = Engine(tiny_model_fp32, no_stop_tokenizer, max_batch=4)
    assert engine.scheduler.pack
    yield engine
    engine.close()


def alone(engine: Engine, ids: list[int], params: SamplingParams):
    g = engine.generate_ids(ids, params)
    g.text()
    return g.result


def test_requests_arriving_together_prefill_in_one_pass(engine: Engine) -> None:
    ps = prompts(4)
    params = SamplingParams(max_tokens=6, logprobs=2, **GREEDY)
    expected = [alone(engine, p, params) for p in ps]
    passes = Passes(engine.model)
    try:
        with held(engine):
            gens = [engine.generate_ids(p, params) for p in ps]
        for g in gens:
            g.text()
    finally:
        passes.remove()
    # One pass prefills all four; then five decoding steps of the four together.
    assert passes.seen[0][1:] == (4, 0) and passes.seen[0][0] >= sum(map(len, ps))
    assert passes.seen[1:] == [(1, 0, 4)] * 5
    for g, want in zip(gens, expected):
        assert g.result.output_ids == want.output_ids
        for got, ref in zip(g.result.logprobs, want.logprobs):
            assert got.token == ref.token and got.logprob == pytest.approx(ref.logprob, abs=1e-4)


def test_a_prompt_shares_its_pass_with_the_decoding_requests(engine: Engine) -> None:
    """Decoding rows inside a prefill's pass get the tokens they get in decoding steps (the
    repetition penalty reads their history; a seeded sampled one draws the same)."""
    first, second, late = prompts(3, seed=11)
    penalised = SamplingParams(max_tokens=12, repetition_penalty=1.3, logprobs=1, **GREEDY)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    late_params = SamplingParams(max_tokens=3, **GREEDY)
    want = [alone(engine, first, penalised), alone(engine, second, sampled),
            alone(engine, late, late_params)]
    passes = Passes(engine.model)
    try:
        with held(engine):
            a = engine.generate_ids(first, penalised)
            b = engine.generate_ids(second, sampled)
        ia, ib = iter(a), iter(b)
        next(ia), next(ib)  # both decode now
        c = engine.generate_ids(late, late_params)
        results = [g.text() and g.result for g in (a, b, c)]
    finally:
        passes.remove()
    assert passes.seen[0][1:] == (2, 0)  # the two together
    assert any(s == 1 and d == 2 for _, s, d in passes.seen)  # the late one beside both
    assert not any(s == 1 and d == 0 for _, s, d in passes.seen[1:])  # no lone prefill pass
    for got, ref in zip(results, want):
        assert got.output_ids == ref.output_ids
    for got, ref in zip(results[0].logprobs, want[0].logprobs):
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)


def test_a_failed_pass_fails_its_prompts_alone(engine: Engine, monkeypatch) -> None:
    """A packed pass fails: the prompts in it fail with the error, the request decoding
    beside them gets its step again and all its tokens, and the engine serves on."""
    keep_ids, *ps = prompts(3, seed=3)
    keep_params = SamplingParams(max_tokens=8, **GREEDY)
    want = alone(engine, keep_ids, keep_params).output_ids
    real = engine.runner.packed
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("injected")

    keep = engine.generate_ids(keep_ids, keep_params)
    it = iter(keep)
    next(it)
    monkeypatch.setattr(engine.runner, "packed", broken)
    with held(engine):
        gens = [engine.generate_ids(p, SamplingParams(max_tokens=4, **GREEDY)) for p in ps]
    for g in gens:
        with pytest.raises(RuntimeError, match="injected"):
            g.text()
        assert g.result.stop_reason == "error"
    list(it)
    assert calls == [1] and keep.result.output_ids == want
    monkeypatch.setattr(engine.runner, "packed", real)
    assert engine.stats().running == 0
    with held(engine):
        gens = [engine.generate_ids(p, SamplingParams(max_tokens=4, **GREEDY)) for p in ps]
    assert [len(g.text() and g.result.output_ids) for g in gens] == [4, 4]


def test_a_prompt_cancelled_between_its_packed_chunks_leaves_alone(engine: Engine) -> None:
    """A long prompt prefilling beside a decoding request, cancelled after its first packed
    chunk: it ends as cancelled at the next step, the decoding request goes on unharmed."""
    rng = random.Random(5)
    long = [rng.randrange(100, 60000) for _ in range(1500)]
    short = prompts(1, seed=6)[0]
    params = SamplingParams(max_tokens=8, **GREEDY)
    want = alone(engine, short, params).output_ids
    running = engine.generate_ids(short, params)
    it = iter(running)
    next(it)
    doomed = engine.generate_ids(long, SamplingParams(max_tokens=4, **GREEDY))

    def cancel_after_first_chunk(_m, _a, kw) -> None:
        if isinstance(kw.get("cache"), PackedStep):
            doomed.cancel()

    hook = engine.model.register_forward_pre_hook(cancel_after_first_chunk, with_kwargs=True)
    try:
        doomed.text()
        list(it)
    finally:
        hook.remove()
    assert doomed.result.stop_reason == "cancelled" and doomed.result.output_ids == []
    assert running.result.output_ids == want
    assert engine.stats().running == 0


def test_prefix_cache_hits_in_a_packed_pass(tiny_model_fp32, no_stop_tokenizer) -> None:
    """Two requests extending a cached conversation arrive together: both reuse it, and get
    what they get with the cache off."""
    rng = random.Random(9)
    base = [rng.randrange(100, 60000) for _ in range(80)]
    tails = [[rng.randrange(100, 60000) for _ in range(n)] for n in (7, 20)]
    params = SamplingParams(max_tokens=4, **GREEDY)
    off = Engine(tiny_model_fp32, no_stop_tokenizer, max_batch=4, prefix_cache=False)
    want = [alone(off, base + t, params).output_ids for t in tails]
    off.close()
    on = Engine(tiny_model_fp32, no_stop_tokenizer, max_batch=4, prefix_cache=True)
    try:
        alone(on, base, params)  # leaves an entry of its prompt
        with held(on):
            gens = [on.generate_ids(base + t, params) for t in tails]
        for g in gens:
            g.text()
        assert [g.result.cached_input_token_count > 0 for g in gens] == [True, True]
        assert [g.result.output_ids for g in gens] == want
    finally:
        on.close()


def make(max_batch: int = 4, budget: int = 100, chunk: int = 400) -> Scheduler:
    rows = RowAllocator(max_batch, lambda: 10_000, lambda: max_batch, prefix_cache=False)
    return Scheduler(rows, max_batch, chunk, budget, pack=True)


def test_packing_scheduler_shares_the_budget_in_arrival_order() -> None:
    s = make(max_batch=3, budget=100, chunk=400)
    reqs = [Request([i] * n) for i, n in enumerate((150, 300, 10, 5))]
    for r in reqs:
        s.add(r)
    plan = s.schedule()  # nothing decodes: a whole chunk's 400 tokens, rows for 3
    assert [(c.request.prompt[0], c.begin, c.end) for c in plan.prefills] == [
        (0, 0, 150), (1, 0, 250)]
    for c in plan.prefills:
        s.prefilled(c)
    s.end_prefill(reqs[0], admit=True)
    # Now one decodes: 100 - 1 tokens for prompts; request 1 first, then 2 starts (3rd row)
    plan = s.schedule()
    assert [(c.request.prompt[0], c.begin, c.end) for c in plan.prefills] == [
        (1, 250, 300), (2, 0, 10)]
    for c in plan.prefills:
        s.prefilled(c)
        s.end_prefill(c.request, admit=True)
    assert s.schedule().prefills == [] and list(s.waiting) == [reqs[3]]  # no row left

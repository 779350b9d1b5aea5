"""Prompt log-probabilities (SamplingParams.prompt_logprobs): every prompt token's score given
the tokens before it, computed in the prefill chunks the prompt runs anyway. The scores are
those of one plain forward pass over the whole prompt (fp32, the tiny checkpoint), whether the
prompt runs in one chunk, several, or packed beside other requests; the prefix cache is not
read for a scored prompt; max_tokens 0 scores without generating."""

from __future__ import annotations

import random

import pytest
import torch

from chatglm3.engine.engine import Engine
from chatglm3.params import MAX_LOGPROBS, SamplingParams, SettingsError
from chatglm3.model.sampling import SCORE_ROWS, prompt_logprobs
from chatglm3.settings import PREFILL_CHUNK

from helpers.engines import Passes, held

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model_fp32, no_stop_tokenizer):
    engine = Engine(tiny_model_fp32, no_stop_tokenizer, max_batch=4, prefix_cache=True)
    assert engine.prefix_cache and engine.scheduler.pack
    yield engine
    engine.close()


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 60000) for _ in range(n)]


def direct(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log-softmax of one plain forward pass over the whole prompt: [len(ids), vocab]."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def run(engine: Engine, ids: list[int], params: SamplingParams):
    g = engine.generate_ids(ids, params)
    g.text()
    return g.result


def assert_scores(entries, ids: list[int], lp: torch.Tensor, k: int) -> None:
    assert len(entries) == len(ids) and entries[0] is None
    for i, e in enumerate(entries[1:], 1):
        row = lp[i - 1]
        assert e.token == ids[i]
        assert e.logprob == pytest.approx(row[ids[i]].item(), abs=1e-4)
        # 1 + the likelier tokens, give or take those within the scores' tolerance of it
        own = row[ids[i]]
        assert int((row > own + 1e-4).sum()) + 1 <= e.rank <= int((row > own - 1e-4).sum()) + 1
        values, top = row.topk(k)
        assert [t for t, _ in e.top] == top.tolist()
        assert [v for _, v in e.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.slow
def test_scores_equal_one_forward_pass_over_the_whole_prompt(engine: Engine) -> None:
    """A prompt over two chunks: the chunk boundary's token is scored by the previous chunk's
    last position; the sum matches to 1e-4 and the answer is the unscored one."""
    ids = random_prompt(PREFILL_CHUNK + 150, seed=1)
    want = direct(engine.model, ids)
    r = run(engine, ids, SamplingParams(max_tokens=4, prompt_logprobs=3, logprobs=1, **GREEDY))
    assert_scores(r.prompt_logprobs, ids, want, 3)
    total = sum(want[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert sum(e.logprob for e in r.prompt_logprobs[1:]) == pytest.approx(total, abs=1e-4)
    plain = run(engine, ids, SamplingParams(max_tokens=4, logprobs=1, **GREEDY))
    assert r.output_ids == plain.output_ids and plain.prompt_logprobs == []
    assert [e.logprob for e in r.logprobs] == pytest.approx([e.logprob for e in plain.logprobs],
                                                            abs=1e-5)


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(engine: Engine) -> None:
    ids = random_prompt(40, seed=2)
    r = run(engine, ids, SamplingParams(max_tokens=0, prompt_logprobs=0, **GREEDY))
    assert r.output_ids == [] and r.text == "" and r.stop_reason == "max_tokens"
    assert r.output_token_count == 0 and r.input_token_count == 40
    assert_scores(r.prompt_logprobs, ids, direct(engine.model, ids), 0)
    assert all(e.top == () for e in r.prompt_logprobs[1:])


def test_a_scored_prompt_does_not_read_the_prefix_cache(engine: Engine) -> None:
    """The positions a cache entry would give were never run for the logits; the scored
    request runs them all (and a plain one after it still hits the cache)."""
    ids = random_prompt(200, seed=3)
    run(engine, ids, SamplingParams(max_tokens=2, **GREEDY))
    again = run(engine, ids + [7], SamplingParams(max_tokens=2, **GREEDY))
    assert again.cached_input_token_count > 0  # the entry is there
    scored = run(engine, ids + [7], SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY))
    assert scored.cached_input_token_count == 0
    assert_scores(scored.prompt_logprobs, ids + [7], direct(engine.model, ids + [7]), 1)


def test_scored_prompts_packed_in_one_pass_score_as_alone(engine: Engine) -> None:
    """Arriving together, a scored prompt (over a chunk boundary of the pass), a plain one
    and a scored one with max_tokens 0 prefill in the same passes; each gets its own scores."""
    prompts = [random_prompt(n, seed=10 + n) for n in (30, 300, 45)]
    params = [SamplingParams(max_tokens=3, prompt_logprobs=2, **GREEDY),
              SamplingParams(max_tokens=3, **GREEDY),
              SamplingParams(max_tokens=0, prompt_logprobs=1, **GREEDY)]
    alone = [run(engine, p, q) for p, q in zip(prompts, params)]
    passes = Passes(engine.model)
    try:
        with held(engine):
            gens = [engine.generate_ids(p, q) for p, q in zip(prompts, params)]
        for g in gens:
            g.text()
    finally:
        passes.remove()
    assert passes.seen[0][1] == 3  # all three prompts in the first pass
    for g, want in zip(gens, alone):
        assert g.result.output_ids == want.output_ids
        assert len(g.result.prompt_logprobs) == len(want.prompt_logprobs)
        for got, ref in zip(g.result.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            assert got.token == ref.token and got.rank == ref.rank
            assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
    assert_scores(gens[0].result.prompt_logprobs, prompts[0],
                  direct(engine.model, prompts[0]), 2)


def test_scores_are_worked_out_a_block_of_rows_at_a_time() -> None:
    """prompt_logprobs over more rows than SCORE_ROWS (blocks and a partial last one) equals
    one log-softmax over them all; a last row without a target is left out."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * SCORE_ROWS + 5, 1000, generator=g) * 4
    targets = torch.randint(0, 1000, (2 * SCORE_ROWS + 4,), generator=g).tolist()
    got = prompt_logprobs(logits.to(torch.bfloat16), targets, 2)
    lp = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    assert len(got) == len(targets)
    for i, (e, t) in enumerate(zip(got, targets)):
        assert e.token == t and e.logprob == pytest.approx(lp[i, t].item(), abs=1e-5)
        assert [x for x, _ in e.top] == lp[i].topk(2).indices.tolist()


def test_max_tokens_0_needs_prompt_logprobs_and_the_count_is_bounded() -> None:
    with pytest.raises(SettingsError, match=r"max_tokens: .*got 0; 0 only with prompt_logprobs"):
        SamplingParams(max_tokens=0)
    with pytest.raises(SettingsError, match=rf"prompt_logprobs: must be an integer from 0 to "
                                            rf"{MAX_LOGPROBS}"):
        SamplingParams(prompt_logprobs=MAX_LOGPROBS + 1)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).scores_only

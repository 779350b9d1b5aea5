"""Per-request token settings on the engine (fp32 tiny checkpoint): logit_bias moves the picks
of its own row only (greedy and sampled), stop_token_ids end an answer, ignore_eos runs past the
model's end tokens, and ids past the vocabulary are refused naming the field."""

from __future__ import annotations

import pytest

from chatglm3.engine.engine import Engine
from chatglm3.errors import InputError
from chatglm3.params import SamplingParams

from helpers.engines import held

GREEDY = dict(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def engine(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=4)
    yield engine
    engine.close()


def run(engine: Engine, ids: list[int], **kw):
    g = engine.generate_ids(ids, SamplingParams(**{**GREEDY, **kw}))
    g.text()
    return g.result


PROMPT = [64790, 64792, 34, 4567, 11, 887]


def test_logit_bias_bans_and_forces_tokens(engine: Engine) -> None:
    plain = run(engine, PROMPT)
    banned = run(engine, PROMPT, logit_bias={t: -100 for t in plain.output_ids})
    assert not set(banned.output_ids) & set(plain.output_ids)
    assert run(engine, PROMPT, logit_bias={777: 100}).output_ids == [777] * 6
    sampled = run(engine, PROMPT, temperature=1.0, top_p=1.0, seed=3, logit_bias={777: 100})
    assert sampled.output_ids == [777] * 6


def test_token_settings_stay_with_their_own_row_in_a_batch(engine: Engine) -> None:
    """Requests with and without the settings decode together; each gets what it gets alone."""
    others = [PROMPT + [100 + i] for i in range(3)]
    settings = [{}, {"logit_bias": {777: 100}}, {"stop_token_ids": [run(engine, others[2])
                                                                    .output_ids[1]]}]
    alone = [run(engine, p, **kw) for p, kw in zip(others, settings)]
    with held(engine):
        gens = [engine.generate_ids(p, SamplingParams(**{**GREEDY, **kw}))
                for p, kw in zip(others, settings)]
    for g, want in zip(gens, alone):
        g.text()
        assert g.result.output_ids == want.output_ids
        assert g.result.stop_reason == want.stop_reason
    assert alone[1].output_ids == [777] * 6
    assert len(alone[2].output_ids) == 1 and alone[2].stop_reason == "stop_token"


def test_ignore_eos_runs_past_the_models_end_tokens(engine: Engine) -> None:
    eos = engine.tokenizer.eos_id
    assert run(engine, PROMPT, logit_bias={eos: 100}).output_ids == []
    forced = run(engine, PROMPT, logit_bias={eos: 100}, ignore_eos=True)
    assert forced.output_ids == [eos] * 6 and forced.stop_reason == "max_tokens"
    # min_tokens holds back the extra stop ids as it does the model's own
    stop = run(engine, PROMPT).output_ids[0]
    held_back = run(engine, PROMPT, stop_token_ids=[stop], min_tokens=3)
    assert len(held_back.output_ids) >= 3 and stop not in held_back.output_ids[:3]


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
def test_token_ids_past_the_vocabulary_are_refused(engine: Engine, field: str) -> None:
    value = {70000: 1} if field == "logit_bias" else [70000]
    with pytest.raises(InputError, match=rf"{field}: token id 70000 is past the vocabulary") as e:
        engine.generate_ids(PROMPT, SamplingParams(**{field: value}))
    assert e.value.field == field


def test_allowed_token_ids_limit_the_picks_of_their_row(engine: Engine) -> None:
    allowed = [500, 900, 1300, engine.tokenizer.eos_id]
    greedy = run(engine, PROMPT, allowed_token_ids=allowed, max_tokens=12)
    sampled = run(engine, PROMPT, allowed_token_ids=allowed, max_tokens=12, temperature=1.0,
                  top_p=1.0, seed=5)
    for r in (greedy, sampled):
        assert set(r.output_ids) <= set(allowed) and (r.output_ids or r.stop_reason)
    assert run(engine, PROMPT, allowed_token_ids=[900]).output_ids == [900] * 6

"""min_tokens, presence_penalty and frequency_penalty (OpenAI's meanings), per request inside a
batch: the sampler's arithmetic, then their effect on the tiny checkpoint next to requests
without them, which must get exactly what they get alone."""

from __future__ import annotations


import pytest
import torch

from chatglm3.engine.engine import Engine
from chatglm3.params import SamplingParams, SettingsError
from chatglm3.model.sampling import RequestSampling, pick
from conftest import consume_together

GREEDY = dict(temperature=0.0)


# ---- the sampler ----

def test_presence_and_frequency_penalties_subtract_per_token_and_per_occurrence() -> None:
    logits = torch.zeros(1, 6)
    s = RequestSampling(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                        prompt_len=2)
    history = torch.tensor([[3, 3, 1, 1, 1, 4]])  # the prompt [3, 3] does not count
    got = s.adjust(logits.clone(), history)
    expected = torch.tensor([[0.0, -(0.5 + 3 * 0.25), 0.0, 0.0, -(0.5 + 0.25), 0.0]])
    assert torch.allclose(got, expected)
    # the next step counts only the new token (its counts are kept, not recounted)
    got = s.adjust(logits.clone(), torch.cat([history, torch.tensor([[5]])], 1))
    assert got[0, 5] == -(0.5 + 0.25) and got[0, 1] == -(0.5 + 3 * 0.25)
    assert s.counts.sum() == 5


def test_min_tokens_holds_the_stop_tokens_back_until_enough_are_out() -> None:
    s = RequestSampling(SamplingParams(min_tokens=2, **GREEDY), prompt_len=3, stop_ids={2, 5})
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 0.0, 8.0]])
    for generated in range(2):
        history = torch.zeros(1, 3 + generated, dtype=torch.long)
        assert pick(logits, [s], [history]).item() == 1  # not 2 nor 5
    assert pick(logits, [s], [torch.zeros(1, 5, dtype=torch.long)]).item() == 2


def test_defaults_change_nothing_and_need_no_history() -> None:
    s = RequestSampling(SamplingParams(), prompt_len=4, stop_ids={2})
    assert not s.needs_history
    logits = torch.randn(1, 50)
    assert torch.equal(s.adjust(logits.clone(), torch.zeros(1, 9, dtype=torch.long)), logits)


@pytest.mark.parametrize("field, value", [("min_tokens", -1), ("min_tokens", 32769),
                                          ("min_tokens", 1.5), ("presence_penalty", 2.5),
                                          ("frequency_penalty", -2.01),
                                          ("frequency_penalty", float("nan"))])
def test_limits(field: str, value) -> None:
    with pytest.raises(SettingsError, match=field):
        SamplingParams(**{field: value}).validate()


# ---- in a batch, on the tiny checkpoint ----

@pytest.fixture(scope="module")
def engine(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer)
    yield engine
    engine.close()


def _chat(reference: dict, name: str) -> dict:
    return next(c for c in reference["chat"]["cases"] if c["name"] == name)


def _together(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """All requests queued at once (they share decoding steps); their output ids."""
    gens = [engine.generate_ids(ids, params) for ids, params in requests]
    consume_together(gens)
    return [g.result.output_ids for g in gens]


@pytest.mark.slow  # many requests
def test_each_input_acts_on_its_own_request_in_a_mixed_batch(engine: Engine, reference) -> None:
    stops = _chat(reference, "ends_on_stop_id")  # greedy ends on a stop token after 26 tokens
    official = stops["raw_generated_ids"][:-1]
    assert stops["raw_generated_ids"][-1] in engine.tokenizer.stop_ids and len(official) == 26
    other = reference["prompts"][1]
    plain = SamplingParams(max_tokens=48, **GREEDY)
    requests = [
        (stops["prompt_ids"], SamplingParams(max_tokens=48, min_tokens=40, **GREEDY)),
        (stops["prompt_ids"], plain),
        (other["input_ids"], SamplingParams(max_tokens=48, frequency_penalty=-2.0, **GREEDY)),
        (other["input_ids"], SamplingParams(max_tokens=48, presence_penalty=2.0, **GREEDY)),
        (other["input_ids"], plain),
    ]
    alone = [engine.generate_ids(ids, p) for ids, p in requests]
    for g in alone:
        g.text()
    alone_ids = [g.result.output_ids for g in alone]
    together = _together(engine, requests)
    assert together == alone_ids  # each request's own settings, whatever its neighbours
    min_tokens, stopped, repeat, fresh, untouched = together
    assert stopped == official  # without min_tokens: the official stop after 26 tokens
    assert min_tokens[:26] == official and len(min_tokens) >= 40  # the stop held back
    assert not set(min_tokens[:40]) & engine.tokenizer.stop_ids
    assert untouched[:24] == other["greedy_generate"]["new_ids"]
    # a negative frequency penalty makes the answer repeat itself; presence 2 avoids repeats
    assert len(set(repeat)) < len(set(untouched)) // 2
    assert len(set(fresh)) == len(fresh) and len(set(fresh)) >= len(set(untouched))


# ---- what the Python API takes (integral JSON numbers, all errors at once) ----

FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_float_fields_take_integers(field: str) -> None:
    """JSON clients send 2, not 2.0; transformers' repetition penalty refuses an int."""
    value = {"top_p": 1, "presence_penalty": -2}.get(field, 2)
    p = SamplingParams(**{field: value})
    assert getattr(p, field) == value and type(getattr(p, field)) is float
    s = RequestSampling(p, prompt_len=1)  # builds transformers' processor for the penalty
    logits = s.adjust(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2]]))
    assert torch.isfinite(logits).all()


def test_bad_settings_fail_when_built_naming_every_field() -> None:
    with pytest.raises(SettingsError) as e:
        SamplingParams(max_tokens=-5, temperature=9, top_k=-1, stop=["x" * 300])
    message = str(e.value)
    for named in ("max_tokens: must be an integer from 1 to 32768", "temperature: must be from "
                  "0 to 5", "top_k: must be an integer >= 0", "stop_sequences[0]: at most 256"):
        assert named in message, message
    with pytest.raises(SettingsError, match="^repetition_penalty: must be from 0.01 to 10"):
        SamplingParams(repetition_penalty=True)  # a bool is no number

"""The batched sampler against transformers' own warpers, and its per-request independence."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chatglm3.params import GREEDY_BELOW_TEMPERATURE, SamplingParams
from chatglm3.sampling import Sampler, pick

VOCAB = 12
LOGITS = torch.tensor([2.0, 1.5, 1.4, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 0.9])


def hf_probs(params: SamplingParams) -> torch.Tensor:
    """The distribution transformers' warpers leave, for the same settings."""
    procs = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        procs.append(TopPLogitsWarper(params.top_p))
    return torch.softmax(procs(None, LOGITS[None].clone()), -1)[0]


def draws(params: SamplingParams, n: int) -> torch.Tensor:
    """n draws from n requests with seeds 0..n-1, all in one batch."""
    samplers = [Sampler(SamplingParams(**{**params.__dict__, "seed": s})) for s in range(n)]
    tokens = pick(LOGITS.expand(n, VOCAB), samplers, [None] * n)
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).double() / n


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0, top_p=1.0),
    dict(temperature=0.8, top_p=0.8),
    dict(temperature=1.5, top_p=1.0, top_k=4),
    dict(temperature=0.7, top_p=0.6, top_k=5),
    dict(temperature=2.0, top_p=0.95),
])
def test_draws_follow_the_warpers_distribution(settings: dict) -> None:
    params = SamplingParams(**settings)
    expected = hf_probs(params).double()
    n = 20000
    seen = draws(params, n)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((seen - expected).abs() <= 5 * sigma + 1e-9), (seen, expected)
    assert torch.all(seen[expected == 0] == 0)  # nothing outside top-k / top-p, ever


def test_greedy_top_k_one_and_tiny_top_p_are_argmax() -> None:
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    settings = [dict(temperature=0), dict(temperature=0, seed=3), dict(top_k=1, temperature=5),
                dict(top_p=1e-9), dict(top_p=1e-9, temperature=5), dict(top_k=1, top_p=0.5)]
    samplers = [Sampler(SamplingParams(**s)) for s in settings]
    assert pick(logits, samplers, [None] * 6) == logits.argmax(-1).tolist()


def test_rows_are_independent_of_their_batch() -> None:
    """A request's token depends on its own logits, settings and seed, not on its neighbours."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 500, generator=gen) * 3
    settings = [dict(seed=1), dict(temperature=0), dict(seed=2, top_k=7, temperature=1.3),
                dict(seed=3, top_p=0.5), dict(seed=4, temperature=0.2)]
    together = pick(logits, [Sampler(SamplingParams(**s)) for s in settings], [None] * 5)
    alone = [pick(logits[i : i + 1], [Sampler(SamplingParams(**s))], [None])[0]
             for i, s in enumerate(settings)]
    assert together == alone


def test_seed_repeats_and_differs() -> None:
    logits = torch.zeros(1, 50000)  # uniform: different seeds must give different tokens
    def run(seed: int) -> list[int]:
        s = Sampler(SamplingParams(seed=seed, temperature=1.0, top_p=1.0))
        return [pick(logits, [s], [None])[0] for _ in range(8)]
    assert run(5) == run(5) != run(6)


def test_repetition_penalty_only_on_its_row() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    history = torch.tensor([[0]])
    penalised = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))
    plain = Sampler(SamplingParams(temperature=0))
    assert pick(logits, [penalised, plain], [history, None]) == [1, 0]
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits[:1].clone()).argmax(-1)
    assert expected.item() == 1


@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300, 1e-45, 1e-38, 1e-10, 9.99e-5])
def test_temperatures_below_the_threshold_are_greedy(temperature: float) -> None:
    """Every temperature the limits accept behaves: the tiniest (denormals included; in fp32 they
    are 0, and dividing by them overflows) are greedy whatever the seed."""
    assert temperature < GREEDY_BELOW_TEMPERATURE
    params = SamplingParams(temperature=temperature, top_p=1.0)
    params.validate()
    assert params.greedy
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(3)) * 4
    samplers = [Sampler(SamplingParams(temperature=temperature, top_p=1.0, seed=s))
                for s in range(16)]
    assert pick(logits, samplers, [None] * 16) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [GREEDY_BELOW_TEMPERATURE, 1e-3, 0.05, 1.0, 5.0])
def test_temperatures_from_the_threshold_up_sample_finite_distributions(temperature) -> None:
    """From the threshold up, sampling is computed stably: the scaled scores stay finite even for
    extreme logits, every draw is a real token, and near the threshold the top token wins
    (unless its lead is tiny)."""
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(4)) * 30
    logits[:, 0] = logits.max() + 1.0  # a clear winner in every row
    samplers = [Sampler(SamplingParams(temperature=temperature, top_p=1.0, seed=s))
                for s in range(64)]
    assert not SamplingParams(temperature=temperature).greedy
    tokens = pick(logits, samplers, [None] * 64)
    assert all(0 <= t < 5000 for t in tokens)
    if temperature <= 0.05:  # a lead of >= 1 over temperature 0.05: e^-20 for the runner-up
        assert tokens == [0] * 64
    flat = torch.randn(1, 5000, generator=torch.Generator().manual_seed(5)).expand(64, -1)
    spread = len(set(pick(flat, samplers, [None] * 64)))
    assert spread > 8 if temperature >= 1.0 else spread < 8  # hot draws spread, cold ones don't

"""The batched sampler against transformers' own warpers, and its per-request independence."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chatglm3.params import GREEDY_BELOW_TEMPERATURE, SamplingParams
from chatglm3.model.sampling import RequestSampling, kept_tokens, pick

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
    samplers = [RequestSampling(SamplingParams(**{**params.__dict__, "seed": s})) for s in range(n)]
    tokens = pick(LOGITS.expand(n, VOCAB), samplers, [None] * n)
    return torch.bincount(tokens, minlength=VOCAB).double() / n


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
    samplers = [RequestSampling(SamplingParams(**s)) for s in settings]
    assert pick(logits, samplers, [None] * 6).tolist() == logits.argmax(-1).tolist()


def test_rows_are_independent_of_their_batch() -> None:
    """A request's token depends on its own logits, settings and seed, not on its neighbours."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 500, generator=gen) * 3
    settings = [dict(seed=1), dict(temperature=0), dict(seed=2, top_k=7, temperature=1.3),
                dict(seed=3, top_p=0.5), dict(seed=4, temperature=0.2)]
    together = pick(logits, [RequestSampling(SamplingParams(**s)) for s in settings], [None] * 5).tolist()
    alone = [pick(logits[i : i + 1], [RequestSampling(SamplingParams(**s))], [None]).item()
             for i, s in enumerate(settings)]
    assert together == alone


def test_seed_repeats_and_differs() -> None:
    logits = torch.zeros(1, 50000)  # uniform: different seeds must give different tokens
    def run(seed: int) -> list[int]:
        s = RequestSampling(SamplingParams(seed=seed, temperature=1.0, top_p=1.0))
        return [pick(logits, [s], [None]).item() for _ in range(8)]
    assert run(5) == run(5) != run(6)


def test_repetition_penalty_only_on_its_row() -> None:
    """Seen tokens' logits are divided by the penalty when positive and multiplied when
    negative (3.0 -> 2.0 loses to 2.9; -0.5 -> -0.75 loses to -0.6), in the penalised rows
    only, wherever they sit in the batch; the caller's logits are left as they were."""
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [-0.5, -0.6, -9.0],
                           [-0.5, -0.6, -9.0]])
    before = logits.clone()
    penalised = RequestSampling(SamplingParams(temperature=0, repetition_penalty=1.5))
    plain = RequestSampling(SamplingParams(temperature=0))
    seen = torch.tensor([[0, 0]])  # a repeated id is penalised once
    assert pick(logits, [penalised, plain, plain, penalised], [seen, None, None, seen]).tolist() == [
        1, 0, 0, 1]
    assert pick(logits, [plain, penalised, penalised, plain], [None, seen, seen, None]).tolist() == [
        0, 1, 1, 0]
    assert torch.equal(logits, before)
    # A penalty below 1 favours seen tokens: 2.9 / 0.5 = 5.8 beats 3.0.
    favour = RequestSampling(SamplingParams(temperature=0, repetition_penalty=0.5))
    assert pick(logits[:1], [favour], [torch.tensor([[1]])]).tolist() == [1]


@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300, 1e-45, 1e-38, 1e-10, 9.99e-5])
def test_temperatures_below_the_threshold_are_greedy(temperature: float) -> None:
    """Every temperature the limits accept behaves: the tiniest (denormals included; in fp32 they
    are 0, and dividing by them overflows) are greedy whatever the seed."""
    assert temperature < GREEDY_BELOW_TEMPERATURE
    params = SamplingParams(temperature=temperature, top_p=1.0)
    params.validate()
    assert params.greedy
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(3)) * 4
    samplers = [RequestSampling(SamplingParams(temperature=temperature, top_p=1.0, seed=s))
                for s in range(16)]
    assert pick(logits, samplers, [None] * 16).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [GREEDY_BELOW_TEMPERATURE, 1e-3, 0.05, 1.0, 5.0])
def test_temperatures_from_the_threshold_up_sample_finite_distributions(temperature) -> None:
    """From the threshold up, sampling is computed stably: the scaled scores stay finite even for
    extreme logits, every draw is a real token, and near the threshold the top token wins
    (unless its lead is tiny)."""
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(4)) * 30
    logits[:, 0] = logits.max() + 1.0  # a clear winner in every row
    samplers = [RequestSampling(SamplingParams(temperature=temperature, top_p=1.0, seed=s))
                for s in range(64)]
    assert not SamplingParams(temperature=temperature).greedy
    tokens = pick(logits, samplers, [None] * 64).tolist()
    assert all(0 <= t < 5000 for t in tokens)
    if temperature <= 0.05:  # a lead of >= 1 over temperature 0.05: e^-20 for the runner-up
        assert tokens == [0] * 64
    flat = torch.randn(1, 5000, generator=torch.Generator().manual_seed(5)).expand(64, -1)
    spread = len(set(pick(flat, samplers, [None] * 64).tolist()))
    assert spread > 8 if temperature >= 1.0 else spread < 8  # hot draws spread, cold ones don't


def test_kept_tokens_equal_transformers_per_row_warpers() -> None:
    """transformers 5.24's continuous-batching warpers take per-row temperature / top-k /
    top-p (sampling.py says why we don't use them): in a batch of mixed settings, every row
    keeps exactly the tokens they keep."""
    gen = torch.Generator().manual_seed(7)
    vocab = 3000
    scores = torch.randn(6, vocab, generator=gen) * 3
    temperature = torch.tensor([1.0, 0.7, 1.3, 2.0, 0.5, 1.0])
    top_k = torch.tensor([vocab, 50, 7, vocab, 1, 300])
    top_p = torch.tensor([0.9, 1.0, 0.6, 0.3, 0.8, 0.95])
    order, _, keep = kept_tokens(scores, temperature, top_k, top_p)
    ours = torch.zeros_like(keep).scatter(1, order, keep)

    as_int32 = lambda t: t.to(torch.float32).view(torch.int32)  # noqa: E731 - their storage
    theirs = ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(1.0))(
        scores, as_int32(temperature))
    theirs = ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(vocab))(
        theirs, top_k.to(torch.int32))
    theirs = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(0.5))(
        theirs, as_int32(top_p))
    assert torch.equal(ours, torch.isfinite(theirs))
    assert ours.sum(-1)[4] == 1 and int(ours.sum(-1)[2]) <= 7


@pytest.mark.parametrize("min_p", [0.0, 0.02, 0.3, 0.9, 1.0])
def test_min_p_keeps_what_transformers_min_p_keeps(min_p: float) -> None:
    """min_p after temperature, top-k and top-p (transformers' warper order): per row, exactly
    the tokens transformers' MinPLogitsWarper leaves, and never fewer than the top one."""
    gen = torch.Generator().manual_seed(11)
    vocab = 2000
    scores = torch.randn(4, vocab, generator=gen) * 3
    temperature = torch.tensor([1.0, 0.6, 1.5, 1.0])
    top_k = torch.tensor([vocab, 40, vocab, 5])
    top_p = torch.tensor([0.95, 0.9, 0.7, 1.0])
    order, _, keep = kept_tokens(scores, temperature, top_k, top_p,
                                 torch.full((4,), min_p))
    ours = torch.zeros_like(keep).scatter(1, order, keep)
    for row in range(4):
        procs = LogitsProcessorList([TemperatureLogitsWarper(float(temperature[row])),
                                     TopKLogitsWarper(int(top_k[row])),
                                     TopPLogitsWarper(float(top_p[row]))])
        if min_p:
            procs.append(MinPLogitsWarper(min_p))
        theirs = procs(None, scores[row : row + 1].clone())
        assert torch.equal(ours[row : row + 1], torch.isfinite(theirs)), row
    assert (ours.sum(-1) >= 1).all()
    if min_p == 1.0:  # only tokens as likely as the top one: here, the top one alone
        assert (ours.sum(-1) == 1).all()


def test_min_p_draws_only_likely_tokens() -> None:
    """Sampled with min_p, a row never draws a token below min_p x the top probability."""
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.5, 0.0, -1.0]]).expand(200, -1)
    probs = torch.softmax(logits[0], -1)
    allowed = set(torch.nonzero(probs >= 0.5 * probs[0]).flatten().tolist())
    samplers = [RequestSampling(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.5, seed=s))
                for s in range(200)]
    drawn = set(pick(logits.clone(), samplers, [None] * 200).tolist())
    assert drawn == allowed == {0, 1}
    plain = [RequestSampling(SamplingParams(temperature=1.0, top_p=1.0, seed=s))
             for s in range(200)]
    assert len(set(pick(logits.clone(), plain, [None] * 200).tolist())) > 2  # off: wider

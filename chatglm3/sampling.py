"""Picking next tokens for a batch of requests, each with its own settings and seed.

transformers' logits warpers take one temperature / top-k / top-p for the whole batch, so
running them request by request costs ~20 tensor ops (GPU launches) per request per step: at
32 streams more than the forward pass itself. Here temperature, top-k and top-p run once for
the batch with per-row values, with the same rules as those warpers; the repetition penalty
(rare, and per-row history) still uses transformers' processor, row by row. The random draw
is one uniform number per request from its own seeded generator on the host, turned into a
token by inverse CDF, so a request's draws do not depend on the others in its batch.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from .params import MAX_SEED, SamplingParams


class Sampler:
    """One request's settings and its seeded source of uniform draws."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.randrange(MAX_SEED + 1)
        self.rng = random.Random(self.seed)  # draws on the host: no device op, no sync
        self.penalty = (RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                        if params.repetition_penalty != 1.0 else None)

    def uniform(self) -> float:
        return self.rng.random()


def pick(logits: torch.Tensor, samplers: Sequence[Sampler],
         history: Sequence[torch.Tensor]) -> list[int]:
    """The next token of each row: `logits` [batch, vocab]; `history[i]` [1, n] ids so far of
    row i (read only by the repetition penalty)."""
    scores = logits.float()
    for i, s in enumerate(samplers):
        if s.penalty is not None:
            scores[i : i + 1] = s.penalty(history[i], scores[i : i + 1])
    tokens = scores.argmax(-1)
    rows = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if rows:
        settings = [(samplers[i].params, samplers[i].uniform()) for i in rows]
        tokens[rows] = _sample(scores[rows], settings)
    return tokens.tolist()


def _sample(scores: torch.Tensor, settings: list[tuple[SamplingParams, float]]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (as transformers' warpers apply them), then the
    inverse-CDF draw; everything batched, in descending order of the scores."""
    vocab = scores.shape[-1]
    host = torch.tensor([[p.temperature, p.top_k or vocab, p.top_p, u] for p, u in settings])
    temperature, top_k, top_p, u = host.to(scores.device).unbind(-1)
    ordered, order = torch.sort(scores / temperature[:, None], dim=-1, descending=True)
    within_k = torch.arange(vocab, device=scores.device) < top_k[:, None]
    probs = torch.softmax(ordered.masked_fill(~within_k, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # probability mass ranked above each token
    keep = (before < top_p[:, None]) & within_k
    keep[:, 0] = True  # the top token always stays
    cdf = (probs * keep).cumsum(-1)
    pos = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)
    pos = torch.minimum(pos, keep.sum(-1, keepdim=True) - 1)
    return order.gather(1, pos)[:, 0]

"""Picking next tokens for a batch of requests, each with its own settings and seed.

transformers' ordinary logits warpers take one temperature / top-k / top-p for the whole
batch, so running them request by request costs ~20 tensor ops (GPU launches) per request per
step: at 32 streams more than the forward pass itself. Here temperature, top-k and top-p run
once for the batch with per-row values, with the same rules as those warpers. The adjustments
that read a request's history run row by row, only for the requests that ask for them: the
repetition penalty (transformers' processor), and our presence/frequency penalties and
min_tokens (token counts kept per request, updated with the step's new token only). The random
draw is one uniform number per request from its own seeded generator on the host, turned into
a token by inverse CDF, so a request's draws do not depend on the others in its batch.

transformers 5.24 does have per-row warpers, for its continuous batching
(generation/continuous_batching/cb_logits_processors.py: ContinuousBatchingTemperature-,
-TopK- and -TopPLogitsWarper); tests/model/test_sampling.py checks that the tokens we keep are the
ones they keep. They don't fit here:
- they only filter; the draw in that path is `torch.multinomial` on the process-wide
  generator (ModelRunner._sample), so no request has its own seed. The draw, with a seed per
  request, still has to be ours;
- each takes its values as one packed int32 row (floats viewed as int32) that
  `prepare_tensor_args` fills from their FutureRequestState objects: using them means
  imitating their scheduler's bookkeeping;
- top-k and top-p each sort the vocabulary, and the inverse-CDF draw needs it sorted once more;
  here one sort serves all three;
- greedy rows (temperature 0) would divide by zero: their batch is either all sampled or all
  greedy (one `do_sample` per manager).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from ..params import MAX_SEED, SamplingParams

if TYPE_CHECKING:
    from .grammar import Constraint


class RequestSampling:
    """One request's sampling settings, its seed and its seeded source of uniform draws (the
    picking itself is `pick`, for the whole batch), and the per-request state its logit
    adjustments need: the counts of the tokens it generated, and which tokens stop it.

    `prompt_len`: where its generated tokens start in the id history `pick` is given;
    `stop_ids`: the tokens `min_tokens` holds back."""

    def __init__(self, params: SamplingParams, prompt_len: int = 0,
                 stop_ids: Iterable[int] = (), constraint: "Constraint | None" = None) -> None:
        self.params = params
        self.constraint = constraint  # structured output: grammar.Constraint
        self.seed = params.seed if params.seed is not None else random.randrange(MAX_SEED + 1)
        self.rng = random.Random(self.seed)  # draws on the host: no device op, no sync
        self.penalty = (RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                        if params.repetition_penalty != 1.0 else None)
        self.prompt_len = prompt_len
        self.stop_ids = sorted(stop_ids)
        self._stop_index: torch.Tensor | None = None  # stop_ids on the device, made once
        self.counts: torch.Tensor | None = None  # [vocab] times each token was generated
        self._counted = prompt_len  # history positions already in `counts`
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias on the device
        self._allowed: torch.Tensor | None = None  # 0 at allowed_token_ids, -inf elsewhere

    @property
    def needs_history(self) -> bool:
        """Whether `pick` must be given this request's ids so far (the default settings never
        need them: per-row work only for the requests that ask for it)."""
        p = self.params
        return (self.penalty is not None or p.min_tokens > 0 or p.presence_penalty != 0
                or p.frequency_penalty != 0)

    @property
    def adjusts(self) -> bool:
        """Whether `pick` runs `adjust` on this request's row."""
        p = self.params
        return (self.needs_history or bool(p.logit_bias) or bool(p.allowed_token_ids)
                or self.constraint is not None)

    def accept(self, token: int) -> None:
        """The token picked for this request (its grammar, if any, moves past it)."""
        if self.constraint is not None:
            self.constraint.accept(token)

    def uniform(self) -> float:
        return self.rng.random()

    def adjust(self, scores: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """The row's scores after `_settings`, then (structured output) with every token the
        grammar cannot take next at -inf: last, so greedy and sampling both obey it. Should the
        settings leave none of the grammar's tokens (min_tokens holding back the end tokens
        where only an end is allowed), the grammar wins over them."""
        adjusted = self._settings(scores, history)
        if self.constraint is None:
            return adjusted
        allowed = self.constraint.allowed(scores.shape[-1], scores.device)
        masked = adjusted.masked_fill(~allowed, float("-inf"))
        if not bool(torch.isfinite(masked).any()):
            masked = scores.masked_fill(~allowed, float("-inf"))
        return masked

    def _settings(self, scores: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """This row's scores [1, vocab] after the repetition penalty (over prompt and output,
        transformers' processor), the presence/frequency penalties (OpenAI's: over the
        generated tokens, once per token / once per occurrence) and min_tokens (stop tokens
        held back until that many are out), then logit_bias and allowed_token_ids. `history` [1, n]: the ids so
        far (None when not `needs_history`)."""
        p = self.params
        if p.logit_bias:
            if self._bias is None:  # made once: no host-to-device copy per step
                ids, values = zip(*p.logit_bias)
                self._bias = (torch.tensor(ids, device=scores.device),
                              torch.tensor(values, dtype=scores.dtype, device=scores.device))
            scores = scores.index_add(-1, self._bias[0], self._bias[1][None])
        if p.allowed_token_ids:
            if self._allowed is None:
                self._allowed = torch.full((scores.shape[-1],), float("-inf"),
                                           device=scores.device)
                self._allowed[list(p.allowed_token_ids)] = 0.0
            scores = scores + self._allowed
        if history is None:
            return scores
        if self.penalty is not None:
            scores = self.penalty(history, scores)
        if p.presence_penalty or p.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(scores.shape[-1], device=scores.device)
            new = history[0, self._counted :]  # the tokens since the last step: O(1) per step
            self.counts.index_add_(0, new, torch.ones(new.shape, device=scores.device))
            self._counted = history.shape[1]
            scores = scores - (p.frequency_penalty * self.counts
                               + p.presence_penalty * (self.counts > 0).float())
        if history.shape[1] - self.prompt_len < p.min_tokens and self.stop_ids:
            if self._stop_index is None:  # not a host-to-device copy on every step
                self._stop_index = torch.tensor(self.stop_ids, device=scores.device)
            scores = scores.index_fill(-1, self._stop_index, float("-inf"))
        return scores


def pick(logits: torch.Tensor, samplings: Sequence[RequestSampling],
         history: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The next token of each row, [batch] on the device (no host sync until the caller reads
    them, unless a row has a grammar: it takes its token at once): `logits` [batch, vocab];
    `history[i]` [1, n] ids so far of row i (read only for requests that `needs_history`)."""
    adjusted = [i for i, s in enumerate(samplings) if s.adjusts]
    # A copy when rows change: fp32 logits' .float() is the caller's tensor itself (on a GPU,
    # a graph's output buffer).
    scores = logits.to(torch.float32, copy=bool(adjusted))
    for i in adjusted:
        scores[i : i + 1] = samplings[i].adjust(scores[i : i + 1], history[i])
    tokens = scores.argmax(-1)
    rows = [i for i, s in enumerate(samplings) if not s.params.greedy]
    if rows:
        settings = [(samplings[i].params, samplings[i].uniform()) for i in rows]
        tokens[rows] = _sample(scores[rows], settings)
    if any(s.constraint is not None for s in samplings):  # their grammars move on (a sync:
        for s, token in zip(samplings, tokens.tolist()):  # their masks are host work anyway)
            s.accept(token)
    return tokens


class TokenLogprob(NamedTuple):
    """A token's log-probability and its likeliest alternatives', most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability)
    rank: int | None = None  # 1 + how many tokens were likelier (prompt tokens only)


# Rows of prompt logits turned into log-probabilities at a time: 64 x 65,024 fp32 = 16 MB.
SCORE_ROWS = 64


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprob]:
    """Each target token's log-probability under the logits row before it (row i scores
    targets[i]), its rank and the k likeliest alternatives: the raw model distribution, as
    for generated tokens. `logits` [rows >= len(targets), vocab] in any float dtype; worked
    through SCORE_ROWS rows at a time, so memory stays bounded whatever the rows."""
    out: list[TokenLogprob] = []
    target = torch.tensor(targets, device=logits.device)
    for begin in range(0, len(targets), SCORE_ROWS):
        end = min(begin + SCORE_ROWS, len(targets))
        lp = torch.log_softmax(logits[begin:end].float(), dim=-1)
        chosen = lp.gather(1, target[begin:end, None])
        rank = (lp > chosen).sum(-1) + 1
        values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for t, c, r, v, i in zip(targets[begin:end], chosen[:, 0].tolist(), rank.tolist(),
                                 values.tolist(), ids.tolist()):
            out.append(TokenLogprob(t, c, tuple(zip(i, v)), r))
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   samplings: Sequence[RequestSampling]) -> list[TokenLogprob | None] | None:
    """For the rows whose settings ask for `logprobs`: the picked token's log-probability and
    the top alternatives under the model's own distribution (the raw logits, before
    temperature, top-k/top-p and penalties: what the model thinks, whatever was drawn; so the
    greedy token is always the first alternative). None when no row asks: no work then. One
    device-to-host copy for the whole batch."""
    rows = [i for i, s in enumerate(samplings) if s.params.logprobs is not None]
    if not rows:
        return None
    k = max(samplings[i].params.logprobs for i in rows)
    index = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = tokens.index_select(0, index)
    chosen = lp.gather(1, picked[:, None])[:, 0]
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    chosen_h, values_h, ids_h, picked_h = (chosen.tolist(), values.tolist(), ids.tolist(),
                                           picked.tolist())
    out: list[TokenLogprob | None] = [None] * len(samplings)
    for j, i in enumerate(rows):
        n = samplings[i].params.logprobs
        out[i] = TokenLogprob(picked_h[j], chosen_h[j],
                              tuple(zip(ids_h[j][:n], values_h[j][:n])))
    return out


def _sample(scores: torch.Tensor, settings: list[tuple[SamplingParams, float]]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then min-p (the order of transformers' warpers),
    then the inverse-CDF draw; everything batched, in descending order of the scores."""
    vocab = scores.shape[-1]
    host = torch.tensor([[p.temperature, p.top_k or vocab, p.top_p, p.min_p, u]
                         for p, u in settings])
    temperature, top_k, top_p, min_p, u = host.to(scores.device).unbind(-1)
    order, probs, keep = kept_tokens(scores, temperature, top_k, top_p, min_p)
    cdf = (probs * keep).cumsum(-1)
    pos = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)
    pos = torch.minimum(pos, keep.sum(-1, keepdim=True) - 1)
    return order.gather(1, pos)[:, 0]


def kept_tokens(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, min_p: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature, top-k (a count, vocab = off), top-p and min-p (0 = off) on `scores`
    [batch, vocab]: (order, probs, keep), all [batch, vocab] in descending order of the scores:
    the token ids, their probabilities after temperature and top-k, and which of them top-p
    and min-p keep. min-p keeps a token whose probability is at least min_p times the top
    token's; a ratio, so the same whichever filters ran before it."""
    vocab = scores.shape[-1]
    ordered, order = torch.sort(scores / temperature[:, None], dim=-1, descending=True)
    within_k = torch.arange(vocab, device=scores.device) < top_k[:, None]
    probs = torch.softmax(ordered.masked_fill(~within_k, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # probability mass ranked above each token
    keep = (before < top_p[:, None]) & within_k
    if min_p is not None:
        keep &= probs >= min_p[:, None] * probs[:, :1]
    keep[:, 0] = True  # the top token always stays
    return order, probs, keep

"""The per-request logits pipeline: transformers' processors and a seeded generator."""

from __future__ import annotations

import random

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .params import SamplingParams

class Sampler:
    """Picks the next token for one request: its own processors and random generator."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        procs = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            if params.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                procs.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
        self.processors = procs

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The next token as a 0-d tensor (no device sync, so a batch syncs once).

        `ids`: [1, n] tokens so far (only read by the repetition penalty); `logits`: [1, vocab].
        """
        scores = self.processors(ids, logits.float()) if self.processors else logits
        if self.params.greedy:
            return scores[0].argmax()
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0, 0]

"""Sampling settings and their limits (no heavy imports: the CLI checks them before loading)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The official ChatGLM3 chat() defaults.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8


class SettingsError(ValueError):
    """A sampling setting out of range; the message names the field and the limit."""


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 is off."""

    max_tokens: int = 2048
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        def bad(name: str, limit: str) -> None:
            raise SettingsError(f"{name}: must be {limit}, got {getattr(self, name)!r}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1")
        if not _finite(self.temperature) or not 0 <= self.temperature <= 100:
            bad("temperature", "between 0 and 100 (0 = greedy)")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "greater than 0 and at most 1")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not _finite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            bad("repetition_penalty", "greater than 0 and at most 100 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            bad("seed", "an integer between 0 and 2**63-1")
        if not all(isinstance(s, str) for s in self.stop):
            bad("stop", "a list of strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

"""Sampling settings: their defaults and limits, in one place (no heavy imports: the CLI checks
them before loading). The CLI, the Python API and the Cog schema all follow these; predict.py
repeats them as literals (cog build's parser reads only literals) and a test keeps them equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CONTEXT = 32768  # ChatGLM3-6B-32K's context window in tokens (seq_length in its config.json)

# The official ChatGLM3 chat() defaults.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_TOKENS = 2048

MAX_TEMPERATURE = 5.0
# Below this a temperature counts as 0 (greedy). Dividing fp32 logits by a tinier one
# overflows (1e-300 is 0 in fp32), and from here down sampling is greedy in all but ties.
GREEDY_BELOW_TEMPERATURE = 1e-4
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
# OpenAI's presence and frequency penalties, with their range: subtracted from a token's logit
# once if it has been generated at all, and once per time it has been generated.
MIN_PENALTY, MAX_PENALTY = -2.0, 2.0
# Seeds up to 2**53 - 1: integers a JSON client in JavaScript (the Replicate web UI) keeps exact,
# and which a float64 schema bound states exactly.
MAX_SEED = 2**53 - 1
# Stop strings: a handful of short ones is what people use (OpenAI allows 4); each one held
# back from the stream while it may still match, so its length is streaming latency too.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
# Log-probabilities: per generated token, its own and those of up to this many likeliest
# alternatives (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20


class SettingsError(ValueError):
    """A sampling setting out of range; the message names the field and the limit."""


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 (or top_p 0) is greedy; top_k 0 is off."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0  # the stop tokens are suppressed until this many tokens are out
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Report each generated token's log-probability and this many likeliest alternatives
    # (0-MAX_LOGPROBS); None = none reported (no work per step).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()  # bad values fail when built, not at the first step

    def validate(self) -> None:
        """Checks every setting against its limit and raises one SettingsError naming each bad
        field. Numbers are taken as JSON clients send them: integral floats (4.0) become the
        integers they are, and integers (2) the floats they stand for (transformers' repetition
        penalty refuses an int). Call it again after changing a field (predict.py sets stop)."""
        errors = [e for e in (self._number_errors() + self._stop_errors()) if e]
        if errors:
            raise SettingsError("; ".join(errors))

    def _number_errors(self) -> list[str]:
        errors: list[str] = []

        def bad(name: str, limit: str) -> None:
            errors.append(f"{name}: must be {limit}, got {getattr(self, name)!r}")

        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if _integer(value):
                setattr(self, name, float(value))
        if not _integer(self.max_tokens) or not 1 <= self.max_tokens <= CONTEXT:
            bad("max_tokens", f"an integer from 1 to {CONTEXT} (it is cut to the room the "
                              "prompt leaves in the context)")
        if not _finite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            bad("temperature", f"from 0 to {MAX_TEMPERATURE:g} (below "
                               f"{GREEDY_BELOW_TEMPERATURE:g} = greedy)")
        if not _finite(self.top_p) or not 0 <= self.top_p <= 1:
            bad("top_p", "from 0 to 1 (1 = off, 0 = greedy)")
        if not _integer(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if (not _finite(self.repetition_penalty)
                or not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            bad("repetition_penalty", f"from {MIN_REPETITION_PENALTY:g} to "
                                      f"{MAX_REPETITION_PENALTY:g} (1 = off)")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed <= MAX_SEED):
            bad("seed", f"an integer from 0 to {MAX_SEED} (2**53-1)")
        if not _integer(self.min_tokens) or not 0 <= self.min_tokens <= CONTEXT:
            bad("min_tokens", f"an integer from 0 to {CONTEXT} (0 = off)")
        if self.logprobs is not None and (not _integer(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"an integer from 0 to {MAX_LOGPROBS} (alternatives per token) "
                            "or None (off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not MIN_PENALTY <= value <= MAX_PENALTY:
                bad(name, f"from {MIN_PENALTY:g} to {MAX_PENALTY:g} (0 = off)")
        return errors

    def _stop_errors(self) -> list[str]:
        from .messages import check_text  # messages imports the tokenizer; only needed here

        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)) or not all(
                isinstance(s, str) for s in self.stop):
            return ["stop_sequences: must be a list of strings"]
        stops = [s for s in self.stop if s]
        if len(stops) > MAX_STOP_SEQUENCES:
            return [f"stop_sequences: at most {MAX_STOP_SEQUENCES} stop strings, got {len(stops)}"]
        errors = []
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_LENGTH:
                errors.append(f"stop_sequences[{i}]: at most {MAX_STOP_LENGTH} characters, "
                              f"got {len(s)}")
                continue
            try:
                check_text(f"stop_sequences[{i}]", s)
            except ValueError as e:
                errors.append(str(e))
        return errors

    @property
    def greedy(self) -> bool:
        """Always the most likely token: temperature (nearly) 0, or top_p 0."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_p == 0


_INTEGER_FIELDS = ("max_tokens", "top_k", "seed", "min_tokens", "logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

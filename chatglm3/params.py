"""Sampling settings, each declared once (`FIELDS`): name, type, default, limits, help text and
the names the OpenAI API reads it under. Everything else is derived from the declarations:
`SamplingParams`' checks and messages, the CLI's flags and --help (cli_args.py), the OpenAI
request parsing (api/protocol.py) and the chat page's controls (webchat). predict.py repeats
them as literals (cog build's parser reads only literals) and tests/cog/test_cog_static.py keeps
them equal. A leaf module: no heavy import (the CLI checks flags before loading anything).

Adding a plain numeric setting: one `Field` here, a dataclass field on `SamplingParams`, its
effect in sampling.py, and its `Input` in predict.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from .errors import InputError, check_text, rename

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
# logit_bias: OpenAI's range per token, and a bound on the entries (each is a device op's
# worth of work per step for its row; OpenAI's own limit is 300).
MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES = 100.0, 300
# stop_token_ids (vLLM's): extra token ids that end the answer.
MAX_STOP_TOKEN_IDS = 16
# Structured output: the largest schema / regex text and choice list accepted (a grammar is
# compiled from it before anything is queued; llguidance's own limits bound the compile).
MAX_GRAMMAR_CHARS = 65536
MAX_CHOICES = 256
STRUCTURED_KINDS = ("json", "regex", "choice")


@dataclass(frozen=True)
class Structured:
    """A constraint on the answer: `json` (spec: a JSON Schema as JSON text; "{}" = any JSON
    value, '{"type": "object"}' = any object), `regex` (spec: the pattern) or `choice` (one of
    `choices`, exactly). The engine compiles it once per request before queueing it."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.choices, list):
            object.__setattr__(self, "choices", tuple(self.choices))

    def problem(self) -> str | None:
        """What is wrong with it, in words (None: nothing)."""
        if self.kind not in STRUCTURED_KINDS:
            return f"kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}"
        if self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                return "choice: needs at least one non-empty string"
            if len(self.choices) > MAX_CHOICES:
                return f"choice: at most {MAX_CHOICES} strings, got {len(self.choices)}"
            size = sum(map(len, self.choices))
        else:
            if not isinstance(self.spec, str) or not self.spec:
                return f"{self.kind}: needs a non-empty text"
            size = len(self.spec)
        if size > MAX_GRAMMAR_CHARS:
            return f"{self.kind}: at most {MAX_GRAMMAR_CHARS} characters, got {size}"
        if self.kind == "json":
            import json

            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                return f"json: not valid JSON ({e})"
            if not isinstance(schema, (dict, bool)):
                return "json: a JSON Schema is an object (or true/false)"
        return None


@dataclass(frozen=True)
class Field:
    """One numeric sampling setting. `low`/`high`: inclusive bounds (`high` None: unbounded);
    `note`: what its special values mean, shown after the range in errors and --help;
    `api`: the names an OpenAI body sets it by, the first one present wins (() = the API
    reads it its own way); `cli`: whether the CLI has a flag for it; `optional`: None is
    allowed (and is the default)."""

    name: str
    kind: type  # int or float
    default: int | float | None
    low: int | float
    high: int | float | None
    help: str
    note: str = ""
    api: tuple[str, ...] | None = None  # None: the field's own name
    cli: bool = True
    optional: bool = False
    metavar: str = "N"

    @property
    def api_names(self) -> tuple[str, ...]:
        return (self.name,) if self.api is None else self.api

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def limit(self) -> str:
        """The accepted values in words: 'an integer from 1 to 32768 (...)'."""
        g = _number_text
        span = (f"from {g(self.low)} to {g(self.high)}" if self.high is not None
                else f">= {g(self.low)}")
        text = f"an integer {span}" if self.kind is int else span
        return f"{text} ({self.note})" if self.note else text

    @property
    def short_range(self) -> str:
        """The range as --help states it: '0-5', '-2 to 2', '0 or more'."""
        g = _number_text
        if self.high is None:
            return f"{g(self.low)} or more"
        sep = " to " if self.low < 0 else "-"
        return f"{g(self.low)}{sep}{g(self.high)}"

    def error(self, value: object) -> str | None:
        """The message for a bad `value`, None when it is good."""
        if value is None and self.optional:
            return None
        good = _integer(value) if self.kind is int else _finite(value)
        if good and (self.low is None or value >= self.low) and (
                self.high is None or value <= self.high):
            return None
        return f"{self.name}: must be {self.limit}, got {value!r}"


FIELDS: tuple[Field, ...] = (
    Field("max_tokens", int, DEFAULT_MAX_TOKENS, 1, CONTEXT,
          "tokens to generate at most",
          f"it is cut to the room the prompt leaves in the {CONTEXT}-token context",
          api=("max_completion_tokens", "max_tokens")),
    Field("temperature", float, DEFAULT_TEMPERATURE, 0.0, MAX_TEMPERATURE,
          "sampling temperature", f"below {GREEDY_BELOW_TEMPERATURE:g} = greedy", metavar="T"),
    Field("top_p", float, DEFAULT_TOP_P, 0.0, 1.0,
          "nucleus sampling: keep the likeliest tokens whose probabilities add up to it",
          "1 = off, 0 = greedy", metavar="P"),
    Field("top_k", int, 0, 0, None, "sample among the K likeliest tokens", "0 = off",
          metavar="K"),
    Field("min_p", float, 0.0, 0.0, 1.0,
          "keep only the tokens at least this fraction as likely as the likeliest one",
          "0 = off", metavar="P"),
    Field("repetition_penalty", float, 1.0, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY,
          "penalty on tokens already in the conversation (prompt and answer)",
          "1 = off, above 1 repeats less", metavar="R"),
    Field("presence_penalty", float, 0.0, MIN_PENALTY, MAX_PENALTY,
          "subtracted once from every token already generated", "0 = off", metavar="P"),
    Field("frequency_penalty", float, 0.0, MIN_PENALTY, MAX_PENALTY,
          "subtracted once per time a token was already generated", "0 = off", metavar="F"),
    Field("min_tokens", int, 0, 0, CONTEXT,
          "fewest tokens to generate: the end tokens are held back until then", "0 = off"),
    # The API draws one seed per choice from it (api/protocol.py): read there.
    Field("seed", int, None, 0, MAX_SEED, "random seed", "2**53-1",
          api=(), optional=True, metavar="S"),
    # An API reads it from its own fields (chat: logprobs + top_logprobs; completions:
    # logprobs as a count); the CLI prints no log-probabilities.
    Field("logprobs", int, None, 0, MAX_LOGPROBS,
          "report each token's log-probability and this many likeliest alternatives",
          "None = off", api=(), cli=False, optional=True),
    # vLLM's extension, read under its own name on both API routes (completions also sets it
    # from echo + logprobs): computed in the prefill chunks, so the prefix cache is not read.
    Field("prompt_logprobs", int, None, 0, MAX_LOGPROBS,
          "report each prompt token's log-probability given the tokens before it, and this "
          "many likeliest alternatives", "None = off", cli=False, optional=True),
)
BY_NAME: Mapping[str, Field] = {f.name: f for f in FIELDS}


class SettingsError(InputError):
    """Sampling settings out of range: one message naming every bad field and its limit;
    `fields` holds their names in order (the first is `field`)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems  # (field, message naming it)
        self.fields = [name for name, _ in problems]
        super().__init__("; ".join(message for _, message in problems), self.fields[0])

    def renamed(self, names: Mapping[str, str]) -> str:
        """The message with each bad field called by `names` (a door's spelling)."""
        return "; ".join(rename(f, m, names) for f, m in self.problems)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, checked when built (every bad field named at once) and immutable
    after. temperature 0 (or top_p 0) is greedy; top_k, min_p and the penalties at their
    defaults are off. Numbers come as JSON clients send them: integral floats (4.0) become the
    integers they stand for, integers (2) floats (transformers' repetition penalty refuses an
    int). `stop`: strings that end the answer (kept as a tuple)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Report each generated token's log-probability and this many likeliest alternatives
    # (0-MAX_LOGPROBS); None = none reported (no work per step).
    logprobs: int | None = None
    # The same for every prompt token after the first (scoring; max_tokens may then be 0:
    # nothing generated). None = off, and the prompt's logits are never computed.
    prompt_logprobs: int | None = None
    # Added to these tokens' logits before sampling or greedy picking ((token id, bias) pairs;
    # OpenAI's logit_bias, -100 to 100): -100 bans a token in practice, 100 forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Token ids that end the answer besides the model's own (vLLM's stop_token_ids).
    stop_token_ids: tuple[int, ...] = ()
    # Only these tokens may be picked (vLLM's allowed_token_ids; () = any). The model's end
    # tokens are not added: list them to let the answer end before max_tokens.
    allowed_token_ids: tuple[int, ...] = ()
    # The model's own end tokens do not end the answer (vLLM's ignore_eos): it runs to
    # max_tokens, a stop string or stop_token_ids.
    ignore_eos: bool = False
    # The answer must match this (JSON Schema, regex or choice): masked every step.
    structured: Structured | None = None

    def __post_init__(self) -> None:
        for f in FIELDS:
            value = getattr(self, f.name)
            if f.kind is int and isinstance(value, float) and value.is_integer():
                object.__setattr__(self, f.name, int(value))
            elif f.kind is float and _integer(value) and abs(value) < 2**1023:
                object.__setattr__(self, f.name, float(value))  # (a larger one: an error)
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        for name in ("logit_bias", "stop_token_ids", "allowed_token_ids"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raises one SettingsError naming every bad field (the constructor calls it)."""
        problems = []
        for f in FIELDS:
            message = f.error(getattr(self, f.name))
            if message and f.name == "max_tokens" and self.max_tokens == 0:
                if self.scores_only:
                    continue
                message += ("; 0 only with prompt_logprobs set (the prompt is scored, "
                            "nothing generated)")
            if message:
                problems.append((f.name, message))
        problems += self._stop_problems() + self._token_problems()
        if problems:
            raise SettingsError(problems)

    def _stop_problems(self) -> list[tuple[str, str]]:
        name = "stop_sequences"
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            return [(name, f"{name}: must be a list of strings")]
        stops = [s for s in self.stop if s]
        if len(stops) > MAX_STOP_SEQUENCES:
            return [(name, f"{name}: at most {MAX_STOP_SEQUENCES} stop strings, "
                           f"got {len(stops)}")]
        problems = []
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_LENGTH:
                problems.append((name, f"{name}[{i}]: at most {MAX_STOP_LENGTH} characters, "
                                       f"got {len(s)}"))
                continue
            try:
                check_text(f"{name}[{i}]", s)
            except InputError as e:
                problems.append((name, str(e)))
        return problems

    def _token_problems(self) -> list[tuple[str, str]]:
        """logit_bias, stop_token_ids and ignore_eos (token ids: the engine checks them
        against its vocabulary)."""
        problems = []
        bias = self.logit_bias
        if not isinstance(bias, tuple) or not all(
                isinstance(e, tuple) and len(e) == 2 for e in bias):
            problems.append(("logit_bias", "logit_bias: must map token ids to numbers"))
        elif len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            problems.append(("logit_bias", f"logit_bias: at most {MAX_LOGIT_BIAS_ENTRIES} "
                                           f"tokens, got {len(bias)}"))
        else:
            for token, value in bias:
                if not _integer(token) or token < 0:
                    problems.append(("logit_bias", f"logit_bias: keys must be token ids "
                                                   f"(integers >= 0), got {token!r}"))
                elif not _finite(value) or abs(value) > MAX_LOGIT_BIAS:
                    problems.append(("logit_bias", f"logit_bias[{token}]: must be from "
                                                   f"-{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}, "
                                                   f"got {value!r}"))
                if len(problems) > 2:
                    break
        for name, most in (("stop_token_ids", MAX_STOP_TOKEN_IDS),
                           ("allowed_token_ids", CONTEXT)):
            ids = getattr(self, name)
            if not isinstance(ids, tuple) or not all(_integer(i) and i >= 0 for i in ids):
                problems.append((name, f"{name}: must be a list of token ids (integers >= 0)"))
            elif len(ids) > most:
                problems.append((name, f"{name}: at most {most}, got {len(ids)}"))
        if self.structured is not None:
            why = (self.structured.problem() if isinstance(self.structured, Structured)
                   else "must be a Structured")
            if why:
                problems.append(("structured", f"structured: {why}"))
        if not isinstance(self.ignore_eos, bool):
            problems.append(("ignore_eos", f"ignore_eos: must be true or false, got "
                                           f"{self.ignore_eos!r}"))
        return problems

    def token_ids(self) -> list[tuple[str, int]]:
        """Every token id these settings name, with its field (the engine checks them
        against its vocabulary)."""
        return ([("logit_bias", t) for t, _ in self.logit_bias]
                + [("stop_token_ids", t) for t in self.stop_token_ids]
                + [("allowed_token_ids", t) for t in self.allowed_token_ids])

    @property
    def scores_only(self) -> bool:
        """Only the prompt's log-probabilities are wanted: max_tokens 0 with prompt_logprobs."""
        return self.max_tokens == 0 and self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        """Always the most likely token: temperature (nearly) 0, or top_p 0."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_p == 0


def _number_text(x: int | float) -> str:
    """5.0 -> '5', 0.01 -> '0.01', 2**53-1 in full (not 9.0072e+15)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

"""What the model runner hands back for a step (model_runner.py -> steps.py): typed results,
token ids as Python ints and their log-probabilities. No tensors cross this line."""

from __future__ import annotations

from typing import NamedTuple

from .sampling import TokenLogprob


class StepOutput(NamedTuple):
    """A decoding step's result: the next token of each running request (running[i] ->
    tokens[i]), and their log-probabilities (None when no request asks for them)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None] | None


class FirstToken(NamedTuple):
    """A prompt's last prefill chunk's result: its first token (and its log-probabilities)."""

    token: int
    logprob: TokenLogprob | None


class ChunkOutput(NamedTuple):
    """A prefill chunk's result: at its prompt's end the first token (else None), and the
    log-probabilities of the prompt tokens it scored (its request's prompt_logprobs; else
    empty): the chunk's positions predict the tokens after them, so a chunk scores the prompt
    tokens from its second to the first of the next chunk."""

    first: FirstToken | None
    scores: list[TokenLogprob]


class PackedOutput(NamedTuple):
    """A packed step's result: per chunk its output, and the decoding step's output (None
    when no request was running)."""

    chunks: list[ChunkOutput]
    decoded: StepOutput | None

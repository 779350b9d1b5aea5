"""Structured output: an answer held to a JSON Schema, a regular expression or a list of
choices, by masking the tokens the grammar cannot take next, every step, before picking.

The grammar engine is llguidance (Microsoft's; one of vLLM's structured-output backends and the
one llama.cpp links). xgrammar, vLLM's default, was the first choice, but its wheel requires
triton on Linux x86_64 (a 286 MB download here) and apache-tvm-ffi, which a CPU install would
carry for nothing; llguidance is one self-contained wheel with no dependency.

The tokenizer description is built once from the SentencePiece vocabulary: each id's bytes as
the engine decodes them (`ChatGLMTokenizer.token_bytes`: byte-fallback pieces one byte, "▁" a
space), the control and special tokens (ids from 64789: [gMASK], sop, the role tokens) carry no
bytes and are never allowed inside the grammar, and the model's end tokens (</s>, <|user|>,
<|observation|>) are allowed only where the grammar may end. Its tokenize function encodes a
text after a "\\n" anchor and drops the anchor's two ids, so the text's own pieces come out
without SentencePiece's dummy-prefix space (checked against random texts in the tests).

Compiling a grammar happens when a request is prepared (on the caller's thread, not the
engine's), with llguidance's parser limits; an invalid schema or pattern is an InputError
naming `structured` before anything is queued. Grammars are cached by their text.
"""

from __future__ import annotations

import functools
import re
import threading

import numpy as np
import torch

from ..errors import InputError
from ..params import Structured
from ..text.tokenizer import ChatGLMTokenizer

# llguidance's own bounds on a grammar's cost (its defaults, stated here so they are ours):
# building the lexer and each step's work, so no schema can stall the engine's worker.
_LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
               max_lexer_states=250_000, max_grammar_size=500_000)
# No whitespace between JSON tokens: a random or weak model could otherwise emit spaces for
# ever without breaking the grammar. The answer is compact JSON.
_JSON_OPTIONS = {"whitespace_flexible": False}


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the special ids, tokenize."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self._sp = tokenizer.sp
        self._anchor = len(tokenizer.sp.encode("\n"))
        n = tokenizer.vocab_size
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = None
        sp = tokenizer.sp
        self.special_token_ids = [i for i in range(n) if i >= tokenizer.n_pieces
                                  or sp.is_control(i) or sp.is_unknown(i)]
        special = set(self.special_token_ids)  # no bytes: never inside the grammar
        self.tokens = [b"" if i in special else tokenizer.token_bytes(i) for i in range(n)]

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._sp.encode("\n" + text)[self._anchor:]


class Grammars:
    """Compiles constraints for one tokenizer (its description built on first use)."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._ll = None

    def _llg(self):
        import llguidance

        with self._lock:
            if self._ll is None:
                wrapper = llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer))
                self._ll = llguidance.LLTokenizer(wrapper, n_vocab=self.tokenizer.vocab_size,
                                                  eos_token=sorted(self.tokenizer.stop_ids))
        return self._ll

    def constraint(self, structured: Structured) -> "Constraint":
        """A fresh matcher for one request; InputError(field "structured") if it cannot be."""
        import llguidance

        grammar = _grammar(structured.kind, structured.spec, structured.choices)
        # Compiled once, here: a grammar it cannot take leaves the matcher in an error state
        # (the message validate_grammar would give, without compiling it a second time).
        matcher = llguidance.LLMatcher(self._llg(), grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(**_LIMITS))
        if matcher.is_error():
            raise InputError(f"structured: the {structured.kind} cannot be compiled: "
                             f"{matcher.get_error().strip().splitlines()[0]}", "structured")
        return Constraint(matcher, self.tokenizer.vocab_size)


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, spec: str, choices: tuple[str, ...]) -> str:
    """The llguidance grammar text of a constraint (cached: clients resend the same schema)."""
    from llguidance import LLMatcher

    if kind == "json":
        try:
            return LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise InputError(f"structured: json: {e}", "structured") from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in choices))


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens taken."""

    def __init__(self, matcher, vocab: int) -> None:
        self.matcher, self.vocab = matcher, vocab

    def allowed(self, width: int, device: torch.device) -> torch.Tensor:
        """[width] bool: the tokens the grammar takes next (end tokens where it may end); the
        logits' columns past the tokenizer's vocabulary never."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.zeros(width, dtype=bool)
        n = min(self.vocab, width)
        mask[:n] = np.unpackbits(bits, bitorder="little")[:n]
        return torch.from_numpy(mask).to(device)

    def accept(self, token: int) -> None:
        """Advances past a picked token (one the mask allowed)."""
        self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()


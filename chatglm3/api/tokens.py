"""POST /tokenize and /detokenize, in vLLM's request and response shapes (lm-eval's `remote`
tokenizer and other tools call them).

/tokenize takes a `prompt` string or chat `messages`:
- `prompt`: the ids /v1/completions runs for that string (`add_special_tokens`, default true:
  the `[gMASK] sop` prefix first, as the official `encode`; false: the text's pieces alone);
- `messages`: the chat input ids /v1/chat/completions runs (`add_generation_prompt`, default
  true: ending with `<|assistant|>` for the model to answer; false: without it).
It answers `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` with
`return_token_strs`: each id's SentencePiece piece or special token's name). A text longer
than the context is counted, not refused: that is what one asks the count for.
/detokenize takes `tokens` (ids below the vocabulary size) and answers `{"prompt": text}`;
special tokens carry no text, as in generated text.
GET /tokenizer_info: what lm-eval's `remote` tokenizer reads first (vLLM's route): the
tokenizer's class, context, and its special tokens by name. No `chat_template`: the chat
format is built in code (tokenizer.build_chat_input); clients send messages instead. The
names are names: this tokenizer, as the official one, tokenizes "</s>" in a text as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .protocol import _boolean, _describe, _field, bad, check_model, check_text_param, \
    parse_messages


@dataclass(frozen=True)
class TokenizeRequest:
    prompt: str | None  # or messages
    messages: list | None
    special: bool  # prompt: the [gMASK] sop prefix; messages: the <|assistant|> ending
    token_strs: bool


def _model(body: dict, served: str) -> None:
    """vLLM makes `model` optional on these routes; given, it must be the served one."""
    if body.get("model") is not None:
        check_model(body, served)


def parse_tokenize(body: dict, served: str) -> TokenizeRequest:
    _model(body, served)
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise bad("prompt or messages: exactly one is required (a string to tokenize as "
                  "/v1/completions does, or chat messages as /v1/chat/completions does)",
                  "prompt" if prompt is None else "messages")
    token_strs = _field(body, "return_token_strs", _boolean, "true or false", False)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise bad(f"prompt: expected a string, got {_describe(prompt)}", "prompt")
        check_text_param("prompt", prompt)
        special = _field(body, "add_special_tokens", _boolean, "true or false", True)
        return TokenizeRequest(prompt, None, special, token_strs)
    special = _field(body, "add_generation_prompt", _boolean, "true or false", True)
    return TokenizeRequest(None, parse_messages(messages), special, token_strs)


def tokenize(tokenizer, req: TokenizeRequest, context: int) -> dict[str, Any]:
    """The response body of /tokenize (runs off the event loop: tokenizing costs ~0.3 s/MB)."""
    if req.prompt is not None:
        ids = tokenizer.encode(req.prompt) if req.special else tokenizer.encode_text(req.prompt)
    else:
        ids = tokenizer.build_chat_input(req.messages)
        if not req.special:
            ids = ids[:-1]  # without the closing <|assistant|>
    return {"count": len(ids), "max_model_len": context, "tokens": ids,
            "token_strs": [tokenizer.piece(i) for i in ids] if req.token_strs else None}


def parse_detokenize(body: dict, served: str, vocab_size: int) -> list[int]:
    _model(body, served)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise bad("tokens: required, a list of token ids" if tokens is None else
                  f"tokens: expected a list of token ids, got {_describe(tokens)}", "tokens")
    for i, t in enumerate(tokens):
        if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size):
            raise bad(f"tokens[{i}]: expected a token id from 0 to {vocab_size - 1}, got "
                      f"{_describe(t)}", "tokens")
    return tokens


def tokenizer_info(tokenizer, context: int) -> dict[str, Any]:
    """The body of GET /tokenizer_info."""
    return {"tokenizer_class": "ChatGLMTokenizer", "model_max_length": context,
            "vocab_size": tokenizer.vocab_size, "eos_token": tokenizer.piece(tokenizer.eos_id),
            "bos_token": None, "pad_token": None,
            "prefix_tokens": [tokenizer.piece(i) for i in tokenizer.prefix_ids],
            "stop_tokens": sorted(tokenizer.piece(i) for i in tokenizer.stop_ids)}

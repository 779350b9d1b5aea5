"""OpenAI request bodies -> our types, checked field by field (no torch, no web framework).

Every bad value raises ApiError naming the field (`param`) and the limit; the sampling limits
are chatglm3/params.py's, the same the CLI and the Cog predictor apply. Unknown fields are
ignored, as OpenAI does; known fields we cannot honour (tools, images, ...) are refused in
words rather than silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..text.messages import MAX_HISTORY_DEPTH, _json_text_depth, _json_type, check_order, check_text
from ..params import BY_NAME, FIELDS, MAX_LOGPROBS, MAX_SEED, SamplingParams, SettingsError
from ..text.tokenizer import Message
from .errors import ApiError, _describe, bad
from .structured import parse_structured

# A body that could hold any conversation the 32k context fits: 524,288 characters of text at
# most (32,768 tokens of at most 16 characters), 12 JSON bytes per character in the worst escape
# (messages.MAX_HISTORY_CHARS has the arithmetic): 6 MiB, plus room for keys and whitespace.
MAX_BODY_BYTES = 8 * 2**20
MAX_N = 16  # choices per request (each one a request in the batch)
DEFAULT_MODEL_NAME = "chatglm3-6b-32k"


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object: UTF-8, nesting bounded before parsing (json.loads recurses
    per level), an object at the top."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"body: not UTF-8 ({e.reason} at byte {e.start})") from None
    if _json_text_depth(text) > MAX_HISTORY_DEPTH:
        raise bad(f"body: JSON nested more than {MAX_HISTORY_DEPTH} levels deep, the limit")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(
            e, json.JSONDecodeError) else ""
        raise bad(f"body: not valid JSON{where}") from None
    if not isinstance(data, dict):
        raise bad(f"body: expected a JSON object, got {_json_type(data)}")
    return data


# ---- field readers: None (or absent) is the default, as OpenAI treats null ----

def _field(body: dict, name: str, check, expected: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise bad(f"{name}: expected {expected}, got {_describe(value)}", name)
    return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return _number(v) and float(v).is_integer()


def _boolean(v: Any) -> bool:
    return isinstance(v, bool)


def _string(v: Any) -> bool:
    return isinstance(v, str)


def _object(v: Any) -> bool:
    return isinstance(v, dict)


def _list(v: Any) -> bool:
    return isinstance(v, list)


@dataclass
class Options:
    """What every generating endpoint takes besides its input."""

    model: str
    params: list[SamplingParams]  # one per choice (its own seed)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # alternatives per token; None = no logprobs
    # vLLM's prompt_logprobs extension: alternatives per prompt token in the answer's own
    # prompt_logprobs field; None = not asked (echo's logprobs are another matter)
    prompt_logprobs: int | None = None
    structured_field: str = "response_format"  # where the answer's constraint came from
    token_ids: bool = False  # vLLM's return_token_ids: the prompt's and each answer's ids


@dataclass
class ChatRequest(Options):
    messages: list[Message] = field(default_factory=list)
    # vLLM's: False leaves the closing <|assistant|> out (continue_final_message: the last
    # assistant message is continued, not answered)
    add_generation_prompt: bool = True


@dataclass
class CompletionRequest(Options):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False


def check_model(body: dict, served: str) -> str:
    model = body.get("model")
    if model is None:  # OpenAI requires it; vLLM, like this server, takes the one it serves
        return served
    if not isinstance(model, str):
        raise bad(f"model: expected a string, got {_describe(model)}", "model")
    if model != served:
        raise ApiError(404, f"model: {model[:100]!r} is not served here; this server serves "
                            f"{served!r}", "model", "model_not_found")
    return model


def _options(body: dict, served: str, logprobs: int | None,
             scored: int | None = None) -> Options:
    """The shared fields: model, n, stream, sampling (one SamplingParams per choice).
    `scored`: alternatives per prompt token the route needs scored itself (completions' echo
    with logprobs), beside what vLLM's prompt_logprobs asks for (the engine computes the
    larger count; each layout is cut to its own)."""
    model = check_model(body, served)
    n = int(_field(body, "n", _integer, f"an integer from 1 to {MAX_N}", 1))
    if not 1 <= n <= MAX_N:
        raise bad(f"n: must be from 1 to {MAX_N} (choices per request), got {n}", "n")
    stream = _field(body, "stream", _boolean, "true or false", False)
    stream_options = _field(body, "stream_options", _object, "an object", {})
    include_usage = _field(stream_options, "include_usage", _boolean, "true or false", False)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad(f"stop: expected a string or a list of strings, got {_describe(stop)}", "stop")
    _field(body, "user", _string, "a string")  # an end-user id for OpenAI's abuse checks
    seed = _field(body, "seed", _integer, "an integer")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise bad(f"seed: expected a 64-bit integer, got {_describe(seed)}", "seed")
    values, names = _sampling_values(body)
    values.update(_token_settings(body))
    values["structured"], names["structured"] = parse_structured(body)
    asked = values.get("prompt_logprobs")
    if asked is not None and (message := BY_NAME["prompt_logprobs"].error(asked)):
        raise bad(message, "prompt_logprobs")  # before it is compared with `scored`
    if asked is not None and stream:
        raise bad("prompt_logprobs: not available with stream (as in vLLM); completions stream "
                  "the prompt's log-probabilities with echo and logprobs", "prompt_logprobs")
    if scored is not None:
        values["prompt_logprobs"] = scored if asked is None else max(scored, asked)
    params = []
    for i in range(n):
        # OpenAI takes any 64-bit seed; the engine's are 0..MAX_SEED. Choice i with seed s
        # draws from (s + i) mod (MAX_SEED + 1): reproducible, and the choices differ (seeds
        # 0..MAX_SEED map to themselves).
        choice_seed = None if seed is None else (int(seed) + i) % (MAX_SEED + 1)
        try:
            params.append(SamplingParams(**values, seed=choice_seed, stop=stop,
                                         logprobs=logprobs))
        except SettingsError as e:
            raise bad(e.renamed(names), names.get(e.field, e.field)) from None
    return Options(model, params, stream, include_usage, logprobs,
                   None if asked is None else int(asked),  # (checked by SamplingParams)
                   names["structured"],
                   _field(body, "return_token_ids", _boolean, "true or false", False))


def _token_settings(body: dict) -> dict[str, Any]:
    """OpenAI's logit_bias ({"token id": bias}; JSON keys are strings) and vLLM's
    stop_token_ids, allowed_token_ids and ignore_eos, as SamplingParams takes them (it
    checks the values)."""
    out: dict[str, Any] = {}
    bias = _field(body, "logit_bias", _object, "an object mapping token ids to numbers")
    if bias:
        entries = []
        for key, value in bias.items():
            if not (isinstance(key, str) and key.isdigit() and key.isascii()):
                raise bad(f"logit_bias: keys must be token ids, got {key[:50]!r}", "logit_bias")
            if not _number(value):
                raise bad(f"logit_bias[{key}]: expected a number, got {_describe(value)}",
                          "logit_bias")
            entries.append((int(key), value))
        out["logit_bias"] = tuple(entries)
    for name in ("stop_token_ids", "allowed_token_ids"):
        ids = _field(body, name, _list, "a list of token ids")
        if ids:
            if not all(_token_id(t) for t in ids):
                raise bad(f"{name}: expected a list of token ids (integers >= 0)", name)
            out[name] = tuple(int(t) for t in ids)
    out["ignore_eos"] = _field(body, "ignore_eos", _boolean, "true or false", False)
    return out


def _sampling_values(body: dict) -> tuple[dict[str, Any], dict[str, str]]:
    """The numeric sampling settings a body sets (params.FIELDS with API names; absent or null
    = the default, as OpenAI takes it), and the API name each was read under."""
    values: dict[str, Any] = {}
    names = {"stop_sequences": "stop"}
    for f in FIELDS:
        for name in f.api_names:
            value = body.get(name)
            if value is None:
                continue
            if not _number(value):
                raise bad(f"{name}: expected a number, got {_describe(value)}", name)
            values[f.name], names[f.name] = value, name
            break
    return values, names


_REFUSED = {
    "tools": "the 32k model does not do tool calls (ChatGLM3-6B-32K has no tool calling)",
    "functions": "the 32k model does not do function calls (ChatGLM3-6B-32K has no tool "
                 "calling)",
    "tool_choice": "the 32k model does not do tool calls",
    "function_call": "the 32k model does not do function calls",
    "audio": "this model takes and writes text only",
    "prediction": "not supported by this server",
}


def _refuse_unsupported(body: dict) -> None:
    for name, why in _REFUSED.items():
        value = body.get(name)
        if value not in (None, [], {}, "none", "auto"):
            raise bad(f"{name}: {why}", name)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad("modalities: this model takes and writes text only", "modalities")


def parse_chat(body: dict, served: str) -> ChatRequest:
    """A /v1/chat/completions body."""
    _refuse_unsupported(body)
    want = _field(body, "logprobs", _boolean, "true or false", False)
    top = _field(body, "top_logprobs", _integer, f"an integer from 0 to {MAX_LOGPROBS}")
    if top is not None:
        if not want:
            raise bad("top_logprobs: needs logprobs set to true", "top_logprobs")
        if not 0 <= top <= MAX_LOGPROBS:
            raise bad(f"top_logprobs: must be from 0 to {MAX_LOGPROBS}, got {top}",
                      "top_logprobs")
    options = _options(body, served, int(top or 0) if want else None)
    messages = parse_messages(body.get("messages"))
    keep_going = _field(body, "continue_final_message", _boolean, "true or false", False)
    generation_prompt = _field(body, "add_generation_prompt", _boolean, "true or false",
                               not keep_going)
    if keep_going and generation_prompt:
        raise bad("continue_final_message: cannot be true with add_generation_prompt true (it "
                  "continues the last message instead of starting an answer)",
                  "continue_final_message")
    if keep_going and messages[-1].role != "assistant":
        raise bad(f"continue_final_message: the last message must be the assistant's (the text "
                  f"to continue), got {messages[-1].role!r}", "continue_final_message")
    return ChatRequest(**vars(options), messages=messages, add_generation_prompt=generation_prompt)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(messages: Any) -> list[Message]:
    """OpenAI's messages -> ours: system (or developer), user and assistant turns; content a
    string or a list of text parts. After a last assistant message the model answers with a
    new assistant turn, as OpenAI and vLLM do."""
    if not isinstance(messages, list):
        raise bad("messages: required, a list of {\"role\", \"content\"} objects"
                  if messages is None else
                  f"messages: expected a list, got {_describe(messages)}", "messages")
    if not messages:
        raise bad("messages: empty; at least one user message is needed", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where}: expected an object with role and content, got "
                      f"{_describe(m)}", "messages")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise bad(f"{where}: the 32k model does not do tool calls (no tool or function "
                      "messages)", "messages")
        if role not in ROLES:
            raise bad(f"{where}.role: expected system, user or assistant, got "
                      f"{_describe(role)}", "messages")
        content = _content(m.get("content"), where, role)
        check_text_param(f"{where}.content", content)
        out.append(Message(ROLES[role], content))  # type: ignore[arg-type]
    if out[-1].role == "system":  # named as sent (a developer message is a system turn here)
        raise bad(f"messages: the last message must be the user's or the assistant's, got "
                  f"{messages[-1]['role']!r}", "messages")
    try:
        check_order(out, where="messages")
    except ValueError as e:
        raise bad(str(e), "messages") from None
    return out


def _content(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise bad(f"{where}.content: expected a string or a list of text parts, got "
                  f"{_describe(content)}", "messages")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            if kind in ("image_url", "input_audio", "file", "image", "audio"):
                raise bad(f"{where}.content[{j}]: this model takes text only, got a {kind} "
                          "part", "messages")
            raise bad(f"{where}.content[{j}]: expected {{\"type\": \"text\", \"text\": ...}}",
                      "messages")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad(f"{where}.content[{j}].text: expected a string, got {_describe(text)}",
                      "messages")
        texts.append(text)
    return "".join(texts)


def check_text_param(where: str, text: str) -> None:
    try:
        check_text(where, text)
    except ValueError as e:
        raise bad(str(e), where.split("[")[0].split(".")[0]) from None


def parse_completion(body: dict, served: str) -> CompletionRequest:
    """A /v1/completions body: prompt a string, a list of strings, a list of token ids or a
    list of such lists; `logprobs` an integer (alternatives per token)."""
    for name in ("suffix",):
        if body.get(name) is not None:
            raise bad(f"{name}: not supported by this model", name)
    logprobs = _field(body, "logprobs", _integer, f"an integer from 0 to {MAX_LOGPROBS}")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs: must be from 0 to {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    echo = _field(body, "echo", _boolean, "true or false", False)
    # echo with logprobs: the prompt's tokens come first in them, scored; echo with max_tokens
    # 0: the prompt alone, the engine's "score only" request (OpenAI allows both).
    scores_only = any(body.get(name) == 0 for name in BY_NAME["max_tokens"].api_names)
    scored = None
    if echo and (logprobs is not None or scores_only):
        scored = 0 if logprobs is None else int(logprobs)
    options = _options(body, served, None if logprobs is None else int(logprobs), scored)
    best_of = _field(body, "best_of", _integer, "an integer")
    if best_of is not None and best_of != len(options.params):
        raise bad("best_of: only equal to n (this server returns every choice it makes)",
                  "best_of")
    prompt = body.get("prompt")
    if prompt is None or prompt == []:  # OpenAI's description requires it, and non-empty
        raise bad("prompt: required, a string, a list of strings, a list of token ids or a "
                  "list of such lists" if prompt is None else
                  "prompt: empty; give a string or at least one token id", "prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_token_id(t) for t in prompt):
        prompts = [[int(t) for t in prompt]]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(_token_id(t) for t in p) for p in prompt):
        prompts = [[int(t) for t in p] for p in prompt]
    else:
        raise bad("prompt: expected a string, a list of strings, a list of token ids or a "
                  f"list of such lists, got {_describe(prompt)}", "prompt")
    if len(prompts) * len(options.params) > MAX_N:
        raise bad(f"prompt: {len(prompts)} prompts x n={len(options.params)} choices is over "
                  f"{MAX_N} completions per request", "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_text_param(f"prompt[{i}]", p)
    return CompletionRequest(**vars(options), prompts=prompts, echo=echo)


def _token_id(t: Any) -> bool:
    return _integer(t) and t >= 0

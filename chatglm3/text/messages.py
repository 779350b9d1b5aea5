"""Turning user input (prompt, system prompt, JSON history) into validated chat messages."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..errors import HistoryError, check_text
from .tokenizer import ROLES, Message

MESSAGE_KEYS = {"role", "content", "metadata", "tools"}

# A valid history is a list of objects or pairs (depth 2); only a system message's `tools` can
# nest further, and real tool schemas stay far below this. The limit is checked before
# json.loads, so hostile nesting never reaches Python's recursion limit.
MAX_HISTORY_DEPTH = 32

# Longest history JSON text accepted. The context holds 32,768 tokens and no token covers more
# than 16 characters, so at most 524,288 characters of text can fit; JSON escaping spends at
# most 12 characters on one (an astral character as "\ud83d\ude00"): 6,291,456. Each message
# also costs at least 2 tokens (its role token and the metadata line), worth up to 384 JSON
# characters of content, which pays for its keys, quotes and commas. 8 MiB leaves ~2 MiB more
# for pretty-printing, so every history that could fit the context is accepted.
MAX_HISTORY_CHARS = 8 * 2**20

# Bytes -> nesting step: +1 for "[" and "{", -1 (255 as int8) for "]" and "}", 0 otherwise.
_BRACKET_STEPS = bytes(
    {ord("["): 1, ord("{"): 1, ord("]"): 255, ord("}"): 255}.get(b, 0) for b in range(256)
)


def parse_history(history: str | list | None) -> list[Message]:
    """Parses history given as JSON text or an already-decoded list.

    Two forms are accepted, item by item: `{"role", "content", "metadata"?, "tools"?}` and the
    older `["question", "answer"]` pair, which stands for a user turn and an assistant turn.
    """
    if history is None:
        return []
    if isinstance(history, str):
        if len(history) > MAX_HISTORY_CHARS:
            raise HistoryError(
                f"history: {len(history):,} characters of JSON, over the limit of "
                f"{MAX_HISTORY_CHARS:,}; no history that long fits the model's context"
            )
        if not history.strip():
            return []
        if _json_text_depth(history) > MAX_HISTORY_DEPTH:
            raise _too_deep()
        try:
            history = json.loads(history)
        except json.JSONDecodeError as e:
            raise HistoryError(
                f"history: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                'expected a JSON list like [{"role": "user", "content": "..."}]'
            ) from None
    elif isinstance(history, list):
        _check_decoded_depth(history)
    if not isinstance(history, list):
        raise HistoryError(
            f"history: expected a JSON list of messages, got {_json_type(history)}"
        )
    messages: list[Message] = []
    for i, item in enumerate(history):
        if isinstance(item, dict):
            messages.append(_parse_message(i, item))
        elif isinstance(item, list):
            messages.extend(_parse_pair(i, item))
        else:
            raise HistoryError(
                f"history[{i}]: expected an object with role and content, or a "
                f'["question", "answer"] pair, got {_json_type(item)}'
            )
    check_order(messages, where="history")
    return messages


def build_messages(
    prompt: str,
    system_prompt: str | None = None,
    history: str | list | None = None,
    role: str = "user",
) -> list[Message]:
    """The whole conversation: optional system prompt, the history, then the new turn."""
    if not isinstance(prompt, str):
        raise HistoryError(f"prompt: expected a string, got {_json_type(prompt)}")
    check_text("prompt", prompt)
    if system_prompt:
        if not isinstance(system_prompt, str):
            raise HistoryError(
                f"system_prompt: expected a string, got {_json_type(system_prompt)}"
            )
        check_text("system_prompt", system_prompt)
    if role not in ROLES or role in ("system", "assistant"):
        raise HistoryError(f"role: expected user or observation for the new turn, got {role!r}")
    messages = parse_history(history)
    if not prompt.strip() and not any(m.role != "system" for m in messages):
        # an answer to nothing: refused (the OpenAI API, as OpenAI, takes empty content)
        raise HistoryError("prompt: empty; write a message (an empty one is only taken after "
                           "earlier turns in history)")
    if system_prompt:
        if messages and messages[0].role == "system":
            raise HistoryError(
                "system_prompt: history already starts with a system message; give one or the other"
            )
        messages.insert(0, Message("system", system_prompt))
    messages.append(Message(role, prompt))  # type: ignore[arg-type]
    return messages


def check_order(messages: list[Message], where: str = "history") -> None:
    """A system message may only open the conversation."""
    for i, m in enumerate(messages):
        if m.role == "system" and i > 0:
            raise HistoryError(
                f"{where}[{i}]: a system message may only be the first message"
            )


def _parse_message(i: int, item: dict[str, Any]) -> Message:
    unknown = sorted(set(item) - MESSAGE_KEYS)
    if unknown:
        raise HistoryError(
            f"history[{i}]: unknown key(s) {', '.join(map(repr, unknown))}; "
            "expected role, content and optionally metadata"
        )
    role = item.get("role")
    if role not in ROLES:
        raise HistoryError(
            f"history[{i}].role: expected one of {', '.join(ROLES)}, got "
            + (repr(role) if isinstance(role, str) else _json_type(role))
        )
    if "content" not in item:
        raise HistoryError(f"history[{i}]: missing content")
    content = item["content"]
    if not isinstance(content, str):
        raise HistoryError(f"history[{i}].content: expected a string, got {_json_type(content)}")
    metadata = item.get("metadata", "")
    if metadata is None:
        metadata = ""
    if not isinstance(metadata, str):
        raise HistoryError(f"history[{i}].metadata: expected a string, got {_json_type(metadata)}")
    tools = item.get("tools")
    if tools is not None and role != "system":
        raise HistoryError(f"history[{i}].tools: only a system message may carry tools")
    check_text(f"history[{i}].content", content)
    check_text(f"history[{i}].metadata", metadata)
    if tools is not None:
        _check_tools_text(f"history[{i}].tools", tools)
    return Message(role, content, metadata, tools)


def _parse_pair(i: int, item: list) -> list[Message]:
    if len(item) != 2 or not all(isinstance(x, str) for x in item):
        raise HistoryError(
            f'history[{i}]: a pair must be ["question", "answer"] with two strings, got '
            + json.dumps(item, ensure_ascii=False)[:80]
        )
    check_text(f"history[{i}][0]", item[0])
    check_text(f"history[{i}][1]", item[1])
    return [Message("user", item[0]), Message("assistant", item[1])]


def _check_tools_text(field: str, tools: Any) -> None:
    """Every string in `tools`, keys included, is tokenized as part of the system message."""
    stack = [tools]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            check_text(field, node)
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _json_text_depth(text: str) -> int:
    """Deepest nesting of lists and objects in JSON text, without parsing it; linear, C speed.

    Reads strings and escapes as json.loads does up to the first syntax error, where json.loads
    stops; so json.loads never recurses deeper than the depth returned.
    """
    if text.count("[") + text.count("{") <= MAX_HISTORY_DEPTH:
        return 0  # too few brackets to matter: the common case costs two counts
    # Drop escapes that could hide a quote: runs of backslashes pair up from their start, as
    # in a JSON string; outside strings a backslash is an error where json.loads stops anyway.
    text = text.replace("\\\\", "").replace('\\"', "")
    # Every other piece between quotes is string content (an unterminated string runs to the
    # end); brackets in there do not nest.
    outside = "".join(text.split('"')[::2])
    steps = np.frombuffer(outside.encode("ascii", "replace").translate(_BRACKET_STEPS), np.int8)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def _check_decoded_depth(history: list) -> None:
    """The depth limit for an already-decoded history, walked without recursion."""
    stack: list[tuple[Any, int]] = [(history, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_HISTORY_DEPTH:
            raise _too_deep()  # also ends a list that contains itself
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, tuple, dict)))


def _too_deep() -> HistoryError:
    return HistoryError(
        f"history: too deeply nested (more than {MAX_HISTORY_DEPTH} levels of lists and "
        "objects, the limit); expected a list of messages"
    )


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_stop_sequences(text: str) -> list[str]:
    """'a,b\\,c' -> ['a', 'b,c']. Commas split; backslash escapes: \\, \\n \\t \\\\.

    A backslash before any other character is kept as is; empty items are dropped.
    """
    escapes = {",": ",", "n": "\n", "t": "\t", "\\": "\\"}
    items, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in escapes:
            cur.append(escapes[text[i + 1]])
            i += 2
            continue
        if ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return [s for s in items if s]

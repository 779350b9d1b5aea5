"""Turning user input (prompt, system prompt, JSON history) into validated chat messages."""

from __future__ import annotations

import json
from typing import Any

from .tokenizer import ROLES, Message

MESSAGE_KEYS = {"role", "content", "metadata", "tools"}


class HistoryError(ValueError):
    """Bad chat history; the message names the offending item and what was expected."""


def parse_history(history: str | list | None) -> list[Message]:
    """Parses history given as JSON text or an already-decoded list.

    Two forms are accepted, item by item: `{"role", "content", "metadata"?, "tools"?}` and the
    older `["question", "answer"]` pair, which stands for a user turn and an assistant turn.
    """
    if history is None:
        return []
    if isinstance(history, str):
        if not history.strip():
            return []
        try:
            history = json.loads(history)
        except json.JSONDecodeError as e:
            raise HistoryError(
                f"history: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                'expected a JSON list like [{"role": "user", "content": "..."}]'
            ) from None
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
    if role not in ROLES or role in ("system", "assistant"):
        raise HistoryError(f"role: expected user or observation for the new turn, got {role!r}")
    messages = parse_history(history)
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
    return Message(role, content, metadata, tools)


def _parse_pair(i: int, item: list) -> list[Message]:
    if len(item) != 2 or not all(isinstance(x, str) for x in item):
        raise HistoryError(
            f'history[{i}]: a pair must be ["question", "answer"] with two strings, got '
            + json.dumps(item, ensure_ascii=False)[:80]
        )
    return [Message("user", item[0]), Message("assistant", item[1])]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)

"""Every kind of bad history gets a clear error naming the item and what was expected."""

from __future__ import annotations

import pytest

from chatglm3.text.messages import HistoryError, build_messages, parse_history


@pytest.mark.parametrize(
    ("history", "fragments"),
    [
        ("[{'role': 'user'}]", ["history", "not valid JSON"]),
        ("{not json", ["history", "not valid JSON"]),
        ('{"role": "user", "content": "x"}', ["history", "list", "an object"]),
        ('"just text"', ["history", "list", "a string"]),
        ("[42]", ["history[0]", "a number"]),
        ('[{"role": "bot", "content": "x"}]', ["history[0].role", "'bot'", "user", "observation"]),
        ('[{"content": "x"}]', ["history[0].role", "null"]),
        ('[{"role": "user"}]', ["history[0]", "missing content"]),
        ('[{"role": "user", "content": 5}]', ["history[0].content", "string", "a number"]),
        ('[{"role": "user", "content": null}]', ["history[0].content", "null"]),
        ('[{"role": "user", "content": ["a"]}]', ["history[0].content", "a list"]),
        ('[{"role": "user", "content": "a", "metadata": 3}]', ["history[0].metadata", "string"]),
        ('[{"role": "user", "contnet": "a"}]', ["history[0]", "'contnet'"]),
        ('[{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]',
         ["history[1]", "system", "first"]),
        ('[["only one"]]', ["history[0]", "pair"]),
        ('[["q", 3]]', ["history[0]", "pair"]),
        ('[{"role": "user", "content": "a", "tools": []}]', ["history[0].tools", "system"]),
        ("[" * 100_000, ["history", "too deeply nested", "32"]),
        ('[["q", "\\ud800"]]', ["history[0][1]", "not valid Unicode", "U+D800"]),
    ],
)
def test_bad_history(history: str, fragments: list[str]) -> None:
    with pytest.raises(HistoryError) as info:
        parse_history(history)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_empty_history_forms() -> None:
    assert parse_history(None) == parse_history("") == parse_history("  ") == parse_history("[]") == []


def test_system_prompt_conflicts_with_history_system() -> None:
    with pytest.raises(HistoryError, match="system_prompt"):
        build_messages("q", system_prompt="a", history='[{"role": "system", "content": "b"}]')


def test_new_turn_role_and_type() -> None:
    with pytest.raises(HistoryError, match="role"):
        build_messages("q", role="assistant")
    with pytest.raises(HistoryError, match="prompt"):
        build_messages(None)  # type: ignore[arg-type]

"""Hostile input to the message builder: deep nesting, huge history, text that is not Unicode."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatglm3.text.messages import (
    MAX_HISTORY_CHARS, MAX_HISTORY_DEPTH, HistoryError, build_messages, check_text, parse_history,
)
from chatglm3.text.tokenizer import ChatGLMTokenizer, Message

DEEP = 100_000


def _system_with_tools(tools: str) -> str:
    """History JSON whose depth is 3 + the depth of `tools` (list, message object, tools)."""
    return f'[{{"role": "system", "content": "s", "tools": [{tools}]}}]'


def _nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- nesting depth ------------------------------------------------------------------------


@pytest.mark.parametrize("history", [
    "[" * DEEP + "]" * DEEP,
    "[" * DEEP,  # never closed
    '{"a": ' * DEEP + "1" + "}" * DEEP,
    "[" + '{"a": [' * DEEP,
    _system_with_tools(_nested_lists(DEEP)),
], ids=["lists", "unclosed", "objects", "mixed", "in-tools"])
def test_deep_json_is_a_history_error(history: str) -> None:
    # Before the check this was RecursionError "while decoding a JSON array", naming nothing.
    with pytest.raises(HistoryError) as info:
        parse_history(history)
    message = str(info.value)
    assert message.startswith("history: too deeply nested"), message
    assert str(MAX_HISTORY_DEPTH) in message


def test_deep_json_does_not_depend_on_the_recursion_limit() -> None:
    # With a generous limit json.loads would decode this nesting (deeper would overflow the C
    # stack), so only a check of its own catches it.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        with pytest.raises(HistoryError, match="too deeply nested"):
            parse_history(_nested_lists(5_000))
    finally:
        sys.setrecursionlimit(limit)


def test_depth_limit_is_exact() -> None:
    at_limit = _system_with_tools(_nested_lists(MAX_HISTORY_DEPTH - 3))
    messages = parse_history(at_limit)
    assert messages[0].tools == json.loads(at_limit)[0]["tools"]
    with pytest.raises(HistoryError, match="too deeply nested"):
        parse_history(_system_with_tools(_nested_lists(MAX_HISTORY_DEPTH - 2)))
    # Objects count as levels too.
    objects = '{"a": ' * (MAX_HISTORY_DEPTH - 3) + "1" + "}" * (MAX_HISTORY_DEPTH - 3)
    assert parse_history(_system_with_tools(objects))
    with pytest.raises(HistoryError, match="too deeply nested"):
        parse_history(_system_with_tools('{"a": ' + objects + "}"))


def test_depth_limit_on_decoded_history() -> None:
    at_limit = json.loads(_system_with_tools(_nested_lists(MAX_HISTORY_DEPTH - 3)))
    assert parse_history(at_limit)[0].tools == at_limit[0]["tools"]
    over = json.loads(_system_with_tools(_nested_lists(MAX_HISTORY_DEPTH - 2)))
    with pytest.raises(HistoryError, match="too deeply nested"):
        parse_history(over)

    deep: list = []
    for _ in range(DEEP):  # built in a loop: json.loads would itself hit the recursion limit
        deep = [deep]
    with pytest.raises(HistoryError, match="too deeply nested"):
        parse_history(deep)
    looped: list = [["q", "a"]]
    looped.append(looped)  # a list that contains itself is infinitely deep
    with pytest.raises(HistoryError, match="too deeply nested"):
        parse_history(looped)


@pytest.mark.parametrize("content", [
    "[" * 10_000 + "]",
    "{" * 10_000,
    '"[' * 10_000,  # escaped quotes must not end the string
    "\\[" * 10_000,  # nor backslashes start an escape of the closing quote
    '\\"{' * 10_000,
    "\\" * 9_999 + '"' + "[" * 10_000,
], ids=["lists", "objects", "quotes", "backslashes", "escaped-quotes", "odd-backslashes"])
def test_brackets_inside_strings_do_not_nest(content: str) -> None:
    history = json.dumps([{"role": "user", "content": content, "metadata": content},
                          [content, content]])
    messages = parse_history(history)
    assert [m.content for m in messages] == [content] * 3
    assert messages[0].metadata == content


def test_brackets_in_keys_and_tools_strings_do_not_nest() -> None:
    tools = [{"[" * 1000: "{" * 1000, "name": "]" * 1000}]
    history = json.dumps([{"role": "system", "content": "s", "tools": tools}])
    assert parse_history(history)[0].tools == tools


@pytest.mark.parametrize("history", [
    '[{"role": "user", "content": "abc' + "[" * DEEP,
    '["' + '\\"[' * DEEP,
    '["' + "\\" * (DEEP + 1),
    '[{"role": "user", "content": "a\\',
], ids=["brackets", "escaped-quotes", "backslashes", "trailing-backslash"])
def test_unterminated_string(history: str) -> None:
    with pytest.raises(HistoryError, match="history: not valid JSON"):
        parse_history(history)


# --- size -----------------------------------------------------------------------------------


def test_size_cap_names_history_its_length_and_the_limit() -> None:
    history = json.dumps([{"role": "user", "content": "x" * MAX_HISTORY_CHARS}])
    with pytest.raises(HistoryError) as info:
        parse_history(history)
    message = str(info.value)
    assert message.startswith("history: "), message
    assert f"{len(history):,}" in message and f"{MAX_HISTORY_CHARS:,}" in message
    with pytest.raises(HistoryError, match="over the limit"):
        parse_history(" " * (MAX_HISTORY_CHARS + 1))


def test_history_just_under_the_cap_is_accepted() -> None:
    overhead = len(json.dumps([{"role": "user", "content": ""}]))
    content = "[x] " * ((MAX_HISTORY_CHARS - overhead) // 4)
    history = json.dumps([{"role": "user", "content": content}])
    assert MAX_HISTORY_CHARS - 4 < len(history) <= MAX_HISTORY_CHARS
    assert parse_history(history)[0].content == content


def test_cap_admits_the_longest_text_the_context_can_hold() -> None:
    # 32,768 tokens of at most 16 characters each, every one an astral character that JSON
    # escapes to 12 characters ("\ud83d\ude00").
    text = "\U0001F600" * (32_768 * 16)
    history = json.dumps([{"role": "user", "content": text}])
    assert len(history) > 12 * len(text)
    assert parse_history(history)[0].content == text


@pytest.mark.parametrize("history", [
    "[" * MAX_HISTORY_CHARS,
    "[" * (MAX_HISTORY_CHARS // 2) + "]" * (MAX_HISTORY_CHARS // 2),
    '["' + '", "' * (MAX_HISTORY_CHARS // 4 - 1) + '"' + "[" * 100,
    '""' * (MAX_HISTORY_CHARS // 4) + "[" * (MAX_HISTORY_CHARS // 2),
    '"' + "\\" * (MAX_HISTORY_CHARS // 2) + '"' + "[" * (MAX_HISTORY_CHARS // 2 - 2),
    "é[" * (MAX_HISTORY_CHARS // 2),
    "[" * (MAX_HISTORY_CHARS + 1),  # the size cap, before any scan
], ids=["open", "pairs", "strings", "empty-strings", "backslashes", "non-ascii", "over-cap"])
def test_rejecting_8_mb_is_fast(history: str) -> None:
    """Linear work: ~0.1 s on a quiet 2-core machine. The bound is loose on purpose (a loaded CI
    machine took 1.07 s): it catches quadratic or recursive scans (hours for 8 MB), not speed,
    which bench/ measures."""
    start = time.perf_counter()
    with pytest.raises(HistoryError, match="^history: "):
        parse_history(history)
    assert time.perf_counter() - start < 10.0


# --- text that is not Unicode ---------------------------------------------------------------


def test_check_text() -> None:
    check_text("prompt", "fine 😀 text")
    with pytest.raises(HistoryError) as info:
        check_text("prompt", "hello\ud800")
    assert str(info.value) == (
        "prompt: not valid Unicode text (lone surrogate U+D800 at character 5); send UTF-8 text")


def _history(item: object) -> str:
    """JSON history with `item` at index 3, after three good messages."""
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, ["c", "d"]]
    return json.dumps(good + [item])


@pytest.mark.parametrize(("history", "field"), [
    (_history({"role": "user", "content": "x\ud800"}), "history[3].content"),
    (_history({"role": "user", "content": "x", "metadata": "\udfff"}), "history[3].metadata"),
    (_history(["\udc80", "ok"]), "history[3][0]"),
    (_history(["ok", "a\ud83d"]), "history[3][1]"),  # a high surrogate with no low one after
    (json.dumps([{"role": "system", "content": "s", "tools": [{"name": "f\ud800"}]}]),
     "history[0].tools"),
    (json.dumps([{"role": "system", "content": "s",
                  "tools": [{"parameters": {"pr\udc00op": {"type": "string"}}}]}]),
     "history[0].tools"),
], ids=["content", "metadata", "question", "answer", "tools-value", "tools-key"])
def test_lone_surrogate_names_the_field(history: str, field: str) -> None:
    assert "\\u" in history  # the surrogate arrives as a JSON escape, as over HTTP
    for given_history in (history, json.loads(history)):
        with pytest.raises(HistoryError) as info:
            parse_history(given_history)
        message = str(info.value)
        assert message.startswith(f"{field}: not valid Unicode text (lone surrogate U+"), message
        with pytest.raises(HistoryError, match=f"^{re.escape(field)}: "):
            build_messages("q", history=history)


def test_lone_surrogate_in_prompt_and_system_prompt() -> None:
    with pytest.raises(HistoryError, match=r"^prompt: .*U\+D800 at character 2\)"):
        build_messages("ab\ud800")
    with pytest.raises(HistoryError, match=r"^system_prompt: .*U\+DC00 at character 0\)"):
        build_messages("q", system_prompt="\udc00")
    with pytest.raises(HistoryError, match="^system_prompt: expected a string"):
        build_messages("q", system_prompt=["a"])  # type: ignore[arg-type]


def test_command_line_bytes_that_are_not_utf8() -> None:
    # Python decodes argv with surrogateescape: the byte 0xE9 becomes U+DCE9.
    arg = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(HistoryError, match=r"^prompt: .*U\+DCE9 at character 3\); send UTF-8"):
        build_messages(arg)
    with pytest.raises(HistoryError, match=r"^history\[0\]\.content: .*U\+DCE9"):
        build_messages("q", history=f'[{{"role": "user", "content": "{arg}"}}]')


def test_surrogate_pair_escape_is_one_character(tokenizer: ChatGLMTokenizer) -> None:
    messages = build_messages("q", history='[["\\ud83d\\ude00", "ok"]]')
    assert messages[0].content == "😀"
    assert tokenizer.build_chat_input(messages)


def test_lone_surrogate_used_to_crash_the_tokenizer(tokenizer: ChatGLMTokenizer) -> None:
    history = '[{"role": "user", "content": "\\ud800"}]'
    with pytest.raises(RuntimeError):  # what reached SentencePiece before the check
        tokenizer.build_chat_input([Message("user", json.loads(history)[0]["content"])])
    with pytest.raises(HistoryError, match=r"^history\[0\]\.content: not valid Unicode"):
        build_messages("q", history=history)


# Any character at all, with lone surrogates (and so also surrogate pairs) made common.
ANY_TEXT = st.text(st.one_of(
    st.characters(exclude_categories=()),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
), max_size=8)


@settings(max_examples=200, deadline=None)
@given(prompt=ANY_TEXT, system=ANY_TEXT, content=ANY_TEXT, metadata=ANY_TEXT, pair=ANY_TEXT,
       tool=ANY_TEXT, as_json=st.booleans(), system_in_history=st.booleans())
def test_what_passes_build_messages_tokenizes(
    tokenizer: ChatGLMTokenizer, prompt: str, system: str, content: str, metadata: str,
    pair: str, tool: str, as_json: bool, system_in_history: bool,
) -> None:
    history: list = [{"role": "user", "content": content, "metadata": metadata}, [pair, pair]]
    texts = [prompt, system, content, metadata, pair]
    if system_in_history:
        tools = [{tool: [tool], "x": {"y": tool}}]
        history.insert(0, {"role": "system", "content": system, "tools": tools})
        texts.append(tool)
    try:
        messages = build_messages(prompt, None if system_in_history else system,
                                  json.dumps(history) if as_json else history)
    except HistoryError as e:
        assert "not valid Unicode text" in str(e)
        assert not all(_is_unicode(t) for t in texts)
        return
    assert all(_is_unicode(t) for t in texts)
    assert tokenizer.build_chat_input(messages)  # never SentencePiece's RuntimeError


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

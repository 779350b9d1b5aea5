"""The OpenAI body reader alone (no server, no model): each choice's settings, the API's field
names in errors, and the refusals."""

from __future__ import annotations

import json

import pytest

from chatglm3.api.protocol import (MAX_N, ApiError, parse_chat, parse_completion, parse_json)
from chatglm3.params import MAX_SEED

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


def test_each_choice_gets_its_own_seed_wrapping_at_the_limit() -> None:
    assert [p.seed for p in parse_chat({**BASE, "n": 3, "seed": 7}, "m").params] == [7, 8, 9]
    assert [p.seed for p in parse_chat({**BASE, "n": 2, "seed": MAX_SEED}, "m").params] == [
        MAX_SEED, 0]
    assert [p.seed for p in parse_chat({**BASE, "n": 2}, "m").params] == [None, None]


def test_any_64_bit_seed_is_taken_and_reproducible() -> None:
    """OpenAI's seed is any 64-bit integer: mapped into the engine's range, the same each time."""
    for seed in (-1, -(2**63), 2**63 - 1, MAX_SEED + 5):
        got = [p.seed for p in parse_chat({**BASE, "n": 2, "seed": seed}, "m").params]
        assert got == [p.seed for p in parse_chat({**BASE, "n": 2, "seed": seed}, "m").params]
        assert all(0 <= s <= MAX_SEED for s in got) and got[0] != got[1]
    assert parse_chat({**BASE, "seed": -1}, "m").params[0].seed == MAX_SEED
    assert error(parse_chat, {**BASE, "seed": 2**63}, "m").param == "seed"


def test_errors_use_the_apis_field_names() -> None:
    e = error(parse_chat, {**BASE, "stop": ["x"] * 17}, "m")
    assert e.param == "stop" and "stop:" in e.message and "stop_sequences" not in e.message
    e = error(parse_chat, {**BASE, "max_completion_tokens": 0}, "m")
    assert e.param == "max_completion_tokens"
    e = error(parse_chat, {**BASE, "temperature": 6, "top_p": 2}, "m")
    assert e.param == "temperature" and "top_p" in e.message  # every bad field, the first named
    assert error(parse_chat, {**BASE, "n": MAX_N + 1}, "m").param == "n"
    assert error(parse_chat, {**BASE, "model": "other"}, "m").status == 404


def test_a_request_without_a_model_gets_the_served_one() -> None:
    """OpenAI requires `model`; vLLM takes the model it serves, and so does this server."""
    for parse, body in ((parse_chat, {"messages": BASE["messages"]}), (parse_completion, {"prompt": "x"})):
        assert parse(body, "served").model == "served"
        assert parse({**body, "model": None}, "served").model == "served"
        assert error(parse, {**body, "model": 5}, "served").param == "model"


def test_the_last_message_may_be_the_assistants_and_continued() -> None:
    """OpenAI and vLLM answer after a last assistant message; vLLM's continue_final_message
    (or add_generation_prompt false) continues it instead."""
    turns = BASE["messages"] + [{"role": "assistant", "content": "Sure, here"}]
    assert parse_chat({**BASE, "messages": turns}, "m").add_generation_prompt
    assert not parse_chat({**BASE, "messages": turns, "continue_final_message": True},
                          "m").add_generation_prompt
    assert not parse_chat({**BASE, "add_generation_prompt": False}, "m").add_generation_prompt
    e = error(parse_chat, {**BASE, "continue_final_message": True}, "m")
    assert e.param == "continue_final_message" and "assistant's" in e.message
    e = error(parse_chat, {**BASE, "messages": turns, "continue_final_message": True,
                           "add_generation_prompt": True}, "m")
    assert e.param == "continue_final_message"
    e = error(parse_chat, {**BASE, "messages": [{"role": "user", "content": "x"},
                                                {"role": "system", "content": "y"}]}, "m")
    assert e.param == "messages"
    assert error(parse_chat, {**BASE, "continue_final_message": "yes"}, "m").param == \
        "continue_final_message"
    assert error(parse_chat, {**BASE, "return_token_ids": "yes"}, "m").param == "return_token_ids"
    assert parse_completion({"prompt": "x", "return_token_ids": True}, "m").token_ids


@pytest.mark.parametrize("body, want", [
    ({"min_p": 0.1}, {"min_p": 0.1}), ({"min_p": 0}, {"min_p": 0.0}),
    ({"top_k": 40, "repetition_penalty": 1.1, "min_tokens": 3},
     {"top_k": 40, "repetition_penalty": 1.1, "min_tokens": 3}),
    ({"max_tokens": 9, "max_completion_tokens": 7}, {"max_tokens": 7}),
    ({"min_p": None, "top_k": None}, {"min_p": 0.0, "top_k": 0}),  # null = the default
])
def test_every_declared_sampling_field_is_read(body, want) -> None:
    for parse, base in ((parse_chat, BASE), (parse_completion, {"model": "m", "prompt": "x"})):
        params = parse({**base, **body}, "m").params[0]
        assert {k: getattr(params, k) for k in want} == want


@pytest.mark.parametrize("field, value", [("min_p", 1.5), ("min_p", -0.1), ("min_p", "0.1"),
                                          ("top_k", -1), ("frequency_penalty", 3)])
def test_bad_sampling_values_name_the_field(field, value) -> None:
    e = error(parse_chat, {**BASE, field: value}, "m")
    assert e.status == 400 and e.param == field and e.message.startswith(f"{field}: ")


@pytest.mark.parametrize("field, value, words", [
    ("tools", [{"type": "function"}], "tool calls"),
    ("function_call", {"name": "f"}, "function calls"),
])
def test_what_the_model_cannot_do_is_refused_in_words(field, value, words) -> None:
    e = error(parse_chat, {**BASE, field: value}, "m")
    assert e.status == 400 and e.param == field and words in e.message


def test_messages_roles_and_parts() -> None:
    req = parse_chat({**BASE, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}, {"role": "user", "content": "c"}]}, "m")
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "be brief"), ("user", "ab"), ("assistant", ""), ("user", "c")]
    assert "system message may only be the first" in error(parse_chat, {**BASE, "messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "b"},
        {"role": "user", "content": "c"}]}, "m").message


def test_completion_prompts_in_every_form() -> None:
    assert parse_completion({"model": "m", "prompt": "x"}, "m").prompts == ["x"]
    assert parse_completion({"model": "m", "prompt": [1, 2]}, "m").prompts == [[1, 2]]
    assert parse_completion({"model": "m", "prompt": [[1], [2, 3]]}, "m").prompts == [[1], [2, 3]]
    assert error(parse_completion, {"model": "m", "prompt": [1, "x"]}, "m").param == "prompt"
    assert error(parse_completion, {"model": "m", "prompt": ["a"] * 9, "n": 2}, "m").param == \
        "prompt"
    assert error(parse_completion, {"model": "m", "prompt": "x", "suffix": "y"}, "m").param == \
        "suffix"


def test_json_depth_is_checked_before_parsing() -> None:
    assert parse_json(json.dumps(BASE).encode()) == BASE
    assert "nested" in error(parse_json, b"[" * 10**6).message  # no RecursionError


def test_logit_bias_stop_token_ids_and_ignore_eos_are_read() -> None:
    body = {**BASE, "logit_bias": {"5": 2, "64000": -100.0}, "stop_token_ids": [7, 8],
            "ignore_eos": True, "allowed_token_ids": [3, 9]}
    for params in (parse_chat(body, "m").params[0],
                   parse_completion({**body, "prompt": "hi"}, "m").params[0]):
        assert params.logit_bias == ((5, 2.0), (64000, -100.0))
        assert params.stop_token_ids == (7, 8) and params.ignore_eos is True
        assert params.allowed_token_ids == (3, 9)
    plain = parse_chat(BASE, "m").params[0]
    assert plain.logit_bias == () and plain.stop_token_ids == () and plain.ignore_eos is False


@pytest.mark.parametrize("field, value, words", [
    ("logit_bias", {"x": 1}, "keys must be token ids"),
    ("logit_bias", {"-3": 1}, "keys must be token ids"),
    ("logit_bias", {"5": "big"}, "expected a number"),
    ("logit_bias", {"5": 100.5}, "must be from -100 to 100, got 100.5"),
    ("logit_bias", {str(i): 1 for i in range(301)}, "at most 300 tokens, got 301"),
    ("logit_bias", [1], "expected an object"),
    ("stop_token_ids", [1, "2"], "token ids"),
    ("stop_token_ids", list(range(17)), "at most 16"),
    ("ignore_eos", "yes", "true or false"),
    ("allowed_token_ids", [-1], "token ids"),
])
def test_bad_token_settings_name_the_field(field, value, words) -> None:
    e = error(parse_chat, {**BASE, field: value}, "m")
    assert e.status == 400 and e.param == field and words in e.message, e.message


@pytest.mark.parametrize("fields, want", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, ("json", '{"type": "object"}', ())),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer"}, "strict": True}}},
     ("json", '{"type": "integer"}', ())),
    ({"structured_outputs": {"json": {"type": "boolean"}}}, ("json", '{"type": "boolean"}', ())),
    ({"structured_outputs": {"regex": "[a-z]+"}}, ("regex", "[a-z]+", ())),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, ("choice", "", ("yes", "no"))),
    ({"structured_outputs": {"json_object": True}}, ("json", '{"type": "object"}', ())),
    ({"guided_choice": ["a"]}, ("choice", "", ("a",))),
])
def test_structured_output_fields_are_read(fields, want) -> None:
    for params in (parse_chat({**BASE, **fields}, "m").params[0],
                   parse_completion({**BASE, **fields, "prompt": "hi"}, "m").params[0]):
        got = params.structured
        assert (got if got is None else (got.kind, got.spec, got.choices)) == want


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "yaml"}}, "response_format", "type must be"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{"}}},
     "response_format", "not valid JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs", "not supported"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "at least one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "one way"),
])
def test_bad_structured_output_names_the_field(fields, param, words) -> None:
    e = error(parse_chat, {**BASE, **fields}, "m")
    assert e.status == 400 and e.param == param and words in e.message, e.message

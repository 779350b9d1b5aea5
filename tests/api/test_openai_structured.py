"""Structured output through `serve` (one server on the tiny checkpoint, fp32 CPU): the openai
SDK's `chat.completions.parse` with a pydantic model, `response_format` json_object and
json_schema on both routes, vLLM's `structured_outputs` (json, regex, choice), streaming, and
400s naming the field for what cannot be compiled. The weights are random: only the grammar
makes the answers parse."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import TINY_CKPT
from helpers.openaiserver import serve
from helpers.schemas import CORPUS

pytestmark = [pytest.mark.slow, pytest.mark.shared]

MODEL = "chatglm3-6b-32k"
MESSAGES = [{"role": "user", "content": "Revenue, net profit and the auditor, as JSON."}]


class Report(BaseModel):
    revenue: int = Field(ge=0, le=10**9)
    net_profit: int = Field(ge=-10**9, le=10**9)
    auditor: Literal["KPMG", "Deloitte", "EY", "PwC"]
    going_concern: bool


@pytest.fixture(scope="module")
def server():
    with serve("--max-batch", "4", weights=TINY_CKPT) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def test_the_sdks_parse_fills_a_pydantic_model(client) -> None:
    answer = client.chat.completions.parse(model=MODEL, messages=MESSAGES,
                                           response_format=Report, max_tokens=200,
                                           temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Report)
    assert choice.message.parsed == Report.model_validate_json(choice.message.content)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_json_schema_and_json_object_on_both_routes(client, route: str) -> None:
    schema = Report.model_json_schema()
    # strict: pydantic's schema allows extra keys; strict mode (OpenAI's) closes every object,
    # so the bounded schema ends. "Any object" leaves keys and strings open: random weights
    # may write one for ever, which only max_tokens ends ("length", the JSON unfinished).
    formats = [({"type": "json_schema", "json_schema": {"name": "report", "schema": schema,
                                                         "strict": True}}, schema),
               ({"type": "json_object"}, {"type": "object"})]
    for fmt, want in formats:
        kw = dict(model=MODEL, max_tokens=200, temperature=0.7, seed=3, n=2,
                  extra_body={"response_format": fmt})
        if route == "chat":
            answer = client.chat.completions.create(messages=MESSAGES, **kw)
            texts = [c.message.content for c in answer.choices]
        else:
            answer = client.completions.create(prompt="Report:", **kw)
            texts = [c.text for c in answer.choices]
        for choice, text in zip(answer.choices, texts):
            assert text.startswith("{")
            if want is schema or choice.finish_reason == "stop":
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(text), want)
            else:
                assert choice.finish_reason == "length"


def test_vllm_structured_outputs_regex_and_choice_streamed(server, client) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=5, stream=True,
        extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-[0-9]{4}"}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{4}", text)
    answer = client.completions.create(
        model=MODEL, prompt="Sentiment:", max_tokens=20, n=3, temperature=1.0, seed=1,
        extra_body={"structured_outputs": {"choice": ["positive", "negative", "neutral"]}})
    assert {c.text for c in answer.choices} <= {"positive", "negative", "neutral"}


def test_a_cut_answer_is_length_and_bad_constraints_are_400s(client) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
        response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "length"
    for body, param, words in (
            ({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "bogus"}}}}, "response_format", "cannot be"),
            ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
            ({"response_format": {"type": "xml"}}, "response_format", "type must be")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                           extra_body=body)
        assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


def test_langchain_structured_output_returns_the_model(server) -> None:
    """LangChain's ChatOpenAI against this server: with_structured_output(Model,
    method="json_schema") sends a strict json_schema response_format and returns a Report."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="none", max_retries=0,
                     temperature=0, max_tokens=200)
    report = llm.with_structured_output(Report, method="json_schema").invoke(
        "Revenue, net profit and the auditor, as JSON.")
    assert isinstance(report, Report)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_the_schema_corpus_through_the_api(client, name: str) -> None:
    """Sampled, three choices per schema, alternately chat and completions: 100% parse and
    validate, each ended by the grammar (finish_reason stop)."""
    schema = CORPUS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, n=3,
                                          temperature=1.0, seed=11, response_format=fmt)
    done = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=200, n=3,
                                     temperature=1.0, seed=12, extra_body={"response_format": fmt})
    texts = [c.message.content for c in chat.choices] + [c.text for c in done.choices]
    reasons = [c.finish_reason for c in chat.choices] + [c.finish_reason for c in done.choices]
    assert reasons == ["stop"] * 6, texts
    for text in texts:
        jsonschema.validate(json.loads(text), schema)

"""`serve`'s limits and safety, against a real server process with an API key, one decoding
row and a one-request wait queue: 401s, 429 with Retry-After, CORS for a named origin only, a
hostile-input pass (the server answers each in words and keeps serving), and the start-up
checks (a taken port, a public address without a key)."""

from __future__ import annotations

import json
import socket

import openai
import pytest

from chatglm3 import cli

from conftest import TINY_CKPT
from helpers.openaiserver import events, open_stream, serve

pytestmark = [pytest.mark.slow, pytest.mark.shared]

MODEL = "chatglm3-6b-32k"
KEY = "sk-test-0123456789"
ORIGIN = "http://app.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def server():
    with serve("--max-batch", "1", "--max-waiting", "1", "--cors-origin", ORIGIN,
               weights=TINY_CKPT, env={"CHATGLM3_API_KEY": KEY}) as s:
        yield s


def sdk(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def test_the_api_key_is_required_and_compared(server) -> None:
    assert sdk(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        sdk(server, "sk-wrong").models.list()
    status, _, body = server.request("POST", "/v1/chat/completions", {"model": MODEL})
    assert status == 401 and "missing API key" in body["error"]["message"]
    status, _, _ = server.request("GET", "/stats", headers={"Authorization": f"Basic {KEY}"})
    assert status == 401
    assert server.request("GET", "/health")[0] == 200  # health needs no key


def test_a_full_queue_answers_429_with_retry_after(server) -> None:
    long = {"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 20000,
            "min_tokens": 20000}
    streams = [open_stream(server.port, long, KEY) for _ in range(2)]  # 1 decoding + 1 waiting
    try:
        for _, resp in streams:
            assert resp.status == 200
        next(events(streams[0][1]))
        with pytest.raises(openai.RateLimitError, match="busy") as e:
            sdk(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):  # n choices count as n requests
            sdk(server).chat.completions.create(model=MODEL, messages=HELLO, n=2)
    finally:
        for conn, _ in streams:
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
    server.wait_until(lambda s: s["in_flight"] == 0, key=KEY)
    assert sdk(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


def test_cors_only_for_the_named_origin(server) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions",
                                        headers={**preflight, "Origin": "http://evil.example"})
    assert status == 400 and "access-control-allow-origin" not in headers
    _, headers, _ = server.request("GET", "/v1/models",
                                   headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers


def _hostile_bodies() -> list[tuple[str, bytes, int, str]]:
    good = {"model": MODEL, "messages": HELLO, "max_tokens": 2}

    def body(**kw) -> bytes:
        return json.dumps({**good, **kw}).encode()

    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}
            for i in range(10_001)]
    return [
        ("not JSON", b"{nope", 400, "not valid JSON"),
        ("a JSON list", b"[]", 400, "expected a JSON object"),
        ("not UTF-8", b"\xff\xfe{}", 400, "not UTF-8"),
        ("deep JSON", deep, 400, "nested"),
        ("lone surrogate", body(messages=[{"role": "user", "content": "a\ud800b"}]), 400, "messages[0].content: not valid Unicode"),
        ("temperature a string", body(temperature="hot"), 400, "temperature"),
        ("messages a string", body(messages="hi"), 400, "messages"),
        ("a message a number", body(messages=[1]), 400, "messages[0]"),
        ("role a number", body(messages=[{"role": 5, "content": "x"}]), 400, "role"),
        ("content a number", body(messages=[{"role": "user", "content": 5}]), 400, "content"),
        ("n a string", body(n="2"), 400, "n:"),
        ("n zero", body(n=0), 400, "n:"),
        ("n huge", body(n=10**6), 400, "n:"),
        ("stream a string", body(stream="yes"), 400, "stream"),
        ("stop a number", body(stop=5), 400, "stop"),
        ("too many stops", body(stop=[str(i) for i in range(17)]), 400, "stop"),
        ("max_tokens a fraction", body(max_tokens=1.5), 400, "max_tokens"),
        ("max_tokens huge", body(max_tokens=10**30), 400, "max_tokens"),
        ("seed past 64 bits", body(seed=2**64), 400, "seed"),
        ("user a number", body(user=5), 400, "user"),
        ("a lone developer message", body(messages=[{"role": "developer", "content": "x"}]),
         400, "got 'developer'"),
        ("NaN temperature", body().replace(b'"max_tokens"', b'"temperature": NaN, "max_tokens"'),
         400, "temperature"),
        ("top_logprobs alone", body(top_logprobs=3), 400, "top_logprobs"),
        ("empty messages", body(messages=[]), 400, "messages: empty"),
        ("10,000 messages", body(messages=many), 400, "context_length_exceeded"),
        ("model a number", json.dumps({"model": 5, "messages": HELLO}).encode(), 400, "model: expected a string"),
        ("huge body", b'{"model": "' + b"x" * (9 * 2**20) + b'"}', 413, "body: over the limit"),
    ]


@pytest.mark.parametrize("name, raw, status, words", _hostile_bodies(),
                         ids=[b[0] for b in _hostile_bodies()])
def test_hostile_input_is_answered_in_words_and_the_server_keeps_serving(
        server, name: str, raw: bytes, status: int, words: str) -> None:
    got, _, body = server.request("POST", "/v1/chat/completions", raw, headers=AUTH)
    assert got == status, body
    error = body["error"]
    assert words in error["message"] or words == error["code"], error
    assert "Traceback" not in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert server.alive()


@pytest.mark.parametrize("mib", [9, 64])  # 64: the SDK still sending when the cap is passed
def test_an_oversized_body_is_the_sdks_413(server, mib: int) -> None:
    with pytest.raises(openai.APIStatusError, match="over the limit") as e:
        sdk(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * (mib * 2**20)}])
    assert e.value.status_code == 413
    assert server.alive()


def test_nulls_are_the_defaults(server) -> None:
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": None, "top_p": None,
        "stop": None, "seed": None, "n": None, "stream": None, "logprobs": None}, headers=AUTH)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_a_taken_port_fails_before_loading(capsys) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--weights", "no/such/dir/at/all", "--port", str(port)]) == 1
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


def test_a_public_address_without_a_key_warns(monkeypatch, capsys) -> None:
    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    from chatglm3 import startup

    monkeypatch.delenv("CHATGLM3_API_KEY", raising=False)
    monkeypatch.setattr(startup, "start_engine", load)
    with pytest.raises(Loaded):
        cli.main(["serve", "--host", "0.0.0.0", "--port", "0"])
    assert "without an API key" in capsys.readouterr().err
    with pytest.raises(Loaded):
        cli.main(["serve", "--host", "0.0.0.0", "--port", "0", "--api-key", "k"])
    assert "without an API key" not in capsys.readouterr().err
    assert cli.main(["serve", "--port", "0", "--api-key", "has space"]) == 1
    assert "--api-key: expected printable ASCII" in capsys.readouterr().err


def test_a_64_mb_body_gets_its_413_not_a_reset(server) -> None:
    """The server reads the rest of an oversized body (dropping it) before answering, so the
    client, still sending, reads the 413: urllib got a connection reset when the server
    answered from the Content-Length alone."""
    import urllib.error
    import urllib.request

    raw = b'{"model": "' + b"x" * (64 * 2**20) + b'"}'
    req = urllib.request.Request(server.base_url + "/chat/completions", data=raw,
                                 headers={"Content-Type": "application/json", **AUTH})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=120)
    assert e.value.code == 413
    assert json.loads(e.value.read())["error"]["code"] == "body_too_large"
    assert server.alive()


def test_conformance_details(server) -> None:
    """OpenAI's description: system_fingerprint a string or absent (not null); a 405 says which
    methods are allowed; token ids past the vocabulary are the prompt's error."""
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": HELLO, "max_tokens": 2}, headers=AUTH)
    assert status == 200 and body.get("system_fingerprint", "") is not None
    status, headers, _ = server.request("DELETE", "/v1/chat/completions", headers=AUTH)
    assert status == 405 and "POST" in headers["allow"]
    status, _, body = server.request("POST", "/v1/completions", {
        "model": MODEL, "prompt": [1, 2, 10**6], "max_tokens": 2}, headers=AUTH)
    assert status == 400 and body["error"]["param"] == "prompt", body
    assert "vocabulary" in body["error"]["message"]
    for prompt, words in ((None, "prompt: required"), ([], "prompt: empty")):
        status, _, body = server.request("POST", "/v1/completions", {
            "model": MODEL, "prompt": prompt, "max_tokens": 2}, headers=AUTH)
        assert status == 400 and body["error"]["param"] == "prompt", body
        assert body["error"]["message"].startswith(words), body

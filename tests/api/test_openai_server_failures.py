"""`serve` when a generation fails on the server (errors injected into the model's forward, as
tests/engine/test_oom.py does): out of memory is a 503 with Retry-After (an error event mid-stream),
any other failure a 500 in words without a traceback, and the server serves the next request.
The app runs in this process under uvicorn, as `serve` runs it."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import torch
import uvicorn
from transformers import DynamicCache

from chatglm3.api.app import ServerConfig, create_app
from chatglm3.engine.engine import Engine
from chatglm3.model.kv_rows import KVRows
from helpers.faults import FailOnce

pytestmark = pytest.mark.slow  # a server

MODEL = "chatglm3-6b-32k"
HELLO = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def served(tiny_model_fp32, no_stop_tokenizer):
    engine = Engine(tiny_model_fp32, no_stop_tokenizer)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig(web=False)),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                           api_key="x", max_retries=0)
    yield engine, client
    server.should_exit = True
    thread.join(10)
    engine.close()


def answers(client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_out_of_memory_in_prefill_is_a_503_and_the_server_goes_on(served, monkeypatch) -> None:
    engine, client = served
    FailOnce(engine.model, monkeypatch, lambda kw: isinstance(kw.get("cache"), DynamicCache))
    with pytest.raises(openai.InternalServerError, match="out of memory during prefill") as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    answers(client)


def test_out_of_memory_mid_stream_is_an_error_event(served, monkeypatch) -> None:
    engine, client = served
    FailOnce(engine.model, monkeypatch, lambda kw: isinstance(kw.get("cache"), KVRows))
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                            stream=True)
    with pytest.raises(openai.APIError, match="out of memory during a decoding step"):
        for _ in stream:
            pass
    answers(client)


def test_another_failure_is_a_500_in_words(served, monkeypatch) -> None:
    engine, client = served
    real = engine.model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("secret internal detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert e.value.status_code == 500
    assert "secret" not in e.value.response.text and "Traceback" not in e.value.response.text
    assert "logged on the server" in e.value.message
    answers(client)

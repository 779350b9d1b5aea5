"""`python -m chatglm3 serve` through the real openai SDK (sync and async), against a real server
process on the tiny checkpoint (fp32 CPU): answers equal the CLI's, streams join to the whole
answer, n choices, stop strings, logprobs, batching, disconnects, and every error as the SDK's
exception class. One server for the module."""

from __future__ import annotations

import asyncio
import json
import socket

import openai
import pytest

from chatglm3 import cli
from chatglm3.params import MAX_LOGPROBS

from conftest import TINY_CKPT
from helpers.openaiserver import events, open_stream, serve

pytestmark = [pytest.mark.slow, pytest.mark.shared]

MODEL = "chatglm3-6b-32k"
GREEDY = {"temperature": 0, "max_tokens": 12}
CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4 😀"},
    {"role": "user", "content": "再说一遍，用中文。"},
]


@pytest.fixture(scope="module")
def server():
    with serve("--max-batch", "8", weights=TINY_CKPT) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def chat(client, messages=None, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages or CONVERSATION,
                                          **{**GREEDY, **kw})


def cli_record(capsys, messages, max_tokens: int) -> dict:
    """`python -m chatglm3 generate --json` for the same conversation, in this process."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    history = [m for m in messages[:-1] if m["role"] != "system"]
    argv = ["generate", "--weights", str(TINY_CKPT), "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", "--max-tokens", str(max_tokens), "--json",
            "--prompt", messages[-1]["content"], "--history", json.dumps(history)]
    if system:
        argv += ["--system", system[0]]
    capsys.readouterr()
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert server.alive()


def test_greedy_answer_and_counts_equal_the_cli(client, capsys) -> None:
    answer = chat(client, max_tokens=16)
    record = cli_record(capsys, CONVERSATION, 16)
    assert answer.choices[0].message.content == record["text"]
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == record["input_token_count"]
    assert answer.usage.completion_tokens == record["output_token_count"] > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.choices[0].finish_reason == (
        "length" if record["stop_reason"] == "max_tokens" else "stop")
    assert answer.model == MODEL and answer.object == "chat.completion"


def test_content_as_text_parts_is_the_same_conversation(client) -> None:
    parts = [dict(m, content=[{"type": "text", "text": m["content"][:3]},
                              {"type": "text", "text": m["content"][3:]}])
             for m in CONVERSATION]
    assert (chat(client, parts).choices[0].message.content
            == chat(client).choices[0].message.content)


def test_stream_deltas_join_to_the_whole_answer(client) -> None:
    whole = chat(client, max_tokens=20)
    chunks = list(chat(client, max_tokens=20, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices
                and c.choices[0].delta.content]
    assert len(contents) > 1  # streamed, not sent at the end
    assert "".join(contents) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


def test_async_client_streams_and_answers_the_same(server, client) -> None:
    whole = chat(client).choices[0].message.content

    async def run() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        answer = await aclient.chat.completions.create(model=MODEL, messages=CONVERSATION,
                                                       **GREEDY)
        stream = await aclient.chat.completions.create(model=MODEL, messages=CONVERSATION,
                                                       stream=True, **GREEDY)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await aclient.close()
        return answer.choices[0].message.content, text

    assert asyncio.run(run()) == (whole, whole)


def test_stop_string_cuts_the_answer_before_it(client) -> None:
    text = chat(client, max_tokens=24).choices[0].message.content
    stop = text[5:8]
    cut = chat(client, max_tokens=24, stop=stop)
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert chat(client, max_tokens=24, stop=["no such text", stop]).choices[0].message.content \
        == text[: text.index(stop)]


def test_n_choices_with_a_seed_are_reproducible_and_each_its_own_request(client) -> None:
    kw = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "seed": 1234}
    first = chat(client, n=2, **kw)
    again = chat(client, n=2, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]  # each choice draws from its own seed
    # choice i is the request with seed + i
    assert chat(client, n=1, **{**kw, "seed": 1235}).choices[0].message.content == texts[1]
    counts = [chat(client, n=1, **{**kw, "seed": s}).usage.completion_tokens for s in (1234, 1235)]
    assert first.usage.completion_tokens == sum(counts)
    assert first.usage.prompt_tokens == chat(client, n=1, **kw).usage.prompt_tokens  # once
    streamed = ["", ""]
    for c in chat(client, n=2, stream=True, **kw):
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_logprobs_greedy_first_sorted_and_streamed_alike(client) -> None:
    answer = chat(client, logprobs=True, top_logprobs=5)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    joined = b"".join(bytes(e.bytes) for e in content).decode()
    assert joined.strip() == answer.choices[0].message.content.strip()
    streamed = [e for c in chat(client, logprobs=True, top_logprobs=5, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content]
    plain = chat(client, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert chat(client).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match=f"top_logprobs.*{MAX_LOGPROBS}"):
        chat(client, logprobs=True, top_logprobs=MAX_LOGPROBS + 1)


def test_completions_continue_plain_text(server, client) -> None:
    from chatglm3.engine.engine import Engine
    from chatglm3.params import SamplingParams

    prompt = "The capital of France is"
    answer = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10,
                                       logprobs=2, echo=True)
    engine = Engine.from_pretrained(TINY_CKPT, device="cpu", dtype="float32")
    gen = engine.generate_ids(engine.tokenizer.encode(prompt),
                              SamplingParams(max_tokens=10, temperature=0))
    expected = gen.text()
    engine.close()
    choice = answer.choices[0]
    assert choice.text == prompt + expected
    assert answer.usage.completion_tokens == gen.result.output_token_count
    assert answer.usage.prompt_tokens == len(gen.result.input_ids)
    # echo: the prompt's own tokens (after the server's [gMASK] sop prefix) come first,
    # scored, spelling the prompt; then the generated ones from the prompt's end.
    lp = choice.logprobs
    echoed = len(gen.result.input_ids) - len(engine.tokenizer.prefix_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        echoed + answer.usage.completion_tokens
    assert "".join(lp.tokens[:echoed]) == prompt and lp.text_offset[0] == 0
    assert lp.text_offset[echoed] == len(prompt) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert None not in lp.token_logprobs  # the first text token is scored given the prefix
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=10, stream=True) if c.choices)
    assert streamed == expected
    two = client.completions.create(model=MODEL, prompt=[prompt, "你好"], temperature=0,
                                    max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == expected[
        : len(two.choices[0].text)]


def test_eight_concurrent_streams_are_batched_and_each_equals_its_run_alone(server, client
                                                                             ) -> None:
    prompts = [f"第{i}个问题：{'hello ' * i}" for i in range(8)]
    alone = [chat(client, [{"role": "user", "content": p}], max_tokens=24)
             .choices[0].message.content for p in prompts]
    before = server.stats()

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)

        async def one(p: str) -> str:
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], stream=True,
                temperature=0, max_tokens=24)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        out = await asyncio.gather(*(one(p) for p in prompts))
        await aclient.close()
        return list(out)

    together = asyncio.run(run())
    after = server.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["decoded_tokens"] - before["decoded_tokens"]
    assert together == alone
    assert tokens / steps > 2, (tokens, steps)  # batched: many rows per decoding step


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "write a long story"}],
            "stream": True, "temperature": 0, "max_tokens": 20000, "min_tokens": 20000}
    conn, resp = open_stream(server.port, body)
    stream = events(resp)
    first = next(stream)
    rid = first["id"]
    for _ in range(3):
        next(stream)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    s = server.wait_until(lambda s: any(r["id"] == rid for r in s["recent"]))
    ended = [r for r in s["recent"] if r["id"] == rid][0]
    assert ended["finish"] == "cancelled"
    assert ended["completion_tokens"] < 2000  # stopped, not run to its 20,000 tokens
    assert server.wait_until(lambda s: s["running"] == 0 and s["in_flight"] == 0)


def test_a_non_streaming_client_that_disconnects_stops_its_generation(server) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "go on"}],
                       "temperature": 0, "max_tokens": 20000, "min_tokens": 20000}).encode()
    before = server.stats()["finished"]["cancelled"]
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    server.wait_until(lambda s: s["running"] == 1)
    sock.close()
    s = server.wait_until(lambda s: s["finished"]["cancelled"] == before + 1)
    assert s["recent"][-1]["completion_tokens"] < 20000


def test_errors_raise_the_sdks_exceptions(server, client) -> None:
    with pytest.raises(openai.BadRequestError, match=r"temperature.*0 to 5") as e:
        chat(client, temperature=9)
    assert e.value.body["param"] == "temperature" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        chat(client, max_completion_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="stop"):
        chat(client, stop=["x" * 300])
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=CONVERSATION)
    with pytest.raises(openai.BadRequestError, match="tool calls"):
        chat(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="tool calls"):
        chat(client, CONVERSATION + [{"role": "tool", "content": "1", "tool_call_id": "a"}])
    with pytest.raises(openai.BadRequestError, match="text only"):
        chat(client, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(openai.BadRequestError, match="last message"):
        chat(client, CONVERSATION[:2] + [{"role": "developer", "content": "then be brief"}])
    status, _, body = server.request("GET", "/v1/nothing")
    assert status == 404 and "no such route" in body["error"]["message"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health"):
        assert path in body["error"]["message"]  # each one listed answers
        assert server.request("GET" if "completions" not in path else "POST", path)[0] != 404
    assert server.alive()


@pytest.mark.parametrize("text, counted", [("a" * 600_000, "characters"),
                                            ("你" * 40_000, "tokens")])
def test_a_prompt_too_long_names_both_token_counts(client, text: str, counted: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": text}])
    assert e.value.code == "context_length_exceeded"
    message = e.value.body["message"]
    assert "32768 tokens" in message and counted in message


def test_unknown_fields_are_ignored_and_user_accepted(client) -> None:
    answer = chat(client, user="someone", extra_body={"no_such_field": 1, "top_k": 5,
                                                       "repetition_penalty": 1.0})
    assert answer.choices[0].message.content == chat(client).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="top_k"):
        chat(client, extra_body={"top_k": -1})


def test_tokenize_gives_the_ids_each_route_runs(server, client) -> None:
    """/tokenize (vLLM's shape): a prompt's ids are those /v1/completions runs (same answer
    from them as from the text), chat messages' those /v1/chat/completions runs."""
    from chatglm3.text.tokenizer import SPECIAL_IDS

    text = "Once upon a time, 从前有座山 😀"
    status, _, body = server.request("POST", "/tokenize", {"model": MODEL, "prompt": text})
    assert status == 200, body
    ids = body["tokens"]
    assert body["count"] == len(ids) and body["token_strs"] is None
    assert ids[:2] == [SPECIAL_IDS["[gMASK]"], SPECIAL_IDS["sop"]]
    by_text = client.completions.create(model=MODEL, prompt=text, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert by_text.usage.prompt_tokens == len(ids) and by_ids.choices[0].text == \
        by_text.choices[0].text
    _, _, bare = server.request("POST", "/tokenize", {"prompt": text, "add_special_tokens": False,
                                                     "return_token_strs": True})
    assert bare["tokens"] == ids[2:] and len(bare["token_strs"]) == len(ids) - 2
    assert "".join(bare["token_strs"]).replace("\u2581", " ").strip().startswith("Once upon")
    status, _, chat_ids = server.request("POST", "/tokenize", {"messages": CONVERSATION})
    assert status == 200 and chat_ids["tokens"][-1] == SPECIAL_IDS["<|assistant|>"]
    assert chat_ids["count"] == chat(client, max_tokens=1).usage.prompt_tokens
    _, _, open_end = server.request("POST", "/tokenize", {"messages": CONVERSATION,
                                                          "add_generation_prompt": False})
    assert open_end["tokens"] == chat_ids["tokens"][:-1]
    # Counted, not refused, past the context: what one asks a count for.
    long = "word " * (body["max_model_len"] + 10)
    status, _, counted = server.request("POST", "/tokenize", {"prompt": long})
    assert status == 200 and counted["count"] > counted["max_model_len"] == body["max_model_len"]


def test_detokenize_round_trip_and_bad_input(server) -> None:
    text = "Hello, 世界! 😀 tabs\tand\nlines"
    _, _, body = server.request("POST", "/tokenize", {"prompt": text})
    status, _, back = server.request("POST", "/detokenize", {"model": MODEL,
                                                             "tokens": body["tokens"]})
    assert status == 200 and back == {"prompt": text}
    for request, param in [({"tokens": [1, -1]}, "tokens"), ({"tokens": [10**9]}, "tokens"),
                           ({"tokens": "12"}, "tokens"), ({}, "tokens")]:
        status, _, err = server.request("POST", "/detokenize", request)
        assert status == 400 and err["error"]["param"] == param, err
    for request, param in [({}, "prompt"), ({"prompt": "a", "messages": CONVERSATION},
                                            "messages"), ({"prompt": 5}, "prompt"),
                           ({"messages": [{"role": "user"}]}, "messages"),
                           ({"prompt": "a", "return_token_strs": "yes"}, "return_token_strs")]:
        status, _, err = server.request("POST", "/tokenize", request)
        assert status == 400 and err["error"]["param"] == param, (request, err)
    status, _, err = server.request("POST", "/tokenize", {"model": "other", "prompt": "a"})
    assert status == 404 and err["error"]["param"] == "model"
    assert server.alive()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed by prometheus_client's own parser: {(sample, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_follow_the_requests(server, client) -> None:
    """/metrics (vLLM's names): counters move with what requests did, gauges with what runs."""
    model = (("model_name", MODEL),)
    before = scrape(server)
    answer = client.completions.create(model=MODEL, prompt="Count to ten:", temperature=0,
                                       max_tokens=7, extra_body={"min_tokens": 7})
    status, _, _ = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": 5})
    assert status == 400
    # A request's end is counted by its done callback, which may run just after its answer left.
    server.wait_until(lambda s: s["in_flight"] == 0)
    after = scrape(server)

    def moved(name: str, labels: tuple = model) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("vllm:generation_tokens_total") == 7
    assert moved("vllm:prompt_tokens_total") == answer.usage.prompt_tokens
    assert moved("vllm:request_success_total", (("finished_reason", "length"),) + model) == 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:inter_token_latency_seconds_count") == 1
    assert moved("chatglm3:http_errors_total", model + (("status", "400"),)) == 1
    assert after[("vllm:num_requests_running", model)] == 0
    # While a long answer streams, it is counted as running and holds part of the cache.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}],
            "stream": True, "temperature": 0, "max_tokens": 20000, "min_tokens": 20000}
    conn, resp = open_stream(server.port, body)
    try:
        stream = events(resp)
        next(stream), next(stream)
        during = scrape(server)
        assert during[("vllm:num_requests_running", model)] == 1
        assert 0 < during[("vllm:kv_cache_usage_perc", model)] <= 1
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    server.wait_until(lambda s: s["running"] == 0 and s["in_flight"] == 0)
    aborted = scrape(server)
    assert aborted.get(("vllm:request_success_total", (("finished_reason", "abort"),) + model),
                       0) == before.get(("vllm:request_success_total",
                                         (("finished_reason", "abort"),) + model), 0) + 1


def test_after_a_last_assistant_message_it_answers_or_continues(server, client) -> None:
    """A conversation may end with the assistant's message (OpenAI, vLLM): the model answers
    with a new turn; vLLM's continue_final_message continues that message instead. Each equals
    plain completion of the ids /tokenize gives for the same messages."""
    import urllib.request

    turns = CONVERSATION[:3] + [{"role": "assistant", "content": "四"}]

    def completion_of(add_generation_prompt: bool) -> str:
        req = urllib.request.Request(server.base_url.removesuffix("/v1") + "/tokenize", data=json.dumps(
            {"messages": turns, "add_generation_prompt": add_generation_prompt}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            ids = json.loads(r.read())["tokens"]
        return client.completions.create(model=MODEL, prompt=ids, **GREEDY).choices[0].text

    answered = chat(client, turns).choices[0].message.content
    continued = chat(client, turns, extra_body={"continue_final_message": True,
                                                "add_generation_prompt": False})
    assert answered == completion_of(True)
    assert continued.choices[0].message.content == completion_of(False)
    assert answered != continued.choices[0].message.content


def _sse_chunks(server, path: str, body: dict) -> list[dict]:
    status, _, text = server.request("POST", path, {**body, "stream": True})
    assert status == 200, text
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: {")]


def test_return_token_ids_gives_the_prompts_and_answers_ids(server) -> None:
    """vLLM's return_token_ids, both routes, whole and streamed: the prompt's ids as run, and
    each answer's ids, which spell its text and count its completion tokens; a stream's pieces
    join to the whole answer's ids."""
    prompt = [64790, 64792, 30910, 36474, 54591]
    body = {"model": MODEL, "prompt": prompt, "return_token_ids": True, "n": 2, **GREEDY}
    status, _, whole = server.request("POST", "/v1/completions", body)
    assert status == 200, whole
    for choice in whole["choices"]:
        assert choice["prompt_token_ids"] == prompt
        assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"] // 2
        _, _, text = server.request("POST", "/detokenize", {"tokens": choice["token_ids"]})
        assert text["prompt"] == choice["text"]
    chunks = _sse_chunks(server, "/v1/completions", body)
    for k in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == k]
        assert mine[0]["prompt_token_ids"] == prompt
        assert sum((c["token_ids"] for c in mine), []) == whole["choices"][k]["token_ids"]

    chat_body = {"model": MODEL, "messages": CONVERSATION, "return_token_ids": True, **GREEDY}
    status, _, answer = server.request("POST", "/v1/chat/completions", chat_body)
    _, _, tokenized = server.request("POST", "/tokenize", {"messages": CONVERSATION})
    assert status == 200 and answer["prompt_token_ids"] == tokenized["tokens"]
    ids = answer["choices"][0]["token_ids"]
    assert len(ids) == answer["usage"]["completion_tokens"]
    _, _, text = server.request("POST", "/detokenize", {"tokens": ids})
    assert text["prompt"] == answer["choices"][0]["message"]["content"]
    chunks = _sse_chunks(server, "/v1/chat/completions", chat_body)
    assert chunks[0]["prompt_token_ids"] == tokenized["tokens"]
    assert sum((c["choices"][0].get("token_ids", []) for c in chunks if c["choices"]), []) == ids
    plain = server.request("POST", "/v1/completions", {**body, "return_token_ids": False})[2]
    assert "token_ids" not in plain["choices"][0]  # only when asked

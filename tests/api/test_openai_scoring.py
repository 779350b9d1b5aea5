"""Scoring through `serve` (one server process on the tiny checkpoint, fp32 CPU, for the module):
/v1/completions with echo and logprobs returns every prompt token's log-probability (the
first null), then the generated tokens'; the echoed tokens spell the echoed text; max_tokens 0
scores without generating; vLLM's prompt_logprobs on both routes. The scores are checked
against one plain forward pass of the same model in this process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from conftest import TINY_CKPT
from helpers.openaiserver import events, serve

pytestmark = [pytest.mark.slow, pytest.mark.shared]

MODEL = "chatglm3-6b-32k"
TEXT = "Hello world, 你好 🦊!\n\tThe  end."


@pytest.fixture(scope="module")
def server():
    with serve("--max-batch", "4", weights=TINY_CKPT) as s:
        yield s


def post(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def direct(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """Each token's log-probability after the ones before it (one forward pass, fp32)."""
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_with_logprobs_scores_every_prompt_token(server, tiny_model_fp32,
                                                      tokenizer) -> None:
    """Token ids as lm-eval sends them (several prompts in one request): one entry per id, the
    first null, then max_tokens generated ones; the scores are the model's."""
    prompts = [[64790, 64792, 34, 4567, 11, 887, 30910], [100, 2000, 30000, 5]]
    status, body = post(server, "/v1/completions", {
        "model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
        "echo": True, "seed": 1234})
    assert status == 200, body
    for choice, ids in zip(sorted(body["choices"], key=lambda c: c["index"]), prompts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = direct(tiny_model_fp32, ids)
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
        # The echoed tokens spell the echoed text; offsets count along the tokens.
        echo = tokenizer.decode(ids)
        assert "".join(lp["tokens"][:len(ids)]) == echo and choice["text"].startswith(echo)
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i]))
                                     for i in range(len(lp["tokens"]))]


def test_a_string_prompt_is_echoed_without_the_prefix_the_server_adds(
        server, tiny_model_fp32, tokenizer) -> None:
    """The server runs `[gMASK] sop` + the text; the echo (text and scores) covers the text's
    own tokens, the first scored given that prefix."""
    status, body = post(server, "/v1/completions", {
        "model": MODEL, "prompt": TEXT, "temperature": 0, "max_tokens": 2, "logprobs": 3,
        "echo": True})
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    ids = tokenizer.encode(TEXT)
    text_ids = ids[len(tokenizer.prefix_ids):]
    assert len(lp["tokens"]) == len(text_ids) + 2
    assert "".join(lp["tokens"][:len(text_ids)]) == TEXT
    assert choice["text"].startswith(TEXT) and lp["text_offset"][len(text_ids)] == len(TEXT)
    want = direct(tiny_model_fp32, ids)[len(tokenizer.prefix_ids) - 1:]
    assert lp["token_logprobs"][:len(text_ids)] == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 3 for t in lp["top_logprobs"])
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_max_tokens_0_with_echo_scores_only(server, tiny_model_fp32) -> None:
    ids = [64790, 64792, 34, 4567, 11]
    status, body = post(server, "/v1/completions", {
        "model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        direct(tiny_model_fp32, ids), abs=1e-4)
    status, body = post(server, "/v1/completions", {
        "model": MODEL, "prompt": "Hi", "max_tokens": 0, "echo": True})
    assert status == 200 and body["choices"][0]["text"] == "Hi"
    assert body["choices"][0]["logprobs"] is None


def test_max_tokens_0_without_echo_is_refused(server) -> None:
    status, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi",
                                                    "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert "0 only with" in body["error"]["message"]


def test_prompt_logprobs_on_both_routes(server, tiny_model_fp32, tokenizer) -> None:
    """vLLM's extension: per prompt token None (the first) or {id: {logprob, rank,
    decoded_token}} for the token and its k alternatives."""
    messages = [{"role": "user", "content": "What is 2+2?"}]
    status, body = post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": messages, "max_tokens": 1, "prompt_logprobs": 2})
    assert status == 200, body
    from chatglm3.text.tokenizer import Message

    ids = tokenizer.build_chat_input([Message("user", "What is 2+2?")])
    entries = body["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for entry, i, want in zip(entries[1:], ids[1:], direct(tiny_model_fp32, ids)):
        assert entry[str(i)]["logprob"] == pytest.approx(want, abs=1e-4)
        ranks = sorted(v["rank"] for k, v in entry.items() if k != str(i))
        assert ranks[:2] == [1, 2][:len(ranks)] and 2 <= len(entry) <= 3
    status, body = post(server, "/v1/completions", {
        "model": MODEL, "prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 0})
    assert status == 200 and body["choices"][0]["logprobs"] is None
    got = body["choices"][0]["prompt_logprobs"]
    assert got[0] is None and [list(e) for e in got[1:]] == [["6"], ["7"]]
    for bad, param in (({"prompt_logprobs": 21}, "prompt_logprobs"),
                       ({"prompt_logprobs": -1}, "prompt_logprobs"),
                       ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs")):
        status, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi",
                                                        "max_tokens": 1, **bad})
        assert status == 400 and body["error"]["param"] == param, (bad, body)


def test_a_streamed_echo_carries_the_prompt_scores_first(server) -> None:
    """Streamed, the echo comes as each choice's first chunk, with its scores; the stream's
    logprobs join to the ones of the same request unstreamed."""
    request = {"model": MODEL, "prompt": TEXT, "temperature": 0, "max_tokens": 4,
               "logprobs": 1, "echo": True}
    _, whole = post(server, "/v1/completions", request)
    req = urllib.request.Request(server.url + "/v1/completions",
                                 json.dumps({**request, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as stream:
        chunks = [c for c in events(stream) if c != "[DONE]"]
    first = chunks[0]["choices"][0]
    assert first["text"] == TEXT and first["logprobs"]["token_logprobs"][0] is not None
    joined = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        for k in joined:
            joined[k] += lp[k] if lp else []
    want = whole["choices"][0]["logprobs"]
    assert joined["tokens"] == want["tokens"] and joined["text_offset"] == want["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_tokenizer_info(server, tokenizer) -> None:
    with urllib.request.urlopen(server.url + "/tokenizer_info", timeout=30) as r:
        info = json.loads(r.read())
    assert info["eos_token"] == "</s>" and info["model_max_length"] == 32768
    assert info["prefix_tokens"] == ["[gMASK]", "sop"]
    assert "<|user|>" in info["stop_tokens"] and "chat_template" not in info


# ---- lm-evaluation-harness, offline, against this server ----

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "a city in Spain"],
     "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
    {"question": "中国的首都是", "choices": ["北京", "上海", "深圳 and more"], "answer": 0},
]
SCORING_TASK = """task: glm_scoring
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GENERATION_TASK = """task: glm_generation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    (folder / "glm_scoring.yaml").write_text(SCORING_TASK.format(data=data))
    (folder / "glm_generation.yaml").write_text(GENERATION_TASK.format(data=data))
    return TaskManager(include_path=str(folder))


def lm_eval_samples(server, tasks, task: str, model: str, **model_args) -> list[dict]:
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=model, model_args={"model": MODEL, **model_args},
                          tasks=[task], task_manager=tasks, log_samples=True,
                          apply_chat_template=model == "local-chat-completions")
    return out["samples"][task]


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "strings"])
def test_lm_eval_loglikelihoods_are_the_models(server, tasks, tiny_model_fp32, tokenizer,
                                               monkeypatch, tokenized: bool) -> None:
    """`lm-eval --model local-completions` with the remote tokenizer (this server's
    /tokenizer_info, /tokenize, /detokenize), 4 prompts per request, prompts as token ids or as
    strings: each choice's loglikelihood equals the model's own to 1e-4 (strings run after the
    `[gMASK] sop` prefix the server adds, which the echo leaves out)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples = lm_eval_samples(server, tasks, "glm_scoring", "local-completions",
                              base_url=server.url + "/v1/completions",
                              tokenizer_backend="remote", tokenized_requests=tokenized,
                              batch_size=4, max_retries=1)
    checked = 0
    for s in samples:
        for (context, continuation), resps in zip(s["arguments"], s["resps"]):
            ll = resps[0][0]
            ctx = tokenizer.encode_text(context)
            ids = tokenizer.encode_text(context + continuation)
            assert ids[:len(ctx)] == ctx
            skip = 0
            if not tokenized:  # the server runs the decoded text after its prefix
                ids = tokenizer.encode(tokenizer.decode(ids))
                skip = len(tokenizer.prefix_ids)
            want = sum(direct(tiny_model_fp32, ids)[skip + len(ctx) - 1:])
            assert ll == pytest.approx(want, abs=1e-4), (context, continuation)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)


def test_lm_eval_chat_generation_gives_the_models_answers(server, tasks, tiny_model_fp32,
                                                          tokenizer, monkeypatch) -> None:
    """`lm-eval --model local-chat-completions --apply_chat_template` with a generation task:
    each answer is the engine's own greedy answer (8 tokens, cut at a blank line)."""
    from chatglm3.engine.engine import Engine
    from chatglm3.params import SamplingParams
    from chatglm3.text.tokenizer import Message

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    samples = lm_eval_samples(server, tasks, "glm_generation", "local-chat-completions",
                              base_url=server.url + "/v1/chat/completions",
                              tokenizer_backend=None, max_retries=1)
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=1)
    try:
        for s in samples:
            g = engine.generate([Message("user", s["doc"]["question"])],
                                SamplingParams(max_tokens=8, temperature=0, stop=("\n\n",)))
            assert s["resps"][0][0] == g.text()
    finally:
        engine.close()
    assert len(samples) == len(DOCS)


def test_logit_bias_and_stop_token_ids_through_the_api(server) -> None:
    """OpenAI's logit_bias (string keys) and vLLM's stop_token_ids / ignore_eos per request;
    an id past the vocabulary is a 400 naming its field."""
    base = {"model": MODEL, "prompt": [5, 6, 7], "temperature": 0, "max_tokens": 4,
            "logprobs": 0}
    status, body = post(server, "/v1/completions", {**base, "logit_bias": {"777": 100}})
    assert status == 200 and body["choices"][0]["logprobs"]["tokens"] == [
        body["choices"][0]["logprobs"]["tokens"][0]] * 4
    status, body = post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "logit_bias": {"2": 100}, "ignore_eos": True, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    for field, value in (("logit_bias", {"70000": 1}), ("stop_token_ids", [70000])):
        status, body = post(server, "/v1/completions", {**base, field: value})
        assert status == 400 and body["error"]["param"] == field, body
        assert "past the vocabulary" in body["error"]["message"]

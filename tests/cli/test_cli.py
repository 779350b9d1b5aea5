"""`python -m chatglm3` as a person uses it, on the shared tiny checkpoint: run in this process
(chatglm3.cli.main with its own stdin, stdout and stderr), since what these tests check is the
command's behaviour, not process start-up; test_cli_first_hour.py runs real subprocesses where
that is the point (Ctrl-C, scripts/run, pip install, loading messages)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from unittest import mock

import jsonschema
import pytest
import torch

from chatglm3 import cli as cli_module
from chatglm3.params import CONTEXT, MAX_STOP_SEQUENCES, MAX_TEMPERATURE
from conftest import TINY_CKPT
from helpers.schemas import CORPUS

pytestmark = pytest.mark.shared

TINY = ["--weights", str(TINY_CKPT), "--dtype", "float32"]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m chatglm3 ARGS`, in this process: its exit status and what it wrote."""
    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8")
    # No network: a fetch attempt would fail fast instead of reaching out.
    with (mock.patch.dict(os.environ, HF_HUB_OFFLINE="1"), mock.patch.object(sys, "stdin", fake_stdin),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        try:
            code = cli_module.main(list(args))
        except SystemExit as e:  # argparse's errors exit
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.mark.slow  # loads the model
def test_generate_json_greedy_equals_official(reference: dict) -> None:
    prompt = reference["prompts"][0]
    assert prompt["query"] == "你好" and prompt["history"] == []
    out = cli("generate", *TINY, "--prompt", "你好", "--temperature", "0", "--max-tokens", "24",
              "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["input_ids"] == prompt["input_ids"]
    assert record["output_ids"] == prompt["greedy_generate"]["new_ids"]
    assert record["stop_reason"] == "max_tokens"
    for key in ("text", "input_token_count", "output_token_count", "time_to_first_token",
                "tokens_per_second"):
        assert key in record
    assert record["output_token_count"] == 24 and record["input_token_count"] == 8


@pytest.mark.slow  # loads the model twice
def test_generate_streams_the_same_text_and_stops(reference: dict) -> None:
    ids = reference["prompts"][0]["greedy_generate"]["new_ids"]
    out = cli("generate", *TINY, "--prompt", "你好", "--temperature", "0", "--max-tokens", "24")
    assert out.returncode == 0, out.stderr
    from chatglm3.text.tokenizer import ChatGLMTokenizer

    full = ChatGLMTokenizer.from_dir(TINY_CKPT).decode(ids)
    assert out.stdout == full + "\n"
    stop = full[6:9]
    stopped = cli("generate", *TINY, "--prompt", "你好", "--temperature", "0", "--max-tokens",
                  "24", "--stop", "never-there", "--stop", stop, "--json")
    assert json.loads(stopped.stdout)["text"] == full[: full.index(stop)]


def test_encode(reference: dict) -> None:
    case = reference["chat_inputs"][2]
    out = cli("encode", "--weights", str(TINY_CKPT), "--prompt", case["query"], "--history",
              json.dumps(case["history"]))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == case["input_ids"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "--prompt", "x", "--temperature", "hot"], "--temperature"),
        (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
        (["generate", "--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["generate", "--prompt", "x", "--history", "[{\"role\": \"bot\"}]"], "history[0].role"),
        (["generate"], "--prompt"),
        (["generate", "--prompt", "x", "--device", "tpu"], "--device"),
        pytest.param(["generate", "--prompt", "x", "--decode-step", "graphs"],
                     "needs a CUDA device", marks=NO_CUDA),
        (["fly"], "fly"),
        (["generate", "--prompt", "x", "--weights", "/no/such/dir"], "/no/such/dir"),
        # The limits are params.py's, checked before the model loads.
        (["generate", "--prompt", "x", "--max-tokens", str(CONTEXT + 1)],
         f"max_tokens: must be an integer from 1 to {CONTEXT}"),
        (["generate", "--prompt", "x", "--max-tokens", "40000"],
         f"max_tokens: must be an integer from 1 to {CONTEXT}"),
        (["generate", "--prompt", "x", "--temperature", "6"],
         f"temperature: must be from 0 to {MAX_TEMPERATURE:g}"),
        (["generate", "--prompt", "x", *["--stop", "s"] * (MAX_STOP_SEQUENCES + 1)],
         f"at most {MAX_STOP_SEQUENCES} stop strings"),
        # The prompt comes from exactly one place.
        (["generate", "--prompt", "x", "--prompt-file", "p.txt"], "not allowed with"),
        (["generate", "--prompt-file", "/no/such/prompt.txt"], "/no/such/prompt.txt"),
        (["encode", "--prompt", "x", "--temperature", "0"], "--temperature"),
        (["generate", "--prompt", "x", "--kv-budget", "lots"], "KV budget"),
    ],
)
def test_bad_arguments_one_line_error(args: list[str], fragment: str) -> None:
    if "--weights" not in args and args[0] == "generate":
        args = args + TINY
    elif args[0] == "encode":  # encode takes no --dtype
        args = args + TINY[:2]
    out = cli(*args)
    assert out.returncode != 0
    # the error is one line; a device check's comes after the progress line before torch loads
    lines = [line for line in out.stderr.strip().splitlines()
             if line != "loading torch and transformers"]
    assert len(lines) == 1, out.stderr
    assert fragment in lines[0] and "Traceback" not in out.stderr


@pytest.mark.slow  # loads the model
def test_chat_keeps_history_clear_and_stop() -> None:
    session = "你好\nTell me more\nclear\nhello again\nstop\nnever read\n"
    out = cli("chat", *TINY, "--max-tokens", "6", "--seed", "7", "--stats", stdin=session)
    assert out.returncode == 0, out.stderr
    stats = [json_line for json_line in out.stdout.splitlines() if "prompt tokens" in json_line]
    counts = [int(line.split()[0].strip("(")) for line in stats]
    assert len(counts) == 3  # 'stop' ended the session before the last line
    assert counts[0] == 8  # [gMASK] sop <|user|> \n 你好 <|assistant|>
    assert counts[1] > counts[0] + 6  # the first turn and its answer are in the history
    assert counts[2] < counts[1]  # 'clear' emptied the history
    assert "(history cleared)" in out.stdout
    assert out.stdout.count("ChatGLM: ") == 3


@pytest.mark.slow  # loads the model
def test_chat_ends_on_end_of_input() -> None:
    out = cli("chat", *TINY, "--max-tokens", "3", stdin="hi\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ChatGLM: ") == 1


@pytest.mark.slow  # the schema corpus, sampled
def test_structured_output_flags(tmp_path) -> None:
    """--json-schema (text or @FILE), --choice, --regex: the answer obeys; bad ones are one
    line naming the flag, before or after the model loads."""
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                              "maximum": 9}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    for given in (json.dumps(schema), f"@{path}"):
        out = cli("generate", *TINY, "--prompt", "hi", "--json-schema", given,
                  "--temperature", "0", "--max-tokens", "40")
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert set(answer) == {"ok", "n"} and 0 <= answer["n"] <= 9
    for seed, corpus_schema in enumerate(CORPUS.values()):  # sampled, the whole corpus
        out = cli("generate", *TINY, "--prompt", "JSON", "--json-schema",
                  json.dumps(corpus_schema), "--temperature", "1", "--seed", str(seed),
                  "--max-tokens", "200")
        assert out.returncode == 0, out.stderr
        jsonschema.validate(json.loads(out.stdout), corpus_schema)
    out = cli("generate", *TINY, "--prompt", "hi", "--choice", "yes", "--choice", "no")
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out.stderr
    for flags, words in ((["--regex", "[a-"], "error: --regex: the regex cannot be compiled"),
                         (["--json-schema", "{nope"], "error: --json-schema: json: not valid"),
                         (["--json-schema", "@" + str(tmp_path / "none.json")],
                          "error: --json-schema: cannot read")):
        out = cli("generate", *TINY, "--prompt", "hi", *flags)
        assert out.returncode == 1 and words in out.stderr, out.stderr
    # chat checks it once, before the first message, rather than answering each with it
    out = cli("chat", *TINY, "--regex", "[a-", stdin="hello\nhello\n")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "error: --regex: the regex cannot be compiled" in out.stderr
    assert "User:" not in out.stdout and "clear" not in out.stderr

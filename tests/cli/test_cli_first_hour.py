"""A new user's first hour with `python -m chatglm3` and `scripts/run`: help texts that state
params.py's limits, where the prompt comes from, Ctrl-C, relative paths, loading messages and
`pip install -e .`. Real subprocesses on the shared tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from chatglm3 import params
from chatglm3.text.messages import build_messages
from chatglm3.text.tokenizer import ChatGLMTokenizer, Message
from conftest import ROOT, TINY_CKPT, TOKENIZER_MODEL
from test_cli import TINY

# No network: a fetch attempt would fail fast instead of reaching out.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m chatglm3 ARGS` as a real subprocess (what these tests are about)."""
    return subprocess.run([sys.executable, "-m", "chatglm3", *args], input=stdin, env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)

pytestmark = [pytest.mark.slow, pytest.mark.shared]  # subprocesses

# A sampled run that goes on for hundreds of tokens on the tiny model (546 before it samples a
# stop token; ~50 tokens/s on a 2-core CPU): something to interrupt.
LONG = ["--prompt", "Tell me a very long story.", "--seed", "14", "--temperature", "1",
        "--top-p", "1", "--max-tokens", "2000"]
LONG_RUN_TOKENS = 546


def option_help(command: str) -> dict[str, str]:
    """`python -m chatglm3 COMMAND --help` as {option: its help text on one line}."""
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr
    entries: dict[str, str] = {}
    current = None
    for line in out.stdout.split("options:", 1)[1].splitlines():
        m = re.match(r"  (-\w|--[\w-]+)", line)
        if m:
            current = m[1] if m[1] != "-h" else "--help"
            entries[current] = line[m.end():]
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items()}


# ---- help and limits ----

def test_generate_help_states_params_defaults_and_ranges() -> None:
    p = params
    h = option_help("generate")
    assert f"0-{p.MAX_TEMPERATURE:g}" in h["--temperature"]
    assert f"below {p.GREEDY_BELOW_TEMPERATURE:g} = greedy" in h["--temperature"]
    assert f"default {p.DEFAULT_TEMPERATURE:g}" in h["--temperature"]
    assert f"1-{p.CONTEXT}" in h["--max-tokens"]
    assert f"default {p.DEFAULT_MAX_TOKENS}" in h["--max-tokens"]
    assert "0-1" in h["--top-p"] and "0 = greedy" in h["--top-p"]
    assert f"default {p.DEFAULT_TOP_P:g}" in h["--top-p"]
    defaults = p.SamplingParams()
    assert f"default {defaults.top_k}" in h["--top-k"]
    assert (f"{p.MIN_REPETITION_PENALTY:g}-{p.MAX_REPETITION_PENALTY:g}"
            in h["--repetition-penalty"])
    assert f"default {defaults.repetition_penalty:g}" in h["--repetition-penalty"]
    assert f"0-{p.MAX_SEED}" in h["--seed"]
    assert f"at most {p.MAX_STOP_SEQUENCES}" in h["--stop"]
    assert f"at most {p.MAX_STOP_LENGTH} characters" in h["--stop"]
    assert "--stop A --stop B" in h["--stop"]
    for option in ("--device", "--dtype", "--decode-step", "--weights", "--system"):
        assert "default" in h[option], option
    assert "-" in h["--prompt"] and "standard input" in h["--prompt"]
    assert "--prompt-file" in h and "--json" in h


def test_encode_help_lists_only_what_encode_uses() -> None:
    h = option_help("encode")
    assert set(h) == {"--help", "--weights", "--system", "--prompt", "--prompt-file",
                      "--history"}
    assert "tokenizer.model" in h["--weights"]


def test_chat_help_has_sampling_but_no_prompt() -> None:
    h = option_help("chat")
    assert "--temperature" in h and "--stats" in h and "--device" in h
    assert "--prompt" not in h and "--history" not in h
    # no option of another command is mentioned (chat has no --json; --stats shows the seed)
    assert not any("--json" in text for text in h.values()), h
    assert "--stats" in h["--seed"]


def test_readme_chat_synopsis_lists_every_chat_option() -> None:
    readme = (ROOT / "README.md").read_text()
    synopsis = readme.split("python -m chatglm3 chat ", 1)[1].split("python -m chatglm3 generate", 1)[0]
    from chatglm3.settings import OPTIONS

    # the model options (settings.py's), listed once for chat and generate below the synopses
    model = {"--weights", "--help"} | {opt.flag for opt in OPTIONS}
    missing = [o for o in option_help("chat") if o not in model and o not in synopsis]
    assert not missing, missing


def test_cli_choices_match_the_library() -> None:
    from chatglm3 import cli as cli_module
    from chatglm3.devices import DEVICES, resolve_dtype

    gen = cli_module.build_parser()._subparsers._group_actions[0].choices["generate"]
    choices = {a.dest: a.choices for a in gen._actions}
    assert tuple(choices["device"]) == DEVICES
    import torch

    for name in choices["dtype"]:
        resolve_dtype(name, torch.device("cpu"))  # each accepted


def test_top_p_zero_is_greedy(reference: dict) -> None:
    out = cli("generate", *TINY, "--prompt", "你好", "--top-p", "0", "--temperature", "1",
              "--max-tokens", "24", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["output_ids"] == \
        reference["prompts"][0]["greedy_generate"]["new_ids"]


# ---- where the prompt comes from ----

def test_prompt_from_stdin(reference: dict) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "chatglm3", "generate", *TINY, "--prompt", "-", "--temperature",
         "0", "--max-tokens", "24", "--json"],
        input="你好\n".encode(), env=ENV, cwd=ROOT, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    # The final newline (echo's, an editor's) is not part of the prompt.
    assert record["input_ids"] == reference["prompts"][0]["input_ids"]
    assert record["output_ids"] == reference["prompts"][0]["greedy_generate"]["new_ids"]


def test_prompt_file_and_stdin_give_the_prompt_verbatim(tmp_path: Path, reference: dict) -> None:
    case = reference["chat_inputs"][2]
    history = json.dumps(case["history"])
    f = tmp_path / "prompt.txt"
    f.write_bytes((case["query"] + "\n").encode())
    by_file = cli("encode", *TINY[:2], "--prompt-file", str(f), "--history", history)
    assert by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout) == case["input_ids"]
    # Inner and leading line breaks stay: only one final line ending is dropped.
    text = "\n line one\n\nline two\t"
    f.write_bytes((text + "\r\n").encode())
    want = ChatGLMTokenizer(TOKENIZER_MODEL).build_chat_input(build_messages(text))
    by_file = cli("encode", *TINY[:2], "--prompt-file", str(f))
    assert json.loads(by_file.stdout) == want
    by_stdin = subprocess.run(
        [sys.executable, "-m", "chatglm3", "encode", *TINY[:2], "--prompt", "-"],
        input=(text + "\n").encode(), env=ENV, cwd=ROOT, capture_output=True, timeout=60)
    assert json.loads(by_stdin.stdout) == want


def test_prompt_file_not_utf8_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("café au lait".encode("latin-1"))
    out = cli("encode", *TINY[:2], "--prompt-file", str(f))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: --prompt-file {f}: not UTF-8 text (invalid continuation byte at byte 3)"]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_prompt_file_that_is_no_file_names_the_option(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "nope.txt" if kind == "missing" else tmp_path
    out = cli("generate", *TINY, "--prompt-file", str(target))
    assert out.returncode == 1
    why = "no such file" if kind == "missing" else "a directory, not a file"
    assert out.stderr.strip().splitlines() == [f"error: --prompt-file {target}: {why} ({target})"]


@pytest.mark.parametrize("args,named", [
    (["--max-tokens", "-5"], "max_tokens: must be an integer from 1 to 32768"),
    (["--temperature", "9"], "temperature: must be from 0 to 5"),
    (["--repetition-penalty", "0"], "repetition_penalty: must be from 0.01 to 10"),
    (["--weights", "/nowhere/ckpt"], "/nowhere/ckpt: no such directory"),
    (["--weights", "./weights-typo/x"], "./weights-typo/x: no such directory"),
])
def test_range_errors_come_before_torch_is_imported(args: list[str], named: str) -> None:
    """Checked before the model's libraries load (they take ~5 s to import): the error comes
    from a process that never imported torch or transformers."""
    code = ("import sys; from chatglm3.cli import main; "
            f"rc = main({['generate', '--prompt', 'hi', *args]!r}); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split() == ["1", "False", "False"], out.stderr
    assert out.stderr.startswith("error: ") and named in out.stderr


def test_encode_without_weights_fetches_only_the_tokenizer(tmp_path: Path, reference: dict) -> None:
    from helpers.fakehub import FakeHub

    from chatglm3.weights.download import DEFAULT_REPO, DEFAULT_REVISION

    case = reference["chat_inputs"][0]
    with FakeHub() as hub:
        hub.add_repo(DEFAULT_REPO, {p.name: p for p in TINY_CKPT.iterdir()}, commit=DEFAULT_REVISION)
        env = {**ENV, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
               "CHATGLM3_WEIGHTS_DIR": str(tmp_path / "w")}
        out = subprocess.run([sys.executable, "-m", "chatglm3", "encode", "--prompt", case["query"],
                              "--history", json.dumps(case["history"])], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == case["input_ids"]
        assert not hub.seen(match=".bin"), [r.path for r in hub.requests]
        assert sorted(p.name for p in (tmp_path / "w").iterdir() if not p.name.startswith(".")) == \
            ["tokenizer.model", "tokenizer_config.json"]


def test_encode_needs_only_the_tokenizer(tmp_path: Path, reference: dict) -> None:
    only = tmp_path / "tok"
    only.mkdir()
    shutil.copy(TOKENIZER_MODEL, only / "tokenizer.model")
    for case in reference["chat_inputs"][:3]:
        out = cli("encode", "--weights", str(only), "--prompt", case["query"], "--history",
                  json.dumps(case["history"]))
        assert out.returncode == 0, out.stderr
        ids = json.loads(out.stdout)
        assert ids == case["input_ids"]
        direct = ChatGLMTokenizer.from_dir(only).build_chat_input(
            build_messages(case["query"], history=case["history"]))
        assert ids == direct


# ---- saying what is happening ----

def test_loading_messages_on_stderr_answer_alone_on_stdout() -> None:
    out = cli("generate", *TINY, "--prompt", "你好", "--temperature", "0", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    # said before torch's import, which would otherwise leave the first seconds silent
    first, *lines = out.stderr.splitlines()
    assert first == "loading torch and transformers"
    assert lines[0] == f"loading weights {TINY_CKPT.resolve()} on cpu as float32"
    assert lines[1:3] == ["loading shard 1/2: pytorch_model-00001-of-00002.bin",
                          "loading shard 2/2: pytorch_model-00002-of-00002.bin"]
    # how the CPU linear layers multiply (packed_linear.layers_summary): 2 layers x 6 + output
    assert lines[3] == "linear layers: 13 packed once for oneDNN (CPU)"
    # the lines every door's start-up says (startup.start_engine)
    assert lines[4:6] == ["KV cache: grows on demand (CPU, no KV budget set)",
                          "prefix cache: off (the default on a CPU; CHATGLM3_PREFIX_CACHE=1 "
                          "turns it on)"]
    assert lines[6].startswith("warm-up: ") and "decoding: eager" in lines[6]
    assert re.fullmatch(r"ready in \d+\.\d s \(peak RSS \d+(\.\d+)? (MiB|GiB)\)", lines[7])
    assert len(lines) == 8
    assert "loading" not in out.stdout and "ready" not in out.stdout


def test_shard_progress_is_a_bar_on_a_terminal() -> None:
    import fcntl
    import pty
    import struct
    import termios

    code = ("import torch; from chatglm3.weights.checkpoint import load_model; "
            f"load_model({str(TINY_CKPT)!r}, 'cpu', torch.float32, progress=True)")
    main, side = pty.openpty()
    # A terminal 100 columns wide: a new pty has 0, and tqdm then draws nothing.
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run([sys.executable, "-c", code], stderr=side, env=ENV, cwd=ROOT,
                              timeout=120)
        os.close(side)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child's end is closed and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "loading shards" in text and "2/2" in text and "\r" in text


# ---- Ctrl-C ----

@contextmanager
def started(*args: str, stdin: bool = False) -> Iterator[subprocess.Popen]:
    """`python -m chatglm3 ARGS` running; killed after 3 minutes, so a hang fails the test
    instead of stalling the suite."""
    proc = subprocess.Popen([sys.executable, "-m", "chatglm3", *args], env=ENV, cwd=ROOT,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        with proc:
            yield proc
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_in_generate_ends_the_line() -> None:
    with started("generate", *TINY, *LONG) as proc:
        _interrupt_generate(proc)


def _interrupt_generate(proc: subprocess.Popen) -> None:
    first = proc.stdout.read1(4096)  # some of the answer has arrived
    assert first
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    text, err = (first + rest).decode(), err.decode()
    assert proc.returncode == 130, err
    assert text.endswith("\n") and len(text) > 1
    assert "Traceback" not in err
    m = re.search(r"^cancelled after (\d+) tokens$", err, re.M)
    assert m and 0 < int(m[1]) < LONG_RUN_TOKENS, err


def test_ctrl_c_in_generate_json_still_prints_the_record() -> None:
    with started("generate", *TINY, *LONG, "--json") as proc:
        _interrupt_generate_json(proc)


def _interrupt_generate_json(proc: subprocess.Popen) -> None:
    line = b""
    while not line.startswith(b"ready"):  # the model is loaded ...
        line = proc.stderr.readline()
        assert line, "no 'ready' line"
    time.sleep(0.5)  # ... and has generated for a while
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert out.endswith(b"}\n") and out.count(b"\n") == 1  # one record
    record = json.loads(out)
    assert record["stop_reason"] == "cancelled"
    assert 0 < record["output_token_count"] == len(record["output_ids"]) < LONG_RUN_TOKENS
    assert record["text"] and record["seed"] == 14


def test_ctrl_c_in_chat_cancels_the_answer_and_goes_on(tokenizer) -> None:
    with started("chat", *TINY, *LONG[2:], "--stats", stdin=True) as proc:
        _interrupt_chat(proc, tokenizer)


STATS = re.compile(r"\((\d+) prompt tokens, (\d+) generated, [\d.]+ tokens/s, stop: (\w+), "
                   r"seed (\d+)\)")


def _interrupt_chat(proc: subprocess.Popen, tokenizer: ChatGLMTokenizer) -> None:
    proc.stdin.write(b"Tell me a very long story.\n")
    proc.stdin.flush()
    seen = b""
    while b"ChatGLM: " not in seen or seen.endswith(b"ChatGLM: "):
        chunk = proc.stdout.read1(4096)
        assert chunk, seen
        seen += chunk
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    # Ctrl-C cut the answer, not the session: it still reads the next line.
    rest, err = proc.communicate("你好\nstop\n".encode(), timeout=60)
    out = (seen + rest).decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err.decode()
    shown = out.split("ChatGLM: ", 1)[1].split(" [interrupted]", 1)[0]
    first, second = STATS.findall(out)
    assert first[2] == "cancelled" and 0 < int(first[1]) < LONG_RUN_TOKENS
    assert int(first[3]) == 14  # the seed given
    # The next turn's prompt holds exactly the answer as it was shown: nothing after the
    # Ctrl-C was printed or kept.
    history = [Message("user", "Tell me a very long story."), Message("assistant", shown.strip()),
               Message("user", "你好")]
    assert int(second[0]) == len(tokenizer.build_chat_input(history))


# ---- scripts/run and paths ----

def _run_env() -> dict[str, str]:
    env = dict(ENV)
    env.pop("PYTHONPATH")  # scripts/run makes the package importable by itself
    return env


def test_scripts_run_relative_paths_from_the_users_directory(tmp_path: Path,
                                                             reference: dict) -> None:
    (tmp_path / "ckpt").symlink_to(TINY_CKPT, target_is_directory=True)
    (tmp_path / "prompt.txt").write_text("你好\n", encoding="utf-8")
    out = subprocess.run(
        [str(ROOT / "scripts" / "run"), "generate", "--weights", "./ckpt", "--dtype", "float32",
         "--prompt-file", "prompt.txt", "--temperature", "0", "--max-tokens", "24", "--json"],
        env=_run_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["input_ids"] == reference["prompts"][0]["input_ids"]
    assert record["output_ids"] == reference["prompts"][0]["greedy_generate"]["new_ids"]
    # The line names the weights by the absolute path the user's ./ckpt stands for.
    assert f"loading weights {(tmp_path / 'ckpt').resolve()} on cpu as float32" in out.stderr


FAKE_VENV = """#!/usr/bin/env bash
# Stands in for scripts/venv: a .venv whose python is the test's, and the stamp the real one writes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/.venv/bin"
printf '#!/bin/sh\\nexec %s "$@"\\n' "{python}" >"$root/.venv/bin/python"
chmod +x "$root/.venv/bin/python"
stamp=$root/.venv/.installed-$(basename "$1")
want=$(cat "$root"/requirements*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "pip progress would be here"
  echo "$want" >"$stamp"
fi
"""


def test_scripts_run_says_when_it_installs(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "run", root / "scripts" / "run")
    venv = root / "scripts" / "venv"
    venv.write_text(FAKE_VENV.replace("{python}", sys.executable))
    venv.chmod(0o755)
    (root / "requirements.txt").write_text("torch\n")
    (root / "chatglm3").symlink_to(ROOT / "chatglm3", target_is_directory=True)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([str(root / "scripts" / "run"), "encode", "--help"],
                              env=_run_env(), cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    first = run()
    assert first.returncode == 0, first.stderr
    assert first.stderr.startswith("first run: ") and "(2-3 min; log: " in first.stderr
    assert "pip progress would be here" in first.stderr  # the installer's output: on stderr
    assert first.stdout.startswith("usage: python -m chatglm3 encode")
    again = run()
    assert again.returncode == 0 and again.stderr == ""
    (root / "requirements.txt").write_text("torch\nnumpy\n")
    changed = run()
    assert changed.stderr.startswith("the pinned packages changed: updating .venv")


FAKE_PYTHON = """#!/bin/sh
# Stands in for .venv's python: pages of output, as pip prints; fails on demand.
i=0; while [ $i -lt 200 ]; do echo "pip says $i"; i=$((i+1)); done
case "$*" in *" -r "*) [ -n "$FAIL_PIP" ] && { echo "ERROR: no matching distribution"; exit 1; } ;; esac
exit 0
"""


def test_an_install_is_one_line_per_step_with_pip_in_a_log(tmp_path: Path) -> None:
    """scripts/venv under scripts/run: each step one line (what, then done and its time); pip's
    pages only in the log, whose end is shown (and its path named) when a step fails."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "venv", root / "scripts" / "venv")
    (root / "requirements.txt").write_text("torch\n")
    (root / ".venv" / "bin").mkdir(parents=True)
    fake = root / ".venv" / "bin" / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "install.log"

    def venv(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(root / "scripts" / "venv"), str(root / "requirements.txt")],
                              env={**_run_env(), "CHATGLM3_INSTALL_LOG": str(log), **env},
                              capture_output=True, text=True, timeout=60)

    ok = venv()
    assert ok.returncode == 0, ok.stderr
    assert [re.sub(r"\(\d+ s\)", "(N s)", line) for line in ok.stderr.splitlines()] == [
        "torch (the build for this machine) ... done (N s)",
        "the pinned packages of requirements.txt ... done (N s)",
        "chatglm3 itself (editable) ... done (N s)"]
    assert "pip says" not in ok.stderr + ok.stdout and log.read_text().count("pip says 199") == 3
    (root / ".venv" / ".installed-requirements.txt").unlink()
    failed = venv(FAIL_PIP="1")
    assert failed.returncode != 0
    assert f"the pinned packages of requirements.txt ... failed; the end of its output (all of " \
           f"it: {log}):" in failed.stderr
    assert failed.stderr.rstrip().endswith("ERROR: no matching distribution")
    assert "pip says 100" not in failed.stderr  # the end of the log, not its pages


def test_pip_install_editable_then_import_from_anywhere(tmp_path: Path) -> None:
    """pyproject.toml names the package: setuptools accepts the flat layout, and the installed
    package imports from any directory. Installed from a copy (the editable install writes
    chatglm3.egg-info next to pyproject.toml) that has the repository's other top-level
    modules and folders, which are what made setuptools refuse."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "chatglm3", src / "chatglm3",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "predict.py"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("bench", "tests", "scripts"):
        (src / folder).mkdir()
        (src / folder / "x.py").write_text("")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # This interpreter's packages (pip, setuptools, torch, ...) without installing any.
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import sysconfig

    Path(site, "_outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "-e", str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import chatglm3, chatglm3.engine.engine, importlib.util as u; print(chatglm3.__file__); "
            "print([m for m in ('bench', 'tests', 'scripts', 'predict') if u.find_spec(m)])")
    check = subprocess.run([str(py), "-c", code], env=env, cwd=elsewhere, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    where, others = check.stdout.splitlines()
    assert Path(where) == src / "chatglm3" / "__init__.py"
    assert others == "[]"


@pytest.mark.parametrize("args,said", [
    (["generate", "--promt", "hi"], "unrecognized option --promt; did you mean --prompt?"),
    (["generate", "--prompt", "hi", "--temprature", "0"],
     "unrecognized option --temprature; did you mean --temperature?"),
    (["chat", "--sytem", "x"], "unrecognized option --sytem; did you mean --system?"),
    (["generate", "--prompt", "hi", "--frobnicate"], "unrecognized option --frobnicate (see"),
])
def test_a_misspelled_option_is_named_with_the_closest_one(args: list[str], said: str) -> None:
    """Not reported as a missing --prompt; abbreviations and values that merely start with
    dashes stay what argparse makes of them."""
    out = cli(*args)
    assert out.returncode == 2 and said in out.stderr, out.stderr
    ok = cli("generate", *TINY, "--prompt", "--not a flag", "--temp", "0", "--max-tok", "2")
    assert ok.returncode == 0, ok.stderr


def test_an_empty_prompt_with_nothing_before_it_is_refused() -> None:
    for prompt in ("", "  \n"):
        out = cli("generate", *TINY, "--prompt", prompt, "--max-tokens", "2")
        assert out.returncode == 1 and "error: prompt: empty" in out.stderr, out.stderr
    history = '[["What is 2+2?", "4"]]'  # after earlier turns an empty turn is taken
    out = cli("generate", *TINY, "--prompt", "", "--history", history, "--max-tokens", "2")
    assert out.returncode == 0, out.stderr


def test_encode_and_generate_without_a_hub_fail_alike(tmp_path: Path) -> None:
    """No weights here and the hub refuses the connection: encode (which fetches only the
    tokenizer) fails as generate does, at once and in one line; no retry lines."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
    env.update(CHATGLM3_WEIGHTS_DIR=str(tmp_path / "w"), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    errors = []
    for command in ("encode", "generate"):
        out = subprocess.run([sys.executable, "-m", "chatglm3", command, "--prompt", "hi"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stderr
        assert "Retrying" not in out.stderr and "Traceback" not in out.stderr, out.stderr
        [line] = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert "did not answer" in line and "Connection refused" in line
        errors.append(line)
    assert errors[0] == errors[1]

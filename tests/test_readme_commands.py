"""The README's commands, read from the README and run as it states them, on a fresh clone's
state: an empty weights folder, the hub (a fake one on 127.0.0.1 serving the tiny checkpoint
as the official repo) reachable. What each command does first on a new machine (fetch the
weights) is part of what is tested. A command that cannot run here says so in its comment
(`# needs Docker`, `# needs a GPU`, `# needs a Replicate token`, `# needs the real weights`);
every other one is run by a test of this module."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatglm3.weights.download import DEFAULT_REPO, DEFAULT_REVISION
from helpers.cogserver import _create, wait_settled
from conftest import ROOT, TINY_CKPT
from helpers.fakehub import FakeHub

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()
NEEDS = re.compile(r"#.*\bneeds (Docker|a GPU|a Replicate token|the real weights)\b")
# What the tests below run: each README command that is not marked holds exactly one of these.
RUN_HERE = ("scripts/run chat", "scripts/test", "cog.server.http", "localhost:5000/",
            "scripts/run serve --port 8000", "http://127.0.0.1:8000/", "scripts/run generate",
            "scripts/run encode")


def readme_shell_lines() -> list[str]:
    """Every command line of the README's ```bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line)
    return lines


def strip_comment(line: str) -> str:
    return line.split("  #", 1)[0].strip()


def readme_commands(marker: str) -> list[str]:
    """The README's command lines that contain `marker`, trailing # comments dropped."""
    return [strip_comment(line) for line in readme_shell_lines() if marker in strip_comment(line)]


def readme_command(marker: str) -> str:
    """The one README command line that contains `marker`."""
    lines = readme_commands(marker)
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def test_every_readme_command_is_run_here_or_marked() -> None:
    lines = readme_shell_lines()
    assert len(lines) >= 10
    for line in lines:
        command = strip_comment(line)
        if NEEDS.search(line):
            continue
        if m := re.fullmatch(r"([A-Z_]+)=\S+", command):  # a variable the next commands use
            assert any(f"${m.group(1)}" in later for later in lines), line
            continue
        assert sum(marker in command for marker in RUN_HERE) == 1, line
    for marker in RUN_HERE:  # each is one the README still has
        assert readme_commands(marker), marker


PYTHON_RUN_HERE = ("OpenAI(base_url", "Engine.from_pretrained")  # what the tests below run


def test_every_readme_python_example_is_run_here_or_marked() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        if not NEEDS.search(block.splitlines()[0]):
            assert sum(marker in block for marker in PYTHON_RUN_HERE) == 1, block
    for marker in PYTHON_RUN_HERE:
        assert sum(marker in block for block in blocks) == 1, marker


def test_the_test_command_is_what_ci_runs() -> None:
    """`scripts/test` is run by CI: .ci/run executes exactly it on a clean clone."""
    command = readme_command("scripts/test")
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [f"exec {command}"]


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as h:
        h.add_repo(DEFAULT_REPO, {p.name: p for p in TINY_CKPT.iterdir()}, commit=DEFAULT_REVISION)
        yield h


def fresh_env(tmp_path: Path, hub: FakeHub, **extra: str) -> dict[str, str]:
    """This machine's environment as a new user has it: online (no HF_HUB_OFFLINE), nothing
    of ours set, the weights folder empty (CHATGLM3_WEIGHTS_DIR stands for weights/, so the
    repository's own stays as it is), the hub at the fake one."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATGLM3_", "COG_", "HF_")) and k not in ("PYTHONPATH", "PORT")}
    weights = tmp_path / "weights"
    weights.mkdir()
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), CHATGLM3_WEIGHTS_DIR=str(weights),
               **extra)
    return env


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group (a command's shell and what it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


def stop_group(proc: subprocess.Popen, sig: int) -> None:
    """Stops a command's whole process group (bash and what it started): `sig`, then kill."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)


def test_the_model_command_fetches_and_chats(tmp_path: Path, hub: FakeHub) -> None:
    command = readme_command("scripts/run chat")
    assert command == "scripts/run chat"
    out = subprocess.run(["bash", "-c", command], input="你好\nstop\n", env=fresh_env(tmp_path, hub),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Fetching {DEFAULT_REPO}" in out.stderr  # the empty weights folder was filled
    answer = out.stdout.split("ChatGLM: ", 1)[1]
    assert answer.strip(), out.stdout
    assert (tmp_path / "weights" / "config.json").is_file()


def test_the_local_server_command_fetches_and_serves_two_at_once(tmp_path: Path,
                                                                 hub: FakeHub) -> None:
    command = readme_command("cog.server.http")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(["bash", "-c", command], env=fresh_env(tmp_path, hub, PORT=str(port)),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_settled(base, proc, 300, poll_s=0.2)
        text = (tmp_path / "server.log").read_text(errors="replace")
        assert health.get("status") == "READY", text[-4000:]
        assert hub.seen(match=f"/{DEFAULT_REPO}/resolve/{DEFAULT_REVISION}/")  # setup fetched
        # Two predictions at once, each longer than _create's 2 s retry of a 409: coglet can
        # answer 409 "At capacity" for a moment right after READY or a prediction's end (seen
        # in CI), which the retry rides out; a one-slot server would refuse the second for
        # the whole of the first, past the retry, and fail here.
        results: list = [None, None]
        started = threading.Barrier(2)

        def predict(i: int) -> None:
            started.wait()
            body = {"input": {"prompt": f"Tell me story {i}", "max_tokens": 2500,
                              "min_tokens": 2500, "temperature": 0}}
            results[i] = _create("POST", base + "/predictions", body)

        threads = [threading.Thread(target=predict, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for code, body in results:
            assert code == 200 and body["status"] == "succeeded", (code, body)
            assert body["metrics"]["output_token_count"] == 2500
            assert body["metrics"]["predict_time"] > 2.0, body["metrics"]  # > the retry
        assert "batch 8" in (tmp_path / "server.log").read_text(errors="replace")
        run_the_cog_curls(port)
    finally:
        stop_group(proc, 15)
        log.close()


def curl(command: str, port: int | str, old: str) -> tuple[int, str]:
    """(status, body) of a README curl command with `old` (its host:port) pointed at `port`;
    a 409 (coglet "At capacity" for a moment after a prediction ends) is asked again for 2 s."""
    command = command.replace(old, f"127.0.0.1:{port}") + " -sS -w '\\n%{http_code}'"
    for _ in range(100):
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (command, out.stderr)
        body, _, code = out.stdout.rpartition("\n")
        if code != "409":
            break
        time.sleep(0.02)
    return int(code), body


class Webhook(http.server.ThreadingHTTPServer):
    """A listener on 127.0.0.1 that keeps what is POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.got = threading.Event()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                hook.got.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def run_the_cog_curls(port: int) -> None:
    """The README's curl commands for the Cog server, in order: an answer, the same streamed,
    an async prediction with a webhook (pointed at a listener here), and its cancel."""
    sync, sse, put, cancel = readme_commands("localhost:5000/")
    code, body = curl(sync, port, "localhost:5000")
    answer = json.loads(body)
    assert code == 200 and answer["status"] == "succeeded" and "".join(answer["output"]), body
    code, body = curl(sse, port, "localhost:5000")
    events = re.findall(r"^event: (\w+)", body, re.M)
    assert code == 200 and events[0] == "start" and "output" in events and events[-1] == "completed", body
    hook = Webhook()
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/done"
        code, body = curl(put.replace("http://127.0.0.1:8080/done", url), port, "localhost:5000")
        assert code == 202, body
        code, body = curl(cancel, port, "localhost:5000")
        assert code == 200, body
        assert hook.got.wait(120)
        done = hook.bodies[-1]
        assert done["id"] == "my-id" and done["status"] == "canceled", done
        assert 0 < done["metrics"]["output_token_count"] < 4096, done["metrics"]
    finally:
        hook.shutdown()


def test_the_openai_server_commands_answer(tmp_path: Path, hub: FakeHub) -> None:
    """The README's `serve` command on a fresh clone (it fetches the weights), then its curl
    and openai SDK examples against it; port 8000 replaced by a free one."""
    serve_cmd = readme_command("scripts/run serve --port 8000")
    chat_cmd, tokenize_cmd = readme_commands("http://127.0.0.1:8000/")
    assert "/v1/chat/completions" in chat_cmd and "/tokenize" in tokenize_cmd
    sdk_example = [b for b in re.findall(r"```python\n(.*?)```", README, re.S)
                   if "OpenAI(base_url" in b]
    assert len(sdk_example) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = fresh_env(tmp_path, hub)
    proc = subprocess.Popen(["bash", "-c", serve_cmd.replace("8000", port)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "serving on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(300) and proc.poll() is None, "".join(lines)[-3000:]
        assert f"http://127.0.0.1:{port}" in lines[-1]
        # scripts/run preloads TCMalloc where the system has it, and runs without it elsewhere
        maps = "".join(Path(f"/proc/{pid}/maps").read_text() for pid in group_pids(proc.pid))
        assert ("libtcmalloc_minimal" in maps) == any(
            Path(d, "libtcmalloc_minimal.so.4").is_file()
            for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"))
        code, body = curl(chat_cmd, port, "127.0.0.1:8000")
        answer = json.loads(body)
        assert code == 200 and answer["object"] == "chat.completion", body
        assert 0 < answer["usage"]["completion_tokens"] <= 64
        code, body = curl(tokenize_cmd, port, "127.0.0.1:8000")
        ids = json.loads(body)
        assert code == 200 and ids["tokens"][:2] == [64790, 64792] and ids["count"] == len(ids["tokens"]) > 2, body
        out = subprocess.run([sys.executable, "-c", sdk_example[0].replace("8000", port)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    finally:
        stop_group(proc, 2)


def test_the_cli_examples_run(tmp_path: Path, hub: FakeHub) -> None:
    """The README's generate and encode examples, on a fresh clone (the first fetches the
    weights, encode only the tokenizer)."""
    commands = readme_commands("scripts/run generate") + readme_commands("scripts/run encode")
    assert len(commands) >= 3
    env = fresh_env(tmp_path, hub)
    for command in commands:
        out = subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0 and out.stdout.strip(), (command, out.stderr[-3000:])
        if "--json" in command:
            record = json.loads(out.stdout)
            if "--choice" in command:
                choices = re.findall(r"--choice (\S+)", command)
                assert record["text"] in choices, record
        if command.startswith("scripts/run encode"):
            assert json.loads(out.stdout)  # the ids, as JSON


def test_the_python_example_runs(tmp_path: Path, hub: FakeHub) -> None:
    """The README's Python example as written (Engine.from_pretrained(None) fetches the default
    weights: here the fake hub's tiny checkpoint into an empty folder)."""
    example = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "Engine.from_pretrained" in b]
    assert len(example) == 1
    out = subprocess.run([sys.executable, "-c", example[0]], env=fresh_env(tmp_path, hub),
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^(stop_token|max_tokens) \d+\.\d tokens/s$", out.stdout, re.M), out.stdout
    assert out.stdout.splitlines()[-1].startswith("{"), out.stdout  # structured: a JSON object (maybe cut)

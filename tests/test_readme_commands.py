"""The README's commands, read from the README and run as it states them, on a fresh clone's
state: an empty weights folder, the hub (a fake one on 127.0.0.1 serving the tiny checkpoint
as the official repo) reachable. What each command does first on a new machine (fetch the
weights) is part of what is tested."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from chatglm3.weights.download import DEFAULT_REPO, DEFAULT_REVISION
from helpers.cogserver import _call, _create, wait_settled
from conftest import ROOT, TINY_CKPT
from helpers.fakehub import FakeHub

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()


def readme_command(marker: str) -> str:
    """The one command line inside a ```bash block of the README that contains `marker`, with
    any trailing # comment dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [line for block in blocks for line in block.splitlines() if marker in line]
    assert len(lines) == 1, (marker, lines)
    return lines[0].split("  #", 1)[0].strip()


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
    finally:
        stop_group(proc, 15)
        log.close()


def test_the_openai_server_commands_answer(tmp_path: Path, hub: FakeHub) -> None:
    """The README's `serve` command on a fresh clone (it fetches the weights), then its curl
    and openai SDK examples against it; port 8000 replaced by a free one."""
    import json
    import sys

    serve_cmd = readme_command("scripts/run serve --port 8000")
    curl_cmd = readme_command("curl http://127.0.0.1:8000/v1/chat/completions")
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
        out = subprocess.run(["bash", "-c", curl_cmd.replace("8000", port) + " -sS"],
                             capture_output=True, text=True, timeout=120)
        answer = json.loads(out.stdout)
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] > 0
        out = subprocess.run([sys.executable, "-c", sdk_example[0].replace("8000", port)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    finally:
        stop_group(proc, 2)

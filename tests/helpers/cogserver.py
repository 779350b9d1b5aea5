"""The real Cog HTTP server (coglet) running predict.py, for tests and benchmarks: start it on a
free loopback port with a given environment, talk to it over HTTP (stdlib only)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
PY = Path(sys.executable)


def _call(method: str, url: str, body=None, headers=None, timeout: float = 120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw) if raw else None
        except ValueError:
            return e.code, raw.decode(errors="replace")


def _create(method: str, url: str, body, headers=None, retry_s: float = 2.0):
    """Starts a prediction. coglet may answer 409 'At capacity' for a few ms after a slot's
    previous prediction has already answered; retry that briefly, nothing else."""
    deadline = time.monotonic() + retry_s
    while True:
        code, resp = _call(method, url, body, headers)
        if code != 409 or time.monotonic() > deadline:
            return code, resp
        time.sleep(0.02)


def _sse(url: str, inputs: dict, method: str = "POST", timeout: float = 120, retry_s: float = 2.0):
    """Yields (arrival time, event name, data) for each server-sent event, as it arrives."""
    req = urllib.request.Request(url, data=json.dumps({"input": inputs}).encode(), method=method,
                                 headers={"Content-Type": "application/json",
                                          "Accept": "text/event-stream"})
    deadline = time.monotonic() + retry_s
    while True:
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        event, data = None, []
        for raw in resp:  # http.client undoes the chunking; lines come as they arrive
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    yield time.monotonic(), event, json.loads("\n".join(data))
                event, data = None, []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


class Server:
    def __init__(self, base: str, log_path: Path) -> None:
        self.base, self.log_path = base, log_path

    def predict(self, **inputs) -> dict:
        """A synchronous prediction; the response body (status succeeded or failed)."""
        code, body = _create("POST", self.base + "/predictions", {"input": inputs})
        assert code == 200, (code, body)
        return body

    def text(self, **inputs) -> str:
        body = self.predict(**inputs)
        assert body["status"] == "succeeded", body
        return "".join(body["output"])

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def wait_settled(base: str, proc: subprocess.Popen, timeout_s: float,
                 poll_s: float = 0.05) -> dict:
    """Polls a Cog server's /health-check until it is READY, SETUP_FAILED or DEFUNCT with
    setup's own status settled too, the process exits, or time runs out; the last health
    seen ({} if none)."""
    deadline, health = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            _, health = _call("GET", base + "/health-check", timeout=2)
            # READY can be reported a moment before setup's own status leaves "starting"
            # (seen under load, once as a 409 "At capacity" right after): wait for both.
            if (isinstance(health, dict)
                    and health.get("status") in ("READY", "SETUP_FAILED", "DEFUNCT")
                    and (health.get("setup") or {}).get("status") != "starting"):
                break
        except OSError:  # not listening yet
            pass
        time.sleep(poll_s)
    return health if isinstance(health, dict) else {}


@contextlib.contextmanager
def running_server(log_path: Path, startup_s: float = 120, **env_overrides: str) -> Iterator[Server]:
    """`python -m cog.server.http` as the image runs it, in the repository root, until it is
    READY, SETUP_FAILED or DEFUNCT (srv.health, srv.started_at); stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.update(
        # coglet starts its worker as plain `python` from PATH: the venv must come first, or the
        # worker cannot import coglet and the server stays STARTING forever.
        PATH=f"{PY.parent}{os.pathsep}{env.get('PATH', '')}",
        PORT=str(port),
        COG_PREDICT_TYPE_STUB="predict.py:Predictor",  # relative to cwd, like .cog/openapi_schema.json
        HF_HUB_OFFLINE="1",
        **env_overrides,
    )
    log = open(log_path, "w")
    started = time.monotonic()
    proc = subprocess.Popen([str(PY), "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", log_path)
    srv.pid, srv.started_at = proc.pid, started
    try:
        srv.health = wait_settled(srv.base, proc, startup_s)
        srv.ready_after = time.monotonic() - started
        yield srv
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
        log.close()

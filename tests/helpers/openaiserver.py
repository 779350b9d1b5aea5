"""`python -m chatglm3 serve` as a real server process for tests and benchmarks: started on a
free loopback port (--port 0; the port is read from its 'serving on' line), raw HTTP helpers
(stdlib) for what the openai SDK cannot send, and a clean stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: list[str]) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, object]:
        """(status, headers, JSON body or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        try:
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            parsed: object = json.loads(raw)
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed

    def stats(self, key: str | None = None) -> dict:
        status, _, body = self.request("GET", "/stats", headers=_auth(key))
        assert status == 200, body
        return body  # type: ignore[return-value]

    def wait_until(self, predicate, timeout: float = 30, key: str | None = None) -> dict:
        """Polls /stats (another process: there is no event to await) until predicate(stats)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats(key)
            if predicate(s):
                return s
            assert time.monotonic() < deadline, f"stats never matched: {s}"
            time.sleep(0.02)

    def alive(self) -> bool:
        status, _, _ = self.request("GET", "/health", timeout=10)
        return status == 200 and self.proc.poll() is None


def _auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def open_stream(port: int, body: dict, key: str | None = None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **_auth(key)})
    return conn, conn.getresponse()


def events(resp: http.client.HTTPResponse) -> Iterator[dict | str]:
    """The data of each server-sent event as it arrives ('[DONE]' as the string)."""
    for line in resp:
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data: "):
            data = line[6:].decode()
            yield data if data == "[DONE]" else json.loads(data)


@contextlib.contextmanager
def serve(*args: str, weights: Path, env: dict | None = None, timeout: float = 120
          ) -> Iterator[Server]:
    """Runs `python -m chatglm3 serve --weights weights --device cpu --dtype float32 --port 0
    *args` until the block ends."""
    cmd = [sys.executable, "-m", "chatglm3", "serve", "--weights", str(weights), "--device",
           "cpu", "--dtype", "float32", "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env={**os.environ, **(env or {})})
    log: list[str] = []
    ready = threading.Event()
    port: list[int] = []

    def read() -> None:  # the whole log, so the pipe never fills
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(timeout) or not port:
            raise RuntimeError("server did not start:\n" + "".join(log))
        yield Server(proc, port[0], log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

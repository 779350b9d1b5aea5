"""A local stand-in for the Hugging Face hub: just what huggingface_hub's `snapshot_download` uses.

Endpoints (as huggingface_hub 2.4 calls them):
  GET  /api/models/{repo}/revision/{rev}         model info; siblings with sizes (`?blobs=true`)
  GET  /api/models/{repo}/tree/{rev}[/{path}]    the file listing snapshot_download downloads from
  HEAD /{repo}/resolve/{rev}/{file}              X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}              the bytes; `Range: bytes=N-[M]` answered with 206
  GET  /static/{name}                            plain files (tar archives), Range too
Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound).
`FakeHub.ranges = False`: a server without Range support (200 and the whole file, always).
Every request is logged with the body bytes it was sent (`Request.sent`, `FakeHub.sent()`).

Faults (`FakeHub.faults`) hit the requests whose path contains `match`, after `skip` of them:
  "500"      answer HTTP 500
  "drop"     send the headers and half the body, then close the connection
  "truncate" serve the file cut to half its size, Content-Length included, so the HTTP transfer
             itself is clean (the hub's listing keeps the true size); HEADs see it, GETs use it up
  "hang"     accept the request and never answer (until `reset()` or `stop()`)
  "stall"    send the headers and half the body, then nothing more (until `reset()`/`stop()`)
  "slow"     send the body at `rate` bytes/s
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Fault:
    kind: str            # "500" | "drop" | "truncate" | "hang" | "stall" | "slow"
    match: str           # substring of the request path
    times: int = 1       # how many requests it spoils; -1: all of them
    method: str = "GET"  # "GET", "HEAD" or "*"
    skip: int = 0        # matching requests let through before it starts
    rate: int = 0        # "slow": bytes per second


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    status: int = 0
    sent: int = 0            # body bytes written to the connection


@dataclass
class _File:
    data: bytes
    etag: str
    lfs: bool


@dataclass
class _Repo:
    commit: str
    branches: dict[str, str]
    files: dict[str, _File] = field(default_factory=dict)


class FakeHub:
    """The server; `url` is its HF_ENDPOINT. Use as a context manager, or start()/stop()."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.static: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.ranges = True
        self._release = threading.Event()  # ends "hang" and "stall"
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- content ---------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], commit: str | None = None) -> str:
        """Serves `files` (name -> bytes or path) as `repo_id` at `commit` (also branch "main")."""
        datas = {n: (v.read_bytes() if isinstance(v, Path) else v) for n, v in files.items()}
        commit = commit or hashlib.sha1(repr(sorted(datas)).encode() + repo_id.encode()).hexdigest()
        repo = _Repo(commit=commit, branches={"main": commit})
        for name, data in datas.items():
            lfs = name.endswith((".bin", ".safetensors", ".model"))
            etag = hashlib.sha256(data).hexdigest() if lfs else \
                hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            repo.files[name] = _File(data, etag, lfs)
        self.repos[repo_id] = repo
        return commit

    def reset(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.ranges = True
            self._release.set()
            self._release = threading.Event()

    def sent(self, match: str = "") -> int:
        """Body bytes sent for the GETs whose path contains `match`."""
        return sum(r.sent for r in self.seen("GET", match))

    def seen(self, method: str | None = None, match: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and match in r.path]

    # --- server ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                head_of_truncated = f.kind == "truncate" and method == "HEAD"
                if f.times != 0 and f.match in path and (f.method in ("*", method) or head_of_truncated):
                    if f.skip > 0 and not head_of_truncated:
                        f.skip -= 1
                        continue
                    if f.times > 0 and not head_of_truncated:  # HEADs see a truncation, GETs spend it
                        f.times -= 1
                    return f
        return None


_API = re.compile(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every answer has a Content-Length

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        with self.hub._lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._request = Request(self.command, path, headers)
            self.hub.requests.append(self._request)
            release = self.hub._release
        fault = self._fault = self.hub._take_fault(self.command, path)
        self._released = release
        if fault is not None and fault.kind == "hang":
            release.wait(60)
            self.close_connection = True
            return
        if fault is not None and fault.kind == "500":
            return self._send(500, b"Internal Server Error", body=body)
        if m := _API.fullmatch(path):
            repo_id, kind, rev = m.group(1), m.group(2), unquote(m.group(3))
            if (found := self._find(repo_id, rev, body)) is None:
                return
            repo, commit = found
            return self._json(self._info(repo_id, repo, commit) if kind == "revision" else self._tree(repo))
        if m := _RESOLVE.fullmatch(path):
            repo_id, rev, name = m.group(1), unquote(m.group(2)), unquote(m.group(3))
            if (found := self._find(repo_id, rev, body)) is None:
                return
            repo, commit = found
            if name not in repo.files:
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                            "X-Repo-Commit": commit}, body)
            f = repo.files[name]
            data = f.data[: len(f.data) // 2] if fault is not None and fault.kind == "truncate" else f.data
            return self._file(data, {"ETag": f'"{f.etag}"', "X-Repo-Commit": commit}, body)
        if path.startswith("/static/") and (data := self.hub.static.get(path[len("/static/"):])) is not None:
            return self._file(data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, body)
        self._send(404, b"Not found", body=body)

    # --- pieces ----------------------------------------------------------------------------------
    def _find(self, repo_id: str, rev: str, body: bool) -> tuple[_Repo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._send(404, b"Repository not found", {"X-Error-Code": "RepoNotFound",
                                                      "X-Error-Message": "Repository not found"}, body)
            return None
        commit = repo.branches.get(rev, rev if rev == repo.commit else None)
        if commit is None:
            self._send(404, b"Invalid rev id", {"X-Error-Code": "RevisionNotFound",
                                                "X-Error-Message": "Invalid rev id"}, body)
            return None
        return repo, commit

    @staticmethod
    def _info(repo_id: str, repo: _Repo, commit: str) -> dict:
        siblings = []
        for name, f in sorted(repo.files.items()):
            s = {"rfilename": name, "size": len(f.data), "blobId": f.etag[:40]}
            if f.lfs:
                s["lfs"] = {"size": len(f.data), "sha256": f.etag, "pointerSize": 134}
            siblings.append(s)
        return {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "siblings": siblings}

    @staticmethod
    def _tree(repo: _Repo) -> list[dict]:
        out = []
        for name, f in sorted(repo.files.items()):
            e = {"type": "file", "path": name, "size": len(f.data), "oid": f.etag[:40]}
            if f.lfs:
                e["lfs"] = {"oid": f.etag, "size": len(f.data), "pointerSize": 134}
            out.append(e)
        return out

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _file(self, data: bytes, headers: dict[str, str], body: bool) -> None:
        start, end, status = 0, len(data), 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if body and m and self.hub.ranges:
            start, status = int(m.group(1)), 206
            end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if self.hub.ranges:
            headers["Accept-Ranges"] = "bytes"
        headers["Content-Type"] = "application/octet-stream"
        self._send(status, data[start:end], headers, body)

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None,
              body: bool = True) -> None:
        self._request.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not body:
            return
        kind = self._fault.kind if self._fault is not None else ""
        try:
            if kind in ("drop", "stall"):  # half the body, then a hard close, or silence
                self._write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                if kind == "stall":
                    self._released.wait(60)
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            step = 64 << 10
            for i in range(0, len(payload), step):
                self._write(payload[i:i + step])
                if kind == "slow":
                    self.wfile.flush()
                    time.sleep(step / self._fault.rate)
        except OSError:  # the client went away
            self.close_connection = True

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self._request.sent += len(data)

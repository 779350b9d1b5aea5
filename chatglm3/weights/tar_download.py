"""A checkpoint from a .tar/.tar.gz URL (COG_WEIGHTS on Replicate) or file, extracted safely.

hub lacks: huggingface_hub has no parallel ranges and no resume across runs, and its `http_get`
reads 10 MB (DOWNLOAD_CHUNK_SIZE) before it writes: a drop loses the bytes in that buffer, a stop
waits for it, and a 70 MB test archive shows 7 progress steps. So this client is our own, on
urllib: where the server takes Range requests the archive is cut into up to WORKERS ranges
fetched at once, each appended to a part file whose size is how far it got (in
dest/.chatglm3-download, until extracted), so a drop, a stall or a later run goes on from the
byte it had. Without ranges: one stream, from zero each time.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from functools import partial
from pathlib import Path
from typing import BinaryIO

from . import transfer
from .checkpoint_files import WeightsError
from .transfer import Progress, Stopped, read_timeout, say, size_text

MIN_PART = 64 << 20           # smallest range worth its own connection
PARTS = ".chatglm3-download"  # in dest: the parts until extracted
_CHUNK = 256 << 10            # most bytes per read; a worker looks for a stop between reads
_NETWORK_ERRORS = (ConnectionError, TimeoutError, ssl.SSLError, http.client.HTTPException, urllib.error.URLError)


def fetch_and_extract(url: str, dest: Path, progress: bool) -> None:
    """The archive at `url` (http(s) or a local path) extracted into `dest`."""
    if not url.startswith(("http://", "https://")):
        with open(url, "rb") as fh:
            return _extract(fh, url, dest)
    try:
        parts = _download(url, dest, progress)
    except _NETWORK_ERRORS as e:  # (urllib's HTTPError is one)
        raise WeightsError(f"{url}: {_why(e)}" + (
            f" ({transfer.ATTEMPTS} tries in a row brought nothing)" if _retry(e) else "")) from None
    say(progress, f"Extracting {url} into {dest}")
    try:
        _extract(_Concat(parts), url, dest)
    except WeightsError:  # a bad archive: a new download would not mend it
        shutil.rmtree(dest / PARTS, ignore_errors=True)
        raise
    shutil.rmtree(dest / PARTS, ignore_errors=True)  # (kept on Ctrl-C: the next run extracts)


def _why(e: Exception) -> str:
    """What went wrong, in a few words."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):  # refused, unresolvable, ...: the reason says
        e = e.reason if isinstance(e.reason, BaseException) else ConnectionError(e.reason)
    if isinstance(e, TimeoutError):
        return f"no data for {read_timeout():g} s (the server stalled)"
    return f"{type(e).__name__}: {e}"


def _retry(e: Exception) -> bool:
    """Whether another try may mend `e`: a network error, a stall, HTTP 5xx/408/429."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in (408, 429)
    return isinstance(e, _NETWORK_ERRORS)


def _download(url: str, dest: Path, progress: bool) -> list[Path]:
    """The archive at `url` as part files in dest/PARTS, in order, resumed from those there."""
    size, ranged, tag = transfer.retrying(partial(_probe, url), _retry)
    n = max(1, min(transfer.WORKERS, size // MIN_PART)) if ranged else 1
    bounds = [(size * i // n, size * (i + 1) // n) for i in range(n)] if ranged else [(0, None)]
    folder, plan = dest / PARTS, json.dumps({"url": url, "size": size, "tag": tag, "bounds": bounds})
    if not ranged or not (folder / "plan.json").is_file() or (folder / "plan.json").read_text() != plan:
        shutil.rmtree(folder, ignore_errors=True)  # another archive, or no resume: from zero
        folder.mkdir(parents=True)
        (folder / "plan.json").write_text(plan)
    parts = [folder / f"part{i}" for i in range(n)]
    have = sum(p.stat().st_size for p in parts if p.exists())
    say(progress, f"Fetching {url} ({size_text(size) if size is not None else 'size unknown'}"
                  + (f", {size_text(have)} already there" if have else "")
                  + (f", {n} ranges at once" if n > 1 else "") + f") into {dest}")
    if not ranged:
        say(progress, f"{url}: the server takes no Range requests: one stream, and a dropped "
                      "connection starts it again from zero")
    bar = Progress(url.rsplit("/", 1)[-1], size or 0, progress, have)
    transfer.run_all([partial(_fetch_part, url, p, a, b, bar) for p, (a, b) in zip(parts, bounds)], bar)
    return parts


def _urlopen(url: str, first: int | None = None, end: int | None = None) -> http.client.HTTPResponse:
    """GET `url` (bytes [first, end) if given), every read timing out after read_timeout() s."""
    ranged = {"Range": f"bytes={first}-{end - 1}"} if first is not None and end is not None else {}
    request = urllib.request.Request(url, headers={"User-Agent": "chatglm3", **ranged})
    return urllib.request.urlopen(request, timeout=read_timeout())


def _probe(url: str) -> tuple[int | None, bool, str]:
    """(size, whether the server takes ranges, its ETag or Last-Modified), from a GET of byte 0."""
    with _urlopen(url, 0, 1) as resp:
        tag = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
        if resp.status == 206 and (m := re.fullmatch(r"bytes 0-0/(\d+)", resp.headers.get("Content-Range", ""))):
            return int(m.group(1)), True, tag
        return (int(n) if (n := resp.headers.get("Content-Length", "")).isdigit() else None), False, tag


def _fetch_part(url: str, path: Path, first: int, end: int | None, bar: Progress,
                stop: threading.Event) -> None:
    """Appends bytes [first + size of `path`, end) of `url` to `path`; end None: no ranges,
    so all of it, from zero."""
    def once() -> None:
        have = path.stat().st_size if path.exists() else 0
        if end is None:  # no ranges: from zero
            bar.add(-have)
            have = 0
        elif first + have >= end:
            return
        with _urlopen(url, first + have, end) as resp, open(path, "wb" if end is None else "ab") as out:
            if end is not None and resp.status != 206:
                raise WeightsError(f"{url}: the server ignored a Range request (HTTP {resp.status})")
            want, got = int(resp.headers.get("Content-Length") or -1), 0
            while chunk := resp.read1(_CHUNK):  # what has come: a stall loses nothing
                out.write(chunk)
                got += len(chunk)
                bar.add(len(chunk))
                if stop.is_set():
                    raise Stopped()
            if got < want:
                raise ConnectionError(f"connection closed after {got} of {want} bytes")

    transfer.retrying(once, _retry, lambda: path.stat().st_size if path.exists() else 0)


class _Concat:
    """The part files read back to back, as one stream (tarfile's stream mode only reads)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths, self._file = list(paths), None

    def read(self, n: int = -1) -> bytes:
        while self._file is not None or self._paths:
            self._file = self._file or open(self._paths.pop(0), "rb")
            if data := self._file.read(n):
                return data
            self._file.close()
            self._file = None
        return b""


def _safe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter (no links out, no `..`, no special files), and no absolute names
    (which it would make relative)."""
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, path)


def _extract(stream: BinaryIO | _Concat, url: str, dest: Path) -> None:
    """Extracts a tar stream into a scratch folder in `dest`, then moves its files up into
    `dest`; a single top-level folder (`chatglm3-6b-32k/config.json`, ...) is the checkpoint."""
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # type: ignore[arg-type]
            tar.extractall(scratch, filter=_safe)
        top = list(scratch.iterdir())
        root = top[0] if len(top) == 1 and top[0].is_dir() else scratch
        for item in root.iterdir():
            if (target := dest / item.name).is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    except tarfile.FilterError as e:
        raise WeightsError(f"{url}: unsafe archive member ({e})") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise WeightsError(f"{url}: not a readable tar archive ({e})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

"""Fetches the ChatGLM3-6B-32K checkpoint (hub repo, tar URL or local folder) and checks it.

huggingface_hub moves the hub's files: it checks sizes in flight, resumes a dropped connection
with Range, answers a pinned commit already in place without network, and uses hf_xet. Only what
it lacks is added here, each marked "hub lacks". The repository's `*.py` files are never fetched.

Across runs, a tar URL resumes at the byte it had (its parts wait in dest/.chatglm3-download).
Hub files already complete are kept; a partial one starts again (huggingface_hub 2.4 never reuses
a partial file), and those a stopped run left are deleted by the next one.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

from filelock import FileLock, Timeout
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from tqdm.auto import tqdm

DEFAULT_REPO = "zai-org/chatglm3-6b-32k"
DEFAULT_REVISION = "e210410255278dd9d74463cf396ba559c0ef801c"  # env CHATGLM3_REVISION overrides
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights"  # env CHATGLM3_WEIGHTS_DIR overrides

# What a checkpoint needs from a hub repo; never `*.py` (remote code is neither fetched nor run).
ALLOW_PATTERNS = ["config.json", "tokenizer.model", "tokenizer_config.json",
                  "*.bin", "*.safetensors", "*.index.json"]
LAYOUTS = [("model.safetensors.index.json", "model.safetensors"),  # the loader's order
           ("pytorch_model.bin.index.json", "pytorch_model.bin")]

# Tries. Hub file: one try is one hf_hub_download; another follows only a 5xx answer to the try's
# first GET (hub lacks: it retries only 408/429 there), at most _ATTEMPTS tries, or, once, a
# finished file of the wrong size. A drop or stall is never ours to retry: the hub reconnects up
# to 5 times in a row, resuming. So a file costs at most 4 GETs under a persistent 5xx, 2 when
# it keeps coming short, 6 when it keeps stalling; mixed, at most 2 + 2 x 6 = 14. (A failed
# HEAD is the hub's to retry, 5 times; then the file fails.)
# Tar: a part (or the probe) gives up after _ATTEMPTS tries in a row that brought no byte, and
# resumes after each: no byte is fetched twice.
_ATTEMPTS = 4
_RETRY_WAIT_S = 1.0            # first back-off; doubles after every try that brought nothing
_WORKERS = 8                   # hub files at once (as snapshot_download), tar ranges at once (as pget)
_MIN_PART = 64 << 20           # smallest tar range worth its own connection
_CHUNK = 256 << 10             # most bytes per read; workers look for a stop between reads
_MARK = ".chatglm3-source"     # in dest, once complete: its source (+ the hub's file sizes)
_PARTS = ".chatglm3-download"  # in dest: a tar URL's parts until extracted
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz)$")
# Appended to a failure, on the same line (the CLI prints errors as one line).
_NEXT_STEPS = ("next: --weights PATH (or COG_WEIGHTS) for a complete local checkpoint or a .tar URL, "
               "HF_ENDPOINT for a reachable hub mirror, or HF_HUB_OFFLINE=1 to use a complete copy "
               "already in the weights folder")


class WeightsError(RuntimeError):
    """The checkpoint could not be fetched or is incomplete; the message names what and where."""


class _Stopped(Exception):
    """A worker saw the stop event (Ctrl-C, or another worker failed)."""


def resolve_weights(source: str | os.PathLike | None = None, *, dest: Path | None = None,
                    revision: str | None = None, progress: bool = True) -> Path:
    """A local directory holding a checked checkpoint, fetched from `source` if needed.

    `source`: None/"" (the default hub repo), an existing directory (checked, used in place),
    "owner/name[@revision]" (hub), or an http(s) URL / local path of a .tar/.tar.gz/.tgz.
    Downloads go into `dest` (default: env CHATGLM3_WEIGHTS_DIR, else DEFAULT_DIR). `progress`:
    say what is fetched and show how far (a bar on a terminal, else log lines); False: silent.
    """
    dest = Path(dest or os.environ.get("CHATGLM3_WEIGHTS_DIR") or DEFAULT_DIR).expanduser()
    text = os.fspath(source) if source is not None else ""
    if text and not re.match(r"https?:/", text) and (local := Path(text).expanduser()).is_dir():
        verify_checkpoint_files(local)
        return local.resolve()
    try:
        return _fetch(text, dest, revision, progress)
    except WeightsError as e:
        raise WeightsError(f"{e}; {_NEXT_STEPS}") from e.__cause__


def _fetch(text: str, dest: Path, revision: str | None, progress: bool) -> Path:
    """resolve_weights for any `text` but an existing directory."""
    env_rev = os.environ.get("CHATGLM3_REVISION")
    if not text:
        return _from_hub(DEFAULT_REPO, revision or env_rev or DEFAULT_REVISION, dest, progress, trust_local=True)
    if m := re.match(r"(https?):/+", text):  # cog.Path / pathlib turn "https://" into "https:/"
        return _from_tar(m.group(1) + "://" + text[m.end():], dest, progress)
    if (local := Path(text).expanduser()).is_file():
        if _TAR_NAME.search(local.name):
            return _from_tar(str(local.resolve()), dest, progress)
        raise WeightsError(f"{text}: a file, but neither a checkpoint directory nor a .tar archive")
    if _looks_like_path(text):
        raise WeightsError(_missing(text))
    repo, _, at_rev = text.partition("@")
    if not _REPO_ID.fullmatch(repo):
        raise WeightsError(f"{text}: no such directory, and not a hub repo id (owner/name[@revision]) "
                           "nor a .tar/.tar.gz/.tgz URL or file")
    if at_rev and revision and at_rev != revision:
        raise WeightsError(f"{text}: revision given twice ({at_rev!r} and {revision!r})")
    rev = at_rev or revision or (env_rev or DEFAULT_REVISION if repo == DEFAULT_REPO else "main")
    try:
        return _from_hub(repo, rev, dest, progress, trust_local=False, note=f"{text}: not a local directory; ")
    except WeightsError as e:
        if isinstance(e.__cause__, RepositoryNotFoundError) and not isinstance(e.__cause__, GatedRepoError):
            raise WeightsError(f"{text}: not a local directory, and hub repo {repo} was not found "
                               f"({e})") from e.__cause__
        raise


def _looks_like_path(text: str) -> bool:
    """Whether `text` (no file or folder) can only mean a local path, so no hub lookup.

    A hub repo id is "owner/name[@revision]": one "/" before any "@", no "." or "~" first. A
    path is anything starting with "/", "~" or "." (absolute, home, ./ ../, hidden), holding a
    backslash, a second or a trailing "/" before any "@", ending in .tar/.tar.gz/.tgz, or whose
    first component exists here ("weights/x" when ./weights does).
    """
    repo = text.split("@", 1)[0]
    return (text.startswith(("/", "~", ".")) or "\\" in text or repo.count("/") > 1
            or repo.endswith("/") or bool(_TAR_NAME.search(repo)) or os.path.lexists(repo.split("/")[0]))


def _missing(text: str) -> str:
    """'a/b/c: no such directory', and how far the path does exist."""
    path = Path(text).expanduser()
    near = next((p for p in path.parents if p.exists()), None)
    if near is None or near.parent == near:  # nothing, or only "." or "/"
        return f"{text}: no such directory"
    return f"{text}: no such directory ({near} exists, but has no {path.relative_to(near).parts[0]})"


def verify_checkpoint_files(path: Path) -> None:
    """Raises WeightsError unless `path` holds a complete checkpoint (cheap: no tensor is read)."""
    if problems := _problems(Path(path)):
        raise WeightsError(_describe(Path(path), problems))


def _problems(d: Path, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """What is missing in checkpoint folder `d`, by file name ("" for the folder itself).

    Files present, at the hub's sizes (`sizes`, when known), config.json an object, the index
    readable, its shards present. A damaged shard is the loader's to name (checkpoint._open_shard).
    """
    if not d.is_dir():
        return {"": "not a directory"}
    out = {n: "missing" if not (d / n).is_file() else f"{(d / n).stat().st_size} bytes, but the hub has {s}"
           for n, s in (sizes or {}).items() if not (d / n).is_file() or (d / n).stat().st_size != s}
    try:
        if "config.json" not in out and not isinstance(json.loads((d / "config.json").read_bytes()), dict):
            out["config.json"] = "not a JSON object"
    except (OSError, ValueError) as e:
        out["config.json"] = "missing" if isinstance(e, FileNotFoundError) else f"unreadable JSON ({e})"
    tok = d / "tokenizer.model"
    if "tokenizer.model" not in out and not (tok.is_file() and tok.stat().st_size > 0):
        out["tokenizer.model"] = "empty" if tok.exists() else "missing"
    for index, single in LAYOUTS:
        if (d / index).is_file():
            try:
                shards = set(json.loads((d / index).read_bytes())["weight_map"].values())
                if not shards or not all(isinstance(s, str) for s in shards):
                    raise ValueError("weight_map is not a non-empty {tensor: file} map")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                return {**out, index: out.get(index, f"unreadable index ({e!s})")}
            if bad := [s for s in shards if PurePosixPath(s).is_absolute() or ".." in s.split("/")]:
                return {**out, index: f"names a shard outside the folder: {bad[0]!r}"}
            return {**out, **{s: "missing (named in the index)" for s in sorted(shards - out.keys())
                              if not (d / s).is_file()}}
        if (d / single).is_file():
            return out
    return {**out, "": "no weights (no model.safetensors[.index.json] nor pytorch_model.bin[.index.json])"}


def _describe(d: Path, problems: dict[str, str]) -> str:
    """One line: the first problem, and the names of a few more."""
    (name, why), *rest = problems.items()
    more = f" (and {len(rest)} more: {', '.join(n or '.' for n, _ in rest[:3])})" if rest else ""
    return f"{d / name if name else d}: {why}{more}"


def _read_mark(dest: Path) -> tuple[str, dict[str, int] | None]:
    """(source, the hub's sizes) of the last complete fetch into `dest`; ("", None) if none."""
    try:
        mark = json.loads(text := (dest / _MARK).read_text())
        return mark["source"], mark["sizes"]
    except OSError:
        return "", None
    except (ValueError, KeyError, TypeError):
        return text, None  # older runs wrote the tar URL alone


# --- progress and workers -----------------------------------------------------------------------

def _say(on: bool, message: str) -> None:
    if on:
        print(message, file=sys.stderr, flush=True)


def _size(n: float) -> str:
    """12_500_000_000 -> '12.5 GB' (decimal units, as the hub shows sizes)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


class _Progress:
    """Bytes done of `total`, added by any thread, drawn by the main thread's show(): tqdm on a
    terminal, else (logs) a line every 5 percent, with the speed."""

    def __init__(self, desc: str, total: int, on: bool, done: int = 0) -> None:
        self.desc, self.total, self.done, self._start, self._next = desc, total, done, done, 5
        self._lock, self._t0 = threading.Lock(), time.monotonic()
        tty = on and sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=desc) if tty else None
        self._log = on and not tty

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def show(self) -> None:
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
        elif self._log and self.total and (pct := 100 * self.done // self.total) >= self._next:
            rate = (self.done - self._start) / max(time.monotonic() - self._t0, 1e-3) / 1e6
            _say(True, f"{self.desc}: {min(pct, 100)}% of {_size(self.total)} ({rate:.1f} MB/s)")
            self._next = pct - pct % 5 + 5

    def close(self) -> None:
        self.show()
        if self._bar is not None:
            self._bar.close()


def _run(jobs: list[Callable[[threading.Event], None]], progress: _Progress) -> None:
    """Runs `jobs`, _WORKERS at once, on daemon threads; draws progress; raises the first failure.

    hub lacks: snapshot_download joins its (non-daemon) workers until every file in flight is
    done, so Ctrl-C took minutes. Here Ctrl-C sets the stop event, which jobs check between
    reads, gives them a second, and goes: no join without a timeout, no thread holds the exit.
    """
    stop, gate, errors = threading.Event(), threading.Semaphore(_WORKERS), []

    def work(job: Callable[[threading.Event], None]) -> None:
        with gate:
            try:
                if not stop.is_set():
                    job(stop)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
                stop.set()

    threads = [threading.Thread(target=work, args=(job,), daemon=True) for job in jobs]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            progress.show()
            time.sleep(0.1)
    except BaseException:
        stop.set()
        deadline = time.monotonic() + 1.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        raise
    finally:
        progress.close()
    if errors:
        raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])


def _timeout() -> float:
    """Seconds without data before a read fails, for all: HF_HUB_DOWNLOAD_TIMEOUT (default 10)."""
    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _backoff(tries: int) -> None:
    time.sleep(_RETRY_WAIT_S * 2 ** (tries - 1))


# --- hub ----------------------------------------------------------------------------------------

def _from_hub(repo: str, revision: str, dest: Path, progress: bool, *, trust_local: bool,
              note: str = "") -> Path:
    """`repo@revision` in `dest`, fetched unless there. `trust_local`: a complete `dest` that
    huggingface_hub never wrote into (copied there by hand) is taken without asking the hub."""
    what = f"{repo}@{revision}"
    source, sizes = _read_mark(dest)
    if source == what and not _problems(dest, sizes):  # the commit fetched last time
        return dest.resolve()
    if trust_local and not (dest / ".cache" / "huggingface").is_dir() and not _problems(dest):
        return dest.resolve()
    if constants.is_offline_mode():  # a complete dest is the best there is
        if not (problems := _problems(dest, sizes if source.startswith(repo + "@") else None)):
            return dest.resolve()
        raise WeightsError(f"{what}: offline (HF_HUB_OFFLINE is set) and no complete local copy: "
                           f"{_describe(dest, problems)}")
    _say(progress, f"{note}looking up {what} on the hub at {constants.ENDPOINT}")
    info = _model_info(repo, revision, what)
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in info.siblings or []}
    names = [n for n in sizes if "/" not in n and any(fnmatch.fnmatch(n, p) for p in ALLOW_PATTERNS)]
    if any(n.endswith(".safetensors") for n in names):  # both formats: skip the .bin copy
        names = [n for n in names if not (n.endswith(".bin") or n == "pytorch_model.bin.index.json")]
    sizes = {n: sizes[n] for n in sorted(names)}
    if not {"config.json", "tokenizer.model"} <= sizes.keys() or not any(
            n.endswith((".bin", ".safetensors")) for n in sizes):
        raise WeightsError(f"{what}: not a ChatGLM3 checkpoint repo (has {sorted(sizes) or 'none'} "
                           "of config.json, tokenizer.model and weight files)")
    dest.mkdir(parents=True, exist_ok=True)
    _drop_dead_partials(dest)
    for name, size in sizes.items():  # hub lacks: a file it wrote for this commit is not checked again
        if (f := dest / name).is_file() and f.stat().st_size != size:
            f.unlink()
    have, total = sum(s for n, s in sizes.items() if (dest / n).is_file()), sum(sizes.values())
    _say(progress, f"Fetching {repo} at {info.sha[:12]} ({revision}): {_size(total)} in {len(sizes)} "
                   f"files, into {dest}" + (f" ({_size(have)} already there)" if have else ""))
    bar = _Progress(repo.rsplit("/", 1)[-1], total, progress, have)
    _run([partial(_fetch_file, repo, info.sha, n, s, dest, what, bar) for n, s in sizes.items()], bar)
    if problems := _problems(dest, sizes):
        raise WeightsError(f"{what}: incomplete after fetching: {_describe(dest, problems)}")
    (dest / _MARK).write_text(json.dumps({"source": f"{repo}@{info.sha}", "sizes": sizes}))
    return dest.resolve()


def _model_info(repo: str, revision: str, what: str):
    """The repo's commit and files; a 5xx is tried again (hub lacks: no retry on this call)."""
    for tries in range(1, _ATTEMPTS + 1):
        try:
            return HfApi(library_name="chatglm3").model_info(repo, revision=revision, files_metadata=True,
                                                             timeout=_timeout())
        except HfHubHTTPError as e:
            if not (_is_5xx(e) and tries < _ATTEMPTS):
                raise WeightsError(_hub_message(e, what, tries)) from e
        except Exception as e:  # noqa: BLE001 - refused, unresolvable, or no answer in time
            raise WeightsError(f"{what}: the hub at {constants.ENDPOINT} did not answer ({_cause(e)})") from e
        _backoff(tries)


def _drop_dead_partials(dest: Path) -> None:
    """Deletes the partial files of hub downloads that no process is writing any more.

    hub lacks: huggingface_hub 2.4 writes each file into a `<hash>.<etag>.<random>.incomplete`
    of its own, never reused, and a killed run leaves it behind. It writes only while it holds
    that file's `<name>.lock`, so a partial whose lock is free, or absent, is dead.
    """
    for folder in {p.parent for p in (dest / ".cache" / "huggingface" / "download").rglob("*.incomplete")}:
        locks = {base64.urlsafe_b64encode(hashlib.sha1(f"{lock.name[:-5]}.metadata".encode()).digest())
                 .decode(): lock for lock in folder.glob("*.lock")}  # <hash>, as the hub makes it
        for part in folder.glob("*.incomplete"):
            try:
                if lock := locks.get(part.name.split(".", 1)[0]):
                    with FileLock(lock, blocking=False, preserve_lock_file=True):
                        pass  # free: whoever wrote the partial is gone (else Timeout)
                part.unlink()
            except (Timeout, OSError):
                pass


def _fetch_file(repo: str, commit: str, name: str, size: int, dest: Path, what: str,
                bar: _Progress, stop: threading.Event) -> None:
    """`name` into `dest` by hf_hub_download, tried again only as said at _ATTEMPTS."""
    came_short = False
    for tries in range(1, _ATTEMPTS + 1):
        got, bars = [0], []  # this try's bytes; its progress bars (made once a GET answered 2xx)

        class Hook(tqdm):
            """The hub's progress bar: counts the bytes, and stops the transfer when asked."""

            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **{**kwargs, "disable": True})
                bars.append(self)

            def update(self, n: float | None = 1) -> None:
                got[0] += int(n or 0)
                bar.add(int(n or 0))
                if stop.is_set():
                    raise _Stopped()

            def update_transfer(self, *args, **kwargs) -> None:  # hf_xet's network bytes: not the file's
                pass

            set_transfer_postfix_str = update_transfer

        try:
            if stop.is_set():
                raise _Stopped()
            hf_hub_download(repo, name, revision=commit, local_dir=dest, library_name="chatglm3",
                            etag_timeout=_timeout(), tqdm_class=Hook)
            if (actual := (dest / name).stat().st_size) == size:
                return
            why = f"{dest / name}: {actual} bytes, but the hub has {size}"
        except HfHubHTTPError as e:
            bar.add(-got[0])
            if _is_5xx(e) and not bars and tries < _ATTEMPTS:
                _backoff(tries)
                continue
            raise WeightsError(_hub_message(e, what, tries)) from e
        except _Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - the hub's reconnects or HEAD gave up, or ...
            if type(e) is not OSError or e.errno is not None:  # ... its "Consistency check failed"
                timeout = "Timeout" in type(e.__cause__ or e).__name__
                raise WeightsError(f"{what}: {name} from {constants.ENDPOINT}: {_cause(e)}" + (
                    f" (no data for HF_HUB_DOWNLOAD_TIMEOUT={_timeout():g} s)" if timeout else "")) from e
            why = f"{name}: {_cause(e)}"
        bar.add(-got[0])
        if came_short or tries == _ATTEMPTS:
            raise WeightsError(f"{what}: {why} (fetched {'twice' if came_short else f'{tries} times'})")
        came_short = True
        (dest / name).unlink(missing_ok=True)


def _is_5xx(e: HfHubHTTPError) -> bool:
    return e.response is not None and e.response.status_code >= 500


def _cause(e: BaseException) -> str:
    """'ReadTimeout: timed out': the error, unwrapped from the hub's "not found locally"."""
    if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _hub_message(e: HfHubHTTPError, what: str, tries: int) -> str:
    where = constants.ENDPOINT
    if isinstance(e, RevisionNotFoundError):
        return f"{what}: revision not found on {where}"
    if isinstance(e, GatedRepoError):
        return f"{what}: gated repo on {where}; accept its terms there and set HF_TOKEN"
    if isinstance(e, RepositoryNotFoundError):
        return f"{what}: repository not found on {where} (private or gated: set HF_TOKEN)"
    cause = _cause(e) if e.response is None else f"HTTP {e.response.status_code} from {e.response.url}" + (
        " (check HF_TOKEN)" if e.response.status_code in (401, 403) else "")
    return f"{what}: download from {where} failed{f' after {tries} tries' if tries > 1 else ''}: {cause}"


# --- tar archives -------------------------------------------------------------------------------

def _from_tar(url: str, dest: Path, progress: bool) -> Path:
    """Extracts the .tar/.tar.gz at `url` (http(s) or a local path) into `dest`, then checks it."""
    if _read_mark(dest)[0] == url and not _problems(dest):
        return dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / _MARK).unlink(missing_ok=True)
    if url.startswith(("http://", "https://")):
        parts = _download(url, dest, progress)
        _say(progress, f"Extracting {url} into {dest}")
        try:
            _extract(_Concat(parts), url, dest)
        except WeightsError:  # a bad archive: a new download would not mend it
            shutil.rmtree(dest / _PARTS, ignore_errors=True)
            raise
        shutil.rmtree(dest / _PARTS, ignore_errors=True)  # (kept on Ctrl-C: the next run extracts)
    else:
        with open(url, "rb") as fh:
            _extract(fh, url, dest)
    if problems := _problems(dest):
        raise WeightsError(f"{url}: the archive holds no complete checkpoint: {_describe(dest, problems)}")
    (dest / _MARK).write_text(json.dumps({"source": url, "sizes": None}))
    return dest.resolve()


def _download(url: str, dest: Path, progress: bool) -> list[Path]:
    """The archive at `url` as part files in dest/_PARTS, in order, resumed from those there.

    Where the server takes Range requests the archive is cut into up to _WORKERS ranges fetched
    at once, each appended to a file of its own: its size is how far it got, so a drop, a stall
    or a later run goes on from there. Without ranges: one stream, from zero each time.
    """
    size, ranged, tag = _retrying(url, partial(_probe, url))
    n = max(1, min(_WORKERS, size // _MIN_PART)) if ranged else 1
    bounds = [(size * i // n, size * (i + 1) // n) for i in range(n)] if ranged else [(0, None)]
    folder, plan = dest / _PARTS, json.dumps({"url": url, "size": size, "tag": tag, "bounds": bounds})
    try:
        same = ranged and (folder / "plan.json").read_text() == plan
    except OSError:
        same = False
    if not same:  # another archive, or a server that cannot resume: from zero
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "plan.json").write_text(plan)
    parts = [folder / f"part{i}" for i in range(n)]
    have = sum(p.stat().st_size for p in parts if p.exists())
    _say(progress, f"Fetching {url} ({_size(size) if size is not None else 'size unknown'}"
                   + (f", {_size(have)} already there" if have else "")
                   + (f", {n} ranges at once" if n > 1 else "") + f") into {dest}")
    if not ranged:
        _say(progress, f"{url}: the server takes no Range requests: one stream, and a dropped "
                       "connection starts it again from zero")
    bar = _Progress(url.rsplit("/", 1)[-1], size or 0, progress, have)
    _run([partial(_fetch_part, url, p, a, b, bar) for p, (a, b) in zip(parts, bounds)], bar)
    return parts


def _urlopen(url: str, first: int | None = None, end: int | None = None) -> http.client.HTTPResponse:
    """GET `url` (bytes [first, end) if given), every read timing out after _timeout() s."""
    ranged = {"Range": f"bytes={first}-{end - 1}"} if first is not None and end is not None else {}
    request = urllib.request.Request(url, headers={"User-Agent": "chatglm3", **ranged})
    return urllib.request.urlopen(request, timeout=_timeout())


def _probe(url: str) -> tuple[int | None, bool, str]:
    """(size, whether the server takes ranges, its ETag or Last-Modified), from a GET of byte 0."""
    with _urlopen(url, 0, 1) as resp:
        tag = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
        if resp.status == 206 and (m := re.fullmatch(r"bytes 0-0/(\d+)", resp.headers.get("Content-Range", ""))):
            return int(m.group(1)), True, tag
        return (int(n) if (n := resp.headers.get("Content-Length", "")).isdigit() else None), False, tag


def _fetch_part(url: str, path: Path, first: int, end: int | None, bar: _Progress,
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
                    raise _Stopped()
            if got < want:
                raise ConnectionError(f"connection closed after {got} of {want} bytes")

    _retrying(url, once, lambda: path.stat().st_size if path.exists() else 0)


def _retrying(url: str, step: Callable[[], object], progress: Callable[[], int] = lambda: 0):
    """step(), tried again (resuming) after a failure that another try may mend, until
    _ATTEMPTS tries in a row have brought nothing (`progress()` unchanged)."""
    fails, mark = 0, progress()
    while True:
        try:
            return step()
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise WeightsError(f"{url}: HTTP {e.code} {e.reason}") from None
            why = f"HTTP {e.code} {e.reason}"
        except (ConnectionError, TimeoutError, ssl.SSLError, http.client.HTTPException,
                urllib.error.URLError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            why = (f"no data for {_timeout():g} s (the server stalled)" if isinstance(reason, TimeoutError)
                   else f"{type(reason).__name__}: {reason}")
        fails, mark = (0, progress()) if progress() > mark else (fails + 1, mark)
        if fails >= _ATTEMPTS:
            raise WeightsError(f"{url}: {why} ({fails} tries in a row brought nothing)")
        if fails:
            _backoff(fails)


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

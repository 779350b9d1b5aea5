"""Fetches the ChatGLM3-6B-32K checkpoint (hub repo, tar URL or local folder) and verifies it.

Nothing is returned before every file has been checked: sizes against the hub's listing when
the files came from the hub, and the structure of every weight file (safetensors header, torch
zip directory) always. The repository's `*.py` files are never downloaded.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, TypeVar

import httpx2  # huggingface_hub's HTTP client
from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm
from tqdm.auto import tqdm

DEFAULT_REPO = "zai-org/chatglm3-6b-32k"
DEFAULT_REVISION = "e210410255278dd9d74463cf396ba559c0ef801c"  # env CHATGLM3_REVISION overrides
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights"  # env CHATGLM3_WEIGHTS_DIR overrides

# What a checkpoint needs from a hub repo; never `*.py` (remote code is neither fetched nor run).
ALLOW_PATTERNS = ["config.json", "tokenizer.model", "tokenizer_config.json",
                  "*.bin", "*.safetensors", "*.index.json"]
# The weight layouts, in the order the loader (`checkpoint.shard_files`) prefers them.
LAYOUTS = [("model.safetensors.index.json", "model.safetensors"),
           ("pytorch_model.bin.index.json", "pytorch_model.bin")]

_ATTEMPTS = 4          # tries per network step on transient errors (5xx, dropped connections)
_RETRY_WAIT_S = 1.0    # first back-off; doubles after every failed try
_SOURCE_MARK = ".chatglm3-source"  # in a dest filled from a tar URL: that URL, once verified
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz)$")


class WeightsError(RuntimeError):
    """The checkpoint could not be fetched or is incomplete; the message names what and where."""


def resolve_weights(source: str | os.PathLike | None = None, *, dest: Path | None = None,
                    revision: str | None = None, progress: bool = True) -> Path:
    """A local directory holding a verified checkpoint, fetched from `source` if needed.

    `source`: None/"" (the default hub repo), an existing directory (verified, used in place),
    "owner/name[@revision]" (hub), or an http(s) URL / local path of a .tar/.tar.gz/.tgz.
    Downloads go into `dest` (default: env CHATGLM3_WEIGHTS_DIR, else DEFAULT_DIR).
    """
    dest = Path(dest or os.environ.get("CHATGLM3_WEIGHTS_DIR") or DEFAULT_DIR).expanduser()
    text = os.fspath(source) if source is not None else ""
    if not text:
        rev = revision or os.environ.get("CHATGLM3_REVISION") or DEFAULT_REVISION
        return _from_hub(DEFAULT_REPO, rev, dest, progress, trust_local=True)
    # A URL that went through pathlib (e.g. a cog.Path) has lost one slash: "https:/host/...".
    if m := re.match(r"(https?):/+", text):
        return _from_tar(m.group(1) + "://" + text[m.end():], dest, progress)
    local = Path(text).expanduser()
    if local.is_dir():
        verify_checkpoint_files(local)
        return local.resolve()
    if local.is_file() and _TAR_NAME.search(local.name):
        return _from_tar(str(local.resolve()), dest, progress)
    repo, _, at_rev = text.partition("@")
    if _REPO_ID.fullmatch(repo) and not text.startswith((".", "/", "~")):
        if at_rev and revision and at_rev != revision:
            raise WeightsError(f"{text}: revision given twice ({at_rev!r} and {revision!r})")
        rev = at_rev or revision or (
            os.environ.get("CHATGLM3_REVISION") or DEFAULT_REVISION if repo == DEFAULT_REPO else "main")
        return _from_hub(repo, rev, dest, progress, trust_local=False)
    raise WeightsError(f"{text}: no such directory, and not a hub repo id (owner/name[@revision]) "
                       "nor a .tar/.tar.gz/.tgz URL or file")


def verify_checkpoint_files(path: Path) -> None:
    """Raises WeightsError unless `path` holds a complete checkpoint (cheap: no tensor is loaded)."""
    if problems := _problems(Path(path)):
        raise WeightsError(_describe(Path(path), problems))


# --- checks -------------------------------------------------------------------------------------

def _problems(d: Path, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """What is wrong in checkpoint folder `d`, by file name ("" for the folder itself).

    `sizes`: the hub's size of every file that should be there.
    """
    if not d.is_dir():
        return {"": "not a directory"}
    out: dict[str, str] = {}
    for name, size in (sizes or {}).items():
        f = d / name
        if not f.is_file():
            out[name] = "missing"
        elif (actual := f.stat().st_size) != size:
            out[name] = f"{actual} bytes, but the hub has {size}"
    for name, required in (("config.json", True), ("tokenizer_config.json", False)):
        f = d / name
        if name in out or not (required or f.exists()):
            continue
        try:
            if not isinstance(json.loads(f.read_bytes()), dict):
                out[name] = "not a JSON object"
        except FileNotFoundError:
            out[name] = "missing"
        except (OSError, ValueError) as e:
            out[name] = f"unreadable JSON ({e})"
    tok = d / "tokenizer.model"
    if "tokenizer.model" not in out and not (tok.is_file() and tok.stat().st_size > 0):
        out["tokenizer.model"] = "missing" if not tok.exists() else "empty"

    for index_name, single in LAYOUTS:
        if (d / index_name).is_file():
            weight_map = _read_index(d / index_name, out)
            shards = sorted(set(weight_map.values()))
            break
        if (d / single).is_file():
            weight_map, shards = {}, [single]
            break
    else:
        out[""] = "no weights (no model.safetensors[.index.json] nor pytorch_model.bin[.index.json])"
        return out
    for shard in shards:
        f = d / shard
        if shard in out:
            continue
        if not f.is_file():
            out[shard] = "missing (named in the index)"
        elif shard.endswith(".safetensors"):
            why, names = _safetensors_problem(f)
            lost = [t for t, s in weight_map.items() if s == shard and t not in names]
            if why or lost:
                out[shard] = why or f"lacks {len(lost)} tensors the index puts there, e.g. {lost[0]!r}"
        elif why := _torch_zip_problem(f):
            out[shard] = why
    return out


def _read_index(f: Path, out: dict[str, str]) -> dict[str, str]:
    """The index's weight_map (tensor -> shard file); problems go into `out`."""
    try:
        weight_map = json.loads(f.read_bytes())["weight_map"]
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError("weight_map is not a non-empty {tensor: file} map")
    except (OSError, ValueError, KeyError, TypeError) as e:
        out[f.name] = f"unreadable index ({e!s})"
        return {}
    bad = [s for s in set(weight_map.values()) if PurePosixPath(s).is_absolute() or ".." in s.split("/")]
    if bad:
        out[f.name] = f"names a shard outside the folder: {bad[0]!r}"
        return {}
    return weight_map


def _safetensors_problem(f: Path) -> tuple[str | None, set[str]]:
    """(what is wrong or None, tensor names) from the header: 8-byte length, JSON, data offsets."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100_000_000):  # safetensors' own header limit
            return f"truncated or not safetensors ({size} bytes, header length {n})", set()
        try:
            header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return f"unreadable safetensors header ({e})", set()
    want = 8 + n + max(ends, default=0)
    if size != want:
        why = "truncated" if size < want else "trailing data"
        return f"{size} bytes, but its header describes {want} ({why})", set()
    return None, {k for k in header if k != "__metadata__"}


def _torch_zip_problem(f: Path) -> str | None:
    """What is wrong with a torch `.bin` (a zip): central directory unreadable or data past the end."""
    size = f.stat().st_size
    try:
        with zipfile.ZipFile(f) as z, f.open("rb") as fh:
            for info in z.infolist():
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    return f"member {info.filename!r}: no local header at offset {info.header_offset}"
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                if info.header_offset + 30 + name_len + extra_len + info.compress_size > size:
                    return f"member {info.filename!r} runs past the end of the file ({size} bytes)"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"truncated or not a torch zip checkpoint ({e})"
    return None


def _describe(d: Path, problems: dict[str, str]) -> str:
    """One line: the first problem, and the names of a few more."""
    (name, why), *rest = problems.items()
    more = f" (and {len(rest)} more: {', '.join(n or '.' for n, _ in rest[:3])})" if rest else ""
    return f"{d / name if name else d}: {why}{more}"


# --- hub ----------------------------------------------------------------------------------------

def _from_hub(repo: str, revision: str, dest: Path, progress: bool, *, trust_local: bool) -> Path:
    """Downloads `repo@revision` into `dest` unless it is already there; verifies it either way.

    `trust_local`: a verified `dest` that huggingface_hub never wrote into (copied there by hand)
    counts as complete without asking the hub.
    """
    what = f"{repo}@{revision}"
    sizes = _cached_sizes(repo, revision, dest)
    hf_state = (dest / ".cache" / "huggingface").is_dir()
    if (sizes is not None or (trust_local and not hf_state)) and not _problems(dest, sizes):
        return dest.resolve()
    if _offline():  # the hub cannot confirm anything: a complete dest is the best there is
        if not (problems := _problems(dest, sizes)):
            return dest.resolve()
        raise WeightsError(f"{what}: offline (HF_HUB_OFFLINE is set) and no complete local copy: "
                           f"{_describe(dest, problems)}")

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, library_name="chatglm3")
    info = _retrying(lambda: api.model_info(repo, revision=revision, files_metadata=True), what, endpoint)
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in info.siblings or []}
    sizes = {n: sizes[n] for n in _select(sizes)}
    if not {"config.json", "tokenizer.model"} <= sizes.keys() or not any(
            n.endswith((".bin", ".safetensors")) for n in sizes):
        raise WeightsError(f"{what}: not a ChatGLM3 checkpoint repo (has {sorted(sizes) or 'none'} "
                           "of config.json, tokenizer.model and weight files)")

    dest.mkdir(parents=True, exist_ok=True)
    _drop_stale_partials(dest)
    for last_try in (False, True):
        _retrying(lambda: snapshot_download(
            repo, revision=info.sha, local_dir=dest, allow_patterns=sorted(sizes),
            endpoint=endpoint, library_name="chatglm3", tqdm_class=None if progress else _Silent,
        ), what, endpoint)
        problems = _problems(dest, sizes)
        if not problems:
            return dest.resolve()
        if last_try:
            raise WeightsError(f"{what}: still bad after fetching again: {_describe(dest, problems)}")
        for name in problems:  # fetched again on the next pass
            if name:
                (dest / name).unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _select(names) -> list[str]:
    """The repo files a checkpoint needs: top-level ALLOW_PATTERNS, one weight format only."""
    picked = [n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in ALLOW_PATTERNS)]
    if any(n.endswith(".safetensors") for n in picked):  # both formats: skip the .bin copy
        picked = [n for n in picked if not (n.endswith(".bin") or n == "pytorch_model.bin.index.json")]
    return sorted(picked)


def _cached_sizes(repo: str, revision: str, dest: Path) -> dict[str, int] | None:
    """File sizes from the hub listing huggingface_hub cached in `dest` for this revision, if any."""
    try:
        files = get_cached_repo_tree(repo, revision=revision, local_dir=dest)
    except (CachedRepoTreeNotFoundError, HFValidationError, OSError):
        return None
    sizes = {f.path: f.size for f in files}
    return {n: sizes[n] for n in _select(sizes)}


def _drop_stale_partials(dest: Path, max_age_s: float = 600) -> None:
    """Deletes partial downloads a killed run left behind.

    huggingface_hub resumes a dropped connection within a run, but gives every download a
    one-off `*.incomplete` name and removes it only on a clean failure, so after a SIGKILL these
    stay forever (each up to a shard's size). One not written to for `max_age_s` is dead.
    """
    for f in (dest / ".cache" / "huggingface" / "download").glob("**/*.incomplete"):
        try:
            if time.time() - f.stat().st_mtime > max_age_s:
                f.unlink()
        except OSError:
            pass


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so it works when set later.
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or flag.upper() in {"1", "ON", "YES", "TRUE"}


class _Silent(hf_tqdm):
    """huggingface_hub's progress bar, always off (progress=False)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


T = TypeVar("T")


def _retrying(step: Callable[[], T], what: str, where: str) -> T:
    """`step()`, tried again with back-off on transient errors; every failure becomes WeightsError."""
    wait = _RETRY_WAIT_S
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return step()
        except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised as is
            if _transient(e) and attempt < _ATTEMPTS:
                time.sleep(wait)
                wait *= 2
                continue
            if isinstance(e, WeightsError):
                raise
            raise WeightsError(_hub_message(e, what, where, attempt)) from e
    raise AssertionError("unreachable")


def _transient(e: BaseException | None) -> bool:
    """Whether trying again may help: 5xx/408/429, connection errors, short reads."""
    while e is not None:
        if isinstance(e, OfflineModeIsEnabled):
            return False
        if isinstance(e, HfHubHTTPError):
            return e.response is not None and (e.response.status_code >= 500
                                               or e.response.status_code in (408, 429))
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
        if isinstance(e, LocalEntryNotFoundError):  # huggingface_hub wraps "hub unreachable" in it
            e = e.__cause__
            continue
        # huggingface_hub raises a bare OSError when a download ends short ("Consistency check
        # failed"); OSErrors from the file system carry an errno.
        return type(e) is OSError and e.errno is None
    return False


def _hub_message(e: Exception, what: str, where: str, attempts: int) -> str:
    if isinstance(e, RevisionNotFoundError):
        return f"{what}: revision not found on {where}"
    if isinstance(e, GatedRepoError):
        return f"{what}: gated repo on {where}; accept its terms there and set HF_TOKEN"
    if isinstance(e, RepositoryNotFoundError):
        return f"{what}: repository not found on {where} (or private: set HF_TOKEN)"
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        cause = f"HTTP {e.response.status_code} from {e.response.url}"
        if e.response.status_code in (401, 403):
            cause += " (check HF_TOKEN)"
    else:
        cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    tries = f" after {attempts} tries" if attempts > 1 else ""
    return f"{what}: download from {where} failed{tries}: {cause}"


# --- tar archives -------------------------------------------------------------------------------

def _from_tar(url: str, dest: Path, progress: bool) -> Path:
    """Extracts the .tar/.tar.gz at `url` (http(s) or a local path) into `dest`, then verifies it."""
    mark = dest / _SOURCE_MARK
    if mark.is_file() and mark.read_text() == url and not _problems(dest):
        return dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    mark.unlink(missing_ok=True)
    if url.startswith(("http://", "https://")):
        _retrying(lambda: _extract_url(url, dest, progress), url, url)
    else:
        with open(url, "rb") as fh:
            _extract(fh, url, dest, None, progress)
    if problems := _problems(dest):
        raise WeightsError(f"{url}: the archive holds no complete checkpoint: {_describe(dest, problems)}")
    mark.write_text(url)
    return dest.resolve()


def _extract_url(url: str, dest: Path, progress: bool) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "chatglm3"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            _extract(resp, url, dest, total, progress)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code in (408, 429):
            raise ConnectionError(f"HTTP {e.code}") from e
        raise WeightsError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ConnectionError(str(e.reason)) from e


def _extract(stream: BinaryIO, url: str, dest: Path, total: int | None, progress: bool) -> None:
    """Streams a tar into a scratch folder in `dest`, then moves its files up into `dest`.

    Only plain files and folders with relative, `..`-free names are accepted. A single top-level
    folder (`chatglm3-6b-32k/config.json`, ...) is taken as the checkpoint folder.
    """
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, disable=not progress) as bar:
            with tarfile.open(fileobj=_Counting(stream, total, bar.update), mode="r|*") as tar:
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if (member.name.startswith(("/", "\\")) or ".." in parts
                            or not (member.isfile() or member.isdir())):
                        kind = "link" if member.issym() or member.islnk() else "absolute or '..' path" \
                            if member.isfile() or member.isdir() else "special file"
                        raise WeightsError(f"{url}: unsafe archive member {member.name!r} ({kind})")
                    if not parts:
                        continue
                    target = scratch.joinpath(*parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None  # a regular file
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        top = list(scratch.iterdir())
        root = top[0] if len(top) == 1 and top[0].is_dir() else scratch
        for item in root.iterdir():
            target = dest / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise WeightsError(f"{url}: not a readable tar archive ({e})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Counting:
    """A read-only stream that reports its progress and turns an early end into ConnectionError.

    (http.client returns a short body as a plain end of stream, which tarfile could take for
    the end of the archive.)
    """

    def __init__(self, raw: BinaryIO, total: int | None, report: Callable[[int], object]):
        self.raw, self.total, self.report, self.seen = raw, total, report, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.seen += len(data)
        self.report(len(data))
        if not data and n != 0 and self.total is not None and self.seen < self.total:
            raise ConnectionError(f"connection closed after {self.seen} of {self.total} bytes")
        return data

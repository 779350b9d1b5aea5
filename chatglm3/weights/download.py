"""Where the checkpoint comes from (hub repo, tar URL or file, local folder), and the hub path.

huggingface_hub moves the hub's files: it checks sizes in flight, reconnects after a drop or a
stall and resumes with Range (up to 5 times in a row that bring nothing), answers a pinned commit
already in place without network, and uses hf_xet. Only what it lacks is added here and in
transfer.py, each marked "hub lacks". The repository's `*.py` files are never fetched. A tar URL
is tar_download.py's.

Across runs, a tar URL resumes at the byte it had. Hub files already complete are kept; a
partial one starts again (huggingface_hub 2.4 never reuses a partial file), and those a stopped
run left are deleted by the next one. Two processes fetching into one folder take turns.

Why a loop of hf_hub_download and not snapshot_download (which lists and fetches the same
files with allow_patterns and max_workers): tried, and it passed every download test but one.
Its pool's threads are not daemon threads, so after Ctrl-C the interpreter's exit waits for
each to finish its current 10 MB read before it can see the stop: 2.3 s at 4 MB/s in
test_sigint_during_a_hub_download (limit 2 s), and up to the read timeout on a stalled link.
transfer.run_all's daemon workers let a run end within a second with the finished shards kept.
The 5xx retry, the progress lines and the stop hook work the same either way.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from . import transfer
from .checkpoint_files import WeightsError, describe, problems, verify_checkpoint_files
from .tar_download import fetch_and_extract
from .transfer import Progress, Stopped, read_timeout, say, size_text

__all__ = ["DEFAULT_DIR", "DEFAULT_REPO", "DEFAULT_REVISION", "WeightsError", "resolve_tokenizer",
           "resolve_weights", "verify_checkpoint_files"]

DEFAULT_REPO = "zai-org/chatglm3-6b-32k"
DEFAULT_REVISION = "e210410255278dd9d74463cf396ba559c0ef801c"  # env CHATGLM3_REVISION overrides
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights"  # env CHATGLM3_WEIGHTS_DIR overrides
# What a checkpoint needs from a hub repo; never `*.py` (remote code is neither fetched nor run).
ALLOW_PATTERNS = ["config.json", "tokenizer.model", "tokenizer_config.json",
                  "*.bin", "*.safetensors", "*.index.json"]
_MARK = ".chatglm3-source"  # in dest, once complete: its source (+ the hub's file sizes)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz)$")


def _err(message: str, kind: str) -> WeightsError:
    """A WeightsError tagged with what kind of failure it is, for _next_steps."""
    e = WeightsError(message)
    e.kind = kind  # type: ignore[attr-defined]
    return e


def _next_steps(kind: str, knob: str, dest: Path, where: Path | None) -> str:
    """Only the next steps that apply to this failure, naming the program's own knob for the
    checkpoint (`--weights` for the CLI, `COG_WEIGHTS` for the Cog server). Appended on the same
    line (the CLI prints errors as one line)."""
    pick = f"{knob} PATH" if knob.startswith("-") else f"{knob}=PATH"
    local = f"{pick} for a complete local checkpoint folder or a .tar/.tar.gz URL"
    if kind == "local":
        return (f"next: fetch it into that folder with `python -m chatglm3 download --dir {where}`, "
                f"or {local}")
    if kind == "offline":
        return f"next: unset HF_HUB_OFFLINE to fetch it into {dest}, or {local}"
    if kind == "source":
        return (f"next: {pick} with an existing checkpoint folder, a hub repo id "
                "(owner/name[@revision]; HF_TOKEN for a private or gated one) or a .tar URL")
    if kind == "tar":
        return f"next: check the archive URL and run again (a download resumes), or {local}"
    steps = [local, "HF_ENDPOINT for a reachable hub mirror"]
    if not problems(dest) and not constants.is_offline_mode():
        steps.append(f"HF_HUB_OFFLINE=1 to use the complete copy already in {dest}")
    return "next: run again (what was fetched is kept), or " + ", or ".join(steps)


def resolve_weights(source: str | os.PathLike | None = None, *, dest: Path | None = None,
                    revision: str | None = None, progress: bool = True,
                    knob: str = "--weights") -> Path:
    """A local directory holding a checked checkpoint, fetched from `source` if needed.

    `source`: None/"" (the default hub repo), an existing directory (checked, used in place),
    "owner/name[@revision]" (hub), or an http(s) URL / local path of a .tar/.tar.gz/.tgz.
    Downloads go into `dest` (default: env CHATGLM3_WEIGHTS_DIR, else DEFAULT_DIR). `progress`:
    say what is fetched and show how far (a bar on a terminal, else log lines); False: silent.
    The download folder itself given as `source` (COG_WEIGHTS=weights) means the default: it is
    fetched into when incomplete, as when nothing is given. `knob`: how the calling program takes
    a checkpoint (--weights, COG_WEIGHTS), named in the next steps of a failure.
    """
    dest = Path(dest or os.environ.get("CHATGLM3_WEIGHTS_DIR") or DEFAULT_DIR).expanduser()
    text = os.fspath(source) if source is not None else ""
    local = Path(text).expanduser() if text else None
    if local is not None and local.is_dir() and local.resolve() == dest.resolve() and problems(local):
        text = ""
    try:
        if not text:
            rev = revision or os.environ.get("CHATGLM3_REVISION") or DEFAULT_REVISION
            return _from_hub(DEFAULT_REPO, rev, dest, progress, trust_local=True)
        if m := re.match(r"(https?):/+", text):  # cog.Path / pathlib turn "https://" into "https:/"
            return _from_tar(m.group(1) + "://" + text[m.end():], dest, progress)
        if (local := Path(text).expanduser()).is_dir():
            if found := problems(local):
                raise _err(describe(local, found), "local")
            return local.resolve()
        if local.is_file():
            if _TAR_NAME.search(local.name):
                return _from_tar(str(local.resolve()), dest, progress)
            raise _err(f"{text}: a file, but neither a checkpoint directory nor a .tar archive",
                       "source")
        return _from_repo_id(text, revision, dest, progress)
    except WeightsError as e:
        steps = _next_steps(getattr(e, "kind", "network"), knob, dest, local)
        raise WeightsError(f"{e}; {steps}") from e.__cause__


def check_source(source: str | os.PathLike | None, *, knob: str = "--weights") -> None:
    """Fails at once, as resolve_weights would, for a source that is neither there nor a hub
    repo id nor a URL (a mistyped path): no network, and no torch imported yet by the caller."""
    text = os.fspath(source) if source is not None else ""
    if (not text or re.match(r"https?:/+", text) or Path(text).expanduser().exists()
            or _is_repo_id(text)):
        return
    resolve_weights(text, knob=knob, progress=False)  # raises before any lookup


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


def resolve_tokenizer(source: str | os.PathLike | None = None, *, dest: Path | None = None,
                      revision: str | None = None, progress: bool = True,
                      knob: str = "--weights") -> Path:
    """A directory holding tokenizer.model, for what needs only the tokenizer (encode).

    A local folder that has one is used as it is. The default repo (nothing given, or the
    download folder) and a hub repo id get only the tokenizer's files fetched into `dest`
    (1 MB, where the whole checkpoint is 12.5 GB). Anything else (a tar URL, a folder without
    a tokenizer) is resolve_weights(source)'s.
    """
    dest = Path(dest or os.environ.get("CHATGLM3_WEIGHTS_DIR") or DEFAULT_DIR).expanduser()
    text = os.fspath(source) if source is not None else ""
    local = Path(text).expanduser() if text else None
    if local is not None and (local / "tokenizer.model").is_file():
        return local
    if local is None or (local.is_dir() and local.resolve() == dest.resolve()):
        if (dest / "tokenizer.model").is_file():
            return dest
        repo = DEFAULT_REPO
        rev = revision or os.environ.get("CHATGLM3_REVISION") or DEFAULT_REVISION
    elif not local.exists() and _is_repo_id(text):
        repo, _, at_rev = text.partition("@")
        rev = at_rev or revision or ((os.environ.get("CHATGLM3_REVISION") or DEFAULT_REVISION)
                                     if repo == DEFAULT_REPO else "main")
    else:
        return resolve_weights(source, dest=dest, revision=revision, progress=progress, knob=knob)
    what = f"{repo}@{rev}"
    try:
        if constants.is_offline_mode():
            raise _err(f"{what}: offline (HF_HUB_OFFLINE is set) and no tokenizer.model in {dest}",
                       "offline")
        _lookup(repo, rev, what)
        say(progress, f"Fetching the tokenizer of {what} from {constants.ENDPOINT} into {dest}")
        for name in TOKENIZER_FILES:
            try:
                transfer.retrying(partial(hf_hub_download, repo, name, revision=rev, local_dir=dest,
                                          library_name="chatglm3", etag_timeout=read_timeout()),
                                  _is_5xx)
            except Exception as e:  # noqa: BLE001 - as in _fetch_file
                if name != "tokenizer.model" and isinstance(e, HfHubHTTPError) and \
                        e.response is not None and e.response.status_code == 404:
                    continue  # the config is optional: the tokenizer needs only its model
                raise _failure(e, what, f"{name} from {constants.ENDPOINT}") from e
    except WeightsError as e:
        steps = _next_steps(getattr(e, "kind", "network"), knob, dest, local)
        raise WeightsError(f"{e}; {steps}") from e.__cause__
    return dest


def _is_repo_id(text: str) -> bool:
    """"owner/name[@revision]" that cannot be a path: looked up on the hub."""
    return not _looks_like_path(text) and bool(_REPO_ID.fullmatch(text.partition("@")[0]))


def _looks_like_path(text: str) -> bool:
    """Never a hub repo id: starts with "/", "~" or "." (absolute, home, ./ ../, hidden), holds
    a backslash, a second or a trailing "/" before any "@", ends in .tar/.tar.gz/.tgz, or its
    first component exists here ("weights/x" when ./weights does)."""
    repo = text.partition("@")[0]
    return (text.startswith(("/", "~", ".")) or "\\" in text or repo.count("/") > 1
            or repo.endswith("/") or bool(_TAR_NAME.search(repo))
            or os.path.lexists(repo.split("/")[0]))


def _from_repo_id(text: str, revision: str | None, dest: Path, progress: bool) -> Path:
    """`text` (no file or folder here) as "owner/name[@revision]", unless it can only be a path
    (_looks_like_path): that is never looked up on the hub."""
    repo, _, at_rev = text.partition("@")
    if _looks_like_path(text):
        path = Path(text).expanduser()
        near = next((p for p in path.parents if p.exists()), None)  # how far the path does exist
        if near is None or near.parent == near:  # nothing, or only "." or "/"
            raise _err(f"{text}: no such directory", "source")
        raise _err(f"{text}: no such directory ({near} exists, but has no "
                   f"{path.relative_to(near).parts[0]})", "source")
    if not _REPO_ID.fullmatch(repo):
        raise _err(f"{text}: no such directory, and not a hub repo id (owner/name[@revision]) "
                   "nor a .tar/.tar.gz/.tgz URL or file", "source")
    if at_rev and revision and at_rev != revision:
        raise _err(f"{text}: revision given twice ({at_rev!r} and {revision!r})", "source")
    default_rev = (os.environ.get("CHATGLM3_REVISION") or DEFAULT_REVISION) if repo == DEFAULT_REPO else "main"
    try:
        return _from_hub(repo, at_rev or revision or default_rev, dest, progress, trust_local=False,
                         note=f"{text}: not a local directory; ")
    except WeightsError as e:
        if isinstance(e.__cause__, RepositoryNotFoundError) and not isinstance(e.__cause__, GatedRepoError):
            raise _err(f"{text}: not a local directory, and hub repo {repo} was not found "
                       f"({e})", "source") from e.__cause__
        raise


def _read_mark(dest: Path) -> tuple[str, dict[str, int] | None]:
    """(source, the hub's sizes) of the last complete fetch into `dest`; ("", None) if none."""
    try:
        mark = json.loads(text := (dest / _MARK).read_text())
        return mark["source"], mark["sizes"]
    except OSError:
        return "", None
    except (ValueError, KeyError, TypeError):
        return text, None  # older runs wrote the tar URL alone


def _from_tar(url: str, dest: Path, progress: bool) -> Path:
    """The checkpoint in the .tar/.tar.gz at `url` (http(s) or a local path), extracted into
    `dest` unless it was the last thing extracted there, and checked."""
    if _read_mark(dest)[0] == url and not problems(dest):
        return dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / _MARK).unlink(missing_ok=True)
    try:
        fetch_and_extract(url, dest, progress)
    except WeightsError as e:
        raise _err(str(e), "tar") from e.__cause__
    if found := problems(dest):
        raise _err(f"{url}: the archive holds no complete checkpoint: {describe(dest, found)}", "tar")
    (dest / _MARK).write_text(json.dumps({"source": url, "sizes": None}))
    return dest.resolve()


# --- hub ----------------------------------------------------------------------------------------

def _from_hub(repo: str, revision: str, dest: Path, progress: bool, *, trust_local: bool,
              note: str = "") -> Path:
    """`repo@revision` in `dest`, fetched unless there. `trust_local`: a complete `dest` that
    huggingface_hub never wrote into (copied there by hand) is taken without asking the hub."""
    what = f"{repo}@{revision}"
    source, sizes = _read_mark(dest)
    if source == what and not problems(dest, sizes):  # the commit fetched last time
        return dest.resolve()
    if trust_local and not (dest / ".cache" / "huggingface").is_dir() and not problems(dest):
        return dest.resolve()
    if constants.is_offline_mode():  # a complete dest is the best there is
        if not (found := problems(dest, sizes if source.startswith(repo + "@") else None)):
            return dest.resolve()
        raise _err(f"{what}: offline (HF_HUB_OFFLINE is set) and no complete local copy: "
                   f"{describe(dest, found)}", "offline")
    dest.mkdir(parents=True, exist_ok=True)
    with _one_fetch_at_a_time(dest, progress):
        source, sizes = _read_mark(dest)
        if source == what and not problems(dest, sizes):  # the process we waited for fetched it
            return dest.resolve()
        return _fetch_from_hub(repo, revision, dest, progress, note)


def _fetch_from_hub(repo: str, revision: str, dest: Path, progress: bool, note: str) -> Path:
    """Lists `repo@revision`, fetches what `dest` lacks, marks `dest` complete. Called alone."""
    what = f"{repo}@{revision}"
    say(progress, f"{note}looking up {what} on the hub at {constants.ENDPOINT}")
    info = _lookup(repo, revision, what)
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in info.siblings or []}
    names = [n for n in sizes if "/" not in n and any(fnmatch.fnmatch(n, p) for p in ALLOW_PATTERNS)]
    if any(n.endswith(".safetensors") for n in names):  # both formats: skip the .bin copy
        names = [n for n in names if not (n.endswith(".bin") or n == "pytorch_model.bin.index.json")]
    sizes = {n: sizes[n] for n in sorted(names)}
    if not {"config.json", "tokenizer.model"} <= sizes.keys() or not any(
            n.endswith((".bin", ".safetensors")) for n in sizes):
        raise _err(f"{what}: not a ChatGLM3 checkpoint repo (has {sorted(sizes) or 'none'} "
                   "of config.json, tokenizer.model and weight files)", "source")
    for part in (dest / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        part.unlink(missing_ok=True)  # hub lacks: a partial is never reused; no one else writes here
    for name, size in sizes.items():  # hub lacks: a file it wrote for this commit is not checked again
        if (f := dest / name).is_file() and f.stat().st_size != size:
            f.unlink()
    have, total = sum(s for n, s in sizes.items() if (dest / n).is_file()), sum(sizes.values())
    say(progress, f"Fetching {repo} at {info.sha[:12]} ({revision}): {size_text(total)} in {len(sizes)} "
                  f"files, into {dest}" + (f" ({size_text(have)} already there)" if have else ""))
    bar = Progress(repo.rsplit("/", 1)[-1], total, progress, have)
    transfer.run_all([partial(_fetch_file, repo, info.sha, n, dest, what, bar) for n in sizes], bar)
    if found := problems(dest, sizes):  # hub lacks: the listing's sizes, not the download's headers
        raise WeightsError(f"{what}: incomplete after fetching: {describe(dest, found)}")
    (dest / _MARK).write_text(json.dumps({"source": f"{repo}@{info.sha}", "sizes": sizes}))
    return dest.resolve()


def _lookup(repo: str, revision: str, what: str):
    """The repo's file listing at `revision`: one request, which fails at once (and in one
    line) where the hub cannot be reached; hf_hub_download alone would first retry its HEAD
    for ~24 s, printing each retry."""
    try:  # hub lacks: model_info is never retried
        return transfer.retrying(partial(HfApi(library_name="chatglm3").model_info, repo,
                                         revision=revision, files_metadata=True,
                                         timeout=read_timeout()), _is_5xx)
    except Exception as e:  # noqa: BLE001 - HTTP errors, refused, unresolvable, or no answer in time
        raise _failure(e, what, f"the hub at {constants.ENDPOINT} did not answer") from e


def _fetch_file(repo: str, commit: str, name: str, dest: Path, what: str, bar: Progress,
                stop: threading.Event) -> None:
    """`name` into `dest` by hf_hub_download. hub lacks: another try after an HTTP 5xx (it
    retries only 408/429 on a download GET). The file starts again from zero each try, so it
    gets transfer.ATTEMPTS tries in all, each one GET plus the hub's own reconnects (<= 5)."""
    def once() -> None:
        hook = transfer.hook(bar, stop)
        try:
            hf_hub_download(repo, name, revision=commit, local_dir=dest, library_name="chatglm3",
                            etag_timeout=read_timeout(), tqdm_class=hook)
        except HfHubHTTPError:
            bar.add(-hook.got)  # the next try starts from zero
            raise

    try:
        transfer.retrying(once, _is_5xx)
    except Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - the hub gave up: HTTP error, reconnects, size check
        raise _failure(e, what, f"{name} from {constants.ENDPOINT}") from e


def _is_5xx(e: Exception) -> bool:
    return isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code >= 500


def _failure(e: BaseException, what: str, where: str) -> WeightsError:
    """A failed hub call as one line: `what` (repo@revision), `where` (a file, the hub), why."""
    hub = constants.ENDPOINT
    if isinstance(e, RevisionNotFoundError):
        return _err(f"{what}: revision not found on {hub}", "source")
    if isinstance(e, GatedRepoError):
        return _err(f"{what}: gated repo on {hub}; accept its terms there and set HF_TOKEN", "source")
    if isinstance(e, RepositoryNotFoundError):
        return _err(f"{what}: repository not found on {hub} (private or gated: set HF_TOKEN)", "source")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        return WeightsError(f"{what}: HTTP {code} from {e.response.url}" + (
            f" ({transfer.ATTEMPTS} tries)" if code >= 500 else " (check HF_TOKEN)" if code in (401, 403) else ""))
    if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:  # the hub's wrapper
        e = e.__cause__
    why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if "Timeout" in type(e).__name__:
        why += f" (no data for HF_HUB_DOWNLOAD_TIMEOUT={read_timeout():g} s)"
    return WeightsError(f"{what}: {where}: {why}")


@contextmanager
def _one_fetch_at_a_time(dest: Path, progress: bool) -> Iterator[None]:
    """Holds `dest`'s fetch lock: a second process fetching into the same folder (a Cog server and
    a CLI started together) waits for the first, then finds the checkpoint there.

    hub lacks: huggingface_hub 2.4 writes each file into an `.incomplete` partial of its own,
    never reused, that a killed run leaves behind. Under this lock no one else fetches into
    `dest`, so every partial there is dead and is deleted before fetching.
    """
    lock = FileLock(dest / ".cache" / "chatglm3-fetch.lock")
    (dest / ".cache").mkdir(exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(progress, f"Another process is fetching into {dest}: waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()

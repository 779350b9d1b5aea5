"""chatglm3.weights.download: resuming, parallel ranges, stalls, Ctrl-C, and what a new user is told.

Against the fake hub (tests/helpers/fakehub.py), counting the requests and the bytes it sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.file_download
import pytest

from chatglm3.weights import tar_download
from chatglm3.weights import transfer
from chatglm3.weights.download import WeightsError, resolve_weights
from conftest import ROOT, TINY_CKPT
from helpers.fakehub import FakeHub, Fault
from test_download import SHARD1, SHARD2, _env, _tar, assert_same_files, no_network  # noqa: F401

pytestmark = pytest.mark.slow  # download servers

ARCHIVE = "ckpt.tar"


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as h:
        h.add_repo("test/tiny", {p.name: p for p in TINY_CKPT.iterdir()})
        h.static[ARCHIVE] = _tar(TINY_CKPT, "", top="chatglm3-6b-32k")
        yield h


@pytest.fixture
def fast(monkeypatch):
    """A 0.5 s read timeout, and huggingface_hub's 1 s pause before a reconnect skipped."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.setattr(huggingface_hub.file_download, "time", types.SimpleNamespace(sleep=lambda s: None))


def _url(hub: FakeHub) -> str:
    return f"{hub.url}/static/{ARCHIVE}"


def _size(hub: FakeHub) -> int:
    return len(hub.static[ARCHIVE])


def _ranges(hub: FakeHub) -> list[str]:
    return [r.headers.get("range", "") for r in hub.seen("GET", ARCHIVE)]


def _on_disk(dest: Path) -> int:
    return sum(p.stat().st_size for p in (dest / ".chatglm3-download").glob("part*"))


def _interrupt_at(monkeypatch, fraction: float) -> dict:
    """Makes the progress display raise KeyboardInterrupt (what Ctrl-C does to the main thread,
    which is the one that draws progress) once `fraction` of the bytes are in; once only."""
    seen: dict = {}
    show = transfer.Progress.show

    def show_then_interrupt(self):
        show(self)
        if self.total and self.done >= fraction * self.total and "at" not in seen:
            seen["at"] = time.monotonic()
            raise KeyboardInterrupt

    monkeypatch.setattr(transfer.Progress, "show", show_then_interrupt)
    return seen


# --- tar URL ------------------------------------------------------------------------------------

def test_parallel_ranges_when_the_server_allows(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(tar_download, "MIN_PART", 8 << 20)
    size = _size(hub)
    out = resolve_weights(_url(hub), dest=tmp_path / "w", progress=False)
    assert_same_files(out, TINY_CKPT)
    n = min(transfer.WORKERS, size // (8 << 20))
    assert n >= 4
    bounds = [(size * i // n, size * (i + 1) // n - 1) for i in range(n)]
    assert _ranges(hub)[0] == "bytes=0-0"  # the probe
    assert sorted(_ranges(hub)[1:]) == sorted(f"bytes={a}-{b}" for a, b in bounds)
    assert all(r.status == 206 for r in hub.seen("GET", ARCHIVE))
    assert hub.sent(ARCHIVE) == size + 1
    assert not (out / ".chatglm3-download").exists()  # parts go once extracted


def test_a_drop_mid_archive_resumes_from_the_byte_it_had(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(tar_download, "MIN_PART", 8 << 20)
    hub.faults.append(Fault("drop", ARCHIVE, skip=3))  # the probe, then two whole parts
    assert_same_files(resolve_weights(_url(hub), dest=tmp_path / "w", progress=False), TINY_CKPT)
    dropped = next(r for r in hub.seen("GET", ARCHIVE) if r.status == 206 and r.sent and
                   r.sent < _length(r.headers["range"]))
    start, end = map(int, dropped.headers["range"][len("bytes="):].split("-"))
    assert f"bytes={start + dropped.sent}-{end}" in _ranges(hub)
    assert len(hub.seen("GET", ARCHIVE)) == 1 + min(transfer.WORKERS, _size(hub) // (8 << 20)) + 1
    assert hub.sent(ARCHIVE) == _size(hub) + 1  # nothing fetched twice


def _length(byte_range: str) -> int:
    start, end = map(int, byte_range[len("bytes="):].split("-"))
    return end - start + 1


def test_a_server_without_ranges_still_works(hub, tmp_path, capsys):
    hub.ranges = False
    hub.faults.append(Fault("drop", ARCHIVE, skip=1))
    out = resolve_weights(_url(hub), dest=tmp_path / "w")
    assert_same_files(out, TINY_CKPT)
    probe, dropped, again = hub.seen("GET", ARCHIVE)
    assert [r.status for r in (probe, dropped, again)] == [200, 200, 200]
    assert dropped.sent == _size(hub) // 2 and again.sent == _size(hub)  # from zero: no resume
    assert "takes no Range requests: one stream, and a dropped connection starts it again from zero" \
        in capsys.readouterr().err


def test_http_500_on_a_part_is_tried_again_and_then_named(hub, tmp_path):
    hub.faults.append(Fault("500", ARCHIVE, times=2, skip=1))  # after the probe
    assert_same_files(resolve_weights(_url(hub), dest=tmp_path / "w", progress=False), TINY_CKPT)
    assert [r.status for r in hub.seen("GET", ARCHIVE)] == [206, 500, 500, 206]
    assert sum(r.sent for r in hub.seen("GET", ARCHIVE) if r.status == 206) == _size(hub) + 1
    hub.reset()
    hub.faults.append(Fault("500", ARCHIVE, times=-1, skip=1))
    with pytest.raises(WeightsError, match=rf"/{ARCHIVE}: HTTP 500 .*\(4 tries in a row brought nothing\)"):
        resolve_weights(_url(hub), dest=tmp_path / "v", progress=False)
    assert len(hub.seen("GET", ARCHIVE)) == 1 + transfer.ATTEMPTS


def test_a_stall_mid_archive_is_retried_from_where_it_was(hub, tmp_path, fast):
    hub.faults.append(Fault("stall", ARCHIVE, skip=1))
    assert_same_files(resolve_weights(_url(hub), dest=tmp_path / "w", progress=False), TINY_CKPT)
    assert _ranges(hub) == ["bytes=0-0", f"bytes=0-{_size(hub) - 1}",
                            f"bytes={_size(hub) // 2}-{_size(hub) - 1}"]
    assert hub.sent(ARCHIVE) == _size(hub) + 1


def test_a_server_that_never_answers_is_reported(hub, tmp_path, fast):
    hub.faults.append(Fault("hang", ARCHIVE, times=-1))
    t0 = time.monotonic()
    with pytest.raises(WeightsError, match=rf"/{ARCHIVE}: no data for 0.5 s \(the server stalled\) "
                                           r"\(4 tries in a row brought nothing\); next: check the archive URL and run "
                                           r"again \(a download resumes\), or --weights PATH"):
        resolve_weights(_url(hub), dest=tmp_path / "w", progress=False)
    assert time.monotonic() - t0 < 4 * 0.5 + 1.5
    assert len(hub.seen("GET", ARCHIVE)) == transfer.ATTEMPTS


def test_a_part_that_keeps_stalling_is_given_up(hub, tmp_path, fast):
    hub.faults.append(Fault("hang", ARCHIVE, times=-1, skip=1))  # the probe gets through
    with pytest.raises(WeightsError, match=rf"{ARCHIVE}: no data for 0.5 s .*4 tries in a row brought nothing"):
        resolve_weights(_url(hub), dest=tmp_path / "w", progress=False)
    assert len(hub.seen("GET", ARCHIVE)) == 1 + transfer.ATTEMPTS


def test_ctrl_c_stops_at_once_and_the_next_run_resumes(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(tar_download, "MIN_PART", 8 << 20)
    hub.faults.append(Fault("slow", ARCHIVE, times=-1, rate=4 << 20))
    seen = _interrupt_at(monkeypatch, 0.3)
    dest = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        resolve_weights(_url(hub), dest=dest, progress=False)
    assert time.monotonic() - seen["at"] < 2
    had = _on_disk(dest)
    assert 0.3 * _size(hub) <= had < _size(hub)
    hub.reset()
    assert_same_files(resolve_weights(_url(hub), dest=dest, progress=False), TINY_CKPT)
    assert hub.sent(ARCHIVE) == _size(hub) - had + 1  # only what was missing, and the probe


def test_a_changed_archive_is_fetched_from_zero(hub, tmp_path, monkeypatch):
    seen = _interrupt_at(monkeypatch, 0.3)
    hub.faults.append(Fault("slow", ARCHIVE, times=-1, rate=16 << 20))
    with pytest.raises(KeyboardInterrupt):
        resolve_weights(_url(hub), dest=tmp_path / "w", progress=False)
    assert seen and _on_disk(tmp_path / "w") > 0
    hub.reset()
    original = hub.static[ARCHIVE]
    try:
        hub.static[ARCHIVE] = _tar(TINY_CKPT, "", top=".")  # another ETag
        assert_same_files(resolve_weights(_url(hub), dest=tmp_path / "w", progress=False), TINY_CKPT)
        assert hub.sent(ARCHIVE) == _size(hub) + 1
    finally:
        hub.static[ARCHIVE] = original


def test_progress_lines_when_stderr_is_no_terminal(hub, tmp_path, capsys):
    hub.faults.append(Fault("slow", ARCHIVE, times=-1, rate=32 << 20))
    resolve_weights(_url(hub), dest=tmp_path / "w")
    err = capsys.readouterr().err
    assert f"Fetching {_url(hub)} ({_size(hub) / 1e6:.1f} MB) into {tmp_path / 'w'}\n" in err
    lines = [line for line in err.splitlines() if line.startswith(f"{ARCHIVE}: ")]
    assert lines[-1].startswith(f"{ARCHIVE}: 100% of {_size(hub) / 1e6:.1f} MB (") and lines[-1].endswith(" MB/s)")
    assert 10 <= len(lines) <= 20  # every 5 %


def test_a_bar_on_a_terminal(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    resolve_weights(_url(hub), dest=tmp_path / "w")
    err = capsys.readouterr().err
    assert f"\r{ARCHIVE}: 100%|" in err and f"{_size(hub) / 1e6:.1f}M/{_size(hub) / 1e6:.1f}M" in err
    assert "% of" not in err  # no log lines


# --- Ctrl-C in a real process -------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from chatglm3.weights.download import resolve_weights
    try:
        resolve_weights(sys.argv[1], dest=sys.argv[2])
    except KeyboardInterrupt:
        sys.exit(130)
""")


def _interrupted_child(hub: FakeHub, source: str, dest: Path, match: str, total: int) -> tuple[float, str]:
    """Runs resolve_weights(source) in a child process, sends it SIGINT twice once a third of
    `total` bytes went out for `match`; (seconds it took to exit after that, its stderr)."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(dest.parent / "hf-cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, source, str(dest)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while hub.sent(match) < total / 3:
            assert child.poll() is None and time.monotonic() < deadline, "the child never got going"
            time.sleep(0.02)
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        time.sleep(0.2)
        if child.poll() is None:
            child.send_signal(signal.SIGINT)  # an impatient user: a second Ctrl-C
        _, err = child.communicate(timeout=10)
        took = time.monotonic() - t0
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    return took, err


def test_sigint_during_a_tar_download(hub, tmp_path):
    hub.faults.append(Fault("slow", ARCHIVE, times=-1, rate=4 << 20))
    dest = tmp_path / "w"
    took, err = _interrupted_child(hub, _url(hub), dest, ARCHIVE, _size(hub))
    assert took < 2
    assert "Traceback" not in err
    had = _on_disk(dest)
    assert had > _size(hub) / 3
    hub.reset()
    assert_same_files(resolve_weights(_url(hub), dest=dest, progress=False), TINY_CKPT)
    assert hub.sent(ARCHIVE) == _size(hub) - had + 1


def test_sigint_during_a_hub_download(hub, tmp_path):
    hub.faults.append(Fault("slow", SHARD2, times=-1, rate=4 << 20))
    dest = tmp_path / "w"
    took, err = _interrupted_child(hub, "test/tiny", dest, SHARD2, (TINY_CKPT / SHARD2).stat().st_size)
    assert took < 2
    assert "Traceback" not in err
    assert (dest / SHARD1).stat().st_size == (TINY_CKPT / SHARD1).stat().st_size  # kept
    hub.reset()
    assert_same_files(resolve_weights("test/tiny", dest=dest, progress=False), TINY_CKPT)
    assert not hub.seen("GET", SHARD1)
    assert hub.sent(SHARD2) == (TINY_CKPT / SHARD2).stat().st_size  # huggingface_hub: from zero
    assert not list(dest.rglob("*.incomplete"))  # what the killed run left is gone


# --- hub ----------------------------------------------------------------------------------------

def test_hub_ctrl_c_keeps_finished_files(hub, tmp_path, monkeypatch):
    hub.faults.append(Fault("slow", SHARD2, times=-1, rate=8 << 20))
    seen = _interrupt_at(monkeypatch, 0.7)
    dest = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        resolve_weights("test/tiny", dest=dest, progress=False)
    assert time.monotonic() - seen["at"] < 2
    hub.reset()
    assert_same_files(resolve_weights("test/tiny", dest=dest, progress=False), TINY_CKPT)
    assert not hub.seen("GET", SHARD1)
    assert len(hub.seen("GET", SHARD2)) == 1
    assert not list(dest.rglob("*.incomplete"))


def test_hub_stall_is_retried_by_huggingface_hub_alone(hub, tmp_path, fast):
    """The hub reconnects 5 times after a stalled GET; we add no tries of our own on top."""
    hub.faults.append(Fault("hang", SHARD1, times=-1))
    t0 = time.monotonic()
    with pytest.raises(WeightsError, match=rf"test/tiny@main: {SHARD1} from http\S+: ReadTimeout: .* "
                                           r"\(no data for HF_HUB_DOWNLOAD_TIMEOUT=0.5 s\)"):
        resolve_weights("test/tiny", dest=tmp_path / "w", progress=False)
    assert len(hub.seen("GET", SHARD1)) == 6
    assert time.monotonic() - t0 < 6 * 0.5 + 2


def test_hub_api_that_never_answers_is_reported(hub, tmp_path, fast):
    hub.faults.append(Fault("hang", "/api/models/test/tiny/revision", times=-1))
    t0 = time.monotonic()
    with pytest.raises(WeightsError, match=r"test/tiny@main: the hub at http\S+ did not answer: ReadTimeout"):
        resolve_weights("test/tiny", dest=tmp_path / "w", progress=False)
    assert time.monotonic() - t0 < 2


def test_what_a_download_says_first(hub, tmp_path, capsys):
    resolve_weights("test/tiny", dest=tmp_path / "w")
    err = capsys.readouterr().err
    total = sum(p.stat().st_size for p in TINY_CKPT.iterdir())
    commit = hub.repos["test/tiny"].commit
    assert f"test/tiny: not a local directory; looking up test/tiny@main on the hub at {hub.url}\n" in err
    assert (f"Fetching test/tiny at {commit[:12]} (main): {total / 1e6:.1f} MB in 6 files, "
            f"into {tmp_path / 'w'}") in err
    assert "tiny: 100% of" in err


# --- sources ------------------------------------------------------------------------------------

def test_a_mistyped_repo_id_is_looked_up_once(hub, tmp_path, capsys):
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as e:
        resolve_weights("nope/nope", dest=tmp_path / "w")
    assert time.monotonic() - t0 < 2  # one request, no retries
    first, hint = str(e.value).split("; next: ")
    assert first.startswith("nope/nope: not a local directory, and hub repo nope/nope was not found")
    # only what applies: another source, or a token for a private repo; not a mirror nor offline
    assert "--weights PATH" in hint and "HF_TOKEN" in hint
    assert not any(s in hint for s in ("COG_WEIGHTS", "HF_ENDPOINT", "HF_HUB_OFFLINE"))
    assert "\n" not in str(e.value)  # the CLI shows errors as one line
    assert "nope/nope: not a local directory; looking up nope/nope@main on the hub" in capsys.readouterr().err
    assert [r.path for r in hub.requests] == ["/api/models/nope/nope/revision/main"]


@pytest.mark.parametrize("source,message", [
    ("nope/nope/", "nope/nope/: no such directory"),
    ("a/b/c", "a/b/c: no such directory"),
    ("./nope", "./nope: no such directory"),
    ("~/no-such-dir-here", r"~/no-such-dir-here: no such directory \(\S+ exists, but has no no-such-dir-here\)"),
    ("nope/ckpt.tar", "nope/ckpt.tar: no such directory"),
    ("weights/nope", r"weights/nope: no such directory \(weights exists, but has no nope\)"),
    ("weights/x/y", r"weights/x/y: no such directory \(weights exists, but has no x\)"),
    ("config.json", "config.json: a file, but neither a checkpoint directory nor a .tar archive"),
])
def test_what_looks_like_a_path_is_never_looked_up(no_network, tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=message + r"; next: --weights PATH"):
        resolve_weights(source, dest=tmp_path / "w")

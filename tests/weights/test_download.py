"""chatglm3.weights.download against a fake hub on 127.0.0.1 (tests/helpers/fakehub.py), with injected faults."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub._local_folder import get_local_download_paths
from safetensors.torch import load_file, save_file

from chatglm3.weights import transfer
from chatglm3.weights.checkpoint import CheckpointError, load_model
from chatglm3.weights.download import (DEFAULT_REPO, DEFAULT_REVISION, WeightsError, resolve_weights,
                               verify_checkpoint_files)
from conftest import TINY_CKPT, convert_to_safetensors
from helpers.fakehub import FakeHub, Fault

pytestmark = [pytest.mark.slow, pytest.mark.shared]  # download servers

SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"
REMOTE_CODE = b"raise SystemExit('remote code must never run')\n"


@pytest.fixture(scope="module")
def st_ckpt(tmp_path_factory) -> Path:
    """The tiny checkpoint in the sharded safetensors layout."""
    return convert_to_safetensors(TINY_CKPT, tmp_path_factory.mktemp("st"))


@pytest.fixture(scope="module")
def hub(st_ckpt, tmp_path_factory):
    bins = {p.name: p for p in TINY_CKPT.iterdir()}
    sts = {p.name: p for p in st_ckpt.iterdir()}
    with FakeHub() as h:
        h.add_repo("test/tiny", {**bins, "modeling_chatglm.py": REMOTE_CODE})
        h.add_repo(DEFAULT_REPO, {**bins, "modeling_chatglm.py": REMOTE_CODE}, commit=DEFAULT_REVISION)
        h.add_repo("test/tiny-st", {**sts, "modeling_chatglm.py": REMOTE_CODE})
        h.add_repo("test/both", {**bins, **sts})
        h.add_repo("test/readme-only", {"README.md": b"# nothing\n"})
        h.static["ckpt.tar.gz"] = _tar(TINY_CKPT, "gz", top="chatglm3-6b-32k")
        h.static["flat.tar"] = _tar(TINY_CKPT, "", top=".")
        yield h


def point_hub_at(monkeypatch, url: str) -> None:
    """What HF_ENDPOINT does when set before huggingface_hub's import (which reads it once)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(autouse=True)
def _env(request, monkeypatch, tmp_path):
    """Each test: the hub's endpoint at the fake hub (or a closed port), its own HF cache, online,
    no token/CHATGLM3_* from outside, no back-off waits, a clean request log."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CHATGLM3_REVISION", "CHATGLM3_WEIGHTS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    point_hub_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    # huggingface_hub fetches an "agent harness" list from its import-time endpoint once per
    # process (user-agent telemetry); give it an empty one so no test ever reaches for the internet.
    monkeypatch.setattr("huggingface_hub.utils._detect_agent._registry",
                        {"standardEnvVars": [], "harnesses": {}}, raising=False)
    monkeypatch.setattr(transfer, "RETRY_WAIT_S", 0.0)
    if "hub" in request.fixturenames:
        h = request.getfixturevalue("hub")
        point_hub_at(monkeypatch, h.url)
        h.reset()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tar(src: Path, compression: str, top: str) -> bytes:
    buf = io.BytesIO()
    options = {"compresslevel": 1} if compression else {}
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", **options) as t:
        t.add(src, arcname=top)
    return buf.getvalue()


def assert_same_files(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir() if not p.name.startswith(".")) == names
    for n in names:
        assert (got / n).read_bytes() == (want / n).read_bytes(), n


def linked_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """`dst` with a symlink to each file of `src` (cheap stand-in for a copy), except `skip`."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p)
    return dst


# --- hub ----------------------------------------------------------------------------------------

def test_hub_download_is_exact_and_never_fetches_python(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # read at call time
    out = resolve_weights("test/tiny", dest=tmp_path / "w", progress=False)
    assert out == (tmp_path / "w").resolve()
    assert_same_files(out, TINY_CKPT)
    assert not list(out.rglob("*.py"))
    assert not hub.seen(match=".py")
    sent = hub.seen(match="test/tiny")
    assert sent and all(r.headers.get("authorization") == "Bearer hf_secret" for r in sent)

    hub.reset()  # pinned to the commit it got: answered from dest alone
    commit = hub.repos["test/tiny"].commit
    assert resolve_weights(f"test/tiny@{commit}", dest=tmp_path / "w", progress=False) == out
    assert hub.requests == []
    # A branch may have moved: one look at the hub, no file fetched again.
    assert resolve_weights("test/tiny", dest=tmp_path / "w", progress=False) == out
    assert [r.path for r in hub.requests] == ["/api/models/test/tiny/revision/main"]


def test_default_source_then_no_network(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATGLM3_WEIGHTS_DIR", str(tmp_path / "w"))
    out = resolve_weights()  # progress bar on
    assert out == (tmp_path / "w").resolve()
    assert_same_files(out, TINY_CKPT)
    assert hub.seen(match=f"/{DEFAULT_REPO}/resolve/{DEFAULT_REVISION}/")

    hub.reset()
    assert resolve_weights() == out
    assert resolve_weights("") == out
    assert resolve_weights(DEFAULT_REPO) == out  # the default repo defaults to the pinned revision
    assert hub.requests == []


def test_default_source_accepts_a_checkpoint_placed_by_hand(hub, tmp_path):
    dest = linked_copy(TINY_CKPT, tmp_path / "w")
    assert resolve_weights(None, dest=dest, progress=False) == dest.resolve()
    assert hub.requests == []


def test_revision_override_from_env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATGLM3_REVISION", "v9")
    with pytest.raises(WeightsError, match=f"{DEFAULT_REPO}@v9: revision not found"):
        resolve_weights(dest=tmp_path / "w", progress=False)


def test_dropped_connection_is_resumed(hub, tmp_path):
    hub.faults.append(Fault("drop", SHARD2))
    out = resolve_weights("test/tiny", dest=tmp_path / "w", progress=False)
    assert_same_files(out, TINY_CKPT)
    gets = hub.seen("GET", SHARD2)
    assert len(gets) == 2 and gets[1].headers.get("range", "").startswith("bytes=")


@pytest.mark.parametrize("match,times", [(SHARD1, 1), (SHARD1, 2), ("/api/models/test/tiny/revision", 2)])
def test_http_500_is_retried(hub, tmp_path, match, times):
    hub.faults.append(Fault("500", match, times=times))
    out = resolve_weights("test/tiny", dest=tmp_path / "w", progress=False)
    assert_same_files(out, TINY_CKPT)
    assert len(hub.seen("GET", match)) == times + 1


def test_http_500_forever_is_a_clear_error(hub, tmp_path):
    hub.faults.append(Fault("500", SHARD1, times=-1))
    with pytest.raises(WeightsError, match=rf"test/tiny@main: HTTP 500 from http://\S+/{SHARD1} \(4 tries\); next: "):
        resolve_weights("test/tiny", dest=tmp_path / "w", progress=False)
    assert len(hub.seen("GET", SHARD1)) == transfer.ATTEMPTS
    assert not (tmp_path / "w" / SHARD1).exists()
    assert not [p for p in (tmp_path / "w").rglob("*") if p.name.endswith(".incomplete")]


def test_truncated_file_is_named_and_the_next_run_fetches_it_again(hub, tmp_path):
    """A file the transfer brought whole but short of the hub's listing (a CDN serving the wrong
    length, which the hub's own in-flight check cannot see) fails the run, naming it; the next
    run fetches that file alone."""
    hub.faults.append(Fault("truncate", SHARD2, times=1))
    size = (TINY_CKPT / SHARD2).stat().st_size
    with pytest.raises(WeightsError, match=rf"test/tiny@main: incomplete after fetching: \S+/{SHARD2}: "
                                           rf"{size // 2} bytes, but the hub has {size}"):
        resolve_weights("test/tiny", dest=tmp_path / "w", progress=False)
    assert len(hub.seen("GET", SHARD2)) == 1
    hub.reset()
    assert_same_files(resolve_weights("test/tiny", dest=tmp_path / "w", progress=False), TINY_CKPT)
    assert [r.path.rsplit("/", 1)[-1] for r in hub.seen("GET", ".bin")] == [SHARD2]


def test_local_truncation_is_repaired_from_the_hub(hub, tmp_path):
    dest = tmp_path / "w"
    resolve_weights("test/tiny", dest=dest, progress=False)
    with open(dest / SHARD1, "r+b") as f:
        f.truncate(1000)
    # What killed runs leave: partials in the hub's download folder, never reused by it.
    partials = [get_local_download_paths(dest, name).incomplete_path("e" * 64) for name in (SHARD1, "other.bin")]
    for p in partials:
        p.write_bytes(b"x" * 100)
    hub.reset()
    assert_same_files(resolve_weights("test/tiny", dest=dest, progress=False), TINY_CKPT)
    assert len(hub.seen("GET", SHARD1)) == 1
    assert not hub.seen("GET", SHARD2)
    assert not list(dest.rglob("*.incomplete"))


def test_a_second_fetch_into_the_same_folder_waits_for_the_first(hub, tmp_path, capsys):
    """Two processes started together (a Cog server and a CLI) share one download, and neither
    deletes the partial files the other is writing."""
    hub.faults.append(Fault("slow", SHARD2, times=-1, rate=16 << 20))
    dest, got = tmp_path / "w", {}
    first = threading.Thread(target=lambda: got.update(a=resolve_weights("test/tiny", dest=dest, progress=False)))
    first.start()
    while not hub.seen("GET", SHARD2) and first.is_alive():
        time.sleep(0.01)
    second = resolve_weights("test/tiny", dest=dest)
    first.join()
    assert f"Another process is fetching into {dest}: waiting for it" in capsys.readouterr().err
    assert got["a"] == second
    assert_same_files(second, TINY_CKPT)
    assert len(hub.seen("GET", SHARD2)) == 1  # fetched once, by the first
    assert len(hub.seen("GET", "/api/models/test/tiny/revision")) == 2  # the second asks after waiting


@pytest.mark.parametrize("source,message", [
    ("nobody/nothing", "nobody/nothing: not a local directory, and hub repo nobody/nothing was not found "
                       r"\(nobody/nothing@main: repository not found on http"),
    ("test/tiny@v9", "test/tiny@v9: revision not found on http"),
    ("test/readme-only", "test/readme-only@main: not a ChatGLM3 checkpoint repo"),
])
def test_missing_repo_or_revision(hub, tmp_path, source, message):
    with pytest.raises(WeightsError, match=message):
        resolve_weights(source, dest=tmp_path / "w", progress=False)


def test_safetensors_repo(hub, tmp_path, st_ckpt):
    out = resolve_weights("test/tiny-st", dest=tmp_path / "w", progress=False)
    assert_same_files(out, st_ckpt)


def test_repo_with_both_formats_fetches_only_safetensors(hub, tmp_path, st_ckpt):
    out = resolve_weights("test/both", dest=tmp_path / "w", progress=False)
    assert_same_files(out, st_ckpt)
    assert not hub.seen(match=".bin")


def test_offline(hub, tmp_path, monkeypatch):
    resolve_weights("test/tiny", dest=tmp_path / "full", progress=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    hub.reset()
    full = resolve_weights("test/tiny", dest=tmp_path / "full", progress=False)
    assert full == (tmp_path / "full").resolve()
    with pytest.raises(WeightsError, match=r"test/tiny@main: offline \(HF_HUB_OFFLINE is set\)"):
        resolve_weights("test/tiny", dest=tmp_path / "empty", progress=False)
    assert hub.requests == []


# --- local folders ------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """The hub at a closed port, offline, and any outgoing connection an error."""
    point_hub_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_local_dir_is_used_in_place(no_network):
    assert resolve_weights(str(TINY_CKPT)) == TINY_CKPT.resolve()
    assert resolve_weights(TINY_CKPT) == TINY_CKPT.resolve()  # os.PathLike, e.g. cog.Path
    verify_checkpoint_files(TINY_CKPT)


def test_local_safetensors_dir(no_network, st_ckpt):
    assert resolve_weights(st_ckpt) == st_ckpt.resolve()


def _cut(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.unlink()  # a symlink from linked_copy: replace it, never touch the original
    path.write_bytes(data[:keep])


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize("case,message", [
    ("missing shard", rf"{SHARD1}: missing \(named in the index\)"),
    ("broken config", r"config.json: unreadable JSON"),
    ("empty tokenizer", r"tokenizer.model: empty"),
    ("no weights", r"no weight files"),
    ("bad index", r"pytorch_model.bin.index.json: unreadable index"),
    ("index names a shard outside", r"pytorch_model.bin.index.json: names a shard outside the folder"),
])
def test_local_dir_problems_are_named(no_network, tmp_path, case, message):
    d = linked_copy(TINY_CKPT, tmp_path / "c")
    if case == "missing shard":
        (d / SHARD1).unlink()
    elif case == "broken config":
        _rewrite(d / "config.json", b'{"num_layers": ')
    elif case == "empty tokenizer":
        _rewrite(d / "tokenizer.model", b"")
    elif case == "no weights":
        for p in d.glob("pytorch_model*"):
            p.unlink()
    elif case == "bad index":
        _rewrite(d / "pytorch_model.bin.index.json", b'{"metadata": {}}')
    else:
        index = json.loads((d / "pytorch_model.bin.index.json").read_text())
        index["weight_map"]["transformer.output_layer.weight"] = "../../etc/passwd"
        _rewrite(d / "pytorch_model.bin.index.json", json.dumps(index).encode())
    with pytest.raises(WeightsError, match=message):
        resolve_weights(d)
    with pytest.raises(WeightsError, match=message):
        verify_checkpoint_files(d)


# What is inside a shard is the loader's to check (download.py no longer parses safetensors
# headers or torch zips): verify_checkpoint_files lets these through, load_model names the file.
@pytest.mark.parametrize("case,message", [
    ("truncated bin", rf"{SHARD2}: cannot be read"),
    ("truncated safetensors", r"model-00002-of-00002.safetensors: cannot be read"),
    ("a shard lacks a tensor the index puts there", r"1 tensors missing from the weights"),
])
def test_damaged_shards_are_named_by_the_loader(no_network, tmp_path, st_ckpt, case, message):
    d = linked_copy(TINY_CKPT if "bin" in case else st_ckpt, tmp_path / "c")
    if case == "truncated bin":
        _cut(d / SHARD2, (d / SHARD2).stat().st_size - 100)
    elif case == "truncated safetensors":
        _cut(d / "model-00002-of-00002.safetensors", 5000)
    else:
        shard = d / "model-00001-of-00002.safetensors"
        tensors = load_file(shard)
        dropped = next(n for n in tensors if "layers.0." in n)
        del tensors[dropped]
        shard.unlink()
        save_file(tensors, shard)
        assert dropped in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    verify_checkpoint_files(d)
    with pytest.raises(CheckpointError, match=message):
        load_model(d, "cpu", torch.float32)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_unsharded_checkpoints(no_network, tmp_path, name):
    d = linked_copy(TINY_CKPT, tmp_path / "c", skip=(SHARD1, SHARD2, "pytorch_model.bin.index.json"))
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 4)}
    if name.endswith(".safetensors"):
        save_file(tensors, d / name)
    else:
        torch.save(tensors, d / name)
    verify_checkpoint_files(d)
    assert resolve_weights(d) == d.resolve()
    _cut(d / name, (d / name).stat().st_size - 10)
    with pytest.raises(CheckpointError, match=rf"{name}: cannot be read"):  # the loader names it
        load_model(d, "cpu", torch.float32)
    (d / name).unlink()
    with pytest.raises(WeightsError, match="no weight files"):
        verify_checkpoint_files(d)


# --- tar archives -------------------------------------------------------------------------------

def test_tar_url_with_a_top_folder(hub, tmp_path):
    url = f"{hub.url}/static/ckpt.tar.gz"
    out = resolve_weights(url, dest=tmp_path / "w", progress=False)
    assert out == (tmp_path / "w").resolve()
    assert_same_files(out, TINY_CKPT)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".chatglm3-source"]
    hub.reset()
    assert resolve_weights(url, dest=tmp_path / "w", progress=False) == out
    assert hub.requests == []


def test_tar_url_given_as_a_path_and_dropped_once(hub, tmp_path):
    hub.faults.append(Fault("drop", "flat.tar", skip=1))  # the first GET is the one-byte probe
    # cog.Path / pathlib turn "http://host/x" into "http:/host/x"
    out = resolve_weights(Path(f"{hub.url}/static/flat.tar"), dest=tmp_path / "w", progress=False)
    assert_same_files(out, TINY_CKPT)
    size = len(hub.static["flat.tar"])
    probe, part, rest = hub.seen("GET", "flat.tar")  # one part (the archive < 2 x _MIN_PART)
    assert (probe.headers["range"], part.headers["range"]) == ("bytes=0-0", f"bytes=0-{size - 1}")
    assert part.sent == size // 2 and rest.headers["range"] == f"bytes={size // 2}-{size - 1}"
    assert hub.sent("flat.tar") == 1 + size  # no byte fetched twice


def test_local_tar_file(tmp_path, no_network):
    (tmp_path / "ckpt.tar").write_bytes(_tar(TINY_CKPT, "", top="x"))
    assert_same_files(resolve_weights(tmp_path / "ckpt.tar", dest=tmp_path / "w"), TINY_CKPT)


def _evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo({"dotdot": "../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "evil"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "../outside"
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        info.size = 5 if info.isreg() else 0
        t.addfile(info, io.BytesIO(b"pwned") if info.isreg() else None)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo"])
def test_unsafe_tar_is_rejected(hub, tmp_path, kind):
    hub.static[f"evil-{kind}.tar"] = _evil_tar(kind)
    dest = tmp_path / "a" / "w"
    with pytest.raises(WeightsError, match="unsafe archive member"):
        resolve_weights(f"{hub.url}/static/evil-{kind}.tar", dest=dest, progress=False)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "a" / "evil.txt").exists()


def test_tar_url_errors(hub, tmp_path):
    with pytest.raises(WeightsError, match="missing.tar: HTTP 404"):
        resolve_weights(f"{hub.url}/static/missing.tar", dest=tmp_path / "w", progress=False)
    hub.static["junk.tar"] = b"not a tar at all" * 100
    with pytest.raises(WeightsError, match="junk.tar: not a readable tar archive"):
        resolve_weights(f"{hub.url}/static/junk.tar", dest=tmp_path / "w", progress=False)
    hub.static["half.tar"] = _tar(TINY_CKPT, "", top=".")[:-10 * 1024 - 1024 * 512]
    with pytest.raises(WeightsError, match=r"half.tar: not a readable tar archive \(unexpected end of data\)"):
        resolve_weights(f"{hub.url}/static/half.tar", dest=tmp_path / "w", progress=False)
    assert list((tmp_path / "w").iterdir()) == []  # a bad archive is not kept for a resume


# --- sources ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,kwargs,message", [
    ("./no/such/dir", {}, "no such directory"),
    ("not a repo", {}, "no such directory"),
    ("a/b@x", {"revision": "y"}, "revision given twice"),
])
def test_bad_sources(no_network, source, kwargs, message):
    with pytest.raises(WeightsError, match=message):
        resolve_weights(source, **kwargs)


# --- what a failure says next (issue: "(and 1 more: .)", offline advice when offline) ---------

def test_an_empty_folder_is_named_in_words_with_the_programs_own_knob(no_network, tmp_path):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    for knob, pick in (("--weights", "--weights PATH"), ("COG_WEIGHTS", "COG_WEIGHTS=PATH")):
        with pytest.raises(WeightsError) as e:
            resolve_weights(empty, dest=tmp_path / "w", knob=knob)
        what, hint = str(e.value).split("; next: ")
        assert what == f"{empty}: empty folder: no config.json, no tokenizer.model, no weight files"
        assert hint.startswith(f"fetch it into that folder with `python -m chatglm3 download "
                               f"--dir {empty}`") and pick in hint
        other = "COG_WEIGHTS" if knob == "--weights" else "--weights"
        assert other not in hint and "HF_HUB_OFFLINE" not in hint and " ." not in what


def test_several_problems_are_each_named(no_network, tmp_path):
    ckpt = linked_copy(TINY_CKPT, tmp_path / "ckpt", skip=("config.json", "tokenizer.model",
                                                           SHARD2))
    with pytest.raises(WeightsError) as e:
        resolve_weights(ckpt, dest=tmp_path / "w")
    what = str(e.value).split("; next: ")[0]
    assert what == (f"{ckpt}: config.json: missing; tokenizer.model: missing; "
                    f"{SHARD2}: missing (named in the index)")


def test_offline_with_an_empty_folder_says_to_go_online(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "w").mkdir()
    with pytest.raises(WeightsError) as e:
        resolve_weights(None, dest=tmp_path / "w", knob="COG_WEIGHTS")
    what, hint = str(e.value).split("; next: ")
    assert "offline (HF_HUB_OFFLINE is set)" in what and "empty folder" in what
    assert hint.startswith("unset HF_HUB_OFFLINE to fetch it into")
    assert "HF_HUB_OFFLINE=1" not in hint and "COG_WEIGHTS=PATH" in hint


def test_a_hub_that_does_not_answer_names_the_mirror_and_offline_only_if_it_helps(tmp_path):
    # the hub at a closed port (the autouse fixture); nothing in dest yet
    with pytest.raises(WeightsError) as e:
        resolve_weights(None, dest=tmp_path / "w", progress=False)
    hint = str(e.value).split("; next: ")[1]
    assert "HF_ENDPOINT" in hint and "--weights PATH" in hint
    assert "HF_HUB_OFFLINE" not in hint  # nothing complete to use offline


def test_the_download_folder_given_by_name_is_fetched_into(hub, tmp_path):
    """COG_WEIGHTS=weights (the README's server command on a fresh clone): the empty download
    folder means the default weights, fetched into it, as when nothing is given."""
    dest = tmp_path / "w"
    dest.mkdir()
    assert resolve_weights(dest, dest=dest, progress=False) == dest.resolve()
    assert_same_files(dest, TINY_CKPT)
    assert hub.seen(match=f"/{DEFAULT_REPO}/resolve/{DEFAULT_REVISION}/")


def test_the_tokenizer_alone_is_fetched_for_encode(hub, tmp_path):
    from chatglm3.weights.download import resolve_tokenizer

    dest = tmp_path / "w"
    assert resolve_tokenizer(None, dest=dest, progress=False) == dest
    assert (dest / "tokenizer.model").read_bytes() == (TINY_CKPT / "tokenizer.model").read_bytes()
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.seen("GET") if "/resolve/" in r.path}
    assert fetched == {"tokenizer.model", "tokenizer_config.json"}
    assert not hub.seen(match=".bin")
    hub.reset()
    assert resolve_tokenizer(None, dest=dest) == dest and hub.requests == []  # there already
    other = tmp_path / "other"
    assert resolve_tokenizer("test/tiny", dest=other, progress=False) == other
    assert not hub.seen(match=".bin") and (other / "tokenizer.model").is_file()


def test_engine_from_pretrained_takes_what_the_cli_takes(hub, tmp_path, monkeypatch):
    """None: the official weights, fetched into the weights folder first; a hub repo id too."""
    from chatglm3.engine.engine import Engine
    from chatglm3.params import SamplingParams

    monkeypatch.setenv("CHATGLM3_WEIGHTS_DIR", str(tmp_path / "w"))
    engine = Engine.from_pretrained(None, "cpu", "float32")
    try:
        assert (tmp_path / "w" / "config.json").is_file()
        assert engine.generate_ids([64790, 64792, 64795], SamplingParams(max_tokens=3,
                                                                         temperature=0)).text()
    finally:
        engine.close()
    hub.reset()
    engine = Engine.from_pretrained("test/tiny", "cpu", "float32")
    engine.close()
    assert hub.seen(match="/test/tiny/resolve/")

"""Native loading of the official checkpoint layout, checked against the official logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatglm3.weights.checkpoint import CheckpointError, glm_config, load_model
from conftest import GOLDEN, ROOT, TINY_CKPT, convert_to_safetensors

pytestmark = pytest.mark.shared



@pytest.fixture(scope="module")
def ref_logits() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "reference_logits.safetensors")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]


@pytest.mark.parametrize("name", ["short_chat", "medium_chat",
                                  pytest.param("long_chat", marks=pytest.mark.slow)])
def test_fp32_logits_match_official(tiny_model_fp32, reference: dict, ref_logits, name: str) -> None:
    prompt = next(p for p in reference["prompts"] if p["name"] == name)
    with torch.inference_mode():
        logits = tiny_model_fp32(torch.tensor([prompt["input_ids"]])).logits[0]
    assert rel_l2(logits[-1], ref_logits[f"{name}.last"]) < 1e-4
    for key in prompt["extra_position_logits"]["keys"]:
        pos = int(key.rsplit(".pos", 1)[1])
        assert rel_l2(logits[pos], ref_logits[key]) < 1e-4, key


def test_config_mapping() -> None:
    cfg = glm_config(json.loads((TINY_CKPT / "config.json").read_text()))
    assert cfg.rope_parameters["rope_theta"] == 10000 * 50
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size) == (64, 2, 65024)
    assert cfg.max_position_embeddings == 32768 and cfg.attention_bias


def test_rotary_frequencies_stay_fp32() -> None:
    model = load_model(TINY_CKPT, "cpu", torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_bf16_close_to_fp32(reference: dict, ref_logits) -> None:
    model = load_model(TINY_CKPT, "cpu", torch.bfloat16)
    prompt = reference["prompts"][1]
    assert rel_l2(last_logits(model, prompt["input_ids"]), ref_logits["medium_chat.last"]) < 0.02


def test_safetensors_layout_loads_identically(tmp_path: Path, tiny_model_fp32, reference) -> None:
    st_dir = convert_to_safetensors(TINY_CKPT, tmp_path / "st")
    assert not list(st_dir.glob("*.bin"))
    model = load_model(st_dir, "cpu", torch.float32)
    ids = reference["prompts"][1]["input_ids"]
    assert torch.equal(last_logits(model, ids), last_logits(tiny_model_fp32, ids))


def _copy_ckpt(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(TINY_CKPT, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_config_not_matching_tensors(tmp_path: Path) -> None:
    ckpt = _copy_ckpt(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hidden_size"] = 512
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape .* config\.json"):
        load_model(ckpt, "cpu", torch.float32)


def test_config_with_more_layers_than_tensors(tmp_path: Path) -> None:
    ckpt = _copy_ckpt(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(ckpt, "cpu", torch.float32)


def test_unsupported_architecture_option(tmp_path: Path) -> None:
    ckpt = _copy_ckpt(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rmsnorm"] = False
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rmsnorm"):
        load_model(ckpt, "cpu", torch.float32)


def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    ckpt = _copy_ckpt(tmp_path)
    shard = ckpt / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        load_model(ckpt, "cpu", torch.float32)


def test_missing_config(tmp_path: Path) -> None:
    ckpt = _copy_ckpt(tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(ckpt, "cpu", torch.float32)


def test_the_context_is_the_checkpoints_seq_length() -> None:
    """params.CONTEXT (what the schema's and CLI's limits say) is the 32k config's seq_length."""
    from chatglm3.params import CONTEXT

    assert json.loads((TINY_CKPT / "config.json").read_text())["seq_length"] == CONTEXT
    assert glm_config(json.loads((TINY_CKPT / "config.json").read_text())).max_position_embeddings == CONTEXT


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_copied_tensors_file_pages_are_handed_back(tmp_path: Path) -> None:
    """The loader reads shards memory-mapped; once a tensor is copied, its pages of the file
    leave the process's RSS (so a load's peak is not the model plus a whole shard), and the
    mapping still reads the same values (the pages come back from the file)."""
    import re

    from chatglm3.weights.checkpoint import _drop_file_pages

    def rss_file() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"RssFile:\s+(\d+)", status).group(1)) * 1024

    torch.save({"w": torch.arange(16 * 2**20, dtype=torch.float32)}, tmp_path / "shard.bin")
    mapped = torch.load(tmp_path / "shard.bin", mmap=True, weights_only=True)["w"]
    before = rss_file()
    total = float(mapped.sum())  # reads all 64 MiB: their pages are now resident
    assert rss_file() - before > 60 * 2**20
    _drop_file_pages(mapped)
    assert rss_file() - before < 4 * 2**20
    assert float(mapped.sum()) == total


_THREADS_AFTER_LOAD = """
import os, sys, torch
torch.set_num_threads(2)
from chatglm3.weights import checkpoint
before = len(os.listdir("/proc/self/task"))
load = checkpoint.load_model if sys.argv[2] == "load_model" else (
    lambda *a: checkpoint._load_model(*a, False, "none"))
load(sys.argv[1], "cpu", torch.float32)
# A finished thread's OpenMP helpers exit on their own a moment later (seen under load: 2 still
# listed once): wait up to 2 s for the count to drop; a team that stays never does.
import time
deadline = time.monotonic() + 2
while len(os.listdir("/proc/self/task")) > before and time.monotonic() < deadline:
    time.sleep(0.02)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.slow  # two subprocesses that import torch
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_loading_leaves_no_openmp_team_behind() -> None:
    """load_model runs on a thread that ends with it, so the caller keeps no OpenMP helper
    threads: a second team beside the engine worker's makes libgomp sleep at every barrier
    of a decoding step. Loading on the caller's own thread (the control) leaves one."""
    def extra_threads(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_LOAD, str(TINY_CKPT), how],
                             capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert extra_threads("in_caller") >= 1  # the control: its team stays
    assert extra_threads("load_model") == 0

"""Weight-only int8/int4 quantization (chatglm3/model/quantize.py): each mode loads, generates,
streams, batches, cancels, reuses the prefix cache and passes the fixed-shape self-check on the
tiny checkpoint; its output stays within a stated distance of the official fp32 logits; the KV
planner gives the smaller weights' memory to rows; loading keeps its peak to the quantized
model plus one shard.

The engine tests that do not compare with the official tokens (which quantized weights do not
give) run here again on quantized engines: they are imported from test_engine, and pytest runs
them in this module with this module's `engine` fixture.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatglm3 import settings
from chatglm3.weights.checkpoint import load_model
from chatglm3.engine.engine import Engine
from chatglm3.model.kv_rows import KVBudgetError, kv_bytes_per_token, plan_kv
from chatglm3.text.messages import build_messages
from chatglm3.params import SamplingParams
from chatglm3.model.qlinear import Int4Linear, Int8Linear
from chatglm3.model.quantize import INT4_GROUP_SIZE, MODES, check_mode, weight_bytes
from engine import test_engine
from conftest import GOLDEN, ROOT, TINY_CKPT, consume_together
from engine.test_engine import (  # noqa: F401 - collected here, run on this module's engines
    test_bad_settings_name_the_field,
    test_cancel_from_another_thread_stops_within_one_step,
    test_prompt_too_long_names_both_counts,
)
from test_kv_plan import CUDA_CONTEXT, PREFILL_PEAK, weight_bytes as fp16_weight_bytes


def _slow_copy(test):
    """test_engine's test, collected here (with this module's `engine`) in the slow tier; a
    copy, so that the mark stays off the original."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return test(*args, **kwargs)
    return pytest.mark.slow(run)


test_cancel_during_long_prefill = _slow_copy(test_engine.test_cancel_during_long_prefill)
test_max_tokens_cut_to_fit = _slow_copy(test_engine.test_max_tokens_cut_to_fit)
test_metrics = _slow_copy(test_engine.test_metrics)
test_per_step_device_work_does_not_grow_with_the_batch = _slow_copy(
    test_engine.test_per_step_device_work_does_not_grow_with_the_batch)
test_seeded_sampling_repeats = _slow_copy(test_engine.test_seeded_sampling_repeats)
test_temperature_zero_is_greedy_whatever_the_seed = _slow_copy(
    test_engine.test_temperature_zero_is_greedy_whatever_the_seed)
test_unseeded_sampling_reports_seed_that_reproduces = _slow_copy(
    test_engine.test_unseeded_sampling_reports_seed_that_reproduces)

GREEDY = dict(temperature=0.0)
QUANTIZED = ("int8", "int4")


@pytest.fixture(scope="module", params=QUANTIZED)
def quantized_bf16(request):
    """The tiny checkpoint quantized, computing in bfloat16 (the CPU default dtype)."""
    return request.param, load_model(TINY_CKPT, "cpu", torch.bfloat16, quantize=request.param)


@pytest.fixture(scope="module")
def engine(quantized_bf16, tokenizer):
    engine = Engine(quantized_bf16[1], tokenizer)
    yield engine
    engine.close()


@pytest.fixture(scope="module", params=QUANTIZED)
def engine_fp32(request, tokenizer):
    """Quantized weights computing in fp32, for the batched-equals-alone checks: in bf16 a
    near-tied token of the tiny checkpoint may flip between a request decoded alone and in a
    batch (seen with int4 at step 5; the quantized linear kernels themselves give each row the
    same result at every batch size, tested below), in fp32 none does."""
    engine = Engine(load_model(TINY_CKPT, "cpu", torch.float32, quantize=request.param),
                    tokenizer)
    yield engine
    engine.close()


# ---- the modes and what they replace ----

def test_modes_and_the_cli_choices() -> None:
    assert MODES == settings.QUANTIZE_MODES == ("none", "int8", "int4")
    with pytest.raises(ValueError, match="quantize: expected one of none, int8, int4, got 'q4'"):
        check_mode("q4")
    with pytest.raises(ValueError, match="quantize"):
        load_model(TINY_CKPT, "cpu", torch.bfloat16, quantize="int3")


def test_every_linear_layer_is_quantized_and_the_embedding_is_not(quantized_bf16) -> None:
    mode, model = quantized_bf16
    assert model.quantize_mode == mode
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
               layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    for module in linears:
        if mode == "int8":
            assert isinstance(module, Int8Linear) and module.qweight.dtype == torch.int8
        else:
            assert isinstance(module, Int4Linear) and module.qdata.dtype == torch.uint8
            assert module.group_size == INT4_GROUP_SIZE
            assert module.qdata.numel() * 2 == module.in_features * module.out_features
    assert layer.self_attn.q_proj.bias is not None and layer.self_attn.q_proj.bias.device.type == "cpu"
    assert isinstance(model.lm_head, Int8Linear)  # int8 in both modes (quantize.py says why)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_weight_bytes_follow_the_packed_layout() -> None:
    """int8: 1 byte per weight + a bf16 scale per output row; int4: half a byte per weight + a
    bf16 scale and zero per group of 128; everything else as loaded (bf16)."""
    cfg = json.loads((TINY_CKPT / "config.json").read_text())
    h, ffn, vocab = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["kv_channels"], cfg["multi_query_group_num"] * cfg["kv_channels"]
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (2 * ffn, h), (h, ffn)]  # (out, in)
    rest = 2 * (vocab * h + h + cfg["num_layers"] * (q + 2 * kv + 2 * h))  # embedding, norms, biases
    head = vocab * h + 2 * vocab
    none = load_model(TINY_CKPT, "cpu", torch.bfloat16)
    rest += sum(b.numel() * 4 for b in none.model.rotary_emb.buffers())  # fp32 frequencies
    assert weight_bytes(none) == rest + 2 * vocab * h + cfg["num_layers"] * sum(
        2 * o * i for o, i in shapes)
    for mode, per_layer in (("int8", sum(o * i + 2 * o for o, i in shapes)),
                            ("int4", sum(o * i // 2 + 4 * o * i // INT4_GROUP_SIZE
                                         for o, i in shapes))):
        model = load_model(TINY_CKPT, "cpu", torch.bfloat16, quantize=mode)
        assert weight_bytes(model) == rest + head + cfg["num_layers"] * per_layer, mode


# Multiples of 64: aten packs int4 in blocks of 64 output rows on AVX-512 CPUs, 32 on AVX2.
@pytest.mark.parametrize("rows", [64, 192])
def test_int4_packed_in_row_blocks_is_the_whole_packing(monkeypatch, rows: int) -> None:
    """int4_cpu_weight packs a few rows at a time (less memory while loading): the pieces, the
    last one shorter, join into exactly what torchao's int4 CPU config makes of the whole
    weight, and the layer computes exactly the same."""
    import chatglm3.model.quantize as Q

    with Q._quiet_torchao_import():
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig)
        from torchao.quantization import quantize_
    torch.manual_seed(0)
    whole = torch.nn.Linear(2 * INT4_GROUP_SIZE, rows * 3 + 32, bias=False)
    whole = whole.to(torch.bfloat16).requires_grad_(False)
    blocks = Q.int4_cpu_weight  # packed with INT4_PACK_ROWS = rows below
    monkeypatch.setattr(Q, "INT4_PACK_ROWS", rows)
    mine = blocks(whole.weight.detach())
    quantize_(whole, PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE,
                                                   set_inductor_config=False))
    theirs = whole.weight
    assert mine.shape == theirs.shape and mine.block_size == theirs.block_size
    assert torch.equal(mine.qdata, theirs.qdata)
    assert torch.equal(mine.scale_and_zero, theirs.scale_and_zero)
    x = torch.randn(5, 2 * INT4_GROUP_SIZE, dtype=torch.bfloat16)
    assert torch.equal(torch.nn.functional.linear(x, mine), whole(x))


# ---- close to the official fp32 outputs ----

# Last-position logits, relative L2 against the official fp32 ones, computing in fp32 (measured
# 0.015 / 0.19 on these prompts; the tiny checkpoint's weights are made sharp, so every error
# shows: a real-width random checkpoint gives 0.006 / 0.05, docs/benchmarks.md). Bounds: ~1.5x measured.
TOLERANCE = {"int8": 0.025, "int4": 0.3}


@pytest.mark.parametrize("mode", QUANTIZED)
def test_logits_close_to_official_fp32(mode: str, reference: dict) -> None:
    model = load_model(TINY_CKPT, "cpu", torch.float32, quantize=mode)
    logits = load_file(GOLDEN / "reference_logits.safetensors")
    for prompt in reference["prompts"][:2]:  # 8 and 337 tokens
        with torch.inference_mode():
            out = model(input_ids=torch.tensor(prompt["input_ids"])[None],
                        logits_to_keep=1).logits[0, -1]
        want = logits[prompt["name"] + ".last"]
        assert float((out - want).norm() / want.norm()) < TOLERANCE[mode], prompt["name"]
        assert int(out.argmax()) == int(want.argmax()), prompt["name"]


def test_none_is_the_model_as_loaded() -> None:
    """quantize='none' loads exactly today's model (the parity tests run on it)."""
    a = load_model(TINY_CKPT, "cpu", torch.float32)
    b = load_model(TINY_CKPT, "cpu", torch.float32, quantize="none")
    assert not hasattr(a, "quantize_mode") or a.quantize_mode == "none"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- the engine on quantized weights ----

def test_streams_the_text_it_reports_and_repeats(engine: Engine) -> None:
    runs = []
    for _ in range(2):
        gen = engine.generate(build_messages("你好, tell me a story 🦊"),
                              SamplingParams(max_tokens=16, **GREEDY))
        deltas = list(gen)
        assert "".join(deltas) == gen.result.text and len(gen.result.output_ids) >= 1
        runs.append(gen.result.output_ids)
    assert runs[0] == runs[1]


def test_linear_kernels_give_each_row_the_same_result_at_any_batch(quantized_bf16) -> None:
    _, model = quantized_bf16
    layer = model.model.layers[0]
    with torch.inference_mode():
        for lin in [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_up_proj,
                    layer.mlp.down_proj, model.lm_head]:
            x = torch.randn(8, 1, lin.in_features, dtype=torch.bfloat16)
            alone = torch.cat([lin(x[i : i + 1]) for i in range(8)])
            for batch in (2, 3, 8):
                assert torch.equal(lin(x[:batch]), alone[:batch])


@pytest.mark.slow  # 4.5 s per mode: fp32 prefill is the quantized kernels' slow path
def test_async_iteration_of_concurrent_requests(engine_fp32: Engine, reference: dict) -> None:
    test_engine.test_async_iteration_of_concurrent_requests(engine_fp32, reference)


def test_batched_equals_alone(engine_fp32: Engine, reference: dict) -> None:
    engine = engine_fp32
    long = reference["prompts"][1]["input_ids"]
    prompts = [reference["prompts"][0]["input_ids"], long[:40], long[:100]]
    alone = []
    for ids in prompts:
        gen = engine.generate_ids(ids, SamplingParams(max_tokens=8, **GREEDY))
        gen.text()
        alone.append(gen.result.output_ids)
    gens = [engine.generate_ids(ids, SamplingParams(max_tokens=8, **GREEDY)) for ids in prompts]
    consume_together(gens)
    assert [g.result.output_ids for g in gens] == alone


def test_prefix_cache_reuses_and_gives_the_same_tokens(quantized_bf16, tokenizer,
                                                       reference: dict) -> None:
    engine = Engine(quantized_bf16[1], tokenizer, prefix_cache=True)
    try:
        ids = reference["prompts"][1]["input_ids"]
        outs = []
        for _ in range(2):
            gen = engine.generate_ids(ids, SamplingParams(max_tokens=8, **GREEDY))
            gen.text()
            outs.append((gen.result.output_ids, gen.result.cached_input_token_count))
        assert outs[0][1] == 0 and outs[1][1] >= len(ids) - 16
        assert outs[0][0] == outs[1][0]
    finally:
        engine.close()


def test_fixed_shape_steps_pass_the_self_check(quantized_bf16, tokenizer, engine: Engine) -> None:
    """The decoding graphs' padded shapes (run eagerly on a CPU) on quantized weights: setup's
    self-check agrees, and they decode what eager steps decode."""
    fixed = Engine(quantized_bf16[1], tokenizer, decode_step="fixed")
    try:
        report = fixed.warm_up(prefill=False)
        assert report.decode_step == "fixed", report.check
        assert "give eager steps' greedy tokens" in report.check
        a = fixed.generate(build_messages("hello"), SamplingParams(max_tokens=10, **GREEDY))
        b = engine.generate(build_messages("hello"), SamplingParams(max_tokens=10, **GREEDY))
        assert a.text() == b.text() and a.result.output_ids == b.result.output_ids
    finally:
        fixed.close()


# ---- the KV plan with the smaller weights (numbers as in test_kv_plan) ----

def real_quantized_weight_bytes(mode: str) -> int:
    """The real model's weights in a mode, by the layout test_weight_bytes_follow_the_packed_
    layout checks on the tiny checkpoint (fp16 for what stays unquantized)."""
    layers, h, ffn, vocab, q, kv = 28, 4096, 13696, 65024, 4096, 256
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (2 * ffn, h), (h, ffn)]
    if mode == "int8":
        per_layer = sum(o * i + 2 * o for o, i in shapes)
    else:
        per_layer = sum(o * i // 2 + 4 * o * i // INT4_GROUP_SIZE for o, i in shapes)
    linear_fp16 = layers * sum(2 * o * i for o, i in shapes) + 2 * vocab * h
    return fp16_weight_bytes() - linear_fp16 + layers * per_layer + vocab * h + 2 * vocab


def plan_on(total_mib: int, weights: int):
    total = total_mib * 2**20
    return plan_kv(total_bytes=total, free_bytes=total - CUDA_CONTEXT - weights,
                   weight_bytes=weights, bytes_per_token=kv_bytes_per_token(28, 2, 128, 2),
                   activation_bytes=PREFILL_PEAK, max_batch=8, context=32768)


def test_quantized_real_model_sizes() -> None:
    assert 6.4e9 < real_quantized_weight_bytes("int8") < 6.6e9  # about half of 12.5 GB
    assert 3.7e9 < real_quantized_weight_bytes("int4") < 3.9e9  # about 30%


def test_16_gb_card_plans_rows_when_quantized() -> None:
    """T4 (15,360 MiB): fp16 weights leave no KV cache (test_kv_plan); int8 leaves 5.1 GiB
    (min(free - prefill peak - 10% margin, 90% - weights - peak)): five whole-context rows.
    RTX 4080 (16,376 MiB) with int4: eight."""
    with pytest.raises(KVBudgetError):
        plan_on(15_360, fp16_weight_bytes())
    int8 = plan_on(15_360, real_quantized_weight_bytes("int8"))
    assert (int8.rows, int8.capacity) == (5, 32768)
    int4 = plan_on(16_376, real_quantized_weight_bytes("int4"))
    assert (int4.rows, int4.capacity) == (8, 32768)


def test_24_gb_card_plans_more_rows_when_quantized() -> None:
    """A10G (23,028 MiB = 24.15 GB): 6 rows with fp16 weights, all 8 with int8 or int4. The
    budget, free memory less the prefill peak and the 10% margin: int8 24.15 - 0.54 (CUDA
    context) - 6.51 (weights) - 2.15 - 2.41 = 12.5 GB = 13 whole-context rows of 0.94 GB;
    int4 (3.82 GB of weights) 15.2 GB = 16 rows (max_batch caps the rows, not the budget)."""
    row = 32768 * kv_bytes_per_token(28, 2, 128, 2)
    assert plan_on(23_028, fp16_weight_bytes()).rows == 6
    int8 = plan_on(23_028, real_quantized_weight_bytes("int8"))
    int4 = plan_on(23_028, real_quantized_weight_bytes("int4"))
    assert int8.rows == int4.rows == 8
    assert (int8.budget_bytes // row, int4.budget_bytes // row) == (13, 16)


# ---- memory while loading ----

PEAK_SCRIPT = """
import json, re, sys, torch
from chatglm3.weights.checkpoint import load_model
from chatglm3.model.quantize import import_torchao, weight_bytes
import_torchao()  # its imports: before the baseline
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := RSS now
before = status("VmRSS")
model = load_model(sys.argv[1], "cpu", torch.bfloat16, quantize=sys.argv[2])
print(json.dumps({"growth": status("VmHWM") - before, "weights": weight_bytes(model),
                  "after": status("VmRSS") - before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_load_peak_is_the_quantized_model_plus_one_shard(tmp_path: Path) -> None:
    """A checkpoint written by bench/synthetic.py (8 layers at a quarter of the real width, in
    9 fp16 shards of up to 64 MiB): loading it in int4 raises the process's peak RSS by at most
    the quantized weights plus its largest shard plus 96 MiB (torch's first-use allocations and
    one layer's packing temporaries; measured 175-185 MiB against 102 + 64 + 96, since the
    loader hands back each copied tensor's pages of the shard and packs int4 in row blocks;
    226 before). Quantizing after a whole load would need the bf16 model first (266 MiB,
    measured for `none`) plus the quantized one: over this bound. Once loaded, the process holds about the weights."""
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", shards=9, num_layers=8, hidden_size=1024,
                            num_attention_heads=8, ffn_hidden_size=3456, padded_vocab_size=16384)
    largest = max(p.stat().st_size for p in ckpt.glob("pytorch_model-*.bin"))

    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ckpt), mode],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    int4, none = run("int4"), run("none")
    assert int4["weights"] < 0.4 * none["weights"]
    assert int4["growth"] <= int4["weights"] + largest + 96 * 2**20, (int4, largest)
    assert int4["growth"] < none["growth"], (int4, none)  # below the unquantized load (0.84x here)
    assert int4["after"] < 1.3 * int4["weights"], int4


# ---- the command line and the Cog predictor take the mode ----

@pytest.mark.slow
def test_cli_generate_with_quantize() -> None:
    from cli.test_cli import cli

    out = cli("generate", "--weights", str(TINY_CKPT), "--quantize", "int8", "--prompt", "你好",
              "--max-tokens", "4", "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    assert "linear layers quantized to int8" in out.stderr
    assert "(quantize int8)" in out.stderr
    assert "int8 layers: aten's int8 kernel" in out.stderr
    assert json.loads(out.stdout)["output_token_count"] == 4
    bad = cli("generate", "--weights", str(TINY_CKPT), "--quantize", "int3", "--prompt", "x")
    assert bad.returncode == 2 and "--quantize: invalid choice: 'int3'" in bad.stderr


def test_predictor_setup_takes_chatglm3_quantize(monkeypatch, capsys) -> None:
    import predict

    monkeypatch.setattr(predict.coglet_cancel, "install", lambda: None)
    monkeypatch.setattr(predict.coglet_cancel, "check_coglet_version", lambda: None)
    monkeypatch.setenv("CHATGLM3_DEVICE", "cpu")
    monkeypatch.setenv("CHATGLM3_DTYPE", "bfloat16")
    monkeypatch.setenv("COG_MAX_CONCURRENCY", "2")
    monkeypatch.setenv("CHATGLM3_QUANTIZE", "int4")
    p = predict.Predictor()
    p.setup(weights=str(TINY_CKPT))
    try:
        assert p.engine.quantize == "int4" and isinstance(p.engine.model.lm_head, Int8Linear)
        log = capsys.readouterr().out
        size = re.search(r"^weights: (\d+) MiB \(quantize int4\)$", log, re.M)
        assert size and int(size[1]) == round(p.engine.weight_bytes / 2**20), log
        assert "KV cache: " in log and "ready: " in log
        # how its layers multiply in bf16 on this CPU (qlinear.widen_above decides)
        above = Int4Linear.widen_above(torch.bfloat16)
        assert ("int4 layers: aten's int4 kernel " +
                ("for every call" if above is None else f"up to {above} rows")) in log
    finally:
        p.engine.close()
    monkeypatch.setenv("CHATGLM3_QUANTIZE", "int3")
    from chatglm3 import startup

    monkeypatch.setattr(startup, "resolve_weights",
                        lambda *a, **k: pytest.fail("fetched despite a bad CHATGLM3_QUANTIZE"))
    with pytest.raises(ValueError, match="CHATGLM3_QUANTIZE: expected one of none, "
                                         "int8, int4, got 'int3'"):
        predict.Predictor().setup(weights=str(TINY_CKPT))

"""Setup's warm-up, run by the engine on its worker thread with no request in the cache: every
prefill shape met once, the decoding graphs recorded, and the fixed-shape path (graph replays
on a GPU) checked against eager steps; if it disagrees or fails, decoding is eager from then
on, with the reason. Wrong text must never be served."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .decode_graphs import decode_logits
from .kv_rows import KVPlan
from .model_runner import PREFILL_BUCKETS, PREFILL_CHUNK, ModelRunner
from ..text.tokenizer import ChatGLMTokenizer, Message

log = logging.getLogger("chatglm3.engine")  # the engine's log: what operators watch


@dataclass
class WarmUp:
    """What `Engine.warm_up` did and how long it took."""

    seconds: float = 0.0
    prefill_shapes: int = 0  # prefill chunk lengths run (one per PREFILL_BUCKETS length)
    prefill_seconds: float = 0.0
    graphs: int = 0  # decoding graphs recorded
    graph_seconds: float = 0.0
    graph_pool_bytes: int = 0  # GPU memory the recordings reserved (their shared pool)
    check: str = ""  # the graphs-vs-eager self-check's verdict; empty when not run
    decode_step: str = ""  # what serves from now on: graphs | fixed | eager
    kv: KVPlan | None = None

    def __str__(self) -> str:
        parts = [f"{self.seconds:.2f}s: {self.prefill_shapes} prefill shapes in "
                 f"{self.prefill_seconds:.2f}s"]
        if self.graphs:
            parts.append(f"{self.graphs} decoding graphs recorded in {self.graph_seconds:.2f}s "
                         f"({self.graph_pool_bytes / 2**20:.0f} MiB pool)")
        if self.check:
            parts.append(self.check)
        parts.append(f"decoding: {self.decode_step}")
        return "; ".join(parts)  # the KV plan has a line of its own at setup


def warm_up(runner: ModelRunner, tokenizer: ChatGLMTokenizer, prefill: bool) -> WarmUp:
    """Runs the warm-up (the caller has dropped the prefix cache: it writes every row)."""
    report = WarmUp(kv=runner.kv_plan)
    start = time.perf_counter()
    if prefill:
        ids = torch.arange(PREFILL_BUCKETS[-1], device=runner.device) % 1000 + 100
        for n in PREFILL_BUCKETS:
            runner.prefill_chunk(ids[None, :n], DynamicCache(config=runner.model.config), 0)
        report.prefill_shapes = len(PREFILL_BUCKETS)
        report.prefill_seconds = _since(runner, start)
    fixed = runner.fixed
    if fixed is not None:
        label = "graphs" if fixed.record else "fixed-shape steps"
        try:
            if fixed.record:
                t = time.perf_counter()
                reserved = torch.cuda.memory_reserved(runner.device)
                report.graphs = fixed.record_all()
                report.graph_seconds = _since(runner, t)
                report.graph_pool_bytes = torch.cuda.memory_reserved(runner.device) - reserved
            differ = self_check(runner, tokenizer)
            problem = differ and f"disagree with eager steps: {differ}"
        except Exception as e:  # noqa: BLE001 - a GPU that cannot record graphs still serves
            log.warning("setting up %s failed", label, exc_info=True)
            problem = f"failed to set up: {type(e).__name__}: {e}"
        if problem:
            log.warning("decoding eagerly: %s %s", label, problem)
            report.check = f"{label} {problem}; decoding eagerly"
            runner.fixed = None
        else:
            report.check = f"{label} give eager steps' greedy tokens"
    report.decode_step = runner.decode_step
    report.seconds = _since(runner, start)
    return report


def _since(runner: ModelRunner, t: float) -> float:
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - t


def self_check(runner: ModelRunner, tokenizer: ChatGLMTokenizer, steps: int = 8) -> str | None:
    """Greedy decoding of a few prompts of different lengths, eager steps first, then the
    fixed-shape path (graph replays on a GPU) fed the same tokens. None when every step
    agrees; else what differed. A step differs when the fixed path's token trails eager's
    by more than 1% of the logits' range (fp16 rounding moves logits by far less; near-ties
    may flip, a broken graph's token is far off) or its logits differ by over 5% (relative
    L2). Leaves the cache rows dirty: run with no request in them."""
    chat, kv, device = tokenizer.build_chat_input, runner.kv, runner.device
    prompts = [chat([Message("user", "你好")]),
               chat([Message("user", "Write a long story about a fox. " * 12)]),
               chat([Message("user", "讲一个很长的故事。" * 40)])][: runner.max_batch]
    if not kv.growable:  # a planned cache may be shorter than these prompts
        prompts = [p[: max(1, kv.capacity - steps)] for p in prompts]
    first, lengths = [], [len(p) for p in prompts]
    for row, ids in enumerate(prompts):
        cache = DynamicCache(config=runner.model.config)
        ids_dev = torch.tensor(ids, device=device)[None]
        for begin in range(0, len(ids), PREFILL_CHUNK):
            logits = runner.prefill_chunk(ids_dev[:, begin : begin + PREFILL_CHUNK], cache, begin)
        kv.reserve(row + 1, len(ids) + steps)
        kv.store_prefill(row, cache)
        first.append(int(logits.argmax()))

    def inputs(step: int, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        positions = [n + step for n in lengths]
        return (torch.tensor(tokens, device=device)[:, None],
                torch.tensor(positions, device=device), max(positions) + 1)

    eager, tokens = [], first
    for step in range(steps):
        logits = decode_logits(runner.model, kv, *inputs(step, tokens)).float()
        eager.append((tokens, logits))
        tokens = logits.argmax(-1).tolist()
    for step, (tokens, ref) in enumerate(eager):
        got = runner.fixed(*inputs(step, tokens)).float()
        picked = got.argmax(-1)
        top = ref.max(-1).values
        trails = top - ref.gather(-1, picked[:, None])[:, 0]
        spread = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
        for row in range(len(prompts)):
            if (trails[row] > 0.01 * (top[row] - ref[row].min())
                    or spread[row] > 0.05 or not torch.isfinite(got[row]).all()):
                return (f"step {step + 1}, row {row + 1}: token {int(picked[row])} where "
                        f"eager steps pick {int(ref[row].argmax())}, logits "
                        f"{float(spread[row]):.1%} apart")
    return None

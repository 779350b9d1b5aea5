"""Per-token cost of streaming detokenization, early vs late in a long generation.

Feeds 10,000 ids of mixed Chinese/English/emoji text one at a time to
`IncrementalDetokenizer.push` and, for comparison, to the naive approach that re-decodes the
whole output on every step and emits the new suffix. Prints the mean µs/token over the first
100 tokens, over tokens 9,900-10,000 and over all of them. The incremental cost should stay
flat; the naive one grows with the length of the output.

    .venv/bin/python bench/detokenizer.py [--tokenizer PATH] [--tokens N] [--repeat R]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]

from chatglm3.text.streaming import IncrementalDetokenizer  # noqa: E402
from chatglm3.text.tokenizer import ChatGLMTokenizer  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "chatglm3-tokenizer" / "tokenizer.model"

CHINESE = ("我们 模型 生成 文本 的 时候 需要 逐字 输出 这个 问题 可以 通过 以下 步骤 解决 首先 "
           "其次 最后 总之 数据 训练 推理 显存 长上下文 龘 𠀀 𪚥").split()
ENGLISH = ("the model streams tokens to the client while it keeps generating so the user sees "
           "text early def main return print function value list").split()
EMOJI = ["😀", "🤖", "👍🏽", "👩‍💻", "🇨🇳", "🏳️‍🌈", "🧬", "𐀀", "🀄"]
PUNCT = ["，", "。", "！", "？", ", ", ". ", ": ", "\n", "\n\n", "\t", "  "]


def sample_text(rng: random.Random, n_chars: int) -> str:
    """Chat-like output: runs of Chinese and English words, emoji and punctuation mixed in."""
    parts: list[str] = []
    size = 0
    while size < n_chars:
        kind = rng.random()
        if kind < 0.45:
            part = "".join(rng.choices(CHINESE, k=rng.randint(2, 8)))
        elif kind < 0.8:
            part = " ".join(rng.choices(ENGLISH, k=rng.randint(2, 8)))
        elif kind < 0.9:
            part = "".join(rng.choices(EMOJI, k=rng.randint(1, 3)))
        else:
            part = ""
        part += rng.choice(PUNCT)
        parts.append(part)
        size += len(part)
    return "".join(parts)


def time_pushes(push: Callable[[int], str], ids: Sequence[int]) -> tuple[list[float], str]:
    """Seconds taken by each push, and the joined output."""
    clock = time.perf_counter
    times, out = [], []
    for token_id in ids:
        start = clock()
        out.append(push(token_id))
        times.append(clock() - start)
    return times, "".join(out)


def incremental(tokenizer: ChatGLMTokenizer, ids: Sequence[int]) -> tuple[list[float], str]:
    detok = IncrementalDetokenizer(tokenizer)
    times, text = time_pushes(detok.push, ids)
    return times, text + detok.flush()


def naive(tokenizer: ChatGLMTokenizer, ids: Sequence[int]) -> tuple[list[float], str]:
    """Re-decodes everything generated so far on each step and emits the new suffix."""
    seen: list[int] = []
    state = {"text": ""}

    def push(token_id: int) -> str:
        seen.append(token_id)
        full = tokenizer.decode(seen)
        if full.endswith("\ufffd"):  # possibly an unfinished character: wait
            return ""
        delta, state["text"] = full[len(state["text"]):], full
        return delta

    times, text = time_pushes(push, ids)
    return times, text + tokenizer.decode(ids)[len(state["text"]):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5,
                        help="incremental runs; each token's time is the minimum over them")
    args = parser.parse_args()
    window = 100
    if args.tokens < 2 * window:
        parser.error(f"--tokens must be at least {2 * window}")

    tokenizer = ChatGLMTokenizer(args.tokenizer)
    rng = random.Random(0)
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids += tokenizer.encode_text(sample_text(rng, 4_000))
    ids = ids[:args.tokens]
    expected = tokenizer.decode(ids)
    n_bytes = sum(tokenizer.sp.is_byte(i) for i in ids)
    print(f"{len(ids)} tokens, {len(expected)} characters, {n_bytes} byte-fallback pieces")

    runs = [incremental(tokenizer, ids) for _ in range(max(1, args.repeat))]
    assert all(text == expected for _, text in runs), "incremental output differs from decode"
    inc_times = [min(ts) for ts in zip(*(times for times, _ in runs))]
    naive_times, text = naive(tokenizer, ids)
    assert text == expected, "naive output differs from decode"

    def mean_us(times: Sequence[float]) -> float:
        return sum(times) / len(times) * 1e6

    n = len(ids)
    spans = [(f"tokens 1-{window}", 0, window),
             (f"tokens {n - window + 1}-{n}", n - window, n),
             (f"all {n}", 0, n)]
    print(f"\n{'µs/token':<22}{'incremental':>14}{'naive re-decode':>18}")
    for label, lo, hi in spans:
        print(f"{label:<22}{mean_us(inc_times[lo:hi]):>14.2f}{mean_us(naive_times[lo:hi]):>18.2f}")
    late_over_early = mean_us(inc_times[n - window:]) / mean_us(inc_times[:window])
    print(f"\nincremental late/early ratio: {late_over_early:.2f} "
          f"(naive: {mean_us(naive_times[n - window:]) / mean_us(naive_times[:window]):.1f})")


if __name__ == "__main__":
    main()

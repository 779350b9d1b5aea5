"""Greedy answers of this project's server and vLLM's on the same checkpoint and prompts, in
fp32: the same tokens, or where they first differ. One server at a time (bench/peer.py's).

Prompts: chat inputs (the official chat format, Chinese, English, emoji, a system prompt) and
random token ids of several lengths, sent as ids to /v1/completions, temperature 0, the model's
end tokens ending both. vLLM runs without a tokenizer (the ChatGLM3 tokenizer is remote code);
both return the answers' ids (`return_token_ids`), compared with the finish reasons.

    python bench/peer_greedy.py --weights DIR [--tokens 32] [--random 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from peer import ROOT, STOP_IDS, VOCAB_FOR_PROMPTS, Server, free_port, machine, request

sys.path.insert(0, str(ROOT))
from chatglm3.text.messages import build_messages  # noqa: E402
from chatglm3.text.tokenizer import ChatGLMTokenizer  # noqa: E402

CHATS = [("你好", ""), ("What is the capital of France? Answer in one word.", ""),
         ("用三句话介绍一下长城。", "你是一个乐于助人的助手。"), ("Tell me a joke 😀 about cats.", ""),
         ("Summarize: the quick brown fox jumps over the lazy dog, twice.", "Be brief.")]


def prompts(tok: ChatGLMTokenizer, n_random: int) -> list[tuple[str, list[int]]]:
    rng = random.Random(0)
    out = [(f"chat: {q[:24]}", tok.build_chat_input(build_messages(q, system_prompt=s)))
           for q, s in CHATS]
    for i in range(n_random):
        n = 8 * 3 ** i if i < 5 else 2000
        out.append((f"random ids, {n}", [rng.randrange(*VOCAB_FOR_PROMPTS) for _ in range(n)]))
    return out


def answers(server: Server, items, tokens: int, log: Path) -> list[dict]:
    server.start(log)
    try:
        got = []
        for _, ids in items:
            body = {"model": "m", "prompt": ids, "max_tokens": tokens, "temperature": 0,
                    "return_token_ids": True,
                    **({"stop_token_ids": STOP_IDS} if server.name == "vllm" else {})}
            status, raw = request(server.port, "POST", "/v1/completions", body)
            if status != 200:
                raise RuntimeError(f"{server.name}: {status} {raw[:300]!r}")
            got.append(json.loads(raw)["choices"][0])
        return got
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--vllm-python", default=str(ROOT.parent / "vllm-venv" / "bin" / "python"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--random", type=int, default=6, help="random-id prompts (8, 24, 72, ...)")
    ap.add_argument("--log-dir", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    tok = ChatGLMTokenizer.from_dir(args.weights)
    items = prompts(tok, args.random)
    ours_port, vllm_port = free_port(), free_port()
    ours = Server("ours", [str(ROOT / "scripts" / "run"), "serve", "--weights", str(args.weights),
                           "--port", str(ours_port), "--device", "cpu", "--dtype", "float32",
                           "--no-web", "--model-name", "m"], dict(os.environ), {},
                  ours_port)
    vllm = Server("vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                           "--model", str(args.weights), "--served-model-name", "m",
                           "--skip-tokenizer-init", "--dtype", "float32", "--max-num-seqs", "8",
                           "--no-enable-prefix-caching", "--port", str(vllm_port),
                           "--host", "127.0.0.1"],
                  dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2"), {}, vllm_port)
    a = answers(ours, items, args.tokens, args.log_dir / "greedy-ours.log")
    b = answers(vllm, items, args.tokens, args.log_dir / "greedy-vllm.log")
    print(f"machine: {machine()}\ncheckpoint: {args.weights}, fp32, greedy, up to {args.tokens} "
          "tokens\n")
    print("| prompt | prompt tokens | tokens (ours / vLLM) | same answer | first difference at |")
    print("|---|---|---|---|---|")
    same = 0
    for (name, ids), x, y in zip(items, a, b):
        mine, theirs = x["token_ids"], y["token_ids"]
        equal = (mine, x["finish_reason"]) == (theirs, y["finish_reason"])
        same += equal
        at = "" if equal else f"token {next((i for i, (p, q) in enumerate(zip(mine, theirs)) if p != q), min(len(mine), len(theirs)))}"
        print(f"| {name} | {len(ids)} | {len(mine)} / {len(theirs)} | "
              f"{'yes' if equal else 'no'} | {at} |")
    print(f"\n{same} of {len(items)} answers equal")


if __name__ == "__main__":
    main()

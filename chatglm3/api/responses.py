"""Our results -> OpenAI's response shapes: chat completions and their chunks, legacy
completions, usage, finish reasons and the two logprobs layouts."""

from __future__ import annotations

import time
import uuid
from typing import Sequence

from ..output import GenerationResult
from ..sampling import TokenLogprob
from ..tokenizer import ChatGLMTokenizer

# Our stop reasons -> OpenAI's finish_reason (cancelled requests send nothing: their client left).
FINISH_REASONS = {"stop_token": "stop", "stop_sequence": "stop", "max_tokens": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(results: Sequence[GenerationResult], prompts: int = 1) -> dict:
    """Prompt tokens counted once per prompt (n choices share it, as OpenAI counts them);
    completion tokens summed over the choices; cached = prompt positions the prefix cache gave."""
    per_prompt = len(results) // max(prompts, 1)
    firsts = results[::per_prompt] if per_prompt else []
    prompt = sum(r.input_token_count for r in firsts)
    completion = sum(r.output_token_count for r in results)
    cached = sum(max(r.cached_input_token_count for r in results[i:i + per_prompt])
                 for i in range(0, len(results), per_prompt)) if per_prompt else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def timings(results: Sequence[GenerationResult]) -> list[dict]:
    """An extension field: each choice's time to first token and decoding speed."""
    return [{"index": i, "time_to_first_token": round(r.time_to_first_token, 6),
             "tokens_per_second": round(r.tokens_per_second, 3)} for i, r in enumerate(results)]


class LogprobWriter:
    """Token log-probabilities in OpenAI's layouts, with each token's text and bytes."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: OpenAI spells it as bytes
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)

    def chat(self, entries: Sequence[TokenLogprob]) -> dict:
        """choices[].logprobs of a chat completion (or of a chunk)."""
        content = []
        for e in entries:
            text, raw = self._token(e.token)
            top = []
            for token_id, lp in e.top:
                t, b = self._token(token_id)
                top.append({"token": t, "logprob": lp, "bytes": b})
            content.append({"token": text, "logprob": e.logprob, "bytes": raw,
                            "top_logprobs": top})
        return {"content": content, "refusal": None}

    def legacy(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
        """choices[].logprobs of a /v1/completions answer: parallel lists; text_offset counts
        characters from the start of the returned text (`offset`: where the first token's
        text starts, past an echoed prompt)."""
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            text, _ = self._token(e.token)
            tokens.append(text)
            lps.append(e.logprob)
            tops.append({self._token(t)[0]: lp for t, lp in e.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}

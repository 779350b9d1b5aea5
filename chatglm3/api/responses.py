"""Our results -> OpenAI's response shapes: chat completions and their chunks, legacy
completions, usage, finish reasons and the two logprobs layouts."""

from __future__ import annotations

import time
import uuid
from typing import Sequence

from ..engine.output import GenerationResult
from ..model.sampling import TokenLogprob
from ..text.streaming import IncrementalDetokenizer
from ..text.tokenizer import ChatGLMTokenizer

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

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token's text as it adds to the decoded text of `ids` (the detokenizer's delta:
        a character split over byte pieces shows at its last one): they join to decode(ids)."""
        detok = IncrementalDetokenizer(self.tokenizer)
        texts = [detok.push(i) for i in ids]
        if texts:
            texts[-1] += detok.flush()
        return texts

    def echoed(self, texts: Sequence[str], entries: Sequence[TokenLogprob | None], top: int,
               then: dict | None = None) -> dict:
        """choices[].logprobs of an echoed prompt (its tokens' `pieces`, scored by `entries`,
        `top` alternatives each), then `then` (the generated tokens' layout, its offsets
        already past the echo). The tokens spell the echoed text exactly and offsets count
        from its start. A token with nothing before it has a null log-probability and
        alternatives (OpenAI's first)."""
        lps, tops, offsets, offset = [], [], [], 0
        for text, e in zip(texts, entries):
            lps.append(None if e is None else e.logprob)
            tops.append(None if e is None else {self._token(t)[0]: lp for t, lp in e.top[:top]})
            offsets.append(offset)
            offset += len(text)
        out = {"tokens": list(texts), "token_logprobs": lps, "top_logprobs": tops,
               "text_offset": offsets}
        return out if then is None else {k: out[k] + then[k] for k in out}

    def prompt(self, entries: Sequence[TokenLogprob | None], top: int) -> list[dict | None]:
        """vLLM's prompt_logprobs field: per prompt token None (the first) or {token id:
        {logprob, rank, decoded_token}} for the token itself and its `top` alternatives."""
        out: list[dict | None] = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            entry = {str(e.token): {"logprob": e.logprob, "rank": e.rank,
                                    "decoded_token": self._token(e.token)[0]}}
            for rank, (t, lp) in enumerate(e.top[:top], 1):
                entry.setdefault(str(t), {"logprob": lp, "rank": rank,
                                          "decoded_token": self._token(t)[0]})
            out.append(entry)
        return out


class Echo:
    """/v1/completions' echo for each choice (`per` choices per prompt): the prompt as sent,
    and with logprobs its tokens scored, ahead of the generated ones. A string prompt runs
    after the `[gMASK] sop` prefix the server adds (as the official encode does); the prefix
    is not echoed, so the scores start at the text's first token, scored given the prefix
    (not null: something came before it). Token ids are echoed as sent, the first null."""

    def __init__(self, writer: LogprobWriter, prompts: Sequence[str | list[int]], per: int,
                 echo: bool, top: int | None) -> None:
        self.writer, self.prompts, self.per, self.top = writer, prompts, per, top
        decode = writer.tokenizer.decode
        texts = [(p if isinstance(p, str) else decode(p)) if echo else "" for p in prompts]
        self.texts = [t for t in texts for _ in range(per)]  # per choice
        self._pieces: dict[int, list[str]] = {}  # per prompt: its n choices share them

    def logprobs(self, choice: int, r: GenerationResult, then: dict | None = None) -> dict:
        """The choice's logprobs: its echoed prompt's (if echoed), then `then`."""
        if not self.texts[choice]:
            return then
        prompt = choice // self.per
        skip = (len(self.writer.tokenizer.prefix_ids)
                if isinstance(self.prompts[prompt], str) else 0)
        if prompt not in self._pieces:
            self._pieces[prompt] = self.writer.pieces(r.input_ids[skip:])
        return self.writer.echoed(self._pieces[prompt], r.prompt_logprobs[skip:],
                                  self.top or 0, then)

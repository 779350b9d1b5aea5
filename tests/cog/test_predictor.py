"""predict.py's run() on an event loop, as coglet drives it, without the server: checking and
tokenizing a request happen off the loop, so one slow request never holds up another."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chatglm3.engine.engine import Engine, PromptTooLong
from predict import Predictor

pytestmark = pytest.mark.shared

ARGS = dict(system_prompt="", history="", max_tokens=2, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
            repetition_penalty=1.0, seed=None, stop_sequences="", min_tokens=0,
            presence_penalty=0.0, frequency_penalty=0.0, json_schema="")


@pytest.fixture(scope="module")
def predictor(tiny_model_fp32, tokenizer):
    p = Predictor()
    p.engine = Engine(tiny_model_fp32, tokenizer)
    yield p
    p.engine.close()


def test_a_request_being_tokenized_does_not_block_the_loop(predictor, monkeypatch) -> None:
    """A 'big' prompt whose tokenizing is held until released: meanwhile a short prediction on
    the same loop starts and ends; then the big one fails as too long."""
    real_encode = predictor.engine.encode
    in_encode, release = threading.Event(), threading.Event()

    def encode(messages):
        if messages[-1].content == "BIG":
            in_encode.set()
            assert release.wait(30)
            raise PromptTooLong(40000, predictor.engine.context)
        return real_encode(messages)

    monkeypatch.setattr(predictor.engine, "encode", encode)

    async def main() -> tuple[str, bool]:
        big = asyncio.ensure_future(predictor.run(prompt="BIG", **ARGS))
        await asyncio.to_thread(in_encode.wait, 30)
        stream = await predictor.run(prompt="hi", **ARGS)
        text = await asyncio.to_thread(lambda: "".join(stream))
        big_still_checking = not big.done()
        release.set()
        with pytest.raises(ValueError, match="prompt too long"):
            await big
        return text, big_still_checking

    text, big_still_checking = asyncio.run(main())
    assert text and big_still_checking


def test_cancel_while_checking_leaves_nothing_queued(predictor, monkeypatch) -> None:
    """A prediction cancelled while its prompt is tokenized never reaches the engine."""
    in_encode, release = threading.Event(), threading.Event()
    queued = []
    real_encode, real_generate = predictor.engine.encode, predictor.engine.generate_ids

    def encode(messages):
        in_encode.set()
        assert release.wait(30)
        return real_encode(messages)

    monkeypatch.setattr(predictor.engine, "encode", encode)
    monkeypatch.setattr(predictor.engine, "generate_ids",
                        lambda *a, **k: queued.append(a) or real_generate(*a, **k))

    async def main() -> None:
        task = asyncio.ensure_future(predictor.run(prompt="hello", **ARGS))
        await asyncio.to_thread(in_encode.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(main())
    assert queued == []

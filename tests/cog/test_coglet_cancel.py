"""The relay that lets coglet's cancel reach a stream whose run() coroutine has returned."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from chatglm3 import coglet_cancel


@pytest.fixture
def loop(monkeypatch):
    """An event loop in a thread (as coglet runs one), with the relay installed for this test."""
    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", asyncio.run_coroutine_threadsafe)
    coglet_cancel.install()
    wrapper = asyncio.run_coroutine_threadsafe
    coglet_cancel.install()  # idempotent: one wrapper, not two
    assert asyncio.run_coroutine_threadsafe is wrapper and wrapper._chatglm3_relay
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_cancel_after_run_returned_reaches_the_hook(loop) -> None:
    called = threading.Event()

    async def run() -> str:
        assert coglet_cancel.on_cancel(called.set)
        return "stream"

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    assert future.result(5) == "stream"
    assert not future.cancel()  # the coroutine is done: the plain cancel can do nothing...
    assert called.is_set()  # ...but the stream's cancel ran


def test_a_failing_hook_never_skips_the_real_cancel(loop, caplog) -> None:
    registered, later = threading.Event(), threading.Event()

    def broken() -> None:
        raise RuntimeError("hook bug")

    async def run() -> None:
        coglet_cancel.on_cancel(broken)
        coglet_cancel.on_cancel(later.set)
        registered.set()
        await asyncio.sleep(60)

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    assert registered.wait(5)
    with caplog.at_level(logging.ERROR, logger="chatglm3.coglet_cancel"):
        assert future.cancel()  # still pending: the real cancel happens
    assert later.is_set()
    assert "cancel hook failed" in caplog.text
    with pytest.raises(Exception):
        future.result(5)
    assert future.cancelled()


def test_a_prediction_without_relay_is_logged(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="chatglm3.coglet_cancel"):
        assert coglet_cancel.on_cancel(lambda: None) is False  # not submitted through coglet
    assert "no cancel relay" in caplog.text


def test_cancel_that_finds_no_hook_is_logged(loop, caplog) -> None:
    async def run() -> int:
        return 1

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    future.result(5)
    with caplog.at_level(logging.WARNING, logger="chatglm3.coglet_cancel"):
        future.cancel()
    assert "registered no hook" in caplog.text


def test_another_coglet_version_is_warned_about(monkeypatch, caplog) -> None:
    monkeypatch.setattr(coglet_cancel.metadata, "version", lambda name: "0.99.0")
    with caplog.at_level(logging.WARNING, logger="chatglm3.coglet_cancel"):
        message = coglet_cancel.check_coglet_version()
    assert message and "coglet 0.99.0" in message and coglet_cancel.CHECKED_COGLET in message
    assert f"COGLET_WHEEL=pypi:{coglet_cancel.CHECKED_COGLET}" in message
    assert message in caplog.text

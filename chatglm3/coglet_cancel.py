"""Lets coglet's cancel reach a prediction whose async run() has already returned its stream.

Why this exists (coglet 0.23.1, the server inside the Cog image):
  * more than one prediction at a time needs an `async def run()`; but coglet collects an
    async *generator* into a list and sends it at the end, so a streaming run() is a coroutine
    that returns a plain generator, which coglet drains in the prediction's slot thread;
  * coglet submits each async prediction with `asyncio.run_coroutine_threadsafe(coro, loop)`
    and cancels it with `future.cancel()` on the future that returns. Once run() has returned
    its generator that future is done, and cancel() does nothing: the model would go on
    generating for a client that is gone.

`install()` wraps `asyncio.run_coroutine_threadsafe` (once per process): each future gets a
list of hooks, visible to run() through a context variable (the task running the coroutine
starts from a copy of the submitting thread's context), and its cancel() calls them before
doing what it did. It depends on coglet internals, so it is loud about it: setup() warns when
coglet is not the version this was checked against, run() warns when a prediction has no
relay (coglet submitted it some other way: cancel then acts only when the stream is closed),
and a cancel that finds no hook is logged. A hook that raises never stops the real cancel.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from importlib import metadata
from typing import Callable, Iterator

log = logging.getLogger(__name__)

# The coglet version whose submit/cancel path this was read against and tested with
# (tests/cog/test_cog_server.py runs it; a test checks the installed version equals this).
CHECKED_COGLET = "0.23.1"

_HOOKS: contextvars.ContextVar[list[Callable[[], object]] | None] = contextvars.ContextVar(
    "chatglm3_cancel_hooks", default=None)


def coglet_version() -> str | None:
    try:
        return metadata.version("coglet")
    except metadata.PackageNotFoundError:
        return None


def check_coglet_version() -> str | None:
    """A warning (also logged) when the installed coglet is not the checked one; else None."""
    found = coglet_version()
    if found == CHECKED_COGLET:
        return None
    message = (f"coglet {found or '(not installed)'} is running, but the cancel relay was "
               f"checked against coglet {CHECKED_COGLET}; cancelling may only stop a prediction "
               f"when its stream is closed. Build with COGLET_WHEEL=pypi:{CHECKED_COGLET}.")
    log.warning(message)
    return message


def install() -> None:
    """Wraps asyncio.run_coroutine_threadsafe so that cancel() also runs the hooks that
    `on_cancel()` registered for that prediction. Idempotent."""
    original = asyncio.run_coroutine_threadsafe
    if getattr(original, "_chatglm3_relay", False):
        return

    def run_coroutine_threadsafe(coro, loop):
        hooks: list[Callable[[], object]] = []
        token = _HOOKS.set(hooks)
        try:
            future = original(coro, loop)
        finally:
            _HOOKS.reset(token)
        plain_cancel = future.cancel

        def cancel(*args, **kwargs) -> bool:
            if not hooks and future.done():
                log.warning("cancel for a finished coroutine that registered no hook: "
                            "its stream, if any, stops only when it is closed")
            for hook in list(hooks):
                try:
                    hook()
                except Exception:  # noqa: BLE001 - the real cancel must still happen
                    log.exception("cancel hook failed")
            return plain_cancel(*args, **kwargs)

        future.cancel = cancel
        return future

    run_coroutine_threadsafe._chatglm3_relay = True  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe = run_coroutine_threadsafe


def on_cancel(hook: Callable[[], object]) -> bool:
    """Registers `hook` for the current prediction's cancel; False (and a warning) when this
    prediction has no relay."""
    hooks = _HOOKS.get()
    if hooks is None:
        log.warning("no cancel relay for this prediction (coglet submitted it without "
                    "asyncio.run_coroutine_threadsafe): a cancel stops it only when its "
                    "stream is closed")
        return False
    hooks.append(hook)
    return True


def in_context(ctx: contextvars.Context, items: Iterator[str]) -> Iterator[str]:
    """`items`, with every step (and the final close) run inside `ctx`: coglet keeps each
    prediction's log and metric routing in context variables, and drains the generator in
    another thread."""
    try:
        while True:
            try:
                item = ctx.run(next, items)
            except StopIteration:
                return
            yield item
    finally:
        ctx.run(items.close)

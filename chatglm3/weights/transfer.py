"""What every download shares: progress for a terminal or a log, worker threads that one Ctrl-C
stops within a second, and a bounded number of tries."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TypeVar

from huggingface_hub import constants
from tqdm.auto import tqdm

T = TypeVar("T")
ATTEMPTS = 4           # tries in a row that bring no byte before a transfer gives up
RETRY_WAIT_S = 1.0     # first back-off; doubles after every try that brought nothing
WORKERS = 8            # transfers at once: hub files (as snapshot_download), tar ranges (as pget)


class Stopped(Exception):
    """A worker saw the stop event (Ctrl-C, or another worker failed)."""


def say(on: bool, message: str) -> None:
    if on:
        print(message, file=sys.stderr, flush=True)


def size_text(n: float) -> str:
    """12_500_000_000 -> '12.5 GB' (decimal units, as the hub shows sizes)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def read_timeout() -> float:
    """Seconds without data before a read fails, for all: HF_HUB_DOWNLOAD_TIMEOUT (default 10)."""
    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


class Progress:
    """Bytes done of `total`, added by any thread, drawn by the main thread's show(): tqdm on a
    terminal, else (logs) a line every 5 percent, with the speed."""

    def __init__(self, desc: str, total: int, on: bool, done: int = 0) -> None:
        self.desc, self.total, self.done, self._start, self._next = desc, total, done, done, 5
        self._lock, self._t0, self._log = threading.Lock(), time.monotonic(), on and not sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=desc) \
            if on and not self._log else None

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def show(self) -> None:
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
        elif self._log and self.total and (pct := 100 * self.done // self.total) >= self._next:
            rate = (self.done - self._start) / max(time.monotonic() - self._t0, 1e-3) / 1e6
            say(True, f"{self.desc}: {min(pct, 100)}% of {size_text(self.total)} ({rate:.1f} MB/s)")
            self._next = pct - pct % 5 + 5

    def close(self) -> None:
        self.show()
        if self._bar is not None:
            self._bar.close()


def run_all(jobs: list[Callable[[threading.Event], None]], progress: Progress) -> None:
    """Runs `jobs`, WORKERS at once, on daemon threads; draws progress; raises the first failure.

    hub lacks: snapshot_download joins its (non-daemon) workers until every file in flight is
    done, so Ctrl-C took minutes. Here Ctrl-C sets the stop event, which jobs check between
    reads, gives them a second, and goes: no join without a timeout, no thread holds the exit.
    """
    stop, gate, errors = threading.Event(), threading.Semaphore(WORKERS), []

    def work(job: Callable[[threading.Event], None]) -> None:
        with gate:
            try:
                if not stop.is_set():
                    job(stop)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
                stop.set()

    threads = [threading.Thread(target=work, args=(job,), daemon=True) for job in jobs]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            progress.show()
            time.sleep(0.1)
    except BaseException:
        stop.set()
        deadline = time.monotonic() + 1.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        raise
    finally:
        progress.close()
    if errors:
        raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])


def retrying(call: Callable[[], T], retry: Callable[[Exception], bool],
             fetched: Callable[[], int] = lambda: 0) -> T:
    """call(), tried again after an error that `retry` accepts, until ATTEMPTS tries in a row
    brought nothing (left `fetched()` where it was); then that error is raised."""
    streak, mark = 0, fetched()
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - `retry` decides; the rest go up as they are
            if not retry(e):
                raise
            streak, mark = (0, fetched()) if fetched() > mark else (streak + 1, mark)
            if streak >= ATTEMPTS:
                raise
        if streak:
            time.sleep(RETRY_WAIT_S * 2 ** (streak - 1))


def hook(progress: Progress, stop: threading.Event) -> type[tqdm]:
    """A tqdm class for huggingface_hub's transfers: adds their bytes to `progress` (and to its
    `got`), and ends the transfer when `stop` is set."""
    class Hook(tqdm):
        got = 0

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> None:
            Hook.got += int(n or 0)
            progress.add(int(n or 0))
            if stop.is_set():
                raise Stopped()

        def update_transfer(self, *args, **kwargs) -> None:  # hf_xet's network bytes: not the file's
            pass

        set_transfer_postfix_str = update_transfer
    return Hook

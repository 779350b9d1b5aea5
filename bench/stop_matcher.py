"""Cost of `StopMatcher`: construction, and per streamed character, as stops get long.

For stops of growing length, prints the construction time and tracemalloc peak, then the mean
µs per character for two streams: random text over "ab" against a random "ab" stop that ends
in "c" (so it never completes), pushed in deltas of 1-8 characters as a detokenizer yields
them; and "aaa..." pushed one character at a time against the stop "a...ab", which almost
matches at every position, so the held text stays one character short of the whole stop.
The previous, quadratic matcher (every prefix of every stop in a set, every stop scanned on
every push) is copied here as the baseline, and run only where it finishes quickly: its 100k
construction alone needs about 5 GB. Each cell is the best of --repeat runs.

    .venv/bin/python bench/stop_matcher.py [--chars N] [--repeat R]
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Protocol, Sequence

ROOT = Path(__file__).resolve().parents[1]

from chatglm3.text.streaming import StopMatcher  # noqa: E402

CONSTRUCT_LENGTHS = [1_000, 10_000, 100_000]
STREAM_LENGTHS = [10, 1_000, 100_000]
OLD_MAX_LENGTH = 10_000  # the baseline's construction is quadratic: 100k takes ~5 GB


class Matcher(Protocol):
    def push(self, text: str) -> str: ...
    def flush(self) -> str: ...


class QuadraticStopMatcher:
    """The previous StopMatcher (push and construction as they were), as the baseline."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._prefixes = frozenset(s[:k] for s in self.stops for k in range(1, len(s)))
        self._held = ""
        self._stopped = False

    def push(self, text: str) -> str:
        if self._stopped:
            return ""
        buf = self._held + text
        match = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        undecided = next(
            (i for i in range(max(0, len(buf) - self._max_len + 1), len(buf))
             if buf[i:] in self._prefixes),
            len(buf),
        )
        if match >= 0 and match <= undecided:
            self._stopped = True
            self._held = ""
            return buf[:match]
        self._held = buf[undecided:]
        return buf[:undecided]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self._stopped else held


MATCHERS: dict[str, Callable[[Sequence[str]], Matcher]] = {
    "new": StopMatcher, "old": QuadraticStopMatcher}


def construction(make: Callable[[Sequence[str]], Matcher], stops: Sequence[str],
                 repeat: int) -> tuple[float, int]:
    """Best-of-`repeat` seconds to construct (untraced), and the tracemalloc peak in bytes."""
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        make(stops)
        seconds.append(time.perf_counter() - start)
    tracemalloc.start()
    try:
        make(stops)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return min(seconds), peak


def us_per_char(make: Callable[[Sequence[str]], Matcher], stops: Sequence[str],
                deltas: Sequence[str], repeat: int) -> float:
    """Best-of-`repeat` mean µs per character to push `deltas` and flush."""
    n_chars = sum(map(len, deltas))
    best = float("inf")
    for _ in range(repeat):
        matcher = make(stops)  # not timed
        start = time.perf_counter()
        for delta in deltas:
            matcher.push(delta)
        matcher.flush()
        best = min(best, time.perf_counter() - start)
    return best / n_chars * 1e6


def token_deltas(rng: random.Random, text: str) -> list[str]:
    deltas, i = [], 0
    while i < len(text):
        n = rng.randint(1, 8)
        deltas.append(text[i:i + n])
        i += n
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, default=200_000, help="characters per stream")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the best counts")
    args = parser.parse_args()
    rng = random.Random(0)
    repeat = max(1, args.repeat)

    def skip(name: str, length: int) -> bool:
        return name == "old" and length > OLD_MAX_LENGTH

    print(f"{'construction':<16}{'new s':>10}{'new B/char':>12}{'old s':>10}{'old B/char':>12}")
    for length in CONSTRUCT_LENGTHS:
        stops = ["".join(rng.choices("ab", k=length))]
        cells = []
        for name, make in MATCHERS.items():
            if skip(name, length):
                cells.append(f"{'-':>10}{'-':>12}")
                continue
            seconds, peak = construction(make, stops, repeat)
            cells.append(f"{seconds:>10.4f}{peak / length:>12.1f}")
        print(f"{f'stop {length:,}':<16}{''.join(cells)}")

    text = "".join(rng.choices("ab", k=args.chars))
    random_deltas = token_deltas(rng, text)
    a_deltas = ["a"] * args.chars
    print(f"\n{'µs/char':<16}{'random ab, 1-8 char deltas':>28}{'a*n, one char a push':>28}")
    print(f"{'':<16}{'new':>14}{'old':>14}{'new':>14}{'old':>14}")
    for length in STREAM_LENGTHS:
        # Over "ab" but for its last character, so that it never occurs and the stream runs on.
        random_stop = ["".join(rng.choices("ab", k=length - 1)) + "c"]
        almost = ["a" * (length - 1) + "b"]
        cells = []
        for stops, deltas in ((random_stop, random_deltas), (almost, a_deltas)):
            for name, make in MATCHERS.items():
                if skip(name, length):
                    cells.append(f"{'-':>14}")
                else:
                    cells.append(f"{us_per_char(make, stops, deltas, repeat):>14.3f}")
        print(f"{f'stop {length:,}':<16}{''.join(cells)}")
    # The API's cap (params.MAX_STOP_SEQUENCES x MAX_STOP_LENGTH): 16 stops of 256 characters.
    cap_random = ["".join(rng.choices("ab", k=255)) + "c" for _ in range(16)]
    cap_almost = ["a" * (255 - i) + "b" * (i + 1) for i in range(16)]
    cells = [f"{us_per_char(make, stops, deltas, repeat):>14.3f}"
             for stops, deltas in ((cap_random, random_deltas), (cap_almost, a_deltas))
             for make in MATCHERS.values()]
    print(f"{'16 x 256 (cap)':<16}{''.join(cells)}")
    print("\n(-: not run; the old matcher's construction is quadratic in the stop length)")


if __name__ == "__main__":
    main()

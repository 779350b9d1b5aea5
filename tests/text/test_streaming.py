"""Streaming detokenizer and stop matcher against the real ChatGLM3 tokenizer's `decode`."""

from __future__ import annotations

import random
import time
import tracemalloc
from typing import Any, Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatglm3.text.streaming import IncrementalDetokenizer, StopMatcher
from chatglm3.text.tokenizer import ChatGLMTokenizer

FFFD = "\ufffd"
BYTE0 = 3  # id of <0x00>; byte b is id BYTE0 + b
MAX_ID = 64797  # last special id

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Fragments that stress the tokenizer: multi-byte characters, characters outside the vocabulary
# (byte fallback), ZWJ emoji sequences, flags, combining marks and assorted whitespace.
FRAGMENTS = [
    "中", "文", "你好", "世界", "的", "是", "龘", "𠀀", "𪚥", "𐀀", "𝔘", "🀄", "😀", "🤖", "🧬",
    "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇨🇳", "🇺🇸", "👍🏽", "é", "ñ", "e\u0301", "Ж", "ع", "ॐ", "ㅋ",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u3000", "\u00a0",
    "a", "Hello", " world", "the", "123", ".", ",", "!", "？", "。", "▁", "<0x41>",
]
text_strategy = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        # Any non-surrogate code point except U+FFFD itself, astral planes included.
        st.characters(blacklist_categories=["Cs"], blacklist_characters=[FFFD]),
    ),
    max_size=40,
).map("".join)

# Random ids, biased towards byte pieces (lead and continuation bytes), control/unknown ids
# and special ids, so that byte runs are often invalid or interrupted.
id_strategy = st.one_of(
    st.integers(0, MAX_ID),
    st.integers(0, 2),
    st.integers(BYTE0, BYTE0 + 255),
    st.integers(BYTE0 + 0x80, BYTE0 + 0xBF),
    st.integers(BYTE0 + 0xC2, BYTE0 + 0xF4),
    st.integers(64789, MAX_ID),
    st.sampled_from([30910, 13, 260, 31010, 30914]),
)

# Byte continuations that could complete any unfinished UTF-8 sequence.
COMPLETIONS = [[BYTE0 + b] * n for b in (0x80, 0x90, 0xBF) for n in (1, 2, 3)]


def stream(tokenizer: ChatGLMTokenizer, ids: Sequence[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids], detok.flush()


def assert_final_deltas(tokenizer: ChatGLMTokenizer, ids: Sequence[int]) -> list[str]:
    """Join contract, plus: what was emitted after each id survives any continuation."""
    detok = IncrementalDetokenizer(tokenizer)
    deltas, emitted = [], ""
    for n, token_id in enumerate(ids, 1):
        delta = detok.push(token_id)
        deltas.append(delta)
        emitted += delta
        for tail in ([], *COMPLETIONS):
            assert tokenizer.decode([*ids[:n], *tail]).startswith(emitted), (ids[:n], tail)
    assert emitted + detok.flush() == tokenizer.decode(ids)
    return deltas


# --- IncrementalDetokenizer: properties ---------------------------------------------------

@SETTINGS
@given(text=text_strategy)
def test_detokenizer_matches_decode_on_text(tokenizer: ChatGLMTokenizer, text: str) -> None:
    ids = tokenizer.encode_text(text)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert not any(FFFD in d for d in deltas + [tail])


@SETTINGS
@given(text=text_strategy, specials=st.lists(st.integers(64789, MAX_ID), max_size=5),
       data=st.data())
def test_detokenizer_with_specials_interleaved(
    tokenizer: ChatGLMTokenizer, text: str, specials: list[int], data: Any
) -> None:
    ids = tokenizer.encode_text(text)
    for special in specials:
        ids.insert(data.draw(st.integers(0, len(ids))), special)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert not any(FFFD in d for d in deltas + [tail])


@SETTINGS
@given(ids=st.lists(id_strategy, max_size=30))
def test_detokenizer_matches_decode_on_random_ids(
    tokenizer: ChatGLMTokenizer, ids: list[int]
) -> None:
    assert_final_deltas(tokenizer, ids)


@SETTINGS
@given(ids=st.lists(st.integers(BYTE0, BYTE0 + 255), max_size=30))
def test_detokenizer_on_random_byte_runs(tokenizer: ChatGLMTokenizer, ids: list[int]) -> None:
    assert_final_deltas(tokenizer, ids)


# --- IncrementalDetokenizer: explicit cases -----------------------------------------------

def test_astral_char_in_four_byte_pieces(tokenizer: ChatGLMTokenizer) -> None:
    char = "𐀀"  # U+10000: not in the vocabulary, so it falls back to its four UTF-8 bytes
    ids = tokenizer.encode_text(char)
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids]
    assert pieces == ["▁", "<0xF0>", "<0x90>", "<0x80>", "<0x80>"]
    assert stream(tokenizer, ids) == (["", "", "", "", char], "")
    # Mid-text, after a character that has a piece of its own.
    ids = tokenizer.encode_text("好" + char + "好")
    deltas, tail = stream(tokenizer, ids)
    assert [d for d in deltas if d] == ["好", char, "好"] and tail == ""
    assert deltas[-5:-1] == ["", "", "", char]


def test_unfinished_bytes_are_held_then_flushed(tokenizer: ChatGLMTokenizer) -> None:
    ids = [BYTE0 + 0xE4, BYTE0 + 0xB8]  # first two bytes of 中
    deltas, tail = stream(tokenizer, ids)
    assert deltas == ["", ""] and tail == FFFD * 2 == tokenizer.decode(ids)
    deltas, tail = stream(tokenizer, [*ids, BYTE0 + 0xAD])
    assert deltas == ["", "", "中"] and tail == ""
    # A control id ends the byte run, so the bytes are final there (and stay U+FFFD).
    deltas, tail = stream(tokenizer, [*ids, 2, BYTE0 + 0xAD])
    assert "".join(deltas) + tail == tokenizer.decode([*ids, 2, BYTE0 + 0xAD]) == FFFD * 3
    assert deltas[2] == FFFD * 2


def test_special_ids_do_not_split_byte_runs(tokenizer: ChatGLMTokenizer) -> None:
    gmask, sop, user = 64790, 64792, 64795
    ids = [gmask, sop, BYTE0 + 0xE4, user, BYTE0 + 0xB8, 64797, BYTE0 + 0xAD, user]
    assert stream(tokenizer, ids) == (["", "", "", "", "", "", "中", ""], "")
    assert tokenizer.decode(ids) == "中"


def test_first_piece_leading_space(tokenizer: ChatGLMTokenizer) -> None:
    ids = tokenizer.encode_text("hello world")
    assert tokenizer.sp.id_to_piece(ids[0]).startswith("▁")
    deltas, _ = stream(tokenizer, ids)
    assert deltas[0] == "hello" and "".join(deltas) == "hello world"
    # An explicit leading space survives: only the dummy-prefix space is dropped.
    assert "".join(stream(tokenizer, tokenizer.encode_text(" hello"))[0]) == " hello"
    # Control and special ids before the first piece do not use up the rule.
    deltas, _ = stream(tokenizer, [64790, 64792, 1, *ids])
    assert deltas[3] == "hello"
    # A lone "▁" first piece uses it up: the next piece keeps its space.
    space, a = tokenizer.sp.piece_to_id("▁"), tokenizer.sp.piece_to_id("▁a")
    assert stream(tokenizer, [space, a]) == (["", " a"], "") and tokenizer.decode([space, a]) == " a"


def test_text_starting_with_newline(tokenizer: ChatGLMTokenizer) -> None:
    ids = tokenizer.encode_text("\nhi there")
    assert [tokenizer.sp.id_to_piece(i) for i in ids[:2]] == ["▁", "<0x0A>"]
    deltas, tail = stream(tokenizer, ids)
    assert deltas[:3] == ["", "\n", "hi"] and "".join(deltas) + tail == "\nhi there"


def test_unknown_and_control_ids(tokenizer: ChatGLMTokenizer) -> None:
    ids = [1, 0, 2, 0, tokenizer.sp.piece_to_id("▁a"), 2]
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == " ⁇  ⁇  a"
    assert deltas == ["", " ⁇ ", "", " ⁇ ", " a", ""]


def test_flush_resets_for_a_new_stream(tokenizer: ChatGLMTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode_text("hi 中")
    for _ in range(2):
        assert "".join(detok.push(i) for i in ids) + detok.flush() == "hi 中"


class _RecordingSP:
    """Proxy of a SentencePieceProcessor that records the length of every decode input."""

    def __init__(self, sp: Any, lengths: list[int]) -> None:
        self._sp, self._lengths = sp, lengths

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._sp, name)
        if "decode" in name.lower() and callable(attr):
            def recorded(ids: Sequence[int], *args: Any, **kwargs: Any) -> Any:
                self._lengths.append(len(ids))
                return attr(ids, *args, **kwargs)
            return recorded
        return attr


def test_decode_inputs_stay_short(tokenizer: ChatGLMTokenizer) -> None:
    recorded = ChatGLMTokenizer.__new__(ChatGLMTokenizer)
    recorded.__dict__.update(tokenizer.__dict__)
    lengths: list[int] = []
    recorded.sp = _RecordingSP(tokenizer.sp, lengths)
    unit = "模型生成的文本 mixed with English, emoji 😀👩‍💻🇨🇳, rare 𐀀𠀀 chars,\n\ttabs  and spaces. "
    ids = tokenizer.encode_text(unit * 200)[:4000]
    ids += [BYTE0 + 0x80 + i % 0x40 for i in range(500)]  # a long run of invalid bytes
    ids += [BYTE0 + 0xF0, BYTE0 + 0x90] * 250  # and of unfinished sequences
    assert len(ids) == 5000
    detok = IncrementalDetokenizer(recorded)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == tokenizer.decode(ids)
    assert len(lengths) >= len(ids) and max(lengths) <= 5


# --- StopMatcher --------------------------------------------------------------------------

def cut(text: str, stops: Sequence[str]) -> str:
    """Reference: text up to the smallest start index of any stop occurrence."""
    starts = [text.find(s) for s in stops if s and s in text]
    return text[:min(starts)] if starts else text


def run_stops(stops: Sequence[str], chunks: Sequence[str]) -> tuple[str, StopMatcher]:
    matcher = StopMatcher(stops)
    longest = max((len(s) for s in stops), default=0)
    out, fed = "", ""
    for chunk in chunks:
        out += matcher.push(chunk)
        fed += chunk
        if not matcher.stopped:
            # Only a possible stop start is held back: never more than longest stop - 1 chars.
            assert len(fed) - len(out) <= max(0, longest - 1)
            assert fed.startswith(out)
    return out + matcher.flush(), matcher


STOP_ALPHABET = "ab中😀\n "
small_text = st.text(alphabet=STOP_ALPHABET, max_size=30)


@st.composite
def text_stops_chunks(draw: Any) -> tuple[str, list[str], list[str]]:
    text = draw(st.one_of(small_text, text_strategy))
    stops = draw(st.lists(st.text(alphabet=STOP_ALPHABET, max_size=4), max_size=4))
    for _ in range(draw(st.integers(0, 2))):  # stops that do occur in the text
        if text:
            i = draw(st.integers(0, len(text) - 1))
            stops.append(text[i:i + draw(st.integers(1, 5))])
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    return text, stops, chunks


@SETTINGS
@given(case=text_stops_chunks())
def test_stop_matcher_cuts_before_first_occurrence(case: tuple[str, list[str], list[str]]) -> None:
    text, stops, chunks = case
    out, matcher = run_stops(stops, chunks)
    assert out == cut(text, stops)
    assert matcher.stopped == any(s and s in text for s in stops)
    if matcher.stopped:
        assert matcher.push("more a b 中") == ""


@pytest.mark.parametrize(
    ("stops", "chunks", "expected"),
    [
        (["aab"], ["a", "a", "a", "b", "c"], "a"),  # overlapping candidates
        (["aab"], ["aaab"], "a"),
        (["abcd", "bc"], ["a", "b", "c", "d"], ""),  # earlier start wins over earlier end
        (["abcd", "bc"], ["a", "b", "c", "x"], "a"),
        (["abcd", "bc"], ["a", "b", "c"], "a"),  # "bc" seen, "abcd" cannot come: flush cuts
        (["abcd", "bc"], ["abc"], "a"),
        (["ab", "abc"], ["x", "a", "bc"], "x"),  # one stop a prefix of another
        (["<|user|>"], ["Hi<|us", "er|> next"], "Hi"),  # across chunk boundaries
        (["<|user|>"], ["Hi<|us", "e"], "Hi<|use"),  # released by flush: no stop came
        (["中文"], ["好中", "", "文字"], "好"),
        (["", "\n\n"], ["a\n", "\nb"], "a"),  # empty stops are ignored
        ([], ["free ", "text"], "free text"),
    ],
)
def test_stop_matcher_cases(stops: list[str], chunks: list[str], expected: str) -> None:
    assert run_stops(stops, chunks)[0] == expected


def test_stop_matcher_holds_only_possible_starts() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abcST") == "abc"
    assert matcher.push("Oz") == "STOz"
    assert matcher.push("S") == ""
    assert matcher.flush() == "S" and not matcher.stopped


def test_detokenizer_into_stop_matcher(tokenizer: ChatGLMTokenizer) -> None:
    text = "答案是：42 🤖\n\n用户：再见"
    ids = tokenizer.encode_text(text)
    detok, matcher = IncrementalDetokenizer(tokenizer), StopMatcher(["\n\n用户", "Observation:"])
    out = ""
    for token_id in ids:
        out += matcher.push(detok.push(token_id))
        if matcher.stopped:
            break
    out += matcher.push(detok.flush()) + matcher.flush()
    assert out == "答案是：42 🤖" and matcher.stopped


def test_stop_matcher_pending_match_at_flush() -> None:
    # "bc" has been seen but "abcd", starting earlier, could still come: nothing is final yet.
    # At the end it cannot, so flush cuts before "bc" and the stream counts as stopped.
    matcher = StopMatcher(["abcd", "bc"])
    assert [matcher.push(c) for c in "abc"] == ["", "", ""] and not matcher.stopped
    assert matcher.flush() == "a" and matcher.stopped
    assert matcher.push("bc") == "" and matcher.flush() == ""


def test_stop_matcher_after_flush_starts_afresh() -> None:
    matcher = StopMatcher(["ab"])
    assert matcher.push("xa") == "x" and matcher.flush() == "a" and not matcher.stopped
    # The held "a" was released, so it cannot pair with a "b" that comes after the flush.
    assert matcher.push("b") == "b"
    assert matcher.push("yab") == "y" and matcher.stopped and matcher.flush() == ""


# --- StopMatcher: against references ------------------------------------------------------

class QuadraticStopMatcher:
    """The previous StopMatcher, kept as a reference: every prefix of every stop in a set.

    Its push() is unchanged. Its flush() used to return all held text even when a stop had
    already been seen in it (stops ["abcd", "bc"], pushes "a", "b", "c", flush gave "abc");
    here it cuts there, as `StopMatcher` now does.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._prefixes = frozenset(s[:k] for s in self.stops for k in range(1, len(s)))
        self._held = ""
        self.stopped = False

    def _first_match(self, buf: str) -> int:
        return min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        match = self._first_match(buf)
        undecided = next(
            (i for i in range(max(0, len(buf) - self._max_len + 1), len(buf))
             if buf[i:] in self._prefixes),
            len(buf),
        )
        if match >= 0 and match <= undecided:
            self.stopped = True
            self._held = ""
            return buf[:match]
        self._held = buf[undecided:]
        return buf[:undecided]

    def flush(self) -> str:
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        match = self._first_match(held)
        if match >= 0:
            self.stopped = True
            return held[:match]
        return held


def earliest_output(fed: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Reference for what may be out once `fed` has been pushed, and whether it stopped.

    Everything before the first position that could still begin a stop (the rest of the text
    being a proper prefix of one) is final, unless a stop already starts earlier or there.
    """
    stops = [s for s in stops if s]
    live = next((i for i in range(len(fed))
                 if any(len(fed) - i < len(s) and s.startswith(fed[i:]) for s in stops)),
                len(fed))
    first = min((fed.find(s) for s in stops if s in fed), default=len(fed) + 1)
    return (fed[:first], True) if first <= live else (fed[:live], False)


@st.composite
def overlapping_stops(draw: Any) -> tuple[list[str], list[str]]:
    """Stops and deltas over a tiny alphabet, so that occurrences overlap and nest often."""
    alphabet = draw(st.sampled_from(["ab", "abc", "a中😀"]))
    text = draw(st.text(alphabet=alphabet, max_size=40))
    stops = draw(st.lists(
        st.one_of(st.text(alphabet=alphabet, min_size=1, max_size=6), st.just("")),
        min_size=1, max_size=5))
    for _ in range(draw(st.integers(0, 3)) if text else 0):
        # Stops that occur in the text, or that the text's end leaves unfinished (so that
        # an earlier-starting stop is still live when the stream ends).
        i = draw(st.integers(max(0, len(text) - 6), len(text) - 1))
        if draw(st.booleans()):
            stops.append(text[i:draw(st.integers(i + 1, len(text)))])
        else:
            stops.append(text[i:] + draw(st.text(alphabet=alphabet, min_size=1, max_size=3)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    return stops, [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]


@SETTINGS
@given(case=overlapping_stops())
def test_stop_matcher_emits_as_early_as_possible(case: tuple[list[str], list[str]]) -> None:
    stops, chunks = case
    matcher, old = StopMatcher(stops), QuadraticStopMatcher(stops)
    fed = emitted = ""
    for chunk in chunks:
        delta = matcher.push(chunk)
        assert delta == old.push(chunk)
        fed += chunk
        emitted += delta
        assert (emitted, matcher.stopped) == earliest_output(fed, stops)
    tail = matcher.flush()
    assert tail == old.flush()
    assert emitted + tail == cut(fed, stops)
    assert matcher.stopped == old.stopped == any(s and s in fed for s in stops)


# --- StopMatcher: cost ----------------------------------------------------------------------
# The old matcher put every prefix of every stop in a set: one 100,000-character stop took
# 6-14 s and 4.7 GB. These bounds are generous; the quadratic version misses them by far.

TIME_LIMIT_S = 2.0
# tracemalloc peak while building the automaton, per stop character: about 17 measured (four
# 4-byte ints and a 1-byte flag per trie node). The old matcher: 5,000 at 10k characters.
BYTES_PER_STOP_CHAR = 80


def construction_peak(stops: Sequence[str]) -> int:
    """tracemalloc's peak while constructing a matcher for `stops`, in bytes."""
    tracemalloc.start()
    try:
        StopMatcher(stops)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_small_construction_is_linear() -> None:
    """Checked before building huge matchers, so that a quadratic version fails here, fast,
    rather than taking many GB (the old one needed about 20 GB for a 200,000-character stop)."""
    stops = [noise(random.Random(0), 10_000)]
    assert construction_peak(stops) < BYTES_PER_STOP_CHAR * 10_000


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def stream_in_tokens(matcher: StopMatcher, text: str, rng: random.Random) -> str:
    """Pushes `text` in deltas of 1-8 characters, as a detokenizer would; returns the output."""
    out, i = [], 0
    while i < len(text) and not matcher.stopped:
        n = rng.randint(1, 8)
        out.append(matcher.push(text[i:i + n]))
        i += n
    return "".join(out) + matcher.flush()


def noise(rng: random.Random, n: int) -> str:
    return "".join(rng.choices("ab", k=n))


@pytest.mark.parametrize("n_stops, stop_len", [(1, 10_000), (16, 2_000), (1, 100_000)])
@pytest.mark.slow  # stop strings of 10^4-10^5 characters
def test_stop_matcher_memory_is_linear(n_stops: int, stop_len: int) -> None:
    # Smaller than below: tracemalloc traces every int the construction makes, 20-30x slower.
    if n_stops * stop_len > 10_000:
        assert_small_construction_is_linear()
    stops = [noise(random.Random(i), stop_len) for i in range(n_stops)]
    assert construction_peak(stops) < BYTES_PER_STOP_CHAR * stop_len * n_stops


@pytest.mark.parametrize("n_stops, stop_len", [(1, 200_000), (16, 100_000)])
@pytest.mark.slow  # stop strings of 10^5 characters
def test_stop_matcher_long_stops_are_fast(n_stops: int, stop_len: int) -> None:
    assert_small_construction_is_linear()
    rng = random.Random(n_stops)
    stops = [noise(rng, stop_len) for _ in range(n_stops)]
    matcher, seconds = timed(lambda: StopMatcher(stops))
    assert seconds < TIME_LIMIT_S
    # About 1 MB of text over the stops' alphabet (failure links taken all the time), with an
    # almost-match of the last stop (held back whole, then released) before a real one.
    near_miss = stops[-1][:-1] + ("b" if stops[-1][-1] == "a" else "a")
    text = noise(rng, 300_000) + near_miss + noise(rng, 200_000) + stops[0] + noise(rng, 100_000)
    text += noise(rng, 1_000_000 - len(text))
    out, seconds = timed(lambda: stream_in_tokens(matcher, text, rng))
    assert seconds < TIME_LIMIT_S
    assert out == cut(text, stops) and matcher.stopped


class _CountingReads:
    """Wraps a sequence and counts the reads, i.e. the failure links followed."""

    def __init__(self, data: Sequence[int]) -> None:
        self.data, self.reads = data, 0

    def __getitem__(self, index: int) -> int:
        self.reads += 1
        return self.data[index]


@pytest.mark.parametrize("stop_len", [1_000, 100_000])
def test_stop_matcher_per_char_cost_is_flat(stop_len: int) -> None:
    # A long stop that almost matches at every position: the held text stays stop_len
    # characters long and every character ends one almost-match. Push one character at a time.
    stop, n = "a" * stop_len + "b", max(100_000, 2 * stop_len)
    if stop_len > 10_000:
        assert_small_construction_is_linear()
    matcher = StopMatcher([stop])
    fail = matcher._fail = _CountingReads(matcher._fail)  # type: ignore[assignment]
    out = []
    start = time.perf_counter()
    for i in range(n):
        out.append(matcher.push("a"))
        if i % 1_000 == 0:  # fail fast rather than wait for a slow version to finish
            assert time.perf_counter() - start < TIME_LIMIT_S
    assert out == [""] * stop_len + ["a"] * (n - stop_len)
    assert matcher.flush() == "a" * stop_len and not matcher.stopped
    # Each failure link shortens the live suffix and each character lengthens it by at most
    # one, so there are fewer failure steps than characters, whatever the stop's length.
    assert fail.reads <= n


def test_stop_matcher_cost_does_not_grow_with_the_number_of_stops() -> None:
    rng = random.Random(0)
    stops = [noise(rng, 100) for _ in range(1_000)]
    text = noise(rng, 100_000)
    matcher = StopMatcher(stops)
    out = []
    start = time.perf_counter()
    for i, char in enumerate(text):  # the old version scanned all 1,000 stops on every push
        out.append(matcher.push(char))
        if i % 1_000 == 0:
            assert time.perf_counter() - start < TIME_LIMIT_S
    assert "".join(out) + matcher.flush() == cut(text, stops)

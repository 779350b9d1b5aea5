"""The prefix cache: finished requests' keys/values reused by later requests sharing a prefix.

Exactness (greedy outputs equal to the cache off, and to the official ones), the reported
cached_input_token_count, eviction (least recently used first, running requests always win,
a full cache never makes a request wait), cancels, a planned budget and a growing CPU cache,
and the fixed-shape decoder's padding rows, which must not touch entries.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from transformers import DynamicCache

from chatglm3.engine.engine import PREFILL_BUCKETS, PREFILL_CHUNK, Engine
from chatglm3.text.messages import build_messages
from chatglm3.params import SamplingParams
from chatglm3.engine.prefix_cache import ALIGN, PrefixCache, as_ids, common_prefix
from chatglm3.text.tokenizer import Message
from conftest import consume_together

pytestmark = pytest.mark.slow  # long prompts

GREEDY = dict(temperature=0.0)
PER_TOKEN = 2048  # the tiny checkpoint in fp32: 2 (k, v) x 2 layers x 2 heads x 64 x 4 bytes
ROW = 32768 * PER_TOKEN  # one whole-context row


@pytest.fixture(scope="module")
def off(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer, prefix_cache=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def off_no_stop(tiny_model_fp32, no_stop_tokenizer):
    engine = Engine(tiny_model_fp32, no_stop_tokenizer, prefix_cache=False)
    yield engine
    engine.close()


@pytest.fixture
def make_engine(tiny_model_fp32, tokenizer):
    """Engines with the prefix cache on, closed after the test."""
    made: list[Engine] = []

    def make(tok=None, **kwargs) -> Engine:
        engine = Engine(tiny_model_fp32, tok or tokenizer, prefix_cache=True, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def run(engine: Engine, ids: list[int], n: int, **params):
    gen = engine.generate_ids(ids, SamplingParams(max_tokens=n, **(params or GREEDY)))
    gen.text()
    return gen.result


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 60000) for _ in range(n)]


def follow_up(engine: Engine, messages: list[Message], answer_ids: list[int],
              question: str) -> tuple[list[Message], list[int]]:
    """The next turn's messages and ids: the answer as text (as a client sends it back)."""
    messages = [*messages, Message("assistant", engine.tokenizer.decode(answer_ids)),
                Message("user", question)]
    return messages, engine.encode(messages)


# ---- the bookkeeping alone ----

def test_common_prefix_and_match() -> None:
    a, b = as_ids([1, 2, 3, 4]), as_ids([1, 2, 9])
    assert common_prefix(a, b) == 2 and common_prefix(a, a[:3]) == 3
    assert common_prefix(a, as_ids([7])) == 0
    cache = PrefixCache()
    cache.insert(0, as_ids(range(100)))
    cache.insert(1, as_ids([*range(50), *range(500, 600)]))
    assert cache.match(as_ids([*range(60), 7])) == (0, 60)
    assert cache.match(as_ids([*range(50), 500, 501])) == (1, 52)
    assert cache.match(as_ids([5, 6])) == (-1, 0)


def test_insert_drops_entries_the_new_one_covers() -> None:
    cache = PrefixCache()
    assert cache.insert(3, as_ids(range(40))) == []
    assert cache.insert(5, as_ids(range(80))) == [3]  # turn n+1 covers turn n
    assert cache.insert(6, as_ids(range(60))) == [6]  # already held by row 5: row 6 stays free
    assert cache.lru_rows() == [5]


# ---- exactness ----

def test_official_prompts_again_and_again(make_engine, reference) -> None:
    """The three official prompts, each run twice: the second run reuses all but the last
    (aligned) positions and still gives the official greedy tokens."""
    engine = make_engine()
    for p in reference["prompts"]:
        ids, expected = p["input_ids"], p["greedy_generate"]["new_ids"]
        first = run(engine, ids, len(expected))
        second = run(engine, ids, len(expected))
        assert first.output_ids == second.output_ids == expected
        assert first.cached_input_token_count == 0
        assert second.cached_input_token_count == (len(ids) - 1) // ALIGN * ALIGN
    assert run(engine, [64790, 64792, 100], 2).cached_input_token_count == 0


def test_official_chat_cases_turn_by_turn(make_engine, off, reference) -> None:
    """Each official chat case, its conversation replayed a turn at a time with the cache on
    (every turn a follow-up of the one before): the official transcript, and every turn
    equal to the cache off."""
    engine = make_engine()
    for case in reference["chat"]["cases"]:
        history = case["history"]
        user_turns = [i for i, m in enumerate(history) if m["role"] == "user"]
        for end in user_turns:  # the earlier turns, each as the question of its own request
            messages = build_messages(history[end]["content"], history=history[:end])
            budget = 12
            assert (run(engine, engine.encode(messages), budget).output_ids
                    == run(off, engine.encode(messages), budget).output_ids)
        messages = build_messages(case["query"], history=history)
        got = run(engine, engine.encode(messages), case["max_length"] - case["prompt_len"])
        raw = case["raw_generated_ids"]
        assert got.output_ids == (raw[:-1] if case["ended_on_stop_id"] else raw)
        if user_turns:
            assert got.cached_input_token_count > 0


def test_follow_up_turns_of_the_long_prompt(make_engine, off, reference) -> None:
    """The 6,118-token prompt (3 chunks), then two follow-up turns: the second reuses a prefix
    longer than a chunk that ends mid-way through one; the third sends a 2,600-token message
    after it, so the prefill from the cached prefix runs two chunks, the last one padded."""
    engine = make_engine()
    p = reference["prompts"][2]
    first = run(engine, p["input_ids"], 24)
    assert first.output_ids == p["greedy_generate"]["new_ids"]
    messages, ids = follow_up(engine, [Message("user", p["query"])], first.output_ids,
                              "Summarise section 2.")
    second, alone = run(engine, ids, 20), run(off, ids, 20)
    assert second.output_ids == alone.output_ids
    shared = common_prefix(as_ids(ids), as_ids(p["input_ids"] + first.output_ids))
    assert shared > PREFILL_CHUNK and shared % PREFILL_CHUNK
    assert second.cached_input_token_count == min(shared, len(ids) - 1) // ALIGN * ALIGN
    long_question = "第二个问题：请详细解释 the second point. " * 240
    messages, ids = follow_up(engine, messages, second.output_ids, long_question)
    assert len(ids) - second.input_token_count > PREFILL_CHUNK
    third, alone = run(engine, ids, 20), run(off, ids, 20)
    assert third.output_ids == alone.output_ids
    assert third.cached_input_token_count >= second.input_token_count // ALIGN * ALIGN


class PrefillShapes:
    """Records each prefill chunk's (query length, key length)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.pairs: list[tuple[int, int]] = []
        self._handle = model.register_forward_pre_hook(self._before, with_kwargs=True)

    def _before(self, _module, _args, kwargs: dict) -> None:
        cache = kwargs.get("cache")
        if isinstance(cache, DynamicCache):
            n = kwargs["input_ids"].shape[1]
            self.pairs.append((n, cache.get_seq_length() + n))

    def close(self) -> None:
        self._handle.remove()


def test_medium_follow_up_mid_chunk_and_bounded_shapes(make_engine, off, reference) -> None:
    """The 337-token conversation and a follow-up that starts mid-way through the first
    chunk: same tokens as with the cache off; prefill chunks are still PREFILL_BUCKETS long
    and start at multiples of ALIGN."""
    engine = make_engine()
    p = reference["prompts"][1]
    messages = build_messages(p["query"], history=p["history"])
    assert engine.encode(messages) == p["input_ids"]
    shapes = PrefillShapes(engine.model)
    try:
        first = run(engine, p["input_ids"], 16)
        for i, question in enumerate(["Why?", "再说一遍。" * 30, "And the tests? " * 200]):
            messages, ids = follow_up(engine, messages, first.output_ids, question)
            got, alone = run(engine, ids, 16), run(off, ids, 16)
            assert got.output_ids == alone.output_ids
            assert 0 < got.cached_input_token_count < len(ids)
            assert got.cached_input_token_count % ALIGN == 0
            first = got
    finally:
        shapes.close()
    # (Both engines' prefills are recorded: they share the model.)
    assert all(q in PREFILL_BUCKETS for q, _ in shapes.pairs)
    assert all((k - q) % ALIGN == 0 for q, k in shapes.pairs)
    assert any((k - q) % PREFILL_CHUNK for q, k in shapes.pairs)  # some began mid-chunk


# ---- cached_input_token_count, entries ----

def test_what_is_kept_after_a_stop_token_and_after_max_tokens(make_engine, reference) -> None:
    """A request that ended on a stop token keeps every id it was given and generated (the
    stop token's own keys/values were never computed, and it is no output id); one cut by
    max_tokens keeps all but its last token (never fed to the model)."""
    engine = make_engine()
    case = next(c for c in reference["chat"]["cases"] if c["ended_on_stop_id"])
    got = run(engine, case["prompt_ids"], 200)
    assert got.stop_reason == "stop_token"
    p = reference["prompts"][1]
    assert run(engine, p["input_ids"], 5).stop_reason == "max_tokens"
    lengths = sorted(n for _, n in engine.prefix_cache_entries())
    assert lengths == sorted([len(case["prompt_ids"]) + len(got.output_ids),
                              len(p["input_ids"]) + 4])


def test_shared_system_prompt_is_reused(make_engine, off) -> None:
    engine = make_engine()
    system = "You are a careful assistant. Answer with references. " * 20
    a = build_messages("What is a fox?", system_prompt=system)
    b = build_messages("Wie heißt du?", system_prompt=system)
    first = run(engine, engine.encode(a), 4)
    second = run(engine, engine.encode(b), 8)
    assert first.cached_input_token_count == 0
    shared = common_prefix(as_ids(engine.encode(a)), as_ids(engine.encode(b)))
    assert second.cached_input_token_count == shared // ALIGN * ALIGN > 200
    assert second.output_ids == run(off, engine.encode(b), 8).output_ids


# ---- eviction ----

def test_least_recently_used_goes_first(make_engine, no_stop_tokenizer) -> None:
    """4 planned rows, one request at a time: four entries fill them; a request reusing the
    oldest (A) makes B the least recently used, so B goes first, then C."""
    engine = make_engine(no_stop_tokenizer, max_batch=1, kv_budget_bytes=4 * ROW)
    assert engine.stats().kv_rows == 4 and engine.max_batch == 1
    prompts = {name: random_ids(40 + 10 * i, seed=i) for i, name in enumerate("ABCD")}
    for ids in prompts.values():
        assert run(engine, ids, 4).cached_input_token_count == 0
    lengths = {name: len(ids) + 3 for name, ids in prompts.items()}  # 4 tokens, 3 fed back
    assert [n for _, n in engine.prefix_cache_entries()] == [lengths[c] for c in "ABCD"]
    a2 = prompts["A"][:32] + random_ids(21, seed=9)
    assert run(engine, a2, 4).cached_input_token_count == 32  # A is used: B is the oldest now
    assert [n for _, n in engine.prefix_cache_entries()] == [lengths[c] for c in "CDA"] + [56]
    run(engine, random_ids(70, seed=10), 4)
    assert [n for _, n in engine.prefix_cache_entries()] == [lengths[c] for c in "DA"] + [56, 73]


def test_a_full_cache_never_makes_a_request_wait(make_engine, no_stop_tokenizer,
                                                 off_no_stop, monkeypatch) -> None:
    """2 planned rows, both holding entries: two new requests still run at once (the entries
    give way), and their outputs are exact."""
    engine = make_engine(no_stop_tokenizer, max_batch=2, kv_budget_bytes=2 * ROW)
    for seed in (1, 2):
        run(engine, random_ids(100, seed), 3)
    assert len(engine.prefix_cache_entries()) == 2
    most = []
    admit = engine.runner.admit

    def spy(r, row, moves) -> None:
        admit(r, row, moves)
        most.append(row + 1)

    monkeypatch.setattr(engine.runner, "admit", spy)
    ids = [random_ids(300, 3), random_ids(200, 4)]
    gens = [engine.generate_ids(x, SamplingParams(max_tokens=40, **GREEDY)) for x in ids]
    consume_together(gens)
    assert max(most) == 2  # both ran at once
    for gen, x in zip(gens, ids):
        assert gen.result.output_ids == run(off_no_stop, x, 40).output_ids
    assert sorted(n for _, n in engine.prefix_cache_entries()) == [239, 339]


def test_running_requests_keep_their_rows_when_entries_go(make_engine, no_stop_tokenizer,
                                                          off_no_stop) -> None:
    """A request that reused an entry keeps decoding exactly while that entry is evicted and
    its row taken by another request (a running request's keys/values live in its own row,
    never in an entry's)."""
    engine = make_engine(no_stop_tokenizer, max_batch=2, kv_budget_bytes=2 * ROW)
    doc = random_ids(700, seed=5)
    run(engine, doc, 3)
    run(engine, random_ids(50, seed=6), 3)  # a second entry: both rows are full
    reuser = engine.generate_ids(doc + random_ids(30, seed=7),
                                 SamplingParams(max_tokens=60, **GREEDY))
    it = iter(reuser)
    next(it)  # running
    other = run(engine, random_ids(400, seed=8), 5)  # needs the other row: evicts
    rest = list(it)
    assert reuser.result.cached_input_token_count == 688
    expected = run(off_no_stop, doc + random_ids(30, seed=7), 60).output_ids
    assert reuser.result.output_ids == expected and rest
    assert other.output_ids == run(off_no_stop, random_ids(400, seed=8), 5).output_ids


# ---- cancels ----

class CancelAfter:
    """Cancels the next request from inside the worker's forward pass number `n` of a kind
    (prefill: with a DynamicCache; decode: without), so the engine sees the cancel before its
    next step: a deterministic point."""

    def __init__(self, model: torch.nn.Module, kind: str, n: int) -> None:
        self.kind, self.n, self.seen = kind, n, 0
        self.gen = None
        self._armed = threading.Event()
        self._handle = model.register_forward_pre_hook(self._before, with_kwargs=True)

    def start(self, engine: Engine, ids: list[int], max_tokens: int):
        self.gen = engine.generate_ids(ids, SamplingParams(max_tokens=max_tokens, **GREEDY))
        self._armed.set()
        return self.gen

    def _before(self, _module, _args, kwargs: dict) -> None:
        assert self._armed.wait(30)  # the worker waits here until `gen` is known
        prefill = isinstance(kwargs.get("cache"), DynamicCache)
        if prefill == (self.kind == "prefill"):
            self.seen += 1
            if self.seen == self.n:
                self.gen.cancel()

    def close(self) -> None:
        self._handle.remove()


def test_cancel_while_decoding_after_a_hit(make_engine, no_stop_tokenizer,
                                           off_no_stop) -> None:
    """A request reusing an entry is cancelled after 5 decoding steps: the entry stays, and
    what the cancelled one computed (its prompt and the 5 tokens fed back) is kept too."""
    engine = make_engine(no_stop_tokenizer)
    doc = random_ids(500, seed=11)
    run(engine, doc, 3)
    ids = doc + random_ids(40, seed=12)
    cancel = CancelAfter(engine.model, "decode", 5)
    try:
        gen = cancel.start(engine, ids, 500)
        gen.text()
    finally:
        cancel.close()
    r = gen.result
    assert r.stop_reason == "cancelled" and r.cached_input_token_count == 496
    assert len(r.output_ids) == 6
    assert sorted(n for _, n in engine.prefix_cache_entries()) == [502, len(ids) + 5]
    again = run(engine, ids + r.output_ids[:5] + [300], 10)
    assert again.cached_input_token_count == (len(ids) + 5) // ALIGN * ALIGN
    assert again.output_ids == run(off_no_stop, ids + r.output_ids[:5] + [300], 10).output_ids


def test_cancel_while_prefilling_after_a_hit(make_engine, no_stop_tokenizer,
                                             off_no_stop) -> None:
    """A request reusing an entry with 5,000 more tokens to prefill is cancelled in its first
    chunk: the positions prefilled so far (the reused ones and one chunk) become an entry."""
    engine = make_engine(no_stop_tokenizer)
    doc = random_ids(1000, seed=13)
    run(engine, doc, 2)
    ids = doc + random_ids(5000, seed=14)
    cancel = CancelAfter(engine.model, "prefill", 1)
    try:
        gen = cancel.start(engine, ids, 5)
        assert gen.text() == ""
    finally:
        cancel.close()
    assert gen.result.stop_reason == "cancelled" and gen.result.cached_input_token_count == 992
    assert sorted(n for _, n in engine.prefix_cache_entries()) == [1001, 992 + PREFILL_CHUNK]
    again = run(engine, ids, 6)
    assert again.cached_input_token_count == 992 + PREFILL_CHUNK
    assert again.output_ids == run(off_no_stop, ids, 6).output_ids


# ---- budgets, growth, fixed shapes ----

@pytest.mark.parametrize("setup", ["planned", "growing"])
def test_concurrent_conversations(make_engine, off, reference, setup: str) -> None:
    """Three conversations at once, each a follow-up of an official prompt, on 3 planned rows
    (max_batch 2: one row is for entries alone) or a growing cache: exact, and each hits."""
    kwargs = dict(max_batch=2, kv_budget_bytes=3 * ROW) if setup == "planned" else {}
    engine = make_engine(**kwargs)
    assert engine.stats().kv_growable == (setup == "growing")
    prompts = reference["prompts"]
    firsts = [run(engine, p["input_ids"], 16) for p in prompts]
    follow = [follow_up(engine, build_messages(p["query"], history=p["history"]),
                        f.output_ids, "Go on.")[1] for p, f in zip(prompts, firsts)]
    gens = [engine.generate_ids(ids, SamplingParams(max_tokens=12, **GREEDY)) for ids in follow]
    consume_together(gens)
    for gen, ids in zip(gens, follow):
        assert gen.result.output_ids == run(off, ids, 12).output_ids
    # The random model's answers do not start with the "\n" an assistant turn opens with,
    # so a follow-up shares its conversation's prompt, not the answer: the 8-token one
    # shares too little to reuse.
    hits = [g.result.cached_input_token_count for g in gens]
    assert hits[0] == 0
    if setup == "growing":  # room for every entry
        assert hits[1:] == [(len(p["input_ids"]) // ALIGN * ALIGN) for p in prompts[1:]]
    assert len(engine.prefix_cache_entries()) <= engine.stats().kv_rows


def test_padding_rows_leave_entries_intact(make_engine, no_stop_tokenizer, off_no_stop) -> None:
    """Fixed-shape decoding pads a batch of 3 to 4 rows; the 4th holds an entry: its keys and
    values must come out unchanged (the padding row writes to the scratch row, the plan's
    fifth), and reusing it must stay exact."""
    engine = make_engine(no_stop_tokenizer, max_batch=4, kv_budget_bytes=5 * ROW,
                         decode_step="fixed")
    assert engine.max_batch == 4 and engine.rows.scratch == 4 and engine.rows.limit == 4
    prompts = [random_ids(60 + 20 * i, seed=20 + i) for i in range(4)]
    for ids in prompts:
        run(engine, ids, 3)
    (row, n), = [e for e in engine.prefix_cache_entries() if e[1] == 122]  # prompts[3]
    snapshot = [k[row, :, :n].clone() for k in engine.runner.kv.keys]
    # Three at once (decoding pads them to 4 rows): the three oldest entries give way, the
    # newest (prompts[3]) stays, in row 3: a padding row while the three decode.
    gens = [engine.generate_ids(random_ids(30, seed=30 + i), SamplingParams(max_tokens=20,
                                                                          **GREEDY))
            for i in range(3)]
    consume_together(gens)
    entries = dict((n, row) for row, n in engine.prefix_cache_entries())
    assert entries[122] == 3
    assert all(torch.equal(k[3, :, :122], s) for k, s in zip(engine.runner.kv.keys, snapshot))
    ids = prompts[3] + [7, 8, 9]
    got = run(engine, ids, 8)
    assert got.cached_input_token_count == 112
    assert got.output_ids == run(off_no_stop, ids, 8).output_ids


def test_default_is_on_only_for_cuda(tiny_model_fp32, tokenizer) -> None:
    engine = Engine(tiny_model_fp32, tokenizer)
    try:
        assert not engine.prefix_cache and engine.prefix_cache_entries() == []
        assert run(engine, random_ids(40, 1), 2).cached_input_token_count == 0
    finally:
        engine.close()


def test_warm_up_clears_the_cache(make_engine, no_stop_tokenizer) -> None:
    engine = make_engine(no_stop_tokenizer, decode_step="fixed")
    run(engine, random_ids(40, 1), 2)
    assert engine.prefix_cache_entries()
    engine.warm_up(prefill=False)
    assert engine.prefix_cache_entries() == []


# ---- predict.py ----

def test_predictor_records_the_metric(make_engine, monkeypatch) -> None:
    from predict import Predictor

    p = Predictor()
    p.engine = make_engine()
    metrics: dict = {}
    monkeypatch.setattr(p, "record_metric", lambda k, v: metrics.__setitem__(k, v), raising=False)
    ids = random_ids(80, seed=3)
    for last, expected in ((0, 0), (1, 80)):
        gen = p.engine.generate_ids(ids + [last], SamplingParams(max_tokens=2, **GREEDY))
        "".join(p._stream(gen))
        assert metrics["cached_input_token_count"] == expected


def test_env_switch(monkeypatch) -> None:
    """CHATGLM3_PREFIX_CACHE=0 turns the cache off in setup; unset = the engine's default."""
    import predict

    seen = {}

    class Stop(Exception):
        pass

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    from chatglm3.engine.engine import Engine

    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    monkeypatch.setattr(predict.coglet_cancel, "install", lambda: None)
    monkeypatch.setattr(predict.coglet_cancel, "check_coglet_version", lambda: None)
    from chatglm3 import startup

    monkeypatch.setattr(startup, "resolve_weights", lambda *a, **k: "/nowhere")
    monkeypatch.setenv("CHATGLM3_DEVICE", "cpu")
    for value, expected in (("0", False), ("1", True), ("", None)):
        monkeypatch.setenv("CHATGLM3_PREFIX_CACHE", value)
        with pytest.raises(Stop):
            predict.Predictor().setup()
        assert seen["prefix_cache"] is expected

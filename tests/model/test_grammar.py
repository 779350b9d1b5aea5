"""Structured output (chatglm3/model/grammar.py) on the random tiny checkpoint: whatever the
weights, an answer held to a JSON Schema parses and validates, a choice is one of the choices,
a regex matches whole; greedy and sampled; beside unconstrained requests in one batch, whose
answers do not change. The grammar's view of the vocabulary is checked against the tokenizer."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from chatglm3.engine.engine import Engine
from chatglm3.errors import InputError
from chatglm3.model.grammar import _Vocabulary
from chatglm3.params import SamplingParams, SettingsError, Structured

from helpers.engines import held
from helpers.schemas import CORPUS

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["revenue", "auditor", "currency", "profitable"],
          "properties": {"revenue": {"type": "integer", "minimum": 0, "maximum": 10**6},
                         "auditor": {"enum": ["KPMG", "Deloitte", "普华永道"]},
                         "currency": {"type": "string", "maxLength": 3},
                         "profitable": {"type": "boolean"}}}
PROMPT = [64790, 64792, 34, 4567, 11, 887, 30910]


@pytest.fixture(scope="module")
def engine(tiny_model_fp32, tokenizer):
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=4)
    yield engine
    engine.close()


def run(engine: Engine, structured: Structured | None, **kw):
    g = engine.generate_ids(PROMPT, SamplingParams(**{"max_tokens": 64, "temperature": 0,
                                                      "structured": structured, **kw}))
    g.text()
    return g.result


def test_every_token_is_described_by_the_bytes_the_tokenizer_decodes(tokenizer) -> None:
    vocab = _Vocabulary(tokenizer)
    sp = tokenizer.sp
    anchor = sp.piece_to_id("a")
    special = set(vocab.special_token_ids)
    assert len(vocab.tokens) == tokenizer.vocab_size
    assert set(range(tokenizer.n_pieces, tokenizer.vocab_size)) <= special
    for i, raw in enumerate(vocab.tokens):
        if i in special:
            assert raw == b""
        elif sp.is_byte(i):
            assert len(raw) == 1 and raw[0] == int(sp.id_to_piece(i)[3:-1], 16)
        else:  # mid-text (after "a"), where no dummy-prefix rule applies
            assert raw.decode() == tokenizer.decode([anchor, i])[1:], i
    rng = random.Random(0)
    chars = 'ab {}":,[]\n\t0123456789你好🦊é'
    for _ in range(500):
        text = "".join(rng.choice(chars) for _ in range(rng.randrange(0, 16)))
        assert b"".join(vocab.tokens[t] for t in vocab(text)) == text.encode()


@pytest.mark.parametrize("sampling", [
    pytest.param({}, id="greedy"),
    pytest.param({"temperature": 1.0, "top_p": 1.0}, id="sampled", marks=pytest.mark.slow)])
def test_json_schema_answers_parse_and_validate(engine: Engine, sampling: dict) -> None:
    for seed in range(3):
        kw = {**sampling, "seed": seed} if sampling else sampling
        r = run(engine, Structured("json", json.dumps(SCHEMA)), **kw)
        assert r.stop_reason == "stop_token", r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)
        if not sampling:
            break


def test_any_object_choice_and_regex(engine: Engine) -> None:
    assert isinstance(json.loads(run(engine, Structured("json", '{"type": "object"}')).text),
                      dict)
    choices = ("positive", "negative", "中性 neutral")
    for seed in range(4):
        r = run(engine, Structured("choice", choices=choices), temperature=1.0, top_p=1.0,
                seed=seed)
        assert r.text in choices and r.stop_reason == "stop_token"
    r = run(engine, Structured("regex", r"[A-Z]{2}-[0-9]{3}"))
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r.text) and r.stop_reason == "stop_token"


def test_a_cut_answer_says_length_and_min_tokens_gives_way(engine: Engine) -> None:
    r = run(engine, Structured("json", json.dumps(SCHEMA)), max_tokens=3)
    assert r.stop_reason == "max_tokens" and len(r.output_ids) == 3
    with pytest.raises(ValueError):
        json.loads(r.text)
    # min_tokens holds back the end tokens; where the grammar allows nothing else, it wins
    r = run(engine, Structured("choice", choices=("ok",)), min_tokens=10)
    assert r.text == "ok" and r.stop_reason == "stop_token"


def test_constrained_and_free_requests_share_a_batch(engine: Engine) -> None:
    free = [PROMPT + [100 + i] for i in range(2)]
    alone = [engine.generate_ids(p, SamplingParams(max_tokens=12, temperature=0)) for p in free]
    want = [(g.text(), g.result.output_ids) for g in alone]
    with held(engine):
        gens = [engine.generate_ids(p, SamplingParams(max_tokens=12, temperature=0))
                for p in free]
        gens.append(engine.generate_ids(PROMPT, SamplingParams(
            max_tokens=64, temperature=0, structured=Structured("json", json.dumps(SCHEMA)))))
    got = [(g.text(), g.result.output_ids) for g in gens]
    assert got[:2] == want
    jsonschema.validate(json.loads(got[2][0]), SCHEMA)


def test_bad_constraints_are_refused_before_queueing(engine: Engine) -> None:
    with pytest.raises(InputError, match="structured: the regex cannot be compiled") as e:
        engine.generate_ids(PROMPT, SamplingParams(structured=Structured("regex", "[a-")))
    assert e.value.field == "structured"
    with pytest.raises(InputError, match="structured:"):
        engine.generate_ids(PROMPT, SamplingParams(structured=Structured(
            "json", '{"type": "bogus"}')))
    for bad, words in ((Structured("json", "{"), "not valid JSON"),
                       (Structured("json", "[1]"), "is an object"),
                       (Structured("choice"), "at least one"),
                       (Structured("yaml", "x"), "kind must be")):
        with pytest.raises(SettingsError, match=words):
            SamplingParams(structured=bad)
    assert engine.stats().waiting == 0 and engine.stats().running == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_answer_to_the_corpus_parses_and_validates(engine: Engine, name: str) -> None:
    """Greedy and sampled with many seeds: 100% of the answers parse, validate and end."""
    schema = CORPUS[name]
    runs = [{}] + [{"temperature": 1.0, "top_p": 1.0, "seed": s} for s in range(8)]
    for kw in runs:
        r = run(engine, Structured("json", json.dumps(schema, ensure_ascii=False)),
                max_tokens=160, **kw)
        assert r.stop_reason == "stop_token", (kw, r.text)
        jsonschema.validate(json.loads(r.text), schema)


def test_a_batch_of_8_mixing_constrained_and_free_requests(tiny_model_fp32, tokenizer) -> None:
    """Each of 8 requests decoding together gets the answer it gets alone."""
    engine = Engine(tiny_model_fp32, tokenizer, max_batch=8)
    try:
        shapes = [None, Structured("json", json.dumps(CORPUS["flat report"])), None,
                  Structured("choice", choices=("是", "否")), None,
                  Structured("regex", r"[0-9]{3}"), None,
                  Structured("json", json.dumps(CORPUS["anyOf"]))]
        params = [SamplingParams(max_tokens=24, temperature=0.9, seed=i, structured=s)
                  for i, s in enumerate(shapes)]
        prompts = [PROMPT + [200 + i] for i in range(8)]
        alone = []
        for p, q in zip(prompts, params):
            g = engine.generate_ids(p, q)
            alone.append((g.text(), g.result.output_ids))
        with held(engine):
            gens = [engine.generate_ids(p, q) for p, q in zip(prompts, params)]
        assert [(g.text(), g.result.output_ids) for g in gens] == alone
        assert engine.stats().decode_steps > 0
    finally:
        engine.close()

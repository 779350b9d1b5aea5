"""predict.py stays inside what `cog build`'s static schema parser reads, and says what chatglm3 means.

cog 0.23.1 writes the image's schema without importing predict.py (scripts/cog_static.py restates
its rules): a name in le=, an imported default or a computed decorator argument would silently
give the image another schema than the one the server tests use, or fail the build.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from chatglm3 import params
from chatglm3.text import messages
from chatglm3.engine.engine import DEFAULT_MAX_BATCH

from conftest import ROOT

PREDICT = ROOT / "predict.py"


@pytest.fixture(scope="module")
def static():
    spec = importlib.util.spec_from_file_location("cog_static", ROOT / "scripts" / "cog_static.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cog_static"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predictor(static):
    return static.read_predictor(PREDICT)


def inputs(predictor) -> dict:
    return {item.name: item.keywords for item in predictor.inputs}


def test_predict_py_is_inside_the_subset(static, predictor) -> None:
    assert static.problems(PREDICT) == []
    assert predictor.concurrency_max == 8 and predictor.is_async and predictor.streaming
    for item in predictor.inputs:
        assert item.keywords.keys() >= {"description"}, item.name
        assert item.keywords == item.python, item.name  # read exactly as Python means them


def test_literals_equal_chatglm3s_defaults_and_limits(predictor) -> None:
    kw = inputs(predictor)
    # Every sampling setting the declarations give the CLI is a Cog input too (logprobs has no
    # text output to report on), with the declared default and bounds.
    declared = [f for f in params.FIELDS if f.cli]
    assert {f.name for f in declared} <= kw.keys()
    for f in declared:
        assert kw[f.name]["default"] == f.default, f.name
        assert kw[f.name].get("ge") == f.low, f.name
        assert kw[f.name].get("le") == f.high, f.name
        assert getattr(params.SamplingParams(), f.name) == f.default, f.name
    assert int(float(params.MAX_SEED)) == params.MAX_SEED  # exact in the schema's float64
    assert kw["history"]["max_length"] == messages.MAX_HISTORY_CHARS
    # room for the most stop strings at the longest length, every character escaped
    most = params.MAX_STOP_SEQUENCES * (2 * params.MAX_STOP_LENGTH + 1)
    assert most <= kw["stop_sequences"]["max_length"] <= 4 * most
    assert predictor.concurrency_max == DEFAULT_MAX_BATCH
    # the numbers the descriptions state are the enforced ones
    assert f"{params.CONTEXT}-token" in kw["max_tokens"]["description"]
    assert f"below {params.GREEDY_BELOW_TEMPERATURE:g}" in kw["temperature"]["description"]
    assert (f"At most {messages.MAX_HISTORY_CHARS} characters and "
            f"{messages.MAX_HISTORY_DEPTH} levels") in kw["history"]["description"]
    assert (f"At most {params.MAX_STOP_SEQUENCES} strings of at most "
            f"{params.MAX_STOP_LENGTH} characters") in kw["stop_sequences"]["description"]
    assert kw["json_schema"]["max_length"] == params.MAX_GRAMMAR_CHARS
    assert f"At most {params.MAX_GRAMMAR_CHARS} characters" in kw["json_schema"]["description"]


def test_declarations_are_samplingparams_fields() -> None:
    """Each declared setting is a SamplingParams field, and each numeric field is declared."""
    from dataclasses import fields

    # The others are lists and maps the API reads itself (stop strings, token settings)
    assert {f.name for f in params.FIELDS} == {f.name for f in fields(params.SamplingParams)} - {
        "stop", "logit_bias", "stop_token_ids", "allowed_token_ids", "ignore_eos", "structured"}


def test_committed_schema_carries_these_literals(predictor) -> None:
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    spec = schema["components"]["schemas"]["Input"]
    props = spec["properties"]
    assert list(props) == [item.name for item in predictor.inputs]
    required = [item.name for item in predictor.inputs
                if "default" not in item.keywords
                or (item.keywords["default"] is None and not item.annotation.startswith("Optional"))]
    assert spec["required"] == required == ["prompt"]
    names = {"default": "default", "description": "description", "ge": "minimum",
             "le": "maximum", "max_length": "maxLength"}
    for item in predictor.inputs:
        prop = props[item.name]
        assert prop["x-order"] == item.order
        for key, value in item.keywords.items():
            assert prop[names[key]] == value, (item.name, key)
        assert {names[k] for k in item.keywords} >= set(prop) - {"x-order", "title", "type",
                                                                "nullable"}, item.name


# Each variant breaks one rule of cog build's parser; the check must name what breaks.
BROKEN = [
    ("@cog.concurrent(max=8)", "@cog.concurrent(max=BATCH)", "BATCH = 8\n", "@cog.concurrent"),
    ("le=32768", "le=CONTEXT", "CONTEXT = 32768\n", "max_tokens: le="),
    ("default=0.8, ge=0.0, le=5.0", "default=DEFAULT_TEMPERATURE, ge=0.0, le=5.0",
     "from chatglm3.params import DEFAULT_TEMPERATURE\n", "temperature: default="),
    ("le=9007199254740991", "le=2**53 - 1", "", "seed: le="),
    ("le=9007199254740991", "le=9007199254740993", "", "seed: le="),  # not exact in float64
    ('description="Keep only the k most likely tokens; 0 = off."',
     'description="Keep only the\\tk most likely tokens; 0 = off."', "", "top_k: description="),
    ('description="Keep only the k most likely tokens; 0 = off."',
     'description=f"Keep only the k most likely tokens; {0} = off."', "", "top_k: description="),
    ('description="Keep only the k most likely tokens; 0 = off."',
     'description=("Keep only the k most likely tokens; "\n"0 = off.")', "",
     "top_k: description="),
    ('description="Keep only the k most likely tokens; 0 = off."',
     'description="Keep only the k most likely " "tokens; 0 = off."', "",
     "top_k: description="),
    ('description="Keep only the k most likely tokens; 0 = off."',
     'description=("Keep only the k most likely tokens; 0 = off.")', "", "top_k: description="),
    ('description="Keep only the k most likely tokens; 0 = off."',
     'description=TOP_K_HELP', 'TOP_K_HELP = ("Keep only the k " "most likely tokens")\n',
     "top_k: description="),
    ('prompt: str = Input(description="The user\'s message.")',
     'prompt: str = Input("The user\'s message.")', "", "prompt: positional"),
    ("default=2048, ge=1", "default=2_048, ge=1", "", "max_tokens: default="),
]


@pytest.mark.parametrize("old, new, prelude, named", BROKEN)
def test_each_rule_break_is_named(static, tmp_path, old, new, prelude, named) -> None:
    source = PREDICT.read_text()
    assert old in source, old
    broken = source.replace(old, new, 1)
    broken = broken.replace("\nclass Predictor", f"\n{prelude}\nclass Predictor", 1)
    path = tmp_path / "predict.py"
    path.write_text(broken)
    found = static.problems(path)
    assert any(p.startswith(named) for p in found), found


def test_module_constants_resolve_as_cog_reads_them(static, tmp_path) -> None:
    """A description or default held by a predict.py constant bound to one plain literal is
    read (cog's module scope); a raw string is taken as written, exactly as Python does."""
    source = PREDICT.read_text().replace(
        'description="Keep only the k most likely tokens; 0 = off."', "description=TOP_K_HELP")
    source = source.replace("default=2048, ge=1", "default=MAX_TOKENS, ge=1")
    source = source.replace("\nclass Predictor", '\nTOP_K_HELP = r"Top \\k; 0 = off."\n'
                            "MAX_TOKENS: int = 2048\n\nclass Predictor", 1)
    path = tmp_path / "predict.py"
    path.write_text(source)
    assert static.problems(path) == []
    kw = {i.name: i.keywords for i in static.read_predictor(path).inputs}
    assert kw["top_k"]["description"] == "Top \\k; 0 = off." and kw["max_tokens"]["default"] == 2048


@pytest.mark.parametrize("raw, expected", [
    ('"plain"', "plain"), ("'single'", "single"), ('"""triple"""', "triple"),
    ('r"a\\nb"', "a\\nb"), ('"a\\nb"', "a\\nb"),  # raw text between the quotes: no escapes
    ('f"x{y}"', None), ('b"x"', None), ('R"x"', None), ('u"x"', None),
])
def test_string_rule(static, raw, expected) -> None:
    got = static.go_string(raw)
    assert (None if got is static.UNRESOLVED else got) == expected


@pytest.mark.parametrize("raw, expected", [
    ("32768", 32768.0), ("0.01", 0.01), ("1e-4", 1e-4), ("-1", -1.0), (" 5.0 ", 5.0),
    ("CONTEXT", None), ("2**15", None), ("1_000", None), ("(5)", None),
])
def test_number_rule(static, raw, expected) -> None:
    got = static.go_number(raw)
    assert (None if got is static.UNRESOLVED else got) == expected

"""Load-time settings: one definition each, read from the environment (predict.py) or from
flags (the CLI), with errors that name the variable or flag."""

from __future__ import annotations

import argparse
import inspect

import pytest

from chatglm3 import cli
from chatglm3.settings import OPTIONS, PREFILL_CHUNK, Settings, add_arguments


def test_environment_sets_each_field() -> None:
    env = {"CHATGLM3_DEVICE": "cpu", "CHATGLM3_DTYPE": "float32", "CHATGLM3_DECODE_STEP": "eager",
           "CHATGLM3_KV_BUDGET": "1GiB", "CHATGLM3_PREFIX_CACHE": "on",
           "COG_MAX_CONCURRENCY": "4", "CHATGLM3_PREFILL_BUDGET": "256",
           "CHATGLM3_QUANTIZE": "int8"}
    assert Settings.from_env(env) == Settings("cpu", "float32", "eager", 2**30, True, 4, 256,
                                              "int8")
    assert Settings.from_env({}, max_batch=3) == Settings(max_batch=3)  # Cog's declared max
    assert Settings.from_env({"CHATGLM3_MAX_BATCH": "2", "COG_MAX_CONCURRENCY": "5"}).max_batch == 2
    assert Settings.from_env({"CHATGLM3_PREFIX_CACHE": " "}).prefix_cache is None  # empty: unset


@pytest.mark.parametrize(("env", "fragment"), [
    ({"CHATGLM3_DEVICE": "tpu"}, "CHATGLM3_DEVICE: expected one of auto, cpu, cuda"),
    ({"CHATGLM3_QUANTIZE": "int3"}, "CHATGLM3_QUANTIZE: expected one of none, int8, int4"),
    ({"CHATGLM3_KV_BUDGET": "lots"}, "CHATGLM3_KV_BUDGET: KV budget: expected a size"),
    ({"CHATGLM3_PREFIX_CACHE": "maybe"}, "CHATGLM3_PREFIX_CACHE: expected 0 or 1"),
    ({"COG_MAX_CONCURRENCY": "0"}, "COG_MAX_CONCURRENCY: expected an integer of at least 1"),
    ({"CHATGLM3_PREFILL_BUDGET": str(PREFILL_CHUNK + 1)},
     f"CHATGLM3_PREFILL_BUDGET: expected an integer from 1 to {PREFILL_CHUNK}"),
])
def test_bad_environment_names_the_variable(env: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Settings.from_env(env)


def test_flags_come_from_the_same_definitions() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings[0] != "-h"}
    assert flags == {opt.flag for opt in OPTIONS}
    args = parser.parse_args(["--device", "cpu", "--kv-budget", "8e9", "--no-prefix-cache",
                              "--max-batch", "2"])
    assert Settings.from_args(args) == Settings(device="cpu", kv_budget_bytes=8 * 10**9,
                                                prefix_cache=False, max_batch=2)
    assert Settings.from_args(parser.parse_args([])) == Settings()
    # the CLI's generate and chat take exactly these load-time flags
    out = cli.build_parser().parse_args(["generate", "--prompt", "x", "--prefill-budget", "64"])
    assert Settings.from_args(out).prefill_budget == 64
    # with an environment: its variables, under the flags
    env = {"CHATGLM3_DEVICE": "cuda", "CHATGLM3_MAX_BATCH": "3", "CHATGLM3_QUANTIZE": "int8"}
    assert Settings.from_args(args, env) == Settings(device="cpu", kv_budget_bytes=8 * 10**9,
                                                     prefix_cache=False, max_batch=2,
                                                     quantize="int8")
    with pytest.raises(ValueError, match="CHATGLM3_DEVICE"):
        Settings.from_args(parser.parse_args([]), {"CHATGLM3_DEVICE": "tpu"})


def test_every_setting_reaches_the_engine() -> None:
    from chatglm3.engine.engine import Engine

    accepted = set(inspect.signature(Engine.__init__).parameters) | set(
        inspect.signature(Engine.from_pretrained).parameters)
    assert set(Settings().engine_kwargs()) <= accepted

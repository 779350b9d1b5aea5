"""What is chosen once, at load: device, dtype, decoding step, KV budget, prefix cache, batch
size and prefill budget. One definition per setting (`OPTIONS`): its environment variable (read
here alone: `Settings.from_env`), its command-line flag (`add_arguments`), its choices, default
and parser; predict.py, the CLI and `Engine.from_pretrained(**settings.engine_kwargs())` all
go through it. No torch import: the CLI builds its parser and checks its flags before loading.

A new load-time choice is one more `Option` and one more field.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float16", "bfloat16", "float32")
DECODE_STEPS = ("auto", "eager", "graphs")
QUANTIZE_MODES = ("none", "int8", "int4")  # quantize.MODES, spelled out: no torch import here
DEFAULT_MAX_BATCH = 8
PREFILL_CHUNK = 2048  # prompt tokens per forward pass: bounds activation memory, allows cancel
# Prompt tokens per step while other requests decode (scheduler.py; docs/benchmarks.md "Scheduling"): a
# running stream waits for at most this many prompt tokens between two of its tokens, a quarter
# of a whole chunk; a PREFILL_BUCKETS length, so no chunk is padded.
PREFILL_BUDGET = 512


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true"):
        raise ValueError(f"expected 0 or 1, got {text!r}")
    return value in ("1", "on", "true")


def _positive(most: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1 or (most is not None and value > most):
            limit = f"from 1 to {most}" if most else "of at least 1"
            raise ValueError(f"expected an integer {limit}, got {text!r}")
        return value
    return parse


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'7GiB', '7.5 GB', '512MiB', '8e9', '1073741824' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"KV budget: expected a size such as 7GiB, 7.5GB or 8e9 bytes, "
                         f"got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Option:
    field: str
    env: tuple[str, ...]  # variables read, first set one wins
    flag: str
    help: str
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None  # text -> value (None: the text itself)
    metavar: str | None = None
    const: str | None = None  # a flag without a value that sets this text


OPTIONS = (
    Option("device", ("CHATGLM3_DEVICE",), "--device", choices=DEVICES,
           help="where to run (default auto: a usable CUDA GPU, else the CPU)"),
    Option("dtype", ("CHATGLM3_DTYPE",), "--dtype", choices=DTYPES,
           help="dtype of weights and compute (default auto: float16 on a GPU, as the "
                "checkpoint is stored; bfloat16 on the CPU)"),
    Option("decode_step", ("CHATGLM3_DECODE_STEP",), "--decode-step", choices=DECODE_STEPS,
           help="graphs: replay each decoding step as a CUDA graph; eager: launch it from "
                "Python (default auto: graphs on a GPU, else eager)"),
    Option("kv_budget_bytes", ("CHATGLM3_KV_BUDGET",), "--kv-budget", metavar="BYTES",
           parse=parse_bytes,
           help="size of the KV cache, planned once (e.g. 7GiB, 8e9; default: on a GPU, what "
                "the memory left after the weights allows; on the CPU it grows as needed)"),
    Option("quantize", ("CHATGLM3_QUANTIZE",), "--quantize", choices=QUANTIZE_MODES,
           help="weight-only quantization of the linear layers at load: int8 halves the "
                "weights' memory, int4 (groups of 128; bfloat16 on a GPU) takes ~30%% of it; "
                "both decode faster on a CPU (default none: the weights as stored)"),
    Option("prefix_cache", ("CHATGLM3_PREFIX_CACHE",), "--no-prefix-cache", const="0",
           parse=_switch,
           help="do not keep finished requests' keys/values for later ones sharing a prefix "
                "(default: kept with a GPU, not on the CPU; CHATGLM3_PREFIX_CACHE=1 keeps them "
                "on a CPU)"),
    Option("max_batch", ("CHATGLM3_MAX_BATCH", "COG_MAX_CONCURRENCY"), "--max-batch",
           metavar="N", parse=_positive(),
           help=f"requests decoding at once (default {DEFAULT_MAX_BATCH}; Cog: "
                "COG_MAX_CONCURRENCY, which cog build sets from @cog.concurrent)"),
    Option("prefill_budget", ("CHATGLM3_PREFILL_BUDGET",), "--prefill-budget", metavar="N",
           parse=_positive(PREFILL_CHUNK),
           help=f"tokens per step while other requests decode (on a CPU their decoding "
                f"tokens count too), 1-{PREFILL_CHUNK} (default {PREFILL_BUDGET}): lower = "
                "smoother streams beside long prompts"),
)


@dataclass
class Settings:
    device: str = "auto"
    dtype: str = "auto"
    decode_step: str = "auto"
    kv_budget_bytes: int | None = None
    prefix_cache: bool | None = None  # None: on with a GPU, off on a CPU
    max_batch: int = DEFAULT_MAX_BATCH
    prefill_budget: int = PREFILL_BUDGET
    quantize: str = "none"  # none | int8 | int4 (quantize.py)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **defaults: Any) -> "Settings":
        """The settings the environment sets (empty = unset), over `defaults`; a bad value
        raises ValueError naming the variable."""
        environ = os.environ if environ is None else environ
        values = dict(defaults)
        for opt in OPTIONS:
            for var in opt.env:
                text = environ.get(var, "").strip()
                if text:
                    values[opt.field] = _parse(opt, text, var)
                    break
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings of parsed flags (see add_arguments); unset flags keep the defaults, or
        with `environ` what its variables set (the CLI passes os.environ: in the Cog image,
        `python -m chatglm3 serve` then keeps cog.yaml's CHATGLM3_DEVICE=cuda)."""
        values = {} if environ is None else vars(cls.from_env(environ))
        for opt in OPTIONS:
            text = getattr(args, opt.field, None)
            if text is not None:
                values[opt.field] = _parse(opt, text, opt.flag)
        return cls(**values)

    def engine_kwargs(self) -> dict[str, Any]:
        """Engine.from_pretrained's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _parse(opt: Option, text: str, where: str) -> Any:
    """text -> value; ValueError naming `where` (the variable or flag it came from)."""
    if opt.choices is not None and text not in opt.choices:
        raise ValueError(f"{where}: expected one of {', '.join(opt.choices)}, got {text!r}")
    try:
        return opt.parse(text) if opt.parse is not None else text
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The load-time flags, from OPTIONS (defaults None: Settings' defaults apply)."""
    for opt in OPTIONS:
        if opt.field in skip:
            continue
        if opt.const is not None:
            parser.add_argument(opt.flag, dest=opt.field, default=None, action="store_const",
                                const=opt.const, help=opt.help)
        else:
            parser.add_argument(opt.flag, dest=opt.field, default=None, choices=opt.choices,
                                metavar=opt.metavar, help=opt.help)

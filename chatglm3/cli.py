"""`python -m chatglm3`: chat, generate, encode, download and serve from the command line
(the commands; their flags are in cli_args.py).

The answer (or the JSON record) goes to stdout; what the program is doing (loading, progress,
notes) goes to stderr, so `generate ... > answer.txt` keeps only the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .cli_args import build_parser
from .messages import build_messages
from .params import SamplingParams
from .settings import Settings
from .tokenizer import ChatGLMTokenizer, Message

if TYPE_CHECKING:  # torch and transformers load only once a command needs the model
    import torch

    from .engine import Engine, Generation


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # while loading or reading input: no traceback, the shell's code
        say("\ninterrupted" if sys.stderr.isatty() else "interrupted")
        return 130
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the input's fault: shown as one line, never as a traceback. Only from
    modules already imported (one that is not cannot have raised): importing checkpoint here
    would load torch and transformers (~5 s) to report a bad argument."""
    defined_in = {"chatglm3.checkpoint": "CheckpointError", "chatglm3.devices": "DeviceError",
                  "chatglm3.checkpoint_files": "WeightsError"}
    found = [getattr(sys.modules[m], name) for m, name in defined_in.items() if m in sys.modules]
    return (ValueError, OSError, *found)


def say(text: str) -> None:
    """A progress or status line: stderr, so stdout carries only the answer."""
    print(text, file=sys.stderr, flush=True)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from --prompt TEXT, --prompt - (standard input) or --prompt-file PATH.
    From stdin or a file, one final line ending is dropped (editors and `echo` add one)."""
    if args.prompt_file is not None:
        where, path = f"--prompt-file {args.prompt_file}", Path(args.prompt_file)
        try:
            data = path.read_bytes()
        except OSError as e:
            why = ("no such file" if isinstance(e, FileNotFoundError) else
                   "a directory, not a file" if isinstance(e, IsADirectoryError) else
                   "permission denied" if isinstance(e, PermissionError) else
                   e.strerror or str(e))
            raise ValueError(f"{where}: {why} ({path.absolute()})") from None
    elif args.prompt == "-":
        if sys.stdin.isatty():
            say("reading the prompt from standard input (end it with Ctrl-D)")
        where, data = "--prompt - (standard input)", sys.stdin.buffer.read()
    else:
        return args.prompt
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def cmd_download(args: argparse.Namespace) -> int:
    from .download import resolve_weights

    path = resolve_weights(args.weights, dest=Path(args.dir) if args.dir else None,
                           revision=args.revision)
    print(path)
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    messages = build_messages(read_prompt(args), args.system, args.history)
    from .download import resolve_tokenizer  # only the tokenizer's files, never 12.5 GB

    tokenizer = ChatGLMTokenizer.from_dir(resolve_tokenizer(args.weights))
    print(json.dumps(tokenizer.build_chat_input(messages)))
    return 0


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_used(device: "torch.device") -> str:
    """GPU memory allocated on CUDA (the weights and buffers torch holds); otherwise the peak
    resident memory of this process, which is what the weights cost on the CPU."""
    import torch

    if device.type == "cuda":
        return f"GPU memory allocated {_size(torch.cuda.memory_allocated(device))}"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"peak RSS {_size(peak if sys.platform == 'darwin' else peak * 1024)}"  # KiB on Linux


def load_engine(args: argparse.Namespace) -> "Engine":
    """The engine for --weights/--device/--dtype, saying on stderr what loads where and, once
    ready, how long it took and the memory it holds."""
    from .devices import resolve_device, resolve_dtype
    from .download import resolve_weights
    from .engine import Engine
    from .quantize import compute_dtype

    # Flags over the CHATGLM3_* variables (a ValueError naming the flag or variable).
    settings = Settings.from_args(args, os.environ)
    # Device checks first: a missing GPU should not cost a 12 GB download or load first.
    device = resolve_device(settings.device)
    dtype = compute_dtype(settings.quantize, device, resolve_dtype(settings.dtype, device))
    if settings.decode_step == "graphs" and device.type != "cuda":
        raise ValueError("decode_step: graphs needs a CUDA device")
    path = resolve_weights(args.weights)
    where = str(device)
    if device.type == "cuda":
        import torch

        where += f" ({torch.cuda.get_device_name(device)})"
    quantized = ("" if settings.quantize == "none"
                 else f", linear layers quantized to {settings.quantize}")
    say(f"loading weights {Path(path).absolute()} on {where} as "
        f"{str(dtype).removeprefix('torch.')}{quantized}")
    start = time.perf_counter()
    kwargs = dict(settings.engine_kwargs(), device=device, dtype=dtype)
    engine = Engine.from_pretrained(path, progress=True, **kwargs)
    if engine.quantize != "none":
        say(f"weights: {_size(engine.weight_bytes)} (quantize {engine.quantize})")
    from .packed_linear import layers_summary

    if (layers := layers_summary(engine.model)) is not None:
        say(layers)
    if engine.kv_plan is not None:
        say(f"KV cache: {engine.kv_plan}")
    # On a GPU: every prefill shape, the decoding graphs recorded and checked against eager
    # steps. On a CPU the prefill shapes would cost minutes of a 6B model for one user's chat.
    engine.warm_up(prefill=device.type == "cuda")
    say(f"ready in {time.perf_counter() - start:.1f} s ({memory_used(device)})")
    return engine


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=args.stop, min_tokens=args.min_tokens, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )
    # (built, it is validated: before the model loads, so a typo costs no 12 GB load)
    return params


def finish_cancelled(gen: "Generation") -> str:
    """Cancels `gen` and waits until the engine has ended it; returns the text it streamed
    meanwhile. Why wait: the engine's worker thread sets stop_reason and the counts in
    `gen.result` only when it drops the request (before its next step), so right after
    cancel() the result still says 0 tokens. A second Ctrl-C stops the waiting."""
    gen.cancel()
    rest: list[str] = []
    try:
        for delta in gen:  # a new pass over the stream: the rest, up to its end
            rest.append(delta)
    except KeyboardInterrupt:
        pass
    return "".join(rest)


def cmd_generate(args: argparse.Namespace) -> int:
    messages = build_messages(read_prompt(args), args.system, args.history)
    params = sampling_params(args)
    engine = load_engine(args)
    gen = engine.generate(messages, params)
    interrupted = False
    try:
        for delta in gen:
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        rest = finish_cancelled(gen)
        if not args.json:
            sys.stdout.write(rest)
    record = gen.result.to_dict()
    if interrupted and not record["stop_reason"]:  # a second Ctrl-C cut finish_cancelled short
        record.update(stop_reason="cancelled", output_token_count=len(record["output_ids"]))
    if args.json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if interrupted:
        say(f"cancelled after {record['output_token_count']} tokens")
        return 130
    if record["max_tokens_cut"]:
        say(f"note: max_tokens cut to {record['max_tokens']} to fit the context")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    engine = load_engine(args)
    history: list[Message] = []
    print("ChatGLM3-6B-32K. Type to chat; 'clear' starts over, 'stop' quits.", flush=True)
    while True:
        try:
            query = input("\nUser: ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits, leaving the line clean
            print(flush=True)
            return 130
        command = query.strip()
        if command == "stop":
            return 0
        if command == "clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not command:
            continue
        system = [Message("system", args.system)] if args.system else []
        messages = system + history + [Message("user", query)]
        try:
            gen = engine.generate(messages, params)
        except ValueError as e:  # PromptTooLong: the conversation outgrew the context
            print(f"error: {e}; type 'clear' to start over", flush=True)
            continue
        print("\nChatGLM: ", end="", flush=True)
        answer = ""
        try:
            for delta in gen:
                answer += delta
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            # The text streamed between the Ctrl-C and the engine's stop is dropped, not
            # printed: the answer ends where the user stopped it, and the history keeps exactly
            # what was shown (the next turn answers to what the user read; 'clear' forgets it).
            finish_cancelled(gen)
            print(" [interrupted]", end="")
        print(flush=True)
        if args.stats:
            r = gen.result
            print(f"({r.input_token_count} prompt tokens, {r.output_token_count} generated, "
                  f"{r.tokens_per_second:.1f} tokens/s, stop: {r.stop_reason or 'cancelled'}, "
                  f"seed {r.seed})", flush=True)
        # as the official chat(), history keeps the answer stripped
        history += [Message("user", query), Message("assistant", answer.strip())]


def cmd_serve(args: argparse.Namespace) -> int:
    from .api.serve import cmd_serve as run

    return run(args)


COMMANDS = {"chat": cmd_chat, "generate": cmd_generate, "encode": cmd_encode,
            "download": cmd_download, "serve": cmd_serve}

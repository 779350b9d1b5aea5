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
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .cli_args import build_parser, constraint_flag, sampling_params
from .errors import InputError, SetupError
from .text.messages import build_messages
from .settings import Settings
from .text.tokenizer import ChatGLMTokenizer, Message

if TYPE_CHECKING:  # torch and transformers load only once a command needs the model
    from .engine.engine import Engine, Generation


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # while loading or reading input: no traceback, the shell's code
        say("\ninterrupted" if sys.stderr.isatty() else "interrupted")
        return 130
    except Exception as e:
        if not isinstance(e, (ValueError, OSError, SetupError)):  # input, machine, weights
            raise
        # the constraint is the engine's `structured`, here the flag that set it
        message = (e.renamed({"structured": constraint_flag(args)})
                   if isinstance(e, InputError) else str(e))
        print(f"error: {message}", file=sys.stderr)
        return 1


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
    from .weights.download import resolve_weights

    path = resolve_weights(args.weights, dest=Path(args.dir) if args.dir else None,
                           revision=args.revision)
    print(path)
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    messages = build_messages(read_prompt(args), args.system, args.history)
    from .weights.download import resolve_tokenizer  # only the tokenizer's files, never 12.5 GB

    tokenizer = ChatGLMTokenizer.from_dir(resolve_tokenizer(args.weights))
    print(json.dumps(tokenizer.build_chat_input(messages)))
    return 0


def load_engine(args: argparse.Namespace) -> "Engine":
    """The ready engine for the flags (over the CHATGLM3_* variables), saying on stderr what
    loads where and, once ready, how long it took and the memory it holds."""
    from .weights.download import check_source

    settings = Settings.from_args(args, os.environ)
    check_source(args.weights)  # a mistyped path fails now, not after torch's ~5 s import
    say("loading torch and transformers")  # the first seconds would be silent otherwise
    from .startup import start_engine

    return start_engine(args.weights, settings, say=say, progress=True).engine


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
    # What the settings themselves get wrong (a --regex that does not compile) ends the chat
    # now, in one line, instead of answering every message with it.
    engine.prepare_messages([Message("user", "hi")], params)
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

"""`python -m chatglm3`: chat, generate, encode and download from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from typing import TYPE_CHECKING

from .messages import build_messages
from .params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingParams
from .tokenizer import ChatGLMTokenizer, Message

if TYPE_CHECKING:  # torch and transformers load only once a command needs the model
    from .engine import Engine


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> OneLineParser:
    common = OneLineParser(add_help=False)
    common.add_argument("--weights", default=None, metavar="PATH_OR_REPO",
                        help="checkpoint directory, hub repo id or tar URL "
                             "(default: the weights/ directory, fetched if empty)")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    common.add_argument("--dtype", default="auto",
                        choices=["auto", "float16", "bfloat16", "float32"])
    common.add_argument("--decode-step", default="auto", choices=["auto", "eager", "graphs"],
                        help="graphs: replay decoding steps as CUDA graphs (auto: on a GPU)")

    conversation = OneLineParser(add_help=False)
    conversation.add_argument("--system", default="", help="system prompt")

    sampling = OneLineParser(add_help=False)
    sampling.add_argument("--max-tokens", type=int, default=2048)
    sampling.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                          help="0 = greedy")
    sampling.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    sampling.add_argument("--top-k", type=int, default=0, help="0 = off")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", nargs="+", action="extend", default=[], metavar="TEXT",
                          help="stop sequences")

    parser = OneLineParser(prog="python -m chatglm3", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    chat = sub.add_parser("chat", parents=[common, conversation, sampling],
                          help="interactive chat (type 'clear' to start over, 'stop' to quit)")
    chat.add_argument("--stats", action="store_true",
                      help="print token counts and speed after each answer")

    gen = sub.add_parser("generate", parents=[common, conversation, sampling],
                         help="answer one prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--history", default="", help="JSON list of earlier messages")
    gen.add_argument("--json", action="store_true", help="print one JSON record instead")

    enc = sub.add_parser("encode", parents=[common, conversation],
                         help="print the chat input ids as JSON")
    enc.add_argument("--prompt", required=True)
    enc.add_argument("--history", default="")

    dl = sub.add_parser("download", help="fetch the weights with progress")
    dl.add_argument("--revision", default=None)
    dl.add_argument("--dir", default=None, help="destination (default: weights/)")
    dl.add_argument("--weights", default=None, metavar="REPO_OR_URL",
                    help="hub repo id or tar URL (default: the official 32k repo)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the input's fault: shown as one line, never as a traceback."""
    from .checkpoint import CheckpointError
    from .devices import DeviceError
    from .download import WeightsError

    return (ValueError, OSError, WeightsError, CheckpointError, DeviceError)


def cmd_download(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .download import resolve_weights

    path = resolve_weights(args.weights, dest=Path(args.dir) if args.dir else None,
                           revision=args.revision)
    print(path)
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .download import resolve_weights

    messages = build_messages(args.prompt, args.system, args.history)
    tokenizer = ChatGLMTokenizer.from_dir(resolve_weights(args.weights))
    print(json.dumps(tokenizer.build_chat_input(messages)))
    return 0


def load_engine(args: argparse.Namespace) -> "Engine":
    from .download import resolve_weights
    from .engine import Engine

    return Engine.from_pretrained(resolve_weights(args.weights), args.device, args.dtype,
                                  decode_step=args.decode_step)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=args.stop,
    )
    params.validate()  # before the model loads: a typo should not cost a 12 GB load
    return params


def cmd_generate(args: argparse.Namespace) -> int:
    messages = build_messages(args.prompt, args.system, args.history)
    params = sampling_params(args)
    engine = load_engine(args)
    gen = engine.generate(messages, params)
    if args.json:
        gen.text()
        print(json.dumps(gen.result.to_dict(), ensure_ascii=False))
        return 0
    try:
        for delta in gen:
            sys.stdout.write(delta)
            sys.stdout.flush()
    finally:
        gen.cancel()
    sys.stdout.write("\n")
    if gen.result.max_tokens_cut:
        print(f"note: max_tokens cut to {gen.result.max_tokens} to fit the context",
              file=sys.stderr)
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
            gen.cancel()
            print(" [interrupted]", end="")
        print(flush=True)
        if args.stats:
            r = gen.result
            print(f"({r.input_token_count} prompt tokens, {r.output_token_count} generated, "
                  f"{r.tokens_per_second:.1f} tokens/s, stop: {r.stop_reason})", flush=True)
        # as the official chat(), history keeps the answer stripped
        history += [Message("user", query), Message("assistant", answer.strip())]


COMMANDS = {"chat": cmd_chat, "generate": cmd_generate, "encode": cmd_encode,
            "download": cmd_download}

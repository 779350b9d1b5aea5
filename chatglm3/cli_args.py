"""The command line's flags: each command's parser, with every default and range taken from
params.py (sampling) and settings.py (load-time choices). No torch import: bad flags are
refused before anything loads."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from .params import (FIELDS, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, SamplingParams, SettingsError,
                     Structured)
from .settings import add_arguments


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line, not a usage block; a misspelled option is named, with the
    closest valid one (argparse itself would first report a required option as missing:
    `--promt hi` as "--prompt is required")."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            self._check_options(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def _check_options(self, args: list[str]) -> None:
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for token in args:
            if token == "--":
                return
            name = token.split("=", 1)[0]
            if (not name.startswith("--") or " " in token  # a value (argparse's own rule)
                    or any(k.startswith(name) for k in known)):
                continue  # a value, a known option or an abbreviation of one
            # compared without the dashes, which every option shares
            close = difflib.get_close_matches(name[2:], [k[2:] for k in known], n=1, cutoff=0.7)
            self.error(f"unrecognized option {name}" + (f"; did you mean --{close[0]}?"
                                                          if close else ""))


def _weights_parser(what: str) -> OneLineParser:
    parser = OneLineParser(add_help=False)
    parser.add_argument(
        "--weights", default=None, metavar="PATH_OR_REPO",
        help=f"{what}, a hub repo id (owner/name[@revision]) or the https URL of a .tar/.tar.gz; "
             "a relative path is taken from the current directory (default: the repository's "
             "weights/ directory, fetched from the hub if empty)")
    return parser


def _runtime_parser() -> OneLineParser:
    """The load-time settings' flags (settings.OPTIONS: the same definitions predict.py's
    environment variables use)."""
    parser = OneLineParser(add_help=False)
    add_arguments(parser)
    return parser


def _input_parser() -> OneLineParser:
    """The conversation of one request: system prompt, history and the new prompt."""
    parser = OneLineParser(add_help=False)
    parser.add_argument("--system", default="", metavar="TEXT",
                        help="system prompt (default: none)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT",
                        help="the user message; '-' reads it from standard input "
                             "(--prompt=TEXT for a text that starts with '-')")
    source.add_argument("--prompt-file", metavar="PATH",
                        help="read the user message from this UTF-8 file")
    parser.add_argument("--history", default="", metavar="JSON",
                        help='earlier turns as a JSON list: [{"role": "user", "content": "..."}, '
                             '...] or [["question", "answer"], ...] (default: none)')
    return parser


def _sampling_parser(reports_seed: str) -> OneLineParser:
    """A flag per sampling setting params.FIELDS gives the CLI (name, type, default, range and
    help from there), and --stop. `reports_seed`: where the command shows a seed it drew."""
    parser = OneLineParser(add_help=False)
    for f in FIELDS:
        if not f.cli:
            continue
        default = (f"default: a random one, {reports_seed}" if f.default is None
                   else f"default {f.default:g}")
        note = f"{f.note}; " if f.note else ""
        parser.add_argument(f.flag, type=f.kind, default=f.default, metavar=f.metavar,
                            help=f"{f.help}, {f.short_range} ({note}{default})")
    # One value per flag: with nargs="+" a prompt after `--stop X` became a second stop string.
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help=f"end the answer at this text (not included); repeat for more: --stop A --stop B "
             f"(at most {MAX_STOP_SEQUENCES}, each at most {MAX_STOP_LENGTH} characters; "
             f"default: none)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="TEXT|@FILE",
                       help="the answer is JSON following this JSON Schema (the text, or @ and "
                            "a file holding it); '{\"type\": \"object\"}' = any object")
    shape.add_argument("--regex", metavar="PATTERN",
                       help="the answer matches this regular expression, whole")
    shape.add_argument("--choice", action="append", metavar="TEXT",
                       help="the answer is exactly one of these; repeat: --choice A --choice B")
    return parser


def structured(args: argparse.Namespace) -> Structured | None:
    """--json-schema (@FILE read here), --regex or --choice as the constraint (None: free)."""
    if getattr(args, "json_schema", None):
        text = args.json_schema
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as e:
                raise SettingsError([("structured", f"--json-schema: cannot read {text[1:]!r}: "
                                                    f"{e.strerror}")]) from None
        return Structured("json", text)
    if getattr(args, "regex", None):
        return Structured("regex", args.regex)
    if getattr(args, "choice", None):
        return Structured("choice", choices=tuple(args.choice))
    return None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The parsed sampling flags as checked SamplingParams (SettingsError names bad ones):
    before the model loads, so a typo costs no 12 GB load."""
    return SamplingParams(**{f.name: getattr(args, f.name) for f in FIELDS if f.cli},
                          stop=args.stop, structured=structured(args))


def constraint_flag(args: argparse.Namespace) -> str:
    """The flag that set the answer's constraint (errors name it)."""
    return ("--json-schema" if getattr(args, "json_schema", None) else "--regex"
            if getattr(args, "regex", None) else "--choice")


def build_parser() -> OneLineParser:
    model = _weights_parser("checkpoint directory")
    runtime = _runtime_parser()
    request = _input_parser()

    parser = OneLineParser(
        prog="python -m chatglm3",
        description="ChatGLM3-6B-32K: chat, generate, encode and download. The answer (or JSON "
                    "record) goes to stdout; loading and progress messages go to stderr.",
        epilog="'python -m chatglm3 COMMAND --help' lists each command's options, with their "
               "defaults and ranges.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    chat = sub.add_parser("chat", parents=[model, runtime, _sampling_parser("which --stats shows")],
                          help="interactive chat (type 'clear' to start over, 'stop' to quit)",
                          description="Interactive chat: type a message, get the answer "
                                      "streamed; 'clear' starts over, 'stop' (or Ctrl-D) quits, "
                                      "Ctrl-C cuts an answer short.")
    chat.add_argument("--system", default="", metavar="TEXT",
                      help="system prompt (default: none)")
    chat.add_argument("--stats", action="store_true",
                      help="print token counts and speed after each answer")

    gen = sub.add_parser("generate", parents=[model, runtime, request,
                                              _sampling_parser("which --json reports")],
                         help="answer one prompt",
                         description="Answer one prompt, streamed to stdout (Ctrl-C stops it "
                                     "with exit code 130).")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON record (text, ids, counts, stop_reason, seed) "
                          "instead of streaming the text")

    sub.add_parser("encode", parents=[_weights_parser("directory holding tokenizer.model "
                                                      "(a checkpoint, or just the tokenizer)"),
                                      request],
                   help="print the chat input ids as JSON",
                   description="Print the chat input ids (the official build_chat_input) as "
                               "JSON; needs only the tokenizer.")

    from .api import serve  # its flags only: no web framework or torch import here

    srv = sub.add_parser("serve", parents=[model, runtime],
                         help="an OpenAI-compatible API (and chat page) on one batched engine",
                         description="Serve /v1/chat/completions, /v1/completions, /v1/models "
                                     "and /health (OpenAI's API) on one engine: concurrent "
                                     "requests share decoding steps.")
    serve.add_arguments(srv)

    dl = sub.add_parser("download", help="fetch the weights with progress",
                        description="Fetch and verify a checkpoint; prints its directory.")
    dl.add_argument("--revision", default=None,
                    help="hub revision (default: the pinned one, or env CHATGLM3_REVISION)")
    dl.add_argument("--dir", default=None,
                    help="destination (default: the repository's weights/ directory, or env "
                         "CHATGLM3_WEIGHTS_DIR)")
    dl.add_argument("--weights", default=None, metavar="REPO_OR_URL",
                    help="hub repo id or https URL of a .tar/.tar.gz (default: the official "
                         "32k repo)")
    return parser

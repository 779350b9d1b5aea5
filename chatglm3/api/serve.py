"""`python -m chatglm3 serve`: its flags, and running the app under uvicorn.

Importing this module costs nothing heavy (the CLI builds its parser from it); starlette,
uvicorn and torch load when the command runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from .protocol import DEFAULT_MODEL_NAME

DEFAULT_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; "
                             "0.0.0.0 for every interface, e.g. in a container)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 = a free one, printed when ready)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on the API (default: env "
                             "CHATGLM3_API_KEY; none: no key needed)")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME, metavar="NAME",
                        help=f"the model id clients ask for (default {DEFAULT_MODEL_NAME})")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let browser apps from this origin call the API (e.g. "
                             "http://localhost:3000); repeat for more (default: none, CORS off)")
    parser.add_argument("--max-waiting", type=int, default=64, metavar="N",
                        help="requests accepted beyond the ones decoding before answering 429 "
                             "(each of n choices counts; default 64)")
    parser.add_argument("--no-web", action="store_true",
                        help="do not serve the chat page at /")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound and listening before the model is announced ready, so no
    client that reads 'serving on' is refused)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port: expected 0-65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
                         ) from None
    return sock


def say(text: str) -> None:
    """A status line on stderr (stdout is left to the caller)."""
    print(text, file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..settings import Settings
    from ..startup import start_engine

    key = args.api_key if args.api_key is not None else os.environ.get("CHATGLM3_API_KEY") or None
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting: expected 0 or more, got {args.max_waiting}")
    if key is not None and (not key.strip() or not key.isascii() or not key.isprintable()
                            or " " in key):
        raise ValueError("--api-key: expected printable ASCII without spaces (clients send it "
                         "in an HTTP header)")
    sock = listen(args.host, args.port)  # a taken port fails before the model loads
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        say(f"warning: listening on {args.host} without an API key: anyone who can reach "
                "this port can use the model (set --api-key or CHATGLM3_API_KEY)")
    engine = start_engine(args.weights, Settings.from_args(args, os.environ), say=say,
                          progress=True).engine
    import uvicorn

    from .app import ServerConfig, create_app

    config = ServerConfig(model_name=args.model_name, api_key=key,
                          cors_origins=tuple(args.cors_origin), max_waiting=args.max_waiting,
                          web=not args.no_web)
    app = create_app(engine, config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    say(f"serving on http://{shown}:{port} (model {args.model_name}"
            f"{', API key required' if key else ''}"
            f"{'' if args.no_web else f'; chat page at http://{shown}:{port}/'})")
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run: python -m chatglm3 serve --help")

"""`lmmrt serve`: an OpenAI-compatible HTTP server (lmmrt.serve.app) over the continuous-batching engine.

Like lmmrt.cli, only the standard library at module level. Everything that can be checked without the
model is checked before it loads: the options, that FastAPI and uvicorn are installed, the checkpoint's
chat template, and the address (the listening socket is bound first and handed to uvicorn).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys

from lmmrt.cli_options import (
    BACKEND_OPTION,
    CUDA_GRAPH_OPTION,
    DTYPE_OPTION,
    POSITIVE_INT,
    HelpFormatter,
    _number,
)

API_KEY_ENV = "LMMRT_API_KEY"
# uvicorn cuts the connections still open this long after the engine's grace period ended (by then the
# engine has cancelled every request and their answers have gone out)
SHUTDOWN_MARGIN_S = 5.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """An argparse type: a byte count, as 1073741824, 1G, 1GiB or 512M (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 8G, 512M or 1073741824, got {text!r}")
    value = float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return int(value)


def pixel_count(text: str) -> int:
    """An argparse type: a pixel count, as 16777216 or WIDTHxHEIGHT (4096x4096)."""
    width, sep, height = text.lower().partition("x")
    try:
        value = int(width) * int(height) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count such as 16777216 or 4096x4096, got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {text!r}")
    return value


PORT = _number(int, "a port in [0, 65535] (0: any free port)", lambda v: 0 <= v <= 65535)
FRACTION = _number(float, "in (0, 1]", lambda v: 0 < v <= 1)
SECONDS = _number(float, ">= 0", lambda v: v >= 0)


def _require_server_packages() -> None:
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"lmmrt serve needs {' and '.join(missing)}, not installed: pip install 'lmmrt[serve]' "
                          "(in the venv `make demo` made: make install EXTRAS=serve)")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is said at once, not after it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _check_checkpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}" if not os.path.exists(path)
                                else f"{path} is not a directory (an lmmrt checkpoint is a directory)")
    from lmmrt.runtime.embed import is_clip_checkpoint

    if is_clip_checkpoint(path):
        raise ValueError(f"{path} is a CLIP checkpoint, which generates no text: lmmrt serve runs the generative "
                         "families (use lmmrt classify or lmmrt.embed for CLIP)")


def _local_media_root(args) -> str | None:
    """The resolved directory file:// URLs may read from ("/" for --allow-local-files), or None."""
    if args.allow_local_files:
        return os.sep
    if args.allowed_local_media_path is None:
        return None
    if not args.allowed_local_media_path.strip():  # realpath('') is the current directory: never meant
        raise ValueError("--allowed-local-media-path is empty: give a directory, or leave it out to refuse "
                         "file:// URLs")
    root = os.path.realpath(args.allowed_local_media_path)
    if not os.path.isdir(root):
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    return root


def _interrupt_start(signum, frame):
    print(f"lmmrt serve: {signal.Signals(signum).name} while starting (checks, imports, loading the model): "
          "stopping", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def _cmd_serve(args) -> int:
    # SIGTERM before the server runs stops like Ctrl-C (a message, exit status 130), not silently by the
    # signal: from here, before the checks import torch (a second or more); the arguments parse in milliseconds
    signal.signal(signal.SIGTERM, _interrupt_start)
    if args.api_key == "":
        raise ValueError(f"--api-key (or ${API_KEY_ENV}) is empty: give a key, or leave it out for no key")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name is empty: give a name, or leave it out for the checkpoint "
                         "directory's name")
    _local_media_root(args)
    _check_checkpoint(args.model)
    _require_server_packages()
    from lmmrt.serve.chat_template import compile_template, read_chat_template

    template = read_chat_template(args.model)
    if template is not None:
        compile_template(template, f"{args.model}'s chat template")  # a syntax error, before the load
    from lmmrt.api import parse_device

    parse_device(args.device, option="--device")
    sock = bind_socket(args.host, args.port)
    try:
        return _serve(args, sock, template)
    finally:
        sock.close()


def load_engine(args):
    """The model and the (not yet started) engine the options ask for. The engine decodes as the model's
    cuda_graph (--cuda-graph / --no-cuda-graph) says: the fixed-shape step, captured as CUDA graphs, or eager."""
    import lmmrt
    from lmmrt.serve.engine import Engine

    print(f"lmmrt serve: loading {args.model} ...", file=sys.stderr, flush=True)
    model = lmmrt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                       cuda_graph=args.cuda_graph)
    memory = dict(max_memory=args.max_memory) if args.max_memory is not None else \
        dict(memory_fraction=args.memory_fraction)
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, token_budget=args.token_budget,
                    media_cache_bytes=args.media_cache_bytes, **memory)
    return model, engine


def _serve(args, sock: socket.socket, template: str | None) -> int:
    import uvicorn

    from lmmrt.serve.app import ServeOptions, build_app
    from lmmrt.serve.chat_template import ChatFormatter

    name = args.served_model_name if args.served_model_name is not None else os.path.basename(os.path.normpath(os.path.abspath(args.model)))
    model, engine = load_engine(args)
    formatter = ChatFormatter(model.config, model.tokenizer, template) if model.tokenizer is not None else None
    options = ServeOptions(model_name=name, api_key=args.api_key, local_media_root=_local_media_root(args),
                           max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                           max_request_pixels=args.max_request_pixels, shutdown_grace_s=args.shutdown_grace)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    how = formatter.source if formatter is not None else "no chat (no tokenizer)"

    def ready():  # the engine has started: the address answers from here on (tests wait for this line)
        print(f"lmmrt serve: {name} ({how}) on http://{shown}:{port}/v1", file=sys.stderr, flush=True)

    app = build_app(engine, model, options, formatter, on_ready=ready)

    grace = args.shutdown_grace

    class GracefulServer(uvicorn.Server):
        """uvicorn, with the engine's grace period starting at the signal, when uvicorn stops accepting:
        running requests finish or are cancelled (a stream's error event and [DONE], a 503) by then, and
        uvicorn's own deadline, SHUTDOWN_MARGIN_S later, only backs it up (at it uvicorn cuts connections)."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            engine.begin_shutdown(0.0 if self.force_exit else grace)  # a second Ctrl-C: cancel now

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets=sockets)
            if self.force_exit:  # uvicorn skips the app's shutdown then: its lifespan task was cancelled at
                await self.lifespan.shutdown()  # exit with a CancelledError traceback, the engine not shut down

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=grace + SHUTDOWN_MARGIN_S,
                            access_log=args.access_log)
    server = GracefulServer(config)
    # uvicorn takes over SIGINT / SIGTERM while it runs and re-raises the one that stopped it once it has
    # shut down; these handlers make that a no-op (a stop by signal exits 0, a clean shutdown), and a
    # signal in the moment before uvicorn's handlers are in place still stops it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
    print("lmmrt serve: stopped", file=sys.stderr, flush=True)
    return 0


def add_serve(sub) -> None:
    """The `serve` subcommand, added to the top-level subparsers."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="serve a checkpoint over an OpenAI-compatible HTTP API: POST /v1/chat/completions "
                       "(text and image_url parts, streaming or not), POST /v1/completions (raw prompts with the "
                       "model's image markers), GET /v1/models, /health, /metrics (Prometheus). Requests join and "
                       "leave the running batch at every decode step. SIGINT / SIGTERM stop accepting, let running "
                       "requests finish for --shutdown-grace seconds, cancel the rest and exit 0. Needs the serve "
                       "extra (fastapi, uvicorn)", formatter_class=HelpFormatter)
    s.add_argument("model", metavar="CHECKPOINT", help="lmmrt checkpoint directory (from `lmmrt convert`)")
    n = s.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    n.add_argument("--port", type=PORT, default=8000, help="port to listen on; 0 picks a free one (it is printed)")
    n.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else no key; "
                        "the variable keeps the key out of the process list)")
    n.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (requests must name it; default: the checkpoint's directory "
                        "name)")
    local = n.add_mutually_exclusive_group()
    local.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="accept file:// image URLs of files inside DIR (symlinks and .. resolved first; off: "
                            "base64 data URLs only)")
    local.add_argument("--allow-local-files", action="store_true",
                       help="accept file:// image URLs of any file this process can read (trusted clients only; "
                            "prefer --allowed-local-media-path)")
    n.add_argument("--max-images", type=POSITIVE_INT, default=16, help="images per request at most")
    n.add_argument("--max-image-pixels", type=pixel_count, default=16 << 20, metavar="PIXELS",
                   help="pixels per image at most, as a count or WxH, read from the image's header before any pixel "
                        "is decoded (default 4096x4096; a value above Pillow's own decompression-bomb limit, about "
                        "89 M pixels, raises that limit for the process)")
    n.add_argument("--max-request-pixels", type=pixel_count, default=64 << 20, metavar="PIXELS",
                   help="pixels of a request's images together at most, as a count or WxH (bounds the memory one "
                        "request's decoded images take; default 8192x8192)")
    e = s.add_argument_group("engine")
    e.add_argument("--max-batch", type=POSITIVE_INT, default=16, help="requests decoded together at most (KV slots)")
    e.add_argument("--max-queue", type=POSITIVE_INT, default=64,
                   help="requests waiting for a slot at most; beyond it requests get 503 with Retry-After")
    mem = e.add_mutually_exclusive_group()
    mem.add_argument("--max-memory", type=byte_size, default=None, metavar="BYTES",
                     help="memory for the KV cache, e.g. 8G (default: --memory-fraction of the free GPU memory; "
                          "on the CPU 4G)")
    mem.add_argument("--memory-fraction", type=FRACTION, default=0.9,
                     help="fraction of the free GPU memory the KV cache may take")
    e.add_argument("--token-budget", type=POSITIVE_INT, default=512,
                   help="tokens per scheduler step (decode rows + prefill chunk of newcomers)")
    e.add_argument("--media-cache-bytes", type=byte_size, default=1 << 30, metavar="BYTES",
                   help="memory for encoded media shared across requests (same image, encoded once) (default: 1G)")
    e.add_argument("--shutdown-grace", type=SECONDS, default=10.0, metavar="SECONDS",
                   help="at SIGINT / SIGTERM, running requests get this long to finish before they are cancelled")
    r = s.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cuda|cuda:N|cpu (default: cuda when available)")
    r.add_argument("--dtype", **DTYPE_OPTION, help="compute in this dtype (default: as stored)")
    r.add_argument("--backend", **BACKEND_OPTION)
    r.add_argument("--cuda-graph", **CUDA_GRAPH_OPTION)
    r.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    r.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log one line per HTTP request (default: on)")
    s.set_defaults(fn=_cmd_serve)

"""`lowbit serve PATH | --synthetic NAME --scheme S`: an OpenAI-compatible HTTP server (lowbit/serve/).
With --tp N, N ranks are spawned (one GPU each; gloo processes on CPU): rank 0 serves HTTP and
every rank computes (lowbit/serve/tp.py)."""
from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from .generate import add_load_options, load_from_args


def register(sub):
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("path", nargs="?", help="checkpoint directory (or use --synthetic)")
    p.add_argument("--synthetic", metavar="NAME", help="random-weight model without a tokenizer (token-id prompts "
                                                        "only): llama-3-8b, qwen3-8b, small, tiny")
    p.add_argument("--scheme", default="bf16", help="with --synthetic: bf16, fp8, nvfp4, int4-g128, ...")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients ask for (default: the directory's name)")
    p.add_argument("--max-num-seqs", "--max-batch", dest="max_batch", type=int, default=16,
                   help="KV-cache slots: sequences generated at once")
    p.add_argument("--max-model-len", "--max-len", dest="max_len", type=int, default=None,
                   help="positions per slot, prompt plus completion (default: the model's, at most 4096)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="sequences that may wait for a slot before requests get a 429 (default 4 x --max-num-seqs)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (else 413)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="cancel a request running longer than this (504; default: none)")
    p.add_argument("--api-key", default=os.environ.get("LOWBIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (default: "
                        "$LOWBIT_API_KEY)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template replacing the tokenizer's")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (one GPU each): rank 0 serves HTTP, every rank computes each step")
    add_load_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LowbitError

    if bool(args.path) == bool(args.synthetic):
        raise LowbitError("give a checkpoint PATH or --synthetic NAME (one of them)")
    if args.max_batch < 1 or (args.max_len is not None and args.max_len < 2):
        raise LowbitError("--max-num-seqs must be >= 1 and --max-model-len >= 2")
    if (args.max_queue is not None and args.max_queue < 0) or args.max_body_bytes < 1 or \
            (args.request_timeout is not None and args.request_timeout <= 0):
        raise LowbitError("--max-queue must be >= 0, --max-body-bytes >= 1 and --request-timeout > 0")
    if args.tp < 1:
        raise LowbitError("--tp must be >= 1")
    args.template = None
    if args.chat_template:
        try:
            args.template = Path(args.chat_template).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise LowbitError(f"cannot read the chat template {args.chat_template}: {e}") from None
    try:
        import fastapi  # noqa: F401  (what lowbit.serve needs; imported there)
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LowbitError(f"lowbit serve needs fastapi, uvicorn and prometheus-client ({e}): "
                          f"pip install 'lowbit[serve]'") from None
    with _listen(args.host, args.port) as sock:  # before loading: a taken port fails at once, not after the load
        if args.tp > 1:
            from ..serve import tp

            return tp.launch(args.tp, _on_rank, vars(args), sock)
        return _serve(args, sock, _load(args))


def _on_rank(opts: dict, sock: socket.socket) -> int:
    """One rank of `serve --tp`: rank 0 serves (and leads), the others follow its steps."""
    import argparse

    from .. import parallel
    from ..serve import tp

    args = argparse.Namespace(**opts)
    os.setpgrp()  # a Ctrl-C at the terminal reaches the parent alone, which passes it on once (tp.launch)
    tp.join()
    model = _load(args)
    if parallel.current()[0] != 0:
        sock.close()
        tp.follow(model)
        return 0
    try:
        return _serve(args, sock, model)
    except KeyboardInterrupt:  # uvicorn's graceful shutdown on Ctrl-C is done; the parent exits 130
        return 130


def _serve(args, sock: socket.socket, model) -> int:
    """Serve `model` on the listening socket until the server stops."""
    import uvicorn

    from ..errors import LowbitError
    from ..serve import create_app, tp

    died = []
    server = None

    def on_fatal(error: str) -> None:  # the worker is gone: stop serving rather than answer nothing
        died.append(error)
        server.should_exit = True

    app = create_app(model, args.served_model_name or (None if args.path else args.synthetic), args.max_batch,
                     args.max_len, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                     request_timeout=args.request_timeout, api_key=args.api_key, chat_template=args.template,
                     on_fatal=on_fatal)
    service = app.state.service
    print(f"lowbit serve: '{service.name}' on http://{args.host}:{sock.getsockname()[1]}/v1 "
          f"({args.max_batch} slots of {service.max_len} positions{tp.describe()})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's way out of a failed start-up (logged above)
        pass
    finally:  # a forced exit (a second Ctrl-C) skips the app's shutdown: the worker (and the ranks) stop here
        service.worker.stop()
    error = died[0] if died else service.worker.error
    if error is not None:
        raise LowbitError(f"the model worker died, so the server stopped: {error}")
    if not server.started:
        raise LowbitError("the server did not start (see the log above)")
    # Ctrl-C: 130 whatever SIGINT's inherited disposition (uvicorn re-raises the signal after its
    # graceful shutdown, which does nothing where SIGINT is ignored, e.g. under a background job)
    return 130 if signal.SIGINT in getattr(server, "_captured_signals", ()) else 0


def _listen(host: str, port: int) -> socket.socket:
    from ..errors import LowbitError

    # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and the default 0 does not. With Nagle on, a response's body segment waits for
    # the client's delayed ACK of its header segment: ~40 ms added to every answer and first token.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LowbitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _load(args):
    if not args.synthetic:
        return load_from_args(args, announce=False)  # the banner says when it is ready
    import torch

    from .. import synthetic
    from ..config import parse_dtype

    return synthetic.build(args.synthetic, args.scheme, device=args.device,
                           dtype=parse_dtype(args.dtype) or torch.bfloat16, activation_quant=args.activation_quant,
                           use_kernels=not args.no_kernels, batch_invariant=args.batch_invariant)

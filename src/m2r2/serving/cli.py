"""``m2r2 serve``: the OpenAI-compatible server (see ``m2r2.serving.app``)."""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> int:
    import m2r2

    from ..engine.threads import available_cpus
    from ..errors import M2R2Error
    from .app import serve
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise M2R2Error(f"m2r2 serve needs the server extras ({e.name} is missing): pip install -e \".[serve]\"") \
            from None
    lm = m2r2.load(args.model, dtype=args.dtype, weights=args.weights, threads=args.threads or available_cpus())
    serve(lm, host=args.host, port=args.port, parallel=args.parallel, strategy=args.strategy, api_key=args.api_key,
          ctx_size=args.ctx_size, max_queue=args.max_queue)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``serve`` subcommand (the command line adds the model options: --model, --threads, --dtype, --weights)."""
    from ..options import int_at_least
    p = subparsers.add_parser("serve", help="an OpenAI-compatible server with continuous batching",
                              description="Serve the model over HTTP with OpenAI's API (chat/completions, completions, "
                                          "models, health, metrics) and a chat page at /.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least("--port", 1), default=8000)
    p.add_argument("--parallel", type=int_at_least("--parallel", 1), default=4,
                   help="slots: requests decoded together (default 4)")
    p.add_argument("--strategy", default="plain",
                   help="default lossless strategy for requests (plain, m2r2, prompt-lookup, ...; a request may "
                        "choose another with {\"m2r2\": {\"strategy\": ...}})")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every API request")
    p.add_argument("--ctx-size", type=int_at_least("--ctx-size", 16), default=None,
                   help="context window per slot (default: the model's, at most 4096)")
    p.add_argument("--max-queue", type=int_at_least("--max-queue", 1), default=64,
                   help="requests that may wait for a slot before the server answers 429 (default 64)")
    p.set_defaults(func=cmd_serve)
    return p

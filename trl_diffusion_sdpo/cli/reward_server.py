"""``trl-diffusion-sdpo reward-server``'s options and entry point: a registered scorer served over HTTP by
:func:`trl_diffusion_sdpo.rewards.server.build_app` (docs/reward-server.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..rewards.scorers import available_scorers
from ..rewards.scorers.preflight import ScorerModelUnavailable, check_models
from ..rewards.scorers.registry import register_outside_scorers, unknown_scorer_message
from ..rewards.server import build_app
from .command_parser import CommandParser
from .sample_options import add_scorer_arg_argument, json_or_text

__all__ = ["build_parser", "main"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``reward-server``'s options (on ``parser``, or a new one)."""
    parser = parser or CommandParser(prog="trl-diffusion-sdpo reward-server")
    parser.description = (
        "Serve a registered scorer over HTTP for online training's reward_funcs (http://HOST:PORT/v1/score; "
        "GET /health, GET /ready). Protocol: docs/reward-server.md. Needs the serve extra: pip install "
        "'trl-diffusion-sdpo[serve]'."
    )
    parser.add_argument("--scorer", required=True, help="A registered scorer (`evaluate --help` lists them).")
    add_scorer_arg_argument(
        parser,
        "KEY=VALUE",
        "An argument of the scorer, e.g. model=/path (VALUE parsed as JSON if it can be; repeatable).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to bind (default: %(default)s, this machine only; 0.0.0.0 serves every interface, with no "
        "authentication).",
    )
    parser.add_argument("--port", type=int, default=8000, help="Port (default: %(default)s).")
    parser.add_argument(
        "--max_batch_size",
        "--max-batch-size",
        type=int,
        default=32,
        help="Images per call of the scorer (default: %(default)s).",
    )
    parser.add_argument(
        "--batch_wait_ms",
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="How long a request waits for others to be scored with it (default: %(default)s).",
    )
    parser.add_argument(
        "--max_request_mb",
        "--max_request_mb",
        type=float,
        default=64.0,
        help="The largest request body in MiB; a larger one is answered 413 (default: %(default)s).",
    )
    parser.add_argument(
        "--log_level", "--log-level", default="info", help="uvicorn's log level (default: %(default)s)."
    )
    return parser


def scorer_kwargs_of(items: list[str]) -> dict[str, Any]:
    """``--scorer_arg KEY=VALUE`` flags as keyword arguments (VALUE parsed as JSON where it is JSON)."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--scorer_arg {item!r} should read KEY=VALUE.")
        kwargs[key] = json_or_text(value)
    return kwargs


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, check the scorer is registered, and serve until interrupted."""
    args = build_parser().parse_args(argv)
    register_outside_scorers()
    if args.scorer not in available_scorers():
        raise SystemExit(f"trl-diffusion-sdpo reward-server: error: {unknown_scorer_message(args.scorer, '--scorer')}")
    for name in ("max_batch_size", "port"):
        if getattr(args, name) < 1:
            raise SystemExit(f"trl-diffusion-sdpo reward-server: error: --{name} must be >= 1.")
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            "trl-diffusion-sdpo reward-server needs FastAPI and uvicorn: pip install 'trl-diffusion-sdpo[serve]'."
        ) from None
    scorer_kwargs = scorer_kwargs_of(args.scorer_arg)
    # The scorer's models: local, cached or on a Hub that answers, or one line now (the server loads them after it
    # starts, where a failure would only show as /ready answering 503).
    try:
        check_models([args.scorer], {args.scorer: scorer_kwargs})
    except ScorerModelUnavailable as err:
        raise SystemExit(f"trl-diffusion-sdpo reward-server: error: {err}") from None
    app = build_app(
        args.scorer,
        scorer_kwargs,
        max_batch_size=args.max_batch_size,
        batch_wait=args.batch_wait_ms / 1000,
        max_request_bytes=int(args.max_request_mb * 2**20),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

"""``trl-diffusion-sdpo reward-server``'s options: argparse only, so that ``reward-server --help`` loads no scorer
code; :mod:`.reward_server` serves what they parse."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .command_parser import CommandParser
from .sample_options import add_scorer_arg_argument, json_or_text

__all__ = ["build_parser", "parse_args", "scorer_kwargs_of"]


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` (the words after ``reward-server``) as its options; exits on ``--help`` and with a usage error."""
    return build_parser().parse_args(argv)

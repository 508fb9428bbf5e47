"""``trl-diffusion-sdpo reward-server``'s entry point: a registered scorer served over HTTP by
:func:`trl_diffusion_sdpo.rewards.server.build_app` (docs/reward-server.md), with the options
:mod:`.reward_server_options` parses."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..rewards.scorers import available_scorers
from ..rewards.scorers.preflight import ScorerModelUnavailable, check_models
from ..rewards.scorers.registry import register_outside_scorers, unknown_scorer_message
from ..rewards.server import build_app
from .reward_server_options import build_parser, parse_args, scorer_kwargs_of

__all__ = ["build_parser", "main", "serve"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, check the scorer is registered, and serve until interrupted."""
    return serve(parse_args(argv))


def serve(args: argparse.Namespace) -> int:
    """Check the parsed options' scorer is registered and its models reachable, and serve until interrupted (the
    command registry's runner, :data:`~.main.COMMANDS`)."""
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

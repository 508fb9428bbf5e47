"""Does the winner's term rise after one small step? Diffusion-DPO vs the output-space and parameter-space safeguards.

The check itself, its tolerance and its models: ``tests/helpers/winner_term_check.py`` (the suite runs it at a small
size).
This writes its reports and the lambda histograms:

    python benchmarks/studies/safeguard_exactness.py --batches 100 --mu 0.5 \\
        --json benchmarks/results/safeguard-exactness/cpu-safeguard-exactness-tiny-unet-mu0.5.json
    python benchmarks/studies/safeguard_exactness.py --model flux --mu 0.5 \\
        --json benchmarks/results/safeguard-exactness/cpu-safeguard-exactness-tiny-flux-mu0.5.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the check, shared with the suite

from tests.helpers.winner_term_check import MODELS, Setting, run  # noqa: E402


def format_table(report: dict) -> str:
    lines = [
        "| start | rule | rose beyond 2nd-order tol. | rose at all | lambda mean [min, max] |",
        "|---|---|---|---|---|",
    ]
    for start, rules in report["starts"].items():
        for rule, r in rules.items():
            lines.append(
                f"| {start} | {rule} | {r['rose_beyond_tolerance']}/{r['batches']} | {r['rose_at_all']}/{r['batches']}"
                f" | {r['lambda_mean']:.3f} [{r['lambda_min']:.3f}, {r['lambda_max']:.3f}] |"
            )
    return "\n".join(lines)


def plot_lambdas(reports: dict[float, dict], path: str) -> None:
    """Histograms of the output-space and parameter-space lambdas, one panel per ``mu``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4 * len(reports), 3), squeeze=False)
    for ax, (mu, report) in zip(axes[0], sorted(reports.items())):
        for rule, colour in (("output", "tab:orange"), ("parameter", "tab:blue")):
            values = [v for start in report["starts"].values() for v in start[rule]["lambdas"]]
            ax.hist(values, bins=30, alpha=0.6, color=colour, label=f"{rule} space")
        ax.set_title(f"mu = {mu}")
        ax.set_xlabel("lambda")
    axes[0][0].set_ylabel("batches")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--mu", type=float, default=0.5)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--model", choices=MODELS, default="unet", help="unet (default), or a tiny flow transformer.")
    parser.add_argument("--beta", type=float, default=None, help="Default: 5000 (unet), 100 (flow models).")
    parser.add_argument("--pipeline", default=None, help="A diffusers pipeline folder (default: a tiny random UNet).")
    parser.add_argument("--json", default=None, help="Write the report (with every lambda) here.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adamw", action="store_true", help="Every rule under a warmed real AdamW step.")
    parser.add_argument("--adamw-lr", type=float, default=1e-6)
    parser.add_argument(
        "--plot",
        nargs="*",
        default=None,
        metavar="JSON",
        help="Plot the lambda histograms of these saved reports to --plot-to and exit.",
    )
    parser.add_argument("--plot-to", default="docs/images/safeguard_lambdas.png")
    args = parser.parse_args(argv)
    if args.plot:
        loaded = [json.loads(Path(f).read_text()) for f in args.plot]
        reports = {report["setting"]["mu"]: report for report in loaded}
        plot_lambdas(reports, args.plot_to)
        return 0
    torch.set_num_threads(args.threads)
    beta = args.beta if args.beta is not None else (5000.0 if args.model == "unet" else 100.0)
    setting = Setting(
        batches=args.batches, mu=args.mu, pairs=args.pairs, beta=beta, adamw=args.adamw, adamw_lr=args.adamw_lr
    )
    report = run(setting, args.pipeline, model=args.model)
    print(format_table(report))
    print(f"{report['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

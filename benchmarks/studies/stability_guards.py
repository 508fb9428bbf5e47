"""Stability of each guard against collapse on the toy demo: does it keep the held-out reward where Diffusion-DPO's
falls, and what does it cost where Diffusion-DPO is healthy?

Not part of the test suite. The runs, their held-out evaluation and the results file are :mod:`stability_map`'s
(the demo's shipped base, its pairs, its held-out prompts; resumable, one run appended at a time), with the guards
added as methods beside Diffusion-DPO and the default safeguard:

- ``guard-max-margin``: Diffusion-DPO with ``max_margin`` (``--max-margin``);
- ``guard-sft``: Diffusion-DPO with ``sft_weight`` (``--sft-weight``);
- ``guard-auto-beta``: Diffusion-DPO with ``auto_beta`` (target 0.2);
- ``guard-auto-mu``: the output-space safeguard with ``safeguard_mu="auto"``;
- ``guard-update-auto-mu``: the update-space safeguard with ``safeguard_mu="auto"``.

``ema_decay`` is not among them: the EMA changes no training step, and :mod:`stability_map`'s held-out evaluation
samples the trained weights, so its row would repeat Diffusion-DPO's (its effect is not measured here).

The defaults are the regimes the study is for: learning rates up to 1e-3 at the demo's beta, small betas at the
demo's learning rate, 1000 steps evaluated along the way, 10 paired seeds. Per logged step the history also keeps
``beta``, ``safeguard/mu`` and ``margin``, so the auto-beta's and auto-mu's paths are in the file.

    OMP_NUM_THREADS=1 nohup python benchmarks/studies/stability_guards.py \\
        --json benchmarks/results/cpu-stability-guards-demo.json &
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import stability_map  # noqa: E402

from trl_diffusion_sdpo.demo.methods import Method  # noqa: E402

GUARD_DEFAULTS = {"--max-margin": 5.0, "--sft-weight": 1.0}
STUDY_DEFAULTS = {
    "--lrs": "2e-5,2e-4,1e-3",
    "--betas": "50,500",
    "--max-steps": "1000",
    "--eval-steps": "100,300,1000",
    "--seeds": ",".join(str(s) for s in range(10)),
    "--methods": "dpo,sdpo-output-mu0.5,guard-max-margin,guard-sft,guard-auto-beta,guard-auto-mu,guard-update-auto-mu",
}


def guard_methods(max_margin: float, sft_weight: float) -> tuple[Method, ...]:
    """Each guard as a demo method: one ``Method`` line per guard."""
    return (
        Method("guard-max-margin", f"DPO max_margin={max_margin:g}", False, config=(("max_margin", max_margin),)),
        Method("guard-sft", f"DPO sft_weight={sft_weight:g}", False, config=(("sft_weight", sft_weight),)),
        Method("guard-auto-beta", "DPO auto_beta", False, config=(("auto_beta", True),)),
        Method("guard-auto-mu", "SDPO output mu=auto", True, "auto"),
        Method("guard-update-auto-mu", "SDPO update mu=auto", True, "auto", "update"),
    )


def _take(argv: list[str], flag: str, default: float) -> tuple[float, list[str]]:
    """``flag``'s value in ``argv`` (``default`` where absent) and ``argv`` without it."""
    if flag not in argv:
        return default, argv
    i = argv.index(flag)
    return float(argv[i + 1]), argv[:i] + argv[i + 2 :]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    values = {}
    for flag, default in GUARD_DEFAULTS.items():
        values[flag], argv = _take(argv, flag, default)
    for flag, default in STUDY_DEFAULTS.items():  # the study's regimes unless given
        if flag not in argv:
            argv += [flag, default]
    methods = guard_methods(values["--max-margin"], values["--sft-weight"])
    stability_map.EXTRA_METHODS = (*stability_map.EXTRA_METHODS, *methods)
    stability_map.HISTORY_KEYS = (*stability_map.HISTORY_KEYS, "beta", "safeguard/mu", "margin")
    return stability_map.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Which safeguard setting to use: the text the README, ``docs/safeguard.md`` and the demo's report quote, rendered
from the rows of the paired comparison (``trl_diffusion_sdpo/demo/safeguard_recommendation.json``, written by
``safeguard_comparison.py`` beside this file from the result file its ``source`` names). The demo quotes the file's
``text`` as it is; only this script renders it.

``python benchmarks/studies/recommendation.py`` rewrites the blocks between :data:`START` and :data:`END` in
:data:`PAGES` and the fields of the shipped file the demo quotes (:func:`shipped_fields`: the ``text``, the result
files it rests on and their runs' pairs per step); ``--check`` only reports what differs.

The rule, read off the rows (every number in the text is a row's):

* default: of the safeguards that pay where Diffusion-DPO's pathology bites (lr 2e-4), the one that costs least
  where Diffusion-DPO is healthy (the demo's lr 2e-5, 200 steps): the cheapest insurance;
* Diffusion-DPO (``safeguard_space="none"``) where it is healthy: every safeguard's reward is at or below its own;
* the update space where the pathology bites or may: it pays at lr 2e-4 and, of the safeguards, is the one that
  still pays at the in-between lr 1e-4;
* the authors' per-model values (:data:`AUTHORS_MU`), the defaults of their models' families (real-model evidence
  outranks the toy's); the toy's default is the fallback elsewhere. The demo's own table keeps them for comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "AUTHORS_MU",
    "END",
    "PAGES",
    "START",
    "choose",
    "evidence_files",
    "load_rows",
    "main",
    "marked_block",
    "render",
    "replace_block",
    "shipped_fields",
    "table",
]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "trl_diffusion_sdpo" / "demo" / "safeguard_recommendation.json"
START = "<!-- recommendation:start -->"
END = "<!-- recommendation:end -->"
PAGES = ("README.md", "docs/safeguard.md")
"""The pages that carry the block, relative to the repository root."""

AUTHORS_MU: tuple[tuple[str, float], ...] = (
    ("SD1.5 with Diffusion-DPO and DMPO", 0.9),
    ("SDXL", 0.6),
    ("SD1.5 with DSPO", 0.2),
)
"""The Diffusion-SDPO authors' ``mu`` per model and objective (arXiv 2511.03317): the defaults of those families
(``ModelFamily.authors_safeguard_mu``; ``safeguard_mu`` unset)."""

ONLINE_HEALTHY = "benchmarks/results/online/cpu-online-comparison-tiny.json"
ONLINE_HACKING = "benchmarks/results/online/cpu-online-hacking-demo.json"
"""The online evidence: where online Diffusion-DPO is healthy (the colour reward, lr 2e-4) and where it hacks a
brightness reward (lr 1e-3); the online line (:func:`online_evidence`) is read from their ``analysis``."""
_ONLINE_SAFEGUARDS = {
    "online-sdpo-output": "output space, mu=0.5",
    "online-sdpo-default": "mu=0.9 (the authors' SD1.5 value)",
    "online-sdpo-output-auto": "mu=auto",
    "online-sdpo-parameter": "parameter space, mu=0.5",
    "sdpo-default": "mu=0.9 (the authors' SD1.5 value)",
    "sdpo-output-auto": "mu=auto",
    "sdpo-update-auto": "update space, mu=auto",
    "sdpo-parameter-auto": "parameter space, mu=auto",
}
_PATHOLOGICAL, _BETWEEN, _HEALTHY = "pathological", "between", "demo's"
_LABEL = re.compile(r"^(?P<space>\w+) space(?P<pair> per pair)?, mu=(?P<mu>[\d.]+)$")


def load_rows(path: Path = SHIPPED) -> dict[str, Any]:
    """The shipped recommendation file: ``rows`` (one per setting and safeguard, with the reward difference from
    Diffusion-DPO, its 95% paired t interval, the seeds and a verdict), ``source`` and ``min_seeds``."""
    return json.loads(Path(path).read_text())


def _ci(reward: dict[str, Any]) -> str:
    low, high = reward["ci95"]
    return f"{reward['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _setting(row: dict[str, Any]) -> str:
    """The regime a row's setting names: its first word (``pathological``, ``between`` or ``demo's``)."""
    return row["setting"].split()[0].rstrip(":")


def choose(recommendation: dict[str, Any]) -> dict[str, Any]:
    """The rows the text quotes, picked by the rule in the module's docstring from the rows with at least
    ``min_seeds`` paired seeds.

    Returns ``default``, ``update`` (their row at lr 2e-4), ``default_healthy`` (the default's rows at the demo's lr,
    by run length), ``update_between`` (the update space's row at lr 1e-4, or ``None``), ``between_others`` (the other
    safeguards' rows there), ``healthy_range`` (the lowest and highest safeguard reward difference at the demo's lr,
    200 steps), ``space`` and ``mu`` (the default's, parsed from its label) and ``n`` (the seeds)."""
    rows = [r for r in recommendation["rows"] if r["n"] >= recommendation.get("min_seeds", 0)]

    def at(setting: str, method: str | None = None, step: int | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in rows
            if _setting(r) == setting and method in (None, r["method"]) and step in (None, r["run_steps"])
        ]

    healthy = at(_HEALTHY, step=200)
    paying = [r for r in at(_PATHOLOGICAL) if r["verdict"] == "pays"]
    priced = [r for r in paying if any(h["method"] == r["method"] for h in healthy)]
    if not priced:
        raise ValueError("no safeguard both pays at lr 2e-4 and was measured at the demo's lr: nothing to recommend")

    def cost(row: dict[str, Any]) -> float:
        return next(h for h in healthy if h["method"] == row["method"])["reward_minus_dpo"]["mean"]

    default = max(priced, key=cost)
    parsed = _LABEL.match(default["label"])
    if parsed is None or parsed["pair"]:
        raise ValueError(f"cannot read a safeguard_space and mu from {default['label']!r}")
    update = next((r for r in paying if (m := _LABEL.match(r["label"])) and m["space"] == "update"), None)
    if update is None:
        raise ValueError("the update space does not pay at lr 2e-4 in these rows")
    between = at(_BETWEEN)
    means = [h["reward_minus_dpo"]["mean"] for h in healthy]
    return {
        "default": default,
        "default_healthy": sorted(at(_HEALTHY, default["method"]), key=lambda r: r["run_steps"]),
        "update": update,
        "update_between": next((r for r in between if r["method"] == update["method"]), None),
        "between_others": [r for r in between if r["method"] != update["method"]],
        "healthy_range": (min(means), max(means)),
        "healthy_all_below": all(h["verdict"] == "costs" for h in healthy),
        "space": parsed["space"],
        "mu": float(parsed["mu"]),
        "n": min(r["n"] for r in rows),
    }


def online_evidence(root: Path = ROOT) -> dict[str, Any]:
    """Each online safeguard's held-out shape IoU and colour reward minus online Diffusion-DPO's at the last step
    (95% paired t, 10 paired seeds or fewer where fewer ran): ``healthy`` from the online comparison, ``hacking``
    from the online hacking regime, with the hacking regime's goal verdicts (``holds``: the setting keeps what
    Diffusion-DPO loses there). The online default (no safeguard) rests on these: every safeguard costs where
    online Diffusion-DPO is healthy and none holds where it breaks; a file that says otherwise raises."""
    healthy = next(iter(json.loads((root / ONLINE_HEALTHY).read_text())["analysis"].values()))
    hacking = json.loads((root / ONLINE_HACKING).read_text())["analysis"]
    last = str(hacking["steps"])
    rows: dict[str, list[dict[str, Any]]] = {"healthy": [], "hacking": []}
    for method, entry in healthy["methods"].items():
        if method in _ONLINE_SAFEGUARDS and "minus_online_dpo" in entry:  # 2 paired seeds or more
            paired = entry["minus_online_dpo"]
            rows["healthy"].append({"label": _ONLINE_SAFEGUARDS[method], "n": paired["shape_iou"]["n"],
                                    **{m: paired[m] for m in ("shape_iou", "colour_reward")}})  # fmt: skip
    broken = [m for m, g in hacking["goal"].items() if g["diffusion_dpo_breaks"]]
    for method, entry in hacking["settings"].items():
        if method in _ONLINE_SAFEGUARDS:
            row = entry["by_step"][last]
            holds = all(hacking["goal"][m]["settings"][method]["met"] for m in broken)
            paired = {m: row[m]["vs_dpo"] for m in ("shape_iou", "colour_reward")}
            rows["hacking"].append({"label": _ONLINE_SAFEGUARDS[method], "n": paired["shape_iou"]["n"],
                                    "holds": holds, **paired})  # fmt: skip
    costing = [r for r in rows["healthy"] if r["shape_iou"]["ci95"][1] < 0 or r["colour_reward"]["ci95"][1] < 0]
    if len(costing) < len(rows["healthy"]) or any(r["holds"] for r in rows["hacking"]) or not broken:
        raise ValueError("the online evidence no longer says every safeguard costs online and none holds: revisit "
                         "OnlineDiffusionSDPOConfig's safeguard_space default")  # fmt: skip
    return {"rows": rows, "breaks_on": broken, "learning_rates": (healthy["learning_rate"], hacking["learning_rate"])}


def _tiny_line() -> str:
    """The shipped tiny base's own entry, as the resolution table states it (its value and its evidence)."""
    from trl_diffusion_sdpo.config.defaults import TINY_BASE, resolve_default
    from trl_diffusion_sdpo.families.sd import StableDiffusionFamily

    tiny = resolve_default("safeguard_mu", StableDiffusionFamily, "dpo", base=TINY_BASE)
    return (
        f"- The shipped tiny base (`{TINY_BASE}`, the demo's and the tiny configs'): `safeguard_mu` unset is "
        f"{tiny.value:g} there, from {tiny.source}."
    )


def _online_line(evidence: dict[str, Any]) -> str:
    """The online bullet: no safeguard by default, and why, every number from :func:`online_evidence`."""
    healthy, hacking = evidence["rows"]["healthy"], evidence["rows"]["hacking"]
    fell = " and ".join(m.replace("_", " ") for m in evidence["breaks_on"])
    healthy_lr, hacking_lr = (f"{lr:.0e}".replace("e-0", "e-") for lr in evidence["learning_rates"])
    worst = min(hacking, key=lambda r: r["colour_reward"]["mean"])
    ious = [r["shape_iou"]["mean"] for r in healthy]
    return (
        "- Online (`OnlineDiffusionSDPOTrainer`): no safeguard unless a flag asks for one (`safeguard_space` unset is "
        f"`none` there; the authors' values were measured offline). Where online Diffusion-DPO was healthy (lr "
        f"{healthy_lr}) each of the {len(healthy)} safeguard settings cost held-out shape IoU "
        f"({max(ious):+.4f} to {min(ious):+.4f} against it); where it hacked a brightness reward (lr "
        f"{hacking_lr}; its {fell} worsened) none of the {len(hacking)} kept what it lost, and "
        f"{worst['label']} cost {_ci(worst['colour_reward'])} colour reward more."
    )


def _lr(row: dict[str, Any]) -> str:
    """The learning rate as the row's setting writes it (``lr 2e-4``)."""
    found = re.search(r"lr [\d.e+-]+", row["setting"])
    return found.group(0) if found else f"lr {row['learning_rate']:g}"


def render(recommendation: dict[str, Any], page: str | None = None) -> str:
    """The seven lines of "which setting should I use", as Markdown. ``page``: where the text goes; from the README
    the evidence is a link to ``docs/safeguard.md`` (which names the result file), elsewhere the result file;
    ``docs/safeguard.md`` also gets every row as a table (:func:`table`). ``None``: the demo's console."""
    picked = choose(recommendation)
    default, update, healthy = picked["default"], picked["update"], picked["default_healthy"]
    compared = len({r["method"] for r in recommendation["rows"] if _setting(r) == _HEALTHY and r["run_steps"] == 200})
    costs = [f"{_ci(r['reward_minus_dpo'])} at {r['run_steps']} steps" for r in healthy]
    costs[0] += f" (the least of the {compared} safeguards)"
    low, high = picked["healthy_range"]
    between, others = picked["update_between"], picked["between_others"]
    also = ""
    if between is not None and between["verdict"] == "pays":
        quiet = sum(r["verdict"] != "pays" for r in others)
        who = f"none of the other {len(others)}" if quiet == len(others) else f"{len(others) - quiet} of the other"
        also = f", and {_ci(between['reward_minus_dpo'])} at {_lr(between)}, where {who} paid"
    authors = ", ".join(f"{mu:g} for {model}" for model, mu in AUTHORS_MU)
    evidence = (
        "[the safeguard](docs/safeguard.md)"
        if page == "README.md"
        else f"`{recommendation['source']}`, {picked['n']} paired seeds per setting and safeguard"
    )
    dpo_cost = (
        f"every safeguard cost reward there ({low:+.3f} to {high:+.3f} at 200 steps)"
        if picked["healthy_all_below"]
        else f"the safeguards differed from it by {low:+.3f} to {high:+.3f} there at 200 steps"
    )
    lines = [
        "- Default (`safeguard_mu` unset): the authors' value where they measured the model (below); elsewhere "
        f'Diffusion-SDPO in the {picked["space"]} space at `mu={picked["mu"]:g}` (`safeguard_space="'
        f"{picked['space']}\"`, `safeguard_mu={picked['mu']:g}`), the cheapest insurance: where Diffusion-DPO's "
        f"pathology bites ({_lr(default)}) it changes the held-out reward by {_ci(default['reward_minus_dpo'])} "
        f"against Diffusion-DPO; where Diffusion-DPO is healthy ({_lr(healthy[0])}) it costs {' and '.join(costs)}.",
        '- Diffusion-DPO (`safeguard_space="none"`) where it is healthy (its held-out reward rising) costs '
        f"nothing: {dpo_cost}.",
        f'- The update space at `mu={_LABEL.match(update["label"])["mu"]}` (`safeguard_space="update"`) where '
        "Diffusion-DPO's pathology bites (its held-out reward falling, its winner's error rising): "
        f"{_ci(update['reward_minus_dpo'])} at {_lr(update)}{also}.",
        f"- The authors' values, the defaults for their models (real-model evidence outranks this toy's): "
        f"`safeguard_mu` {authors} (arXiv 2511.03317).",
        _online_line(online_evidence()),
        _tiny_line(),
        "- Evidence: paired comparisons on the benchmark's toy base (held-out reward minus Diffusion-DPO's, 95% "
        f"paired t interval): {evidence}.",
    ]
    if page == "docs/safeguard.md":
        lines += ["", *table(recommendation)]
    return "\n".join(lines)


def evidence_files(recommendation: dict[str, Any]) -> list[str]:
    """Every result file the text's figures come from, for the demo to name beside its quote: the comparison's
    (``source``), the one the tiny base's entry cites and the online evidence's."""
    from trl_diffusion_sdpo.config.defaults import TINY_BASE, resolve_default
    from trl_diffusion_sdpo.families.sd import StableDiffusionFamily

    tiny = resolve_default("safeguard_mu", StableDiffusionFamily, "dpo", base=TINY_BASE).source
    cited = re.findall(r"benchmarks/results/\S+?\.json", tiny)
    return list(dict.fromkeys([recommendation["source"], *cited, ONLINE_HEALTHY, ONLINE_HACKING]))


def pairs_per_step(recommendation: dict[str, Any], root: Path = ROOT) -> int:
    """The preference pairs per optimizer step of every run behind the rows (the comparison's inputs' grids)."""
    comparison = json.loads((root / recommendation["source"]).read_text())
    sizes = {source["grid"]["batch_size"] for source in comparison["sources"].values()}
    if len(sizes) != 1:
        raise ValueError(f"the comparison's runs took {sorted(sizes)} pairs per step: the demo names one")
    return sizes.pop()


def shipped_fields(recommendation: dict[str, Any], root: Path = ROOT) -> dict[str, Any]:
    """What the shipped file carries beside the rows for the demo to quote: ``text`` (:func:`render` for the
    console), ``sources`` (:func:`evidence_files`) and ``pairs_per_step`` (:func:`pairs_per_step`)."""
    return {
        "text": render(recommendation),
        "sources": evidence_files(recommendation),
        "pairs_per_step": pairs_per_step(recommendation, root),
    }


def table(recommendation: dict[str, Any]) -> list[str]:
    """Every row as a Markdown table: the evidence ``docs/safeguard.md`` carries under the five lines."""
    lines = [
        "| setting | safeguard | seeds | reward minus Diffusion-DPO [95% paired t] | detectable (80% power) "
        "| verdict |",
        "|---|---|---:|---|---:|---|",
    ]
    for row in recommendation["rows"]:
        reward = row["reward_minus_dpo"]
        lines.append(
            f"| {row['setting']} | {row['label']} | {row['n']} | {_ci(reward)} | {reward['mde80']:.3f} | "
            f"{row['verdict']} |"
        )
    return lines


def marked_block(text: str) -> str | None:
    """What a page holds between :data:`START` and :data:`END` (without the markers' lines), or ``None``."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def replace_block(text: str, block: str) -> str:
    """``text`` with the marked block replaced by ``block`` (the markers must be there)."""
    if marked_block(text) is None:
        raise ValueError(f"no {START} ... {END} block")
    head, rest = text.split(START, 1)
    # blank lines inside the markers, so that the block renders as Markdown
    return f"{head}{START}\n\n{block}\n\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT), help="Repository root (default: this checkout's).")
    parser.add_argument("--check", action="store_true", help="Only report the blocks that differ (exit status 1).")
    args = parser.parse_args(argv)
    recommendation = load_rows()
    stale = []
    for name in PAGES:
        path = Path(args.root) / name
        if not path.is_file():
            parser.error(f"no {name} under {args.root}: run from a clone of the repository or pass --root")
        text = path.read_text()
        block = render(recommendation, name)
        if marked_block(text) != block:
            stale.append(name)
            if not args.check:
                path.write_text(replace_block(text, block))
    fields = shipped_fields(recommendation)
    if any(recommendation.get(name) != value for name, value in fields.items()):
        stale.append(str(SHIPPED.relative_to(ROOT)))
        if not args.check:
            SHIPPED.write_text(json.dumps({**recommendation, **fields}, indent=1) + "\n")
    for name in stale:
        print(f"{name}: {'differs from the generated text' if args.check else 'rewritten'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

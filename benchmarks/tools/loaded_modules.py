"""Which of the package's modules a plain training run loads, and their lines; and the package's function-level
imports of itself.

    python benchmarks/tools/loaded_modules.py --label after \
        --out benchmarks/results/structure/cpu-loaded-modules-tiny-sd.json
    python benchmarks/tools/loaded_modules.py --root <another checkout> --label before --out (the same file)

The run: the tiny Stable Diffusion pipeline (``trl_diffusion_sdpo.testing``, seed 0), saved with ``save_pretrained``
by a first process and loaded with ``DiffusionPipeline.from_pretrained`` by a fresh second one, as a user's script
loads a pipeline (so the measured process never imports the test pipelines' builders); in that second process the
trainer is constructed with LoRA adapters on four coloured pairs in TRL's preference form (``prompt``, ``chosen``,
``rejected``), trained for 2 optimizer steps and saved (``trainer.save_model()``). Afterwards every module of
``sys.modules`` under ``trl_diffusion_sdpo`` is listed with its file's physical lines (newlines, as ``wc -l`` counts
them). Two runs: Diffusion-DPO (``safeguard_space="none"``) and the exact rule (``safeguard_space="parameter"``).
Each module is also attributed to the package code that first asked for it: a module's top level, or a function
(named ``module.function()``) for an import at run time, the lazy attributes' machinery looked through (a finder on
``sys.meta_path`` of the measured process notes it and finds nothing).

With ``--import-repeats N``: the seconds ``import trl_diffusion_sdpo.trainer`` takes in N fresh interpreters (one
thread, timed inside the interpreter around the import alone), each followed by one on ``--import-against``'s checkout
where given, so that both are read under the same load; the median and every reading are recorded.

The function-level count: ``import`` / ``from ... import`` statements inside a function body (nested functions
included) that import this package (relative imports, or absolute ones naming ``trl_diffusion_sdpo``), over every
``.py`` file of the package; ``if TYPE_CHECKING`` blocks at module level are not in a function and do not count.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

PACKAGE = "trl_diffusion_sdpo"
REPO = Path(__file__).resolve().parents[2]
SCENARIOS = {"dpo": {"safeguard_space": "none"}, "parameter": {"safeguard_space": "parameter", "safeguard_mu": 0.5}}
sys.path.insert(0, str(REPO))
from tests.helpers.core import LOADED_LINES_LIMITS as LIMITS  # noqa: E402  the limits' one home

BUILD = """
import sys
from trl_diffusion_sdpo.testing.unet import build_tiny_sd_pipeline
build_tiny_sd_pipeline(seed=0, tokenizer_dir=sys.argv[2]).save_pretrained(sys.argv[1])
"""

RUN = """
import json, sys

FIRST_IMPORTERS = {}


class FirstImporters:
    \"\"\"A finder that finds nothing: it notes, for each package module, the package code whose import (a module's
    top level) or call (a function, named) first asked for it; the lazy-attribute machinery is looked through.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.startswith("trl_diffusion_sdpo.") and name not in FIRST_IMPORTERS:
            frame = sys._getframe(1)
            while frame is not None:
                module = frame.f_globals.get("__name__", "")
                if module.startswith("trl_diffusion_sdpo") and module != "trl_diffusion_sdpo.config._lazy":
                    function = frame.f_code.co_name
                    FIRST_IMPORTERS[name] = module if function == "<module>" else f"{module}.{function}()"
                    break
                frame = frame.f_back
            else:
                FIRST_IMPORTERS[name] = "(the run's script)"
        return None


sys.meta_path.insert(0, FirstImporters())

import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from peft import LoraConfig
from PIL import Image

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer

torch.set_num_threads(1)
pipeline_dir, output_dir, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
colours = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 20), (200, 20, 200), (20, 200, 200)]
rows = [
    {
        "prompt": f"a picture number {i}",
        "chosen": Image.new("RGB", (32, 32), colours[(2 * i) % 6]),
        "rejected": Image.new("RGB", (32, 32), colours[(2 * i + 1) % 6]),
    }
    for i in range(4)
]
args = DiffusionSDPOConfig(
    output_dir=output_dir, resolution=32, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
    logging_steps=1, use_cpu=True, report_to="none", save_strategy="no", dataloader_num_workers=0,
    disable_tqdm=True, seed=0, **settings,
)
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
trainer = DiffusionSDPOTrainer(
    DiffusionPipeline.from_pretrained(pipeline_dir), args=args, train_dataset=Dataset.from_list(rows), peft_config=lora
)
trainer.train()
trainer.save_model()
loaded = {
    name: module.__file__
    for name, module in list(sys.modules.items())
    if (name == "trl_diffusion_sdpo" or name.startswith("trl_diffusion_sdpo.")) and getattr(module, "__file__", None)
}
print("LOADED " + json.dumps({"files": loaded, "importers": FIRST_IMPORTERS}))
"""


def physical_lines(path: Path) -> int:
    """Newlines in ``path``, as ``wc -l`` counts them."""
    return path.read_bytes().count(b"\n")


def function_level_imports(package_dir: Path) -> list[str]:
    """``file:line`` of every import of this package inside a function body, in ``package_dir``'s files."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        seen: set[int] = set()
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if id(node) in seen or not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                seen.add(id(node))
                if isinstance(node, ast.ImportFrom):
                    internal = node.level > 0 or (node.module or "").split(".")[0] == PACKAGE
                else:
                    internal = any(alias.name.split(".")[0] == PACKAGE for alias in node.names)
                if internal:
                    found.append(f"{path.relative_to(package_dir.parent)}:{node.lineno}")
    return found


def run_fresh(root: Path, script: str, args: list[str], work: Path) -> str:
    """``script`` with ``args`` in a fresh interpreter on the package at ``root`` (one thread), run in ``work``: its
    standard output; a failure raises with the end of its standard error."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=work, env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"the run {args} failed:\n{done.stderr[-4000:]}")
    return done.stdout


IMPORT_TIME = """
import time
start = time.perf_counter()
import trl_diffusion_sdpo.trainer
print(f"SECONDS {time.perf_counter() - start:.4f}")
"""


def trainer_import_seconds(roots: dict[str, Path], repeats: int, work: Path) -> dict[str, dict]:
    """Per name of ``roots``: the seconds of ``import trl_diffusion_sdpo.trainer`` on that checkout in ``repeats``
    fresh interpreters, the checkouts taking turns (one interpreter each per round, so a change of load reaches
    both); each with its median."""
    readings: dict[str, list[float]] = {name: [] for name in roots}
    for _ in range(repeats):
        for name, root in roots.items():
            stdout = run_fresh(root, IMPORT_TIME, [], work)
            readings[name].append(float(next(line for line in stdout.splitlines() if line.startswith("SECONDS "))[8:]))
    return {name: {"median": statistics.median(values), "readings": values} for name, values in readings.items()}


def build_pipeline(root: Path, work: Path) -> Path:
    """The tiny SD pipeline saved by a process of its own (the measured runs never import its builders); its folder."""
    run_fresh(root, BUILD, [str(work / "pipeline"), str(work / "tokenizer")], work)
    return work / "pipeline"


def store_run(out: Path, what: str, label: str, run: dict, **fields) -> None:
    """Add ``run`` to the result file ``out`` under ``label``, beside the runs it already holds."""
    stored = json.loads(out.read_text()) if out.exists() else {}
    result = {"what": what, **fields, "runs": {**stored.get("runs", {}), label: run}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def measure(root: Path, scenario: str, pipeline_dir: Path, work: Path) -> dict:
    """Run ``scenario`` on the package at ``root`` in a fresh interpreter: its loaded modules and their lines."""
    stdout = run_fresh(root, RUN, [str(pipeline_dir), str(work / scenario), json.dumps(SCENARIOS[scenario])], work)
    loaded = json.loads(next(line for line in stdout.splitlines() if line.startswith("LOADED "))[7:])
    modules = {
        name: {
            "lines": physical_lines(Path(file)),
            "first_imported_by": loaded["importers"].get(name, "(the run's script)"),
        }
        for name, file in sorted(loaded["files"].items())
    }
    total = sum(m["lines"] for m in modules.values())
    by_folder: dict[str, int] = {}
    for name, module in modules.items():
        folder = name.split(".")[1] if "." in name else "(package)"
        by_folder[folder] = by_folder.get(folder, 0) + module["lines"]
    return {
        "settings": SCENARIOS[scenario],
        "modules_loaded": len(modules),
        "lines_loaded": total,
        "limit": LIMITS[scenario],
        "within_limit": total <= LIMITS[scenario],
        "lines_by_folder": dict(sorted(by_folder.items(), key=lambda item: -item[1])),
        "modules": modules,
    }


def checkout_id(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
    if done.returncode != 0:
        return str(root)
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout whose package is measured")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--label", default="run", help="the name of this measurement in --out's runs")
    parser.add_argument("--checkout", help="what --root holds (default: its git commit)")
    parser.add_argument("--out", type=Path, help="a result file: this measurement is added to its runs by --label")
    parser.add_argument("--import-repeats", type=int, default=0, help="time the trainer's import N times (0: not)")
    parser.add_argument("--import-against", type=Path, help="a checkout whose import is timed in turn with --root's")
    parser.add_argument("--import-against-checkout", help="what --import-against holds (default: its git commit)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    package_dir = root / PACKAGE
    internal = function_level_imports(package_dir)
    run = {
        "checkout": args.checkout or checkout_id(root),
        "command": " ".join(["python benchmarks/tools/loaded_modules.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {version('torch')}, diffusers {version('diffusers')}, transformers {version('transformers')}",
        "load_average_1min_before": os.getloadavg()[0],
        "package_modules": sum(1 for _ in package_dir.rglob("*.py")),
        "package_lines": sum(physical_lines(p) for p in package_dir.rglob("*.py")),
        "function_level_package_imports": len(internal),
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipeline_dir = build_pipeline(root, work)
        for scenario in args.scenarios.split(","):
            result = measure(root, scenario, pipeline_dir, work)
            run["scenarios"][scenario] = result
            print(
                f"{scenario}: {result['modules_loaded']} modules, {result['lines_loaded']} lines "
                f"(limit {result['limit']}); by folder {result['lines_by_folder']}",
                flush=True,
            )
        if args.import_repeats:
            roots = {"this": root}
            if args.import_against is not None:
                roots["against"] = args.import_against.resolve()
            timed = trainer_import_seconds(roots, args.import_repeats, work)
            if "against" in timed:
                timed["against"]["checkout"] = args.import_against_checkout or checkout_id(roots["against"])
            run["trainer_import_seconds"] = timed
            print(f"import trl_diffusion_sdpo.trainer: {json.dumps({k: v['median'] for k, v in timed.items()})} s")
    run["load_average_1min_after"] = os.getloadavg()[0]
    print(f"function-level package-internal imports: {len(internal)}")
    if args.out:
        store_run(args.out, __doc__.strip(), args.label, run, limits=LIMITS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

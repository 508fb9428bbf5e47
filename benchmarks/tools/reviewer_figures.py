"""The figures an outside review reads off the package: how much of it one training step runs, how far it reaches into
``transformers.Trainer`` and into its own trainer, where it branches on the online run, and what a plain run loads.

    python benchmarks/tools/reviewer_figures.py --label after \
        --out benchmarks/results/structure/cpu-reviewer-figures.json
    python benchmarks/tools/reviewer_figures.py --root <another checkout> --label before --out (the same file)

The run: the tiny Stable Diffusion pipeline (``trl_diffusion_sdpo.testing``, seed 0), built and saved by a first
process and loaded with ``DiffusionPipeline.from_pretrained`` by a fresh second one, as a user's script loads it; LoRA
adapters (r=4) on four coloured pairs in TRL's preference form, batch 2, 3 optimizer steps (no accumulation) with a
checkpoint at step 3, then ``trainer.save_model()``. One run per safeguard space: Diffusion-DPO
(``safeguard_space="none"``), the exact rule (``"parameter"``), the output space and the update space.

Traced (``sys.setprofile``, every Python ``call`` event whose code lives in the package's files):
- ``training_step``: the package functions called, and their files, during the run's second micro-batch: from the
  entry of its outermost ``training_step`` (the trainer's override, or ``Trainer.training_step`` where none is
  defined) to its return;
- ``optimizer_step``: the files (and functions) that run during the third optimizer step, from the callbacks'
  ``on_step_begin`` to their ``on_step_end`` (its micro-batch, clipping, the optimizer's and the scheduler's step; the
  log and the save after it are not in it).

Read from the sources (``ast``, every ``.py`` file of the package):
- ``private_trainer_reads``: reads of a private attribute (one leading underscore) of the trainer by a module other
  than ``trainer.py``: ``trainer._x``, ``self.trainer._x``, ``getattr(trainer, "_x")``;
- ``is_online_reads``: reads of ``is_online`` outside ``online/``: an attribute read ``x.is_online`` or
  ``getattr(x, "is_online", ...)``;
- ``regime_decisions_outside_online``: where a module outside ``online/`` decides by the run's regime: it reads
  ``regime``, ``defaults_regime``, ``is_online`` or ``is_online_config``, passes ``online=``, or compares with or
  passes the string ``"online"``;
- ``trainer_methods_called_around_the_mro``: calls of ``Trainer.<method>(...)`` on the class itself;
- ``function_level_package_imports``: imports of the package inside a function body (as
  ``benchmarks/tools/loaded_modules.py`` counts them).

Read from the classes (imported in a process of their own): the ``transformers.Trainer`` methods that the offline and
the online trainer classes (the package's classes of their MRO) define again, and how many are private (one leading
underscore; dunders other than ``__init__`` are left out).

Lines loaded: every module of ``sys.modules`` under the package after the plain (Diffusion-DPO) run, with its file's
physical lines (newlines, as ``wc -l`` counts them).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
from loaded_modules import (  # noqa: E402
    build_pipeline,
    checkout_id,
    function_level_imports,
    physical_lines,
    run_fresh,
    store_run,
)

from tests.helpers.core import CORE  # noqa: E402
from tests.helpers.source_scans import is_online_reads_in, is_private, private_trainer_reads_in  # noqa: E402

PACKAGE = "trl_diffusion_sdpo"
SCENARIOS = {
    "dpo": {"safeguard_space": "none"},
    "exact": {"safeguard_space": "parameter", "safeguard_mu": 0.5},
    "output": {"safeguard_space": "output", "safeguard_mu": 0.5},
    "update": {"safeguard_space": "update", "safeguard_mu": 0.5},
}

RUN = """
import json, os, sys

import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from peft import LoraConfig
from PIL import Image
from transformers import Trainer, TrainerCallback

import trl_diffusion_sdpo
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer

PACKAGE_DIR = os.path.dirname(os.path.abspath(trl_diffusion_sdpo.__file__)) + os.sep


class Trace:
    \"\"\"Package functions called while recording, by (file relative to the package, qualified name).\"\"\"

    def __init__(self):
        self.functions = set()
        self.recording = False

    def note(self, code):
        if self.recording and code.co_filename.startswith(PACKAGE_DIR):
            self.functions.add((code.co_filename[len(PACKAGE_DIR):], code.co_qualname))


STEP, OPTIMIZER_STEP = Trace(), Trace()
STEP_CODES = set()  # the training_step code objects: Trainer's and any override in the trainer's MRO
state = {"outer": None, "steps": 0}


def profile(frame, event, arg):
    if event == "call":
        code = frame.f_code
        if state["outer"] is None and code in STEP_CODES:
            state["outer"] = frame
            state["steps"] += 1
            STEP.recording = state["steps"] == 2
        STEP.note(code)
        OPTIMIZER_STEP.note(code)
    elif event == "return" and frame is state["outer"]:
        state["outer"] = None
        STEP.recording = False


class Tracing(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        sys.setprofile(profile)

    def on_step_begin(self, args, state, control, **kwargs):
        OPTIMIZER_STEP.recording = state.global_step == 2  # the third optimizer step

    def on_step_end(self, args, state, control, **kwargs):
        OPTIMIZER_STEP.recording = False

    def on_train_end(self, args, state, control, **kwargs):
        sys.setprofile(None)


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
    output_dir=output_dir, resolution=32, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
    logging_steps=1, use_cpu=True, report_to="none", save_strategy="steps", save_steps=3,
    dataloader_num_workers=0, disable_tqdm=True, seed=0, **settings,
)
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
trainer = DiffusionSDPOTrainer(
    DiffusionPipeline.from_pretrained(pipeline_dir), args=args, train_dataset=Dataset.from_list(rows),
    peft_config=lora, callbacks=[Tracing()],
)
STEP_CODES.add(Trainer.training_step.__code__)
for cls in type(trainer).__mro__:
    method = cls.__dict__.get("training_step")
    if method is not None and hasattr(method, "__code__"):
        STEP_CODES.add(method.__code__)
trainer.train()
trainer.save_model()
loaded = {
    name: module.__file__
    for name, module in list(sys.modules.items())
    if (name == "trl_diffusion_sdpo" or name.startswith("trl_diffusion_sdpo.")) and getattr(module, "__file__", None)
}
print("FIGURES " + json.dumps({
    "steps_traced": state["steps"],
    "training_step": sorted(STEP.functions),
    "optimizer_step": sorted(OPTIMIZER_STEP.functions),
    "loaded": loaded,
}))
"""

OVERRIDES = """
import json
from transformers import Trainer
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOTrainer

import ast, inspect, textwrap


def calls_super(function, name):  # whether the body calls super().<name>(...)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError):
        return False
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
        and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
        and node.func.value.func.id == "super"
        for node in ast.walk(tree)
    )


found, by_super = {}, {}
for trainer_class in (DiffusionSDPOTrainer, OnlineDiffusionSDPOTrainer):
    names, reaching = set(), set()
    for cls in trainer_class.__mro__:
        if cls.__module__.startswith("trl_diffusion_sdpo"):
            for n, value in vars(cls).items():
                if hasattr(Trainer, n) and (n == "__init__" or not n.startswith("__")):
                    names.add(n)
                    if calls_super(getattr(value, "__wrapped__", value), n):
                        reaching.add(n)
    found[trainer_class.__name__] = sorted(names)
    by_super[trainer_class.__name__] = sorted(reaching)
print("OVERRIDES " + json.dumps({"found": found, "super": by_super}))
"""

CONFIG_FIELDS = """
import dataclasses, json
from transformers import TrainingArguments
from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig

base = {f.name for f in dataclasses.fields(TrainingArguments)}
print("FIELDS " + json.dumps({
    cls.__name__: sorted(f.name for f in dataclasses.fields(cls) if f.name not in base)
    for cls in (DiffusionSDPOConfig, OnlineDiffusionSDPOConfig)
}))
"""


def private_trainer_reads(package_dir: Path) -> list[str]:
    """``file:line attribute`` of each private trainer attribute read outside the package's ``trainer.py``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        if path == package_dir / "trainer.py":
            continue
        relative = path.relative_to(package_dir.parent)
        found += [f"{relative}:{line} {name}" for line, name in private_trainer_reads_in(path.read_text())]
    return found


def is_online_reads(package_dir: Path) -> list[str]:
    """``file:line`` of each ``is_online`` read outside ``online/``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        if (package_dir / "online") in path.parents:
            continue
        found += [f"{path.relative_to(package_dir.parent)}:{line}" for line in is_online_reads_in(path.read_text())]
    return found


def traced(functions: list[list[str]]) -> dict:
    """A traced span's figures: functions and files, the functions per file."""
    by_file: dict[str, list[str]] = {}
    for file, name in functions:
        by_file.setdefault(file, []).append(name)
    return {
        "functions": len(functions),
        "files": len(by_file),
        "by_file": {file: sorted(names) for file, names in sorted(by_file.items())},
    }


def run_scenario(root: Path, scenario: str, pipeline_dir: Path, work: Path) -> dict:
    """The traced run of ``scenario`` on the package at ``root``, in a fresh interpreter."""
    stdout = run_fresh(root, RUN, [str(pipeline_dir), str(work / scenario), json.dumps(SCENARIOS[scenario])], work)
    figures = json.loads(next(line for line in stdout.splitlines() if line.startswith("FIGURES "))[8:])
    lines = {name: physical_lines(Path(file)) for name, file in sorted(figures["loaded"].items())}
    return {
        "settings": SCENARIOS[scenario],
        "training_steps_run": figures["steps_traced"],
        "training_step": traced(figures["training_step"]),
        "optimizer_step": traced(figures["optimizer_step"]),
        "modules_loaded": len(lines),
        "lines_loaded": sum(lines.values()),
        "module_lines": lines,
    }


def overrides(root: Path) -> dict:
    """The Trainer methods each trainer class overrides, the private ones among them, and those whose body reaches
    the next class's own method through ``super()``."""
    stdout = run_fresh(root, OVERRIDES, [], root)
    read = json.loads(next(line for line in stdout.splitlines() if line.startswith("OVERRIDES "))[10:])
    found, by_super = (read["found"], read["super"]) if "found" in read else (read, {})
    return {
        name: {
            "count": len(names),
            "private": [n for n in names if is_private(n)],
            "names": names,
            "through_super": by_super.get(name, []),
        }
        for name, names in found.items()
    }


def config_fields(root: Path) -> dict:
    """The config fields beyond ``TrainingArguments``'s, of the offline and the online config."""
    stdout = run_fresh(root, CONFIG_FIELDS, [], root)
    found = json.loads(next(line for line in stdout.splitlines() if line.startswith("FIELDS "))[7:])
    return {name: {"count": len(names), "names": names} for name, names in found.items()}


def package_lines(package_dir: Path) -> dict:
    """The package's Python files and their physical lines."""
    files = sorted(package_dir.rglob("*.py"))
    return {"files": len(files), "lines": sum(physical_lines(path) for path in files)}


def core_lines(package_dir: Path) -> dict:
    """The lines of each part of :data:`CORE` and of the whole, the package's lines beside, and the core modules
    that no longer exist (a renamed module must be renamed here too)."""
    parts, missing = {}, []
    for part, files in CORE.items():
        present = [package_dir / name for name in files if (package_dir / name).is_file()]
        missing += [name for name in files if not (package_dir / name).is_file()]
        parts[part] = sum(physical_lines(path) for path in present)
    return {"parts": parts, "lines": sum(parts.values()), "missing": missing}


#: the attributes a module reads to decide by the run's regime, and the functions it calls to
REGIME_NAMES = frozenset({"regime", "defaults_regime", "is_online", "is_online_config"})
REGIME_FUNCTIONS = frozenset({"is_online", "is_online_config"})


def regime_reads_in(source: str) -> list[int]:
    """Lines where ``source`` decides by the run's regime: it reads one of :data:`REGIME_NAMES` (an attribute or
    ``getattr``), names a function of :data:`REGIME_FUNCTIONS`, passes ``online=`` to a call, or compares with or
    passes the string ``"online"`` (docstrings and other statement-level strings are not decisions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in REGIME_NAMES and isinstance(node.ctx, ast.Load):
            found.add(node.lineno)
        elif isinstance(node, ast.Name) and node.id in REGIME_FUNCTIONS and isinstance(node.ctx, ast.Load):
            found.add(node.lineno)
        elif isinstance(node, ast.Call):
            if any(keyword.arg == "online" for keyword in node.keywords):
                found.add(node.lineno)
            named = node.args[1] if len(node.args) >= 2 and getattr(node.func, "id", None) == "getattr" else None
            if isinstance(named, ast.Constant) and named.value in REGIME_NAMES:
                found.add(node.lineno)
            for keyword in node.keywords:
                if isinstance(keyword.value, ast.Constant) and keyword.value.value == "online":
                    found.add(node.lineno)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(side, ast.Constant) and side.value == "online" for side in sides):
                found.add(node.lineno)
    return sorted(found)


def regime_reads(package_dir: Path) -> list[str]:
    """``file:line`` of each decision by the run's regime outside ``online/`` (:func:`regime_reads_in`)."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        if (package_dir / "online") in path.parents:
            continue
        found += [f"{path.relative_to(package_dir.parent)}:{line}" for line in regime_reads_in(path.read_text())]
    return found


def calls_around_the_mro(package_dir: Path) -> list[str]:
    """``file:line Trainer.name`` of each call of a ``transformers.Trainer`` method on the class itself
    (``Trainer.train(trainer, ...)``), which skips any class between the package's trainer and ``Trainer``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "Trainer"
            ):
                found.append(f"{path.relative_to(package_dir.parent)}:{node.lineno} Trainer.{node.func.attr}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout whose package is measured")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--label", default="run", help="the name of this measurement in --out's runs")
    parser.add_argument("--checkout", help="what --root holds (default: its git commit)")
    parser.add_argument("--out", type=Path, help="a result file: this measurement is added to its runs by --label")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    package_dir = root / PACKAGE
    reads, online = private_trainer_reads(package_dir), is_online_reads(package_dir)
    regime, around = regime_reads(package_dir), calls_around_the_mro(package_dir)
    imports = function_level_imports(package_dir)
    from benchmarks.harness import machine_description  # the machine block every result file records

    run = {
        "command": "python benchmarks/tools/reviewer_figures.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_description("cpu"),
        "checkout": args.checkout or checkout_id(root),
        "package": package_lines(package_dir),
        "core": core_lines(package_dir),
        "config_fields": config_fields(root),
        "trainer_overrides": overrides(root),
        "trainer_methods_called_around_the_mro": {"count": len(around), "where": around},
        "regime_decisions_outside_online": {"count": len(regime), "where": regime},
        "private_trainer_reads": {"count": len(reads), "where": reads},
        "is_online_reads_outside_online": {"count": len(online), "where": online},
        "function_level_package_imports": len(imports),
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipeline_dir = build_pipeline(root, work)
        for scenario in args.scenarios.split(","):
            result = run_scenario(root, scenario, pipeline_dir, work)
            run["scenarios"][scenario] = result
            print(
                f"{scenario}: training_step {result['training_step']['functions']} functions in "
                f"{result['training_step']['files']} files; optimizer step {result['optimizer_step']['files']} files; "
                f"{result['lines_loaded']} lines loaded in {result['modules_loaded']} modules",
                flush=True,
            )
    for name, found in run["trainer_overrides"].items():
        print(
            f"{name}: {found['count']} Trainer methods overridden, {len(found['through_super'])} through super(), "
            f"private: {found['private']}"
        )
    print(
        f"package: {run['package']['lines']} lines in {run['package']['files']} files; config fields beyond "
        + ", ".join(f"{name} {found['count']}" for name, found in run["config_fields"].items())
    )
    core = run["core"]
    print(f"core: {core['lines']} lines ({', '.join(f'{k} {v}' for k, v in core['parts'].items())})")
    print(f"Trainer methods called around the MRO: {around}; regime decisions outside online/: {len(regime)}")
    print(
        f"private trainer attributes read outside trainer.py: {len(reads)}; is_online reads outside online/: "
        f"{len(online)}; function-level package imports: {len(imports)}"
    )
    if args.out:
        store_run(args.out, __doc__.strip(), args.label, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

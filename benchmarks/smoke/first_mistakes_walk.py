"""A walk through the README's and docs/quickstart.md's commands, each with one deliberate mistake a new user makes:
the command as typed, the last lines of its output, its exit status, and whether it ended in one error line with no
traceback. Offline (``HF_HUB_OFFLINE=1``), on the shipped tiny base; each command stops before training.

    python benchmarks/smoke/first_mistakes_walk.py --output benchmarks/results/cpu-first-mistakes-walk.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_CPU = "examples/configs/tiny_cpu.yaml"
ONLINE_TINY = "examples/configs/online_tiny_cpu.yaml"


def pair_folders(root: Path, n: int = 4, empty_prompt: int | None = None, broken_image: int | None = None) -> Path:
    """One folder per pair (chosen.png, rejected.png, prompt.txt), with the mistakes asked for."""
    from PIL import Image

    for i in range(n):
        folder = root / f"p{i}"
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), "red").save(folder / "chosen.png")
        Image.new("RGB", (32, 32), "blue").save(folder / "rejected.png")
        (folder / "prompt.txt").write_text("" if i == empty_prompt else "red square on white")
        if i == broken_image:
            (folder / "rejected.png").write_bytes(b"half a download")
    return root


def walk(work: Path) -> list[dict]:
    """(where the command is documented, the mistake, the command's arguments after ``trl-diffusion-sdpo``)."""
    good = pair_folders(work / "my-pairs")
    empty = pair_folders(work / "empty-prompt", empty_prompt=2)
    broken = pair_folders(work / "broken-image", broken_image=1)
    base_copy = work / "a-base-pipeline"
    shutil.copytree(ROOT / "trl_diffusion_sdpo" / "demo" / "base", base_copy)
    train = ["train", "--config", TINY_CPU]
    out = ["--output_dir", str(work / "tiny-sdpo")]
    return [
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "a dataset folder that does not exist",
         [*train, "--dataset_name", "my-pairz", *out]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "the same, written as a path",
         [*train, "--dataset_name", "./my-pairz", *out]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "an option misspelt",
         [*train, "--dataset_name", str(good), *out, "--learning_rat", "1e-4"]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "a value out of range",
         [*train, "--dataset_name", str(good), *out, "--safeguard_mu", "1.5"]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "an empty prompt.txt",
         [*train, "--dataset_name", str(empty), *out]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "a broken image",
         [*train, "--dataset_name", str(broken), *out]),
        ("README: train ... --resume_from_checkpoint true", "resuming a run that never saved a checkpoint",
         [*train, "--dataset_name", str(good), "--output_dir", str(work / "never-ran"), "--resume_from_checkpoint",
          "true"]),
        ("docs/quickstart.md: train ... --output_dir out", "a base pipeline's folder given as output_dir",
         [*train, "--dataset_name", str(good), "--output_dir", str(base_copy)]),
        ("docs/safeguard.md: train ... --early_stopping_patience N", "early stopping without an evaluation split",
         [*train, "--dataset_name", str(good), *out, "--early_stopping_patience", "2"]),
        ("docs/quickstart.md: train --model_name_or_path path/to/pipeline --dataset_name path/to/pairs ...",
         "a pipeline folder that does not exist",
         ["train", "--model_name_or_path", "path/to/pipeline", "--dataset_name", str(good), *out, "--use_peft"]),
        ("docs/quickstart.md: train --config examples/configs/sd15_lora.yaml", "a config file name misspelt",
         ["train", "--config", "examples/configs/sd15_lora.yml"]),
        ("README: online --config online_tiny_cpu.yaml", "a prompts file that does not exist",
         ["online", "--config", ONLINE_TINY, "--prompts", "prompts.txt", *out]),
        ("README: export --lora tiny-sdpo --base trl-diffusion-sdpo:tiny --format kohya --output tiny.safetensors",
         "a LoRA folder that does not exist",
         ["export", "--lora", str(work / "tiny-sdpo"), "--base", "trl-diffusion-sdpo:tiny", "--format", "kohya",
          "--output", str(work / "tiny.safetensors")]),
        ("docs/quickstart.md: evaluate --base trl-diffusion-sdpo:tiny --model tiny=tiny-cpu-sdpo ...",
         "a scorer name misspelt",
         ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--model", f"tiny={work / 'tiny-sdpo'}", "--prompts",
          str(work / "prompts.txt"), "--scorer", "colur", "--steps", "2", "--resolution", "32", "--device", "cpu",
          "--output-dir", str(work / "evaluation")]),
    ]  # fmt: skip


def run(where: str, mistake: str, arguments: list[str], env: dict[str, str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trl_diffusion_sdpo", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return {
        "documented": where,
        "mistake": mistake,
        "command": "trl-diffusion-sdpo " + shlex.join(arguments),
        "exit_code": done.returncode,
        "stderr_last_lines": lines[-3:],
        "one_line": done.returncode != 0 and "Traceback" not in done.stderr and ": error: " in last,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/cpu-first-mistakes-walk.json")
    options = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("TRL_DIFFUSION_SDPO_DEBUG", None)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "prompts.txt").write_text("red square on white\n")
        results = []
        for where, mistake, arguments in walk(work):
            result = run(where, mistake, arguments, env)
            results.append(result)
            verdict = "one line" if result["one_line"] else "NOT ONE LINE"
            print(f"[{result['exit_code']}] {verdict}: {mistake}: {result['stderr_last_lines'][-1:]}")
    for result in results:  # the temporary folder's and the checkout's paths are the machine's, not the walk's
        for key in ("command", "stderr_last_lines"):
            text = json.dumps(result[key]).replace(str(work), "$WORK").replace(str(ROOT), "$REPO")
            result[key] = json.loads(text)
    report = {
        "what": "Each README / docs/quickstart.md command with one deliberate mistake: its exit status and last "
        "stderr lines; one_line: a non-zero exit whose last line is the error and no traceback.",
        "command": "python benchmarks/smoke/first_mistakes_walk.py --output " + options.output,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "offline": "HF_HUB_OFFLINE=1",
        "mistakes": results,
        "all_one_line": all(r["one_line"] for r in results),
    }
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{sum(r['one_line'] for r in results)}/{len(results)} end in one line; wrote {options.output}")


if __name__ == "__main__":
    main()

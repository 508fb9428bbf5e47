"""A walk through the README's and docs' commands, each with one deliberate mistake a new user makes: the command as
typed, the last lines of its output, its exit status, how long it took, and whether it ended in one error line with
no traceback. On a clean install (an empty Hugging Face cache) with the Hub switched off (``HF_HUB_OFFLINE=1``) and
again with the network unreachable (an endpoint nothing listens on), on the shipped tiny base; each command stops
before training. One short training run first gives the mistakes that need one (an export, a merge, a cache) a real
run folder and LoRA; a few commands that succeed are recorded for what they say (the merge, ``--help``). Every
command the top-level parser lists gets a misspelt option (ending in one line that names the real option, after the
command's own usage). A base whose weight files are named pipes stands for a large model: a command that opens one
waits until the case's time limit, so a command pointed at an existing output with it that ends in seconds refused
before any weight file was opened.

    python benchmarks/smoke/first_mistakes_walk.py --output benchmarks/results/cli/cpu-first-mistakes-walk.json
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


def table_pairs(root: Path, n: int = 4) -> Path:
    """A JSONL of TRL-form rows (prompt, chosen, rejected) beside its images."""
    from PIL import Image

    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (32, 32), "red").save(root / f"c{i}.png")
        Image.new("RGB", (32, 32), "blue").save(root / f"r{i}.png")
        rows.append({"prompt": "red square on white", "chosen": f"c{i}.png", "rejected": f"r{i}.png"})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# How long a case with the large base may run: reading one of its weight files never ends, so a command that loads
# it before it refuses runs into this limit (recorded as timed_out) instead of ending with its refusal.
LARGE_BASE_LIMIT_S = 180


def large_base(root: Path) -> Path:
    """A copy of the shipped tiny base whose weight files (``*.safetensors``) are named pipes with no writer: its
    configs read as the tiny base's, and opening a weight file to read it waits forever, as loading a model of many
    gigabytes takes long."""
    if not root.exists():
        shutil.copytree(ROOT / "trl_diffusion_sdpo" / "demo" / "base", root)
        for weights in root.rglob("*.safetensors"):
            weights.unlink()
            os.mkfifo(weights)
    return root


def indented_key_config(path: Path) -> Path:
    """``tiny_cpu.yaml`` with one key indented under the one before it, the YAML slip of a hand-edited config."""
    text = (ROOT / TINY_CPU).read_text()
    if "\nresolution: 32\n" not in text:
        raise SystemExit(f"{TINY_CPU} no longer sets resolution: 32, the key this case indents")
    path.write_text(text.replace("\nresolution: 32\n", "\n  resolution: 32\n"))
    return path


def typos(work: Path) -> dict[str, tuple[str, list[str]]]:
    """One misspelt option for each command the top-level parser lists: (where the command is documented, its
    arguments after ``trl-diffusion-sdpo``), every other argument as the docs give it, so the misspelling is the one
    mistake."""
    lora, good, prompts = str(work / "trained"), str(work / "my-pairs"), str(work / "prompts.txt")
    tiny_eval = ["--prompts", prompts, "--steps", "2", "--resolution", "32", "--device", "cpu", "--no_progress"]
    return {
        "train": ("README: train --config tiny_cpu.yaml --dataset_name my-pairs",
                  ["train", "--config", TINY_CPU, "--dataset_name", good, "--output_dir", str(work / "tiny-sdpo"),
                   "--learning_rat", "1e-4"]),
        "online": ("README: online --config online_tiny_cpu.yaml",
                   ["online", "--config", ONLINE_TINY, "--output_dir", str(work / "online-sdpo"),
                    "--num_generation", "4"]),
        "demo": ("README: trl-diffusion-sdpo demo --methods ...",
                 ["demo", "--output_dir", str(work / "demo"), "--method", "dpo"]),
        "evaluate": ("docs/evaluation.md: evaluate --base ... --model NAME=PATH --scorer ...",
                     ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--model", f"tiny={lora}", "--scorers",
                      "colour", *tiny_eval, "--output_dir", str(work / "evaluation-typo")]),
        "export": ("README: export --lora tiny-sdpo --base trl-diffusion-sdpo:tiny --format kohya --output ...",
                   ["export", "--lora", lora, "--base", "trl-diffusion-sdpo:tiny", "--formt", "kohya", "--output",
                    str(work / "typo.safetensors")]),
        "pairs": ("docs/evaluation.md: pairs --base ... --num_images 4 --scorer ...",
                  ["pairs", "--base", "trl-diffusion-sdpo:tiny", "--prompts", prompts, "--num_image", "2", "--scorer",
                   "colour", "--output_dir", str(work / "pairs-typo")]),
        "cache": ("docs/data.md: cache --config x.yaml --latent_cache FOLDER",
                  ["cache", "--config", TINY_CPU, "--dataset_name", good, "--latent_cach", str(work / "latents")]),
        "reward-server": ("docs/reward-server.md: reward-server --scorer NAME --port 8000",
                          ["reward-server", "--scorer", "colour", "--prot", "8719"]),
        "estimate-memory": ("README: estimate-memory --config x.yaml",
                            ["estimate-memory", "--config", TINY_CPU, "--num_proceses", "2"]),
    }  # fmt: skip


def listed_commands() -> list[str]:
    """The commands ``trl-diffusion-sdpo --help`` lists, read from its parser."""
    from trl_diffusion_sdpo.cli.main import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(subcommands.choices)


def walk(work: Path) -> list[tuple[str, str, list[str]]]:
    """(where the command is documented, the mistake, the command's arguments after ``trl-diffusion-sdpo``)."""
    good = work / "my-pairs"
    empty = pair_folders(work / "empty-prompt", empty_prompt=2)
    broken = pair_folders(work / "broken-image", broken_image=1)
    table = table_pairs(work / "table")
    base_copy = work / "a-base-pipeline"
    if not base_copy.exists():
        shutil.copytree(ROOT / "trl_diffusion_sdpo" / "demo" / "base", base_copy)
    run_dir, lora = work / "trained", work / "trained"  # written by setup()
    earlier_eval = work / "earlier-evaluation"
    earlier_eval.mkdir(exist_ok=True)
    (earlier_eval / "scores.csv").write_text("model,prompt,seed,image,colour\n")
    (earlier_eval / "summary.json").write_text("[]\n")
    exported = work / "tiny.safetensors"
    exported.write_bytes(b"an earlier export")
    broken_yaml = indented_key_config(work / "indented-key.yaml")
    broken_table = table_pairs(work / "broken-table")
    rows = broken_table.read_text().splitlines()
    broken_table.write_text("\n".join([*rows[:1], rows[1].removesuffix("}"), *rows[2:]]) + "\n")  # a brace lost
    large = large_base(work / "a-large-base")
    train = ["train", "--config", TINY_CPU]
    out = ["--output_dir", str(work / "tiny-sdpo")]
    prompts = str(work / "prompts.txt")
    tiny_eval = ["--prompts", prompts, "--steps", "2", "--resolution", "32", "--device", "cpu", "--no_progress"]
    return [
        # --- train and online: data, options, folders
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "a dataset folder that does not exist",
         [*train, "--dataset_name", "my-pairz", *out]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "the same, written as a path",
         [*train, "--dataset_name", "./my-pairz", *out]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "a value out of range",
         [*train, "--dataset_name", str(good), *out, "--safeguard_mu", "1.5"]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "an empty prompt.txt",
         [*train, "--dataset_name", str(empty), *out]),
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "a broken image",
         [*train, "--dataset_name", str(broken), *out]),
        ("docs/data.md: --dataset_columns pickapic", "Pick-a-Pic's columns asked of a table in TRL's columns",
         [*train, "--dataset_name", str(table), *out, "--dataset_columns", "pickapic"]),
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
        ("README: online --config online_tiny_cpu.yaml", "a reward function misspelt (color)",
         ["online", "--config", ONLINE_TINY, "--reward_funcs", "color", *out]),
        # --- a Hub id where the Hub cannot be reached
        ("docs/quickstart.md: train --model_name_or_path <Hub id> ...", "a Hub model, the Hub unreachable",
         ["train", "--model_name_or_path", HUB_MODEL, "--dataset_name", str(good), *out, "--use_peft"]),
        ("README: online --config online_tiny_cpu.yaml", "a Hub model, the Hub unreachable",
         ["online", "--config", ONLINE_TINY, "--model_name_or_path", HUB_MODEL, *out]),
        ("docs/data.md: cache --config x.yaml --latent_cache FOLDER", "a Hub model, the Hub unreachable",
         ["cache", "--config", TINY_CPU, "--model_name_or_path", HUB_MODEL, "--dataset_name", str(good),
          "--latent_cache", str(work / "latents")]),
        ("README: export --lora tiny-sdpo --base trl-diffusion-sdpo:tiny --format kohya --output tiny.safetensors",
         "a Hub base, the Hub unreachable",
         ["export", "--lora", str(lora), "--base", HUB_MODEL, "--format", "kohya", "--output",
          str(work / "new.safetensors")]),
        ("docs/evaluation.md: evaluate --base <Hub id> --model NAME=PATH ...", "a Hub base, the Hub unreachable",
         ["evaluate", "--base", HUB_MODEL, "--model", f"tiny={lora}", "--scorer", "colour", *tiny_eval,
          "--output_dir", str(work / "evaluation-hub")]),
        ("docs/evaluation.md: evaluate --base ... (default scorer pickscore)", "a scorer's model, the Hub unreachable",
         ["evaluate", "--base", "trl-diffusion-sdpo:tiny", *tiny_eval, "--output_dir", str(work / "evaluation-ps")]),
        ("docs/evaluation.md: evaluate --base ... (default prompts partiprompts)",
         "a Hub prompt set, the Hub unreachable",
         ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--scorer", "colour", "--output_dir",
          str(work / "evaluation-parti")]),
        ("docs/evaluation.md: pairs --base <Hub id> --prompts ... --scorer ...", "a Hub base, the Hub unreachable",
         ["pairs", "--base", HUB_MODEL, "--prompts", prompts, "--scorer", "colour", "--output_dir",
          str(work / "pairs-hub")]),
        ("docs/reward-server.md: reward-server --scorer pickscore", "a scorer's model, the Hub unreachable",
         ["reward-server", "--scorer", "pickscore", "--port", "8719"]),
        ("README: estimate-memory --config x.yaml", "a Hub model it has no configs of, the Hub unreachable",
         ["estimate-memory", "--config", TINY_CPU, "--model_name_or_path", "someone/my-sdxl-finetune"]),
        # --- commands that write, pointed at what they did not write
        ("README: export --lora tiny-sdpo ... --output tiny.safetensors", "exporting onto an existing file",
         ["export", "--lora", str(lora), "--base", "trl-diffusion-sdpo:tiny", "--format", "kohya", "--output",
          str(exported)]),
        ("docs/export.md: export --merge --output FOLDER", "merging into the training run's own folder",
         ["export", "--lora", str(lora), "--base", "trl-diffusion-sdpo:tiny", "--merge", "--output", str(run_dir)]),
        ("docs/evaluation.md: evaluate ... --output_dir eval", "evaluating into an earlier evaluation's folder",
         ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--model", f"tiny={lora}", "--scorer", "colour",
          *tiny_eval, "--output_dir", str(earlier_eval)]),
        ("docs/data.md: cache --config x.yaml --latent_cache FOLDER", "a latent cache into a training run's folder",
         ["cache", "--config", TINY_CPU, "--dataset_name", str(good), "--latent_cache", str(run_dir)]),
        # --- names
        ("README: export --lora tiny-sdpo --base trl-diffusion-sdpo:tiny --format kohya --output tiny.safetensors",
         "a LoRA folder that does not exist",
         ["export", "--lora", str(work / "tiny-sdpo"), "--base", "trl-diffusion-sdpo:tiny", "--format", "kohya",
          "--output", str(work / "tiny2.safetensors")]),
        ("docs/quickstart.md: evaluate --base trl-diffusion-sdpo:tiny --model tiny=tiny-cpu-sdpo ...",
         "a scorer name misspelt",
         ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--model", f"tiny={lora}", "--scorer", "colur",
          *tiny_eval, "--output_dir", str(work / "evaluation")]),
        ("docs/reward-server.md: reward-server --scorer NAME --max_batch_size N", "a batch size of 0 (underscores)",
         ["reward-server", "--scorer", "colour", "--max_batch_size", "0"]),
        # --- a config file that is not valid YAML
        ("README: train --config tiny_cpu.yaml --dataset_name my-pairs", "a key indented in the config (YAML syntax)",
         ["train", "--config", str(broken_yaml), "--dataset_name", str(good), *out]),
        ("README: estimate-memory --config x.yaml", "a key indented in the config (YAML syntax)",
         ["estimate-memory", "--config", str(broken_yaml)]),
        ("docs/data.md: a JSONL of image paths (prompt, chosen, rejected)", "a JSONL line missing its closing brace",
         [*train, "--dataset_name", str(broken_table), *out]),
        # --- a large model (weight files that never finish reading) and an output that holds an earlier run's files
        ("README: train --config tiny_cpu.yaml ... (a second run into the same --output_dir)",
         "an existing output folder, a large model",
         [*train, "--model_name_or_path", str(large), "--dataset_name", str(good), "--output_dir", str(run_dir)]),
        ("README: online --config online_tiny_cpu.yaml (a second run into the same --output_dir)",
         "an existing output folder, a large model",
         ["online", "--config", ONLINE_TINY, "--model_name_or_path", str(large), "--output_dir", str(run_dir)]),
        ("docs/data.md: cache --config x.yaml --latent_cache FOLDER", "a training run's folder, a large model",
         ["cache", "--config", TINY_CPU, "--model_name_or_path", str(large), "--dataset_name", str(good),
          "--latent_cache", str(run_dir)]),
        ("README: export --lora tiny-sdpo --base ... --output tiny.safetensors", "an existing file, a large base",
         ["export", "--lora", str(lora), "--base", str(large), "--format", "kohya", "--output", str(exported)]),
        ("docs/evaluation.md: evaluate ... --output_dir eval", "an earlier evaluation's folder, a large base",
         ["evaluate", "--base", str(large), "--model", f"tiny={lora}", "--scorer", "colour", *tiny_eval,
          "--output_dir", str(earlier_eval)]),
        # --- a misspelt option, for every command
        *[(where, f"an option misspelt ({name})", arguments) for name, (where, arguments) in typos(work).items()],
    ]  # fmt: skip


# Commands that succeed, recorded for what they say (the merge names the copy it wrote; --help the shipped configs'
# LoRA rank): (what is looked at, the command's arguments, the text expected in its output).
def sayings(work: Path) -> list[tuple[str, list[str], str]]:
    lora = work / "trained"
    return [
        ("the merge says where the merged copy went and that the base is unchanged",
         ["export", "--lora", str(lora), "--base", "trl-diffusion-sdpo:tiny", "--merge", "--output",
          str(work / "merged")], "(the base itself is unchanged)"),
        ("train --help states the shipped configs' LoRA rank",
         ["train", "--help"],
         "the shipped configs use 16, sd3_lora.yaml 32, tiny_cpu.yaml and online_tiny_cpu.yaml 8"),
    ]  # fmt: skip


def setup(work: Path, env: dict[str, str]) -> dict:
    """The README's tiny training run (2 steps), whose folder and LoRA the mistakes about writing use."""
    pair_folders(work / "my-pairs")
    (work / "prompts.txt").write_text("red square on white\n")
    arguments = ["train", "--config", TINY_CPU, "--dataset_name", str(work / "my-pairs"), "--output_dir",
                 str(work / "trained"), "--max_steps", "2", "--save_steps", "2"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trl_diffusion_sdpo", *arguments], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the setup run failed:\n{done.stderr[-3000:]}")
    return {"command": "trl-diffusion-sdpo " + shlex.join(arguments), "seconds": round(time.perf_counter() - start, 1)}


def run(arguments: list[str], env: dict[str, str], limit: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """The command's output and wall time; one still running after ``limit`` seconds is stopped (exit status None,
    the output it had written)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "trl_diffusion_sdpo", *arguments]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as stopped:
        out, err = (part.decode(errors="replace") if isinstance(part, bytes) else part or "" for part in
                    (stopped.output, stopped.stderr))  # fmt: skip
        done = subprocess.CompletedProcess(command, None, out, err)
    return done, round(time.perf_counter() - start, 1)


def judge(done: subprocess.CompletedProcess) -> dict:
    """How the command ended: exit status, last stderr lines, whether it ended in one error line (a non-zero exit
    whose last line is ``prog: error: ...`` and no traceback), whose usage it printed, whether it was stopped."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    usage = next((line for line in lines if line.startswith("usage: ")), None)
    return {
        "exit_code": done.returncode,
        "stderr_last_lines": lines[-3:],
        "one_line": done.returncode not in (0, None) and "Traceback" not in done.stderr and ": error: " in last,
        "usage_of": usage.removeprefix("usage: ").split(" [", 1)[0].strip() if usage else None,
        "timed_out": done.returncode is None,
    }


def mistake(where: str, what: str, arguments: list[str], env: dict[str, str]) -> dict:
    limit = LARGE_BASE_LIMIT_S if any("a-large-base" in word for word in arguments) else 600
    done, seconds = run(arguments, env, limit)
    return {
        "documented": where,
        "mistake": what,
        "command": "trl-diffusion-sdpo " + shlex.join(arguments),
        **judge(done),
        "seconds": seconds,
    }


def saying(what: str, arguments: list[str], expected: str, env: dict[str, str]) -> dict:
    done, seconds = run(arguments, env)
    output = " ".join((done.stdout + done.stderr).split())
    key = " ".join(expected.split()[:3])
    found = [line.strip() for line in (done.stdout + done.stderr).splitlines() if key in line]
    return {
        "what": what,
        "command": "trl-diffusion-sdpo " + shlex.join(arguments),
        "exit_code": done.returncode,
        "expected": expected,
        "said": expected in output,
        "lines": found[:2],
        "seconds": seconds,
    }


def asks_the_hub(arguments: list[str]) -> bool:
    """Whether a mistake's answer depends on the Hub: a model or dataset name that is not a local path, a Hub prompt
    set (evaluate's default), or a scorer whose model is downloaded (pickscore, evaluate's default)."""
    words = set(arguments)
    hub_names = {HUB_MODEL, "my-pairz", "someone/my-sdxl-finetune", "pickscore"}
    default_prompts_or_scorer = arguments[0] == "evaluate" and not {"--prompts", "--scorer"} <= words
    return bool(words & hub_names) or default_prompts_or_scorer


# How the Hub is out of reach: switched off, or the network unreachable (an endpoint nothing listens on, which refuses
# the connection at once, as a machine without a route does after its timeout).
MODES = {
    "offline": {"HF_HUB_OFFLINE": "1"},
    "unreachable": {"HF_ENDPOINT": "http://127.0.0.1:9"},
}


def clean_environment(hf_home: Path, mode: str) -> dict[str, str]:
    """This process's environment with an empty Hugging Face cache (a clean install) and the Hub out of reach."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **MODES[mode])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env.pop("TRL_DIFFUSION_SDPO_DEBUG", None)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/cli/cpu-first-mistakes-walk.json")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--every_mistake_in_every_mode", action="store_true")
    options = parser.parse_args()
    results, said = [], []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        hf_home = work / "hf-home"
        hf_home.mkdir()
        setup_run = setup(work, clean_environment(hf_home, "offline"))
        print(f"setup: {setup_run['command']} ({setup_run['seconds']} s)")
        mistakes = walk(work)
        for number, mode in enumerate(options.modes):
            env = clean_environment(hf_home, mode)
            # Every mistake runs in the first mode; the later modes rerun those whose answer asks the Hub (a Hub id, a
            # name that may be one, a scorer's model), unless --every_mistake_in_every_mode.
            asked = [m for m in mistakes if number == 0 or options.every_mistake_in_every_mode or asks_the_hub(m[2])]
            for where, what, arguments in asked:
                result = {"hub": mode, **mistake(where, what, arguments, env)}
                results.append(result)
                verdict = "one line" if result["one_line"] else "NOT ONE LINE"
                last = result["stderr_last_lines"][-1:]
                print(f"[{mode} {result['exit_code']} {result['seconds']} s] {verdict}: {what}: {last}")
        env = clean_environment(hf_home, options.modes[0])
        for what, arguments, expected in sayings(work):
            said.append(saying(what, arguments, expected, env))
            print(f"[{'said' if said[-1]['said'] else 'NOT SAID'}] {what}: {said[-1]['lines'][:1]}")
        leftover = sorted(p.name for p in hf_home.iterdir())
    for result in [*results, *said, setup_run]:  # the temporary folder's and the checkout's paths are the machine's
        for key in ("command", "stderr_last_lines", "lines"):
            if key in result:
                text = json.dumps(result[key]).replace(str(work), "$WORK").replace(str(ROOT), "$REPO")
                result[key] = json.loads(text)
    seconds = [r["seconds"] for r in results]
    report = {
        "what": "Each README / docs command with one deliberate mistake: its exit status, last stderr lines and wall "
        "time from the command's start (Python's start and the package's imports included); one_line: a non-zero "
        "exit whose last line is the error and no traceback; usage_of: the command whose usage it printed; "
        "timed_out: stopped after its limit (a case with the large base, whose weight files never finish reading, "
        f"runs {LARGE_BASE_LIMIT_S} s at most: one that ends sooner opened none). Run on a clean install (an empty "
        "HF_HOME) with the Hub out of reach: every mistake offline (HF_HUB_OFFLINE=1), and those whose answer asks "
        "the Hub again with the network unreachable (HF_ENDPOINT=http://127.0.0.1:9, a refused connection). said: "
        "commands that succeed, and whether their output says what is expected.",
        "command": "python benchmarks/smoke/first_mistakes_walk.py --output " + options.output,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "setup": setup_run,
        "modes": {mode: MODES[mode] for mode in options.modes},
        "mistakes": results,
        "said": said,
        "hf_home_after": leftover,
        "summary": {
            "mistakes": len(results),
            "one_line": sum(r["one_line"] for r in results),
            "not_one_line": [f"{r['hub']}: {r['mistake']}" for r in results if not r["one_line"]],
            "timed_out": [f"{r['hub']}: {r['mistake']}" for r in results if r["timed_out"]],
            "commands_without_a_typo": sorted(set(listed_commands()) - set(typos(Path("work")))),
            "seconds_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
            "seconds_max": max(seconds, default=None),
            "said": f"{sum(s['said'] for s in said)}/{len(said)}",
        },
        "all_one_line": all(r["one_line"] for r in results),
    }
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['summary']}; wrote {options.output}")


if __name__ == "__main__":
    main()

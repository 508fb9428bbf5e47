"""The benchmark script runs end to end (its numbers are never asserted)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "speed" / "step_time.py"


@pytest.mark.slow
def test_step_time_script_writes_every_requested_row(tmp_path):
    output = tmp_path / "result.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--runs",
        "floor-lora,cached-lora",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--resolution",
        "64",
        "--batch-size",
        "1",
        "--dataset-batches",
        "2",
        "--output",
        str(output),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    # a trainer run alternates the default --losses: dpo, sdpo (output space), sdpo_param (parameter space)
    assert set(report["rows"]) == {"floor-lora", "dpo-cached-lora", "sdpo-cached-lora", "sdpo_param-cached-lora"}
    assert "ratio_to_floor_wall" in report["rows"]["dpo-cached-lora"]
    assert "safeguard overhead <= 2%" in report["targets"]
    assert set(report["derived"]["paired_ratio_to_dpo_cpu"]) == {"sdpo-cached-lora", "sdpo_param-cached-lora"}


def _step_time_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # it puts the repository root on sys.path for benchmarks.harness
    return module


def test_the_paired_ratio_divides_each_step_by_the_dpo_step_of_its_cycle():
    """Step k of a row over step k of the Diffusion-DPO row of the same run (the losses alternate, so they fall in
    the same seconds), median over k: a drift that slows a whole cycle cancels, where the ratio of the two medians
    does not. Rows from separate processes (--memory-per-loss) or without per-step times are left out."""
    step_time = _step_time_module()
    dpo = [1.0, 2.0, 4.0, 8.0, 16.0]  # the machine slows down cycle by cycle
    param = [1.1 * t for t in dpo]
    rows = {
        "dpo-cached-full": {"step_cpu_s": dpo},
        "sdpo_param-cached-full": {"step_cpu_s": param},
        "sdpo_update-cached-full": {"step_cpu_s": [2.0] * 4},  # another number of steps: not paired
        "sdpo_pair-cached-full": {"step_cpu_s": param, "separate_process": True},
        "floor-full": {"step_cpu_s": dpo},
    }
    paired = step_time.paired_ratios_to_dpo(rows, "cpu")
    assert paired == {"sdpo_param-cached-full": pytest.approx(1.1)}
    # the same steps paired with the next cycle's Diffusion-DPO step: the drift no longer cancels
    shifted = {"dpo-cached-full": {"step_cpu_s": dpo}, "sdpo_param-cached-full": {"step_cpu_s": param[1:] + [1.1]}}
    assert step_time.paired_ratios_to_dpo(shifted, "cpu")["sdpo_param-cached-full"] == pytest.approx(2.2)


@pytest.mark.slow
def test_soak_script_records_every_step_and_keeps_the_last_two_checkpoints(tmp_path):
    output = tmp_path / "soak.json"
    script = ROOT / "benchmarks" / "smoke" / "soak.py"
    command = [
        sys.executable,
        str(script),
        "--steps",
        "6",
        "--save-steps",
        "2",
        "--window",
        "3",
        "--logging-steps",
        "2",
        "--output",
        str(output),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    assert [w["steps"] for w in report["windows"]] == [[1, 3], [4, 6]]
    assert report["checkpoints_left"] == ["checkpoint-4", "checkpoint-6"]
    assert all(w["rss_end_mib"] > 0 and w["median_step_cpu_s"] > 0 for w in report["windows"])


def test_latent_cache_scale_script_measures_and_computes(tmp_path):
    output = tmp_path / "cache.json"
    script = SCRIPT.parent / "latent_cache_scale.py"
    command = [
        sys.executable,
        str(script),
        "--pairs",
        "4",
        "--repeats",
        "1",
        "--chunk-size",
        "2",
        "--out",
        str(output),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    assert set(report["measured"]["encode_median_pairs_per_s"]) == {"map", "sharded", "sharded_one_chunk"}
    # The arithmetic follows from the shapes: 4 VAE encodes and one prompt per pair, float32 latents with flips.
    sd15 = report["real_size_arithmetic"]["sd15"]
    assert sd15["bytes_latents"] == 2 * 2 * (2 * 4 * 64 * 64) * 4
    assert (
        sd15["flops_per_pair_with_flips"]
        == 4 * sd15["vae_encoder_flops_per_image"] + sd15["text_encoder_flops_per_prompt"]
    )


@pytest.mark.slow
def test_fsdp_reference_script_runs_on_two_processes(tmp_path):
    output = tmp_path / "fsdp.json"
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        str(SCRIPT.parent / "fsdp_reference.py"),
        "--steps",
        "1",
        "--out",
        str(output),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300, env=env)
    report = json.loads(output.read_text())
    first = report["per_process"][0]
    assert first["bytes_held"]["sharded"] * 2 == first["bytes_held"]["replicated"]
    assert first["max_abs_difference"] == 0.0  # the sharded copy computes what the whole one does


def test_one_pass_routes_script_writes_its_rows_and_the_ablation(tmp_path):
    """``one_pass_routes.py`` on the tiny UNet: every requested route and tuning, the ablation's ``pass[kinds]`` rows
    (none, each kind, all), each paired with ``dpo`` step by step, with page-fault counts."""
    output = tmp_path / "routes.json"
    script = SCRIPT.parent / "one_pass_routes.py"
    command = [sys.executable, str(script), "--unet", "tiny", "--steps", "2", "--threads", "1", "--ablate"]
    command += ["--routes", "dpo,taps,two_pass", "--tuning", "full,lora", "--json", str(output)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(output.read_text())["rows"]
    # LoRA's trainable layers are Linear only: its ablation has no conv or norm row
    passes = {"full": ["none", "conv", "linear", "norm", "conv+linear+norm"], "lora": ["none", "linear"]}
    for tuning, kinds in passes.items():
        expected = {f"{name}-{tuning}" for name in ["dpo", "taps", "two_pass", *(f"pass[{k}]" for k in kinds)]}
        assert {name for name in rows if name.endswith(f"-{tuning}")} == expected
        for name in expected:
            row = rows[name]
            assert "failed" not in row, row
            assert len(row["step_cpu_s"]) == 2 and row["paired_ratio_to_dpo"] > 0
            assert "minor_page_faults_per_step" in row  # read as test_a_step_counts_the_minor_page_faults_... checks


def test_one_pass_routes_layer_replay_runs_every_tapped_layer_under_its_tap(tmp_path):
    """``one_pass_routes.py --layers`` on the tiny UNet: one row per tapped layer (its forward hook saw it and its
    output got a gradient), each tapped call wrote its weights' split gradients, and the totals add up."""
    output = tmp_path / "layers.json"
    script = SCRIPT.parent / "one_pass_routes.py"
    command = [sys.executable, str(script), "--unet", "tiny", "--layers", "--steps", "1", "--threads", "1"]
    subprocess.run(command + ["--json", str(output)], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())["layers"]
    rows = report["layers"]
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.speed.one_pass_model import TINY_UNET
    finally:
        sys.path.remove(str(ROOT))
    from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps

    unet = UNet2DConditionModel(**TINY_UNET)
    expected = {layer.name: layer.kind for layer in LayerTaps(unet, list(unet.parameters())).layers}
    assert {row["name"]: row["kind"] for row in rows} == expected
    assert all(row["tap_wrote"] and row["native_us"] > 0 and row["tapped_us"] > 0 for row in rows)
    # the backward called as a function, on every conv, linear and norm layer (the tiny UNet has no other kind)
    assert all(row["tap_backward_wrote"] and row["native_backward_us"] > 0 for row in rows)
    assert all(row["tap_backward_us"] > 0 for row in rows)
    assert {row["conv"] for row in rows if row["kind"] == "conv"} == set(report["per_conv_shape"])
    assert sum(kind["layers"] for kind in report["per_kind"].values()) == report["all"]["layers"] == len(rows)
    total = sum(row["tapped_us"] for row in rows) / 1000
    assert abs(report["all"]["tapped_ms"] - total) <= 1e-9 * total
    everything = report["all"]
    backward = sum(row["tap_backward_us"] - row["native_backward_us"] for row in rows) / 1000
    assert abs(everything["backward_extra_ms"] - backward) <= 1e-9 * abs(backward) + 1e-12
    parts = everything["backward_extra_ms"] + everything["rest_extra_ms"]
    assert abs(parts - everything["extra_ms"]) <= 1e-9 * abs(everything["extra_ms"]) + 1e-12


def _proc_stat_minor_faults() -> int:
    """Field 10 (``minflt``) of ``/proc/self/stat``, read apart from ``getrusage`` (the command name, field 2, is in
    parentheses and may hold spaces: the fields after it are split from its closing parenthesis)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])  # fields[0] is field 3 (state)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc/self/stat")
def test_a_step_counts_the_minor_page_faults_its_own_allocation_causes():
    """``process_step`` (what ``one_pass_routes.py`` reports as ``minor_page_faults_per_step``) counts one minor fault
    per page a step first touches: a fresh 32 MiB anonymous mapping (huge pages off, so one fault per 4 KiB page),
    written page by page, faults 8192 times; the count agrees with /proc/self/stat read around the same call, and a
    step that touches pages already mapped counts next to none."""
    import mmap

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.harness import process_step
    finally:
        sys.path.remove(str(ROOT))
    pages, page = 8192, mmap.PAGESIZE
    buffer = mmap.mmap(-1, pages * page)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)

    def touch() -> None:
        for offset in range(0, pages * page, page):
            buffer[offset] = 1

    before = _proc_stat_minor_faults()
    seconds, faults = process_step(touch)
    independent = _proc_stat_minor_faults() - before
    assert seconds > 0
    # every page faults once; the interpreter's own allocations around the loop add a few
    assert pages <= faults <= independent <= pages + 200, (faults, independent)
    _, again = process_step(touch)  # the same pages, mapped now
    assert again < 50, again
    buffer.close()


# the scripts and their harness, not these tests
BENCHMARK_MODULES = sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if "tests" not in p.parent.parts[-1:])


@pytest.mark.slow
@pytest.mark.parametrize("script", [p for p in BENCHMARK_MODULES if "__main__" in p.read_text()], ids=lambda p: p.name)
def test_every_benchmark_script_answers_help_from_the_repository_root(script):
    """Each script finds the package and ``benchmarks.harness`` itself: run from the root without ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"], cwd=ROOT, env=env, timeout=300,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


def test_profile_step_script_profiles_each_safeguard_against_dpo(tmp_path):
    """One trainer, the safeguards alternating: each keeps its own timed steps, and its profiled step differs from
    Diffusion-DPO's where it does more (the per-pair scope's per-image sums: more operator calls)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "speed" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "profile.json"
    argv = ["--resolution", "64", "--batch-size", "2", "--steps", "2", "--warmup", "0", "--safeguards", "dpo,pair"]
    module.main([*argv, "--dataset-batches", "2", "--output", str(output)])
    rows = json.loads(output.read_text())["rows"]
    assert set(rows) == {"dpo", "pair"}
    assert [len(row["step_times_s"]) for row in rows.values()] == [2, 2]  # the profiled step is not among them
    assert rows["dpo"]["step_ratio_to_dpo"] == 1.0 and "operators_against_dpo" not in rows["dpo"]
    against = rows["pair"]["operators_against_dpo"]
    assert any(op["calls"] > op["dpo_calls"] for op in against)
    assert rows["pair"]["slowest_operators"][0]["self_s"] > 0
    assert rows["dpo"]["peak_memory_ratio_to_dpo"] == 1.0 and rows["pair"]["median_peak_memory_bytes"] > 0
    with pytest.raises(SystemExit):  # the differences are taken against Diffusion-DPO, so it comes first
        module.main(["--safeguards", "pair,dpo"])

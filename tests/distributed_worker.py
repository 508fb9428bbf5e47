"""Run the train command (every family) in this process (one of several under ``accelerate launch``) and report.

    accelerate launch --config_file <yaml> --num_processes 2 tests/distributed_worker.py --result r.json \
        --example sd15 -- <train command arguments>
    accelerate launch ... tests/distributed_worker.py --jobs jobs.json

After training, every process takes part in gathering sharded weights; the main process writes ``--result``:
the logged losses, which modules DeepSpeed partitioned, whether the reference still equals the original UNet on
disk, and whether the saved files, loaded back by diffusers, reproduce the trained UNet's outputs.

``--jobs`` runs several trainings one after the other in the same processes (a JSON list of objects with
``result``, ``example``, ``argv`` and optionally ``poison_step``, ``poison_rank``, ``env``): the interpreters, imports
and process group are paid for once instead of once per training. A job's ``env`` holds the ``ACCELERATE_*`` and
``FSDP_*`` variables that ``accelerate launch --config_file <its yaml>`` would have set (computed by accelerate's own
launch code, see test_distributed.py); they replace the launch's own before that training, so one two-process launch
serves DDP, DeepSpeed and FSDP2 trainings in turn (``TrainingArguments`` rebuilds accelerate's state from the
environment for every training, as in a fresh process).

DeepSpeed's CPU shared-memory all-reduce op is not built here (tests only): it is a speed optimisation of CPU
all-reduce that DeepSpeed JIT-compiles with g++ the first time ``deepspeed.comm`` starts on a machine (over a minute
of both cores on a fresh CI machine); without it DeepSpeed all-reduces through torch.distributed (gloo), the path it
takes on any machine where the op cannot be built. Nothing the tests check depends on which one adds the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from torch.distributed.tensor import DTensor

from trl_diffusion_sdpo.cli.train import main as train_command
from trl_diffusion_sdpo.engines.base import is_partitioned
from trl_diffusion_sdpo.engines.collectives import load_pipeline, zero_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.helpers: the RecordingDataset, FSDP on CPU processes
torch.set_num_threads(1)

from tests.helpers.common import freeze_survivors  # noqa: E402
from tests.helpers.fsdp_on_cpu import lift_fsdp_cpu_gate  # noqa: E402


def _gathered(params: list[torch.nn.Parameter]):
    """Full values of possibly ZeRO-3-partitioned parameters inside the block (all processes must enter)."""
    if any(is_partitioned(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _flow_inputs(family, resolution: int) -> dict:
    """Fixed latents, timesteps and conditioning for a flow transformer, called through its family."""
    from trl_diffusion_sdpo.families import PromptEmbeddings

    generator = torch.Generator().manual_seed(123)
    config = family.denoiser.config
    if family.video:  # video latents [N, C, 2, h, w]
        channels, _, size, _ = family.latent_shape(resolution)
        if "text_dim" in config:  # Wan: UMT5 conditioning only
            embeds = PromptEmbeddings(torch.randn(2, 8, config.text_dim, generator=generator))
        else:  # HunyuanVideo 1.5: its two text sequences packed in one, as its encoders make them
            embeds = family.encode_prompts(family.prompt_tokenizer()(['a sign reading "OPEN"', "two blue circles"]))
        return {
            "sample": torch.randn(2, channels, 2, size, size, generator=generator),
            "timestep": torch.tensor([100.0, 700.0]),
            "conditioning": family.denoiser_conditioning(embeds, None),
            "family": family,
        }
    channels, size, _ = family.latent_shape(resolution)
    # the text width (Z-Image: cap_feat_dim, Qwen-Image 2.1: context_in_dim); a pooled projection only where the
    # transformer takes one
    width = config.get("joint_attention_dim") or config.get("cap_feat_dim") or config.get("context_in_dim")
    pooled = config.get("pooled_projection_dim")
    embeds = PromptEmbeddings(
        torch.randn(2, 8, width, generator=generator),
        None if pooled is None else torch.randn(2, pooled, generator=generator),
    )
    if family.edits:  # an editing family: a source image's latents per sample
        embeds.source_latents = torch.randn(2, 1, channels, size, size, generator=generator)
    return {
        "sample": torch.randn(2, channels, size, size, generator=generator),
        "timestep": torch.tensor([100.0, 700.0]),
        "conditioning": family.denoiser_conditioning(embeds, None),
        "family": family,
    }


def _inputs(unet_config, resolution: int, family=None) -> dict[str, torch.Tensor]:
    if family is not None and family.flow_matching:
        return _flow_inputs(family, resolution)
    generator = torch.Generator().manual_seed(123)
    size = resolution // 8
    inputs = {
        "sample": torch.randn(2, unet_config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 8, unet_config.cross_attention_dim, generator=generator),
    }
    if unet_config.addition_embed_type == "text_time":  # SDXL: pooled text embeds and micro-conditioning
        pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, dtype=torch.float),
        }
    return inputs


@contextlib.contextmanager
def _poisoned(step: int, rank: int):
    """Inside the block, the objective's loss at optimizer step ``step`` (1-based, no accumulation) is NaN on process
    ``rank`` only."""
    import trl_diffusion_sdpo.trainer as trainer_module
    from trl_diffusion_sdpo.objectives import ObjectiveOutput

    objective_from_config = trainer_module.objective_from_config
    calls = {"n": 0}

    def poisoned_objective(config, **kwargs):
        objective = objective_from_config(config, **kwargs)

        class Poisoned:
            def __getattr__(self, name):  # name, requires_reference, metric_names, ...
                return getattr(objective, name)

            def __call__(self, predictions, errors, **kwargs):
                out = objective(predictions, errors, **kwargs)
                calls["n"] += 1
                if calls["n"] == step and int(os.environ.get("RANK", "0")) == rank:
                    return ObjectiveOutput(loss=out.loss * float("nan"), logits=out.logits)
                return out

        return Poisoned()

    trainer_module.objective_from_config = poisoned_objective
    try:
        yield
    finally:  # the next job in this process trains with the real objective
        trainer_module.objective_from_config = objective_from_config


@contextlib.contextmanager
def _recording_samples(batches: list[list[int]]):
    """Inside the block, the trainer's training dataloader reads its dataset through :class:`RecordingDataset`."""
    from tests.helpers.common import RecordingDataset
    from trl_diffusion_sdpo.trainer import DiffusionSDPOTrainer

    get_train_dataloader = DiffusionSDPOTrainer.get_train_dataloader

    def recording(self):
        streamed = isinstance(self.train_dataset, torch.utils.data.IterableDataset)  # no indices to record
        if not streamed and not isinstance(self.train_dataset, RecordingDataset):
            self.train_dataset = RecordingDataset(self.train_dataset, batches)
        return get_train_dataloader(self)

    DiffusionSDPOTrainer.get_train_dataloader = recording
    try:
        yield
    finally:
        DiffusionSDPOTrainer.get_train_dataloader = get_train_dataloader


_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all_single", "barrier",
    "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "scatter", "all_gather_coalesced",
    # FSDP2 gathers and reduce-scatters its shards through these (torch 2.13), DeepSpeed may take the older names
    "all_gather_single", "reduce_scatter_single", "_all_gather_base", "_reduce_scatter_base",
)  # fmt: skip


@contextlib.contextmanager
def _counting_collectives(calls: list[str]):
    """Inside the block, every collective this process enters through ``torch.distributed`` (accelerate, DeepSpeed,
    FSDP2 and the package all call them there) is appended to ``calls`` as ``name:elements``. Every process must
    enter the same sequence, or one is left unmatched (a hang, or a reduction paired with another's). DDP's gradient
    buckets are all-reduced in C++, not counted: every process runs every backward pass, so they match."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(name, original):
        def call(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            size = first.numel() if isinstance(first, torch.Tensor) else ""
            calls.append(f"{name}:{size}")
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _first_mismatch(sequences: list[list[str]]) -> str | None:
    """Where the processes' collective sequences first differ, as text; ``None`` when they are equal."""
    for i in range(max(len(s) for s in sequences)):
        entries = [s[i] if i < len(s) else "(none)" for s in sequences]
        if len(set(entries)) > 1:
            return f"collective {i}: " + ", ".join(f"process {p}: {e}" for p, e in enumerate(entries))
    return None


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (an all-gather: every process must call it), else the tensor itself."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


@torch.no_grad()
def _output(unet, inputs) -> torch.Tensor:
    if "family" in inputs:  # a flow transformer
        family = inputs["family"]
        return family.call_denoiser(unet, inputs["sample"], inputs["timestep"], inputs["conditioning"]).float()
    return unet(**inputs, return_dict=False)[0].float()


_ENGINE_PREFIXES = ("ACCELERATE_", "FSDP_")


def _use_environment(env: dict[str, str]) -> None:
    """Replace the launch's engine variables (``ACCELERATE_*``, ``FSDP_*``) with those of another accelerate config."""
    for name in [n for n in os.environ if n.startswith(_ENGINE_PREFIXES)]:
        del os.environ[name]
    os.environ.update(env)


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory comm op (see the module docstring; tests only)."""
    # the submodule: the attribute ``deepspeed.comm.torch`` is the torch package, re-exported by deepspeed.comm
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def _uses(env: dict[str, str], name: str) -> bool:
    return env.get(name, "false").lower() == "true"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", default=None, help="A JSON file listing several trainings to run in turn.")
    parser.add_argument("--result", default=None)
    parser.add_argument("--example", default="sd15")
    parser.add_argument("--poison_step", type=int, default=None, help="Make this step's loss NaN on one process.")
    parser.add_argument("--poison_rank", type=int, default=1)
    argv = sys.argv[1:] if argv is None else argv
    args, example_argv = parser.parse_known_args([a for a in argv if a != "--"])
    if args.jobs is None:
        jobs = [
            dict(
                result=args.result,
                example=args.example,
                argv=example_argv,
                poison_step=args.poison_step,
                poison_rank=args.poison_rank,
            )
        ]
    else:
        with open(args.jobs) as f:
            jobs = json.load(f)
    environments = [dict(os.environ), *(job["env"] for job in jobs if "env" in job)]
    if any(_uses(env, "ACCELERATE_USE_FSDP") for env in environments) and not torch.cuda.is_available():
        lift_fsdp_cpu_gate()  # inert for trainings without FSDP: accelerate builds no FSDP plugin for them
    if any(_uses(env, "ACCELERATE_USE_DEEPSPEED") for env in environments) and not torch.cuda.is_available():
        _skip_deepspeed_shm_op()
    launch_environment = {name: value for name, value in os.environ.items() if name.startswith(_ENGINE_PREFIXES)}
    for job in jobs:
        freeze_survivors()  # the imports' and earlier trainings' objects: each train() collects garbage
        _use_environment(job.get("env", launch_environment))
        poison = job.get("poison_step")
        batches: list[list[int]] = []  # the row indices this process's dataloader fetched, batch by batch
        collectives: list[str] = []  # the collectives this process entered while training
        with (
            _poisoned(poison, job.get("poison_rank", 1)) if poison is not None else contextlib.nullcontext(),
            _recording_samples(batches),
            _counting_collectives(collectives),
        ):
            trainer = train_command(job["argv"])  # the train command, every family: what a launch runs
        report(trainer, job["result"], batches, collectives)
        del trainer
        if "deepspeed" in sys.modules:  # ZeRO-3 registers its config with transformers; a new process has none
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


def report(
    trainer, result_path: str, batches: list[list[int]] | None = None, collectives: list[str] | None = None
) -> None:
    """Every process gathers what it must; the main process writes the report to ``result_path``."""
    from accelerate.utils import gather_object

    accelerator = trainer.accelerator
    # each process's fetched batches, by process (a list holding one list per process)
    sample_batches = gather_object([batches or []]) if accelerator.num_processes > 1 else [batches or []]
    # each process's sequence of collectives while training (the main process compares them)
    several = accelerator.num_processes > 1
    collective_sequences = gather_object([collectives or []]) if several else [collectives or []]
    stage = zero_stage(accelerator)
    backward = getattr(trainer.safeguard, "backward_stage", None)  # the exact safeguard's backward
    policy = trainer.accelerator.unwrap_model(trainer.model)
    model_dir = trainer.base_model_name
    denoiser_name = trainer.family.denoiser_name  # "unet", or "transformer" for SD3 / FLUX
    denoiser_cls = UNet2DConditionModel if denoiser_name == "unet" else type(trainer.family.denoiser)
    original = denoiser_cls.from_pretrained(model_dir, subfolder=denoiser_name)
    original_state = original.state_dict()
    result: dict = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "zero_stage": stage,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "lambdas": [h["safeguard/lambda_mean"] for h in trainer.state.log_history if "safeguard/lambda_mean" in h],
        # each logged step's largest lambda less its smallest, over every process's micro-batches
        "lambda_spreads": [
            h["safeguard/lambda_max"] - h["safeguard/lambda_min"]
            for h in trainer.state.log_history
            if "safeguard/lambda_max" in h
        ],
        "global_step": trainer.state.global_step,
        # why the exact rule ran one pass per branch (None: the tapped one pass, or no exact rule)
        "per_branch_reason": getattr(backward, "two_pass_reason", None),
        "sample_batches": sample_batches,
        "collective_counts": [len(c) for c in collective_sequences],
        "collectives_match": all(c == collective_sequences[0] for c in collective_sequences),
        "first_collective_mismatch": _first_mismatch(collective_sequences),
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "log_history": trainer.state.log_history,
        "frozen_partitioned": {
            name: any(is_partitioned(p) for p in module.parameters())
            for name, module in trainer.family.frozen_modules().items()
        },
        "policy_partitioned": sum(is_partitioned(p) and p.numel() < p.ds_numel for p in policy.parameters()),
        "policy_parameters": sum(1 for _ in policy.parameters()),
        # the exact safeguard's per-branch store, if its per-branch passes ran, and why they ran instead of one pass
        "branch_store": type(getattr(backward, "store", None)).__name__,
        "two_pass_reason": getattr(backward, "two_pass_reason", None),
        # the one pass's pieces, and the bytes they hold after the last step (what the store keeps between steps)
        "one_pass_pieces": len(getattr(getattr(backward, "one_pass", None), "pieces", [])),
        "one_pass_held_bytes": sum(
            piece.untyped_storage().nbytes()
            for piece in getattr(getattr(backward, "one_pass", None), "pieces", [])
            if piece is not None
        ),
    }

    if stage is not None:  # no method of DeepSpeed's optimizers replaced on the instance (a skipped step included)
        from trl_diffusion_sdpo.engines.deepspeed import zero_inner_optimizer

        engine = accelerator.deepspeed_engine_wrapped.engine
        result["zero_optimizer_shadowed"] = [
            f"{type(o).__name__}.{name}"
            for o in (engine.optimizer, zero_inner_optimizer(engine))
            for name in sorted(vars(o))
            if callable(getattr(type(o), name, None))
        ]
        result["zero_inner_found_inf"] = getattr(zero_inner_optimizer(engine), "found_inf", None) is not None

    # The reference: unchanged base weights (LoRA, adapters disabled) or an unchanged frozen copy.
    if trainer.reference.shares_policy_weights:
        named = [(n, p) for n, p in policy.named_parameters() if "lora_" not in n]
        # a compiled FSDP2 root (accelerate compiles before fully_shard) names its weights under _orig_mod
        strip = lambda n: n.removeprefix("_orig_mod.").replace(".base_layer", "")  # noqa: E731
    else:
        reference = trainer.reference.denoiser
        module = getattr(reference, "module", reference)  # a DeepSpeed engine under ZeRO-3
        result["reference_is_engine"] = module is not reference
        result["reference_partitioned"] = sum(
            is_partitioned(p) and p.numel() < p.ds_numel for p in module.parameters()
        )
        named = list(module.named_parameters())
        strip = lambda n: n  # noqa: E731
    with _gathered([p for _, p in named]):
        result["reference_max_abs_change"] = max(
            # against the original in the reference's dtype (bf16 under bf16 mixed precision): rounding is no change
            (_full(p).float().cpu() - original_state[strip(n)].to(p.dtype).float()).abs().max().item()
            for n, p in named
        )
    fsdp = str(accelerator.distributed_type).endswith("FSDP")
    if fsdp:  # how many parameters fully_shard holds as shards (DTensors) on this process
        result["policy_sharded"] = sum(isinstance(p, DTensor) for p in policy.parameters())
        if not trainer.reference.shares_policy_weights:
            ref_params = list(trainer.reference.denoiser.parameters())
            result["reference_sharded"] = sum(isinstance(p, DTensor) for p in ref_params)
            local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in ref_params)
            result["reference_local_fraction"] = local / sum(p.numel() for p in ref_params)

    # every process must hold the same trained weights (the combined gradient was all-reduced); not under sharding
    if stage != 3 and not fsdp:
        flat = torch.cat([p.detach().float().reshape(-1) for p in policy.parameters() if p.requires_grad])
        weights = torch.arange(flat.numel(), dtype=torch.float32) % 7 + 1
        probe = torch.stack([flat.sum(), (flat * weights).sum(), flat.pow(2).sum()]).to(accelerator.device)
        gathered = accelerator.gather(probe.reshape(1, -1))
        result["process_weight_spread"] = (gathered.max(0).values - gathered.min(0).values).abs().max().item()

    if stage == 3:  # the hazard load_pipeline avoids: transformers builds the text encoder partitioned
        import transformers

        with open(os.path.join(model_dir, "model_index.json")) as f:  # CLIP, UMT5, Qwen2.5-VL, Qwen3, Mistral-3 ...
            encoder_cls = getattr(transformers, json.load(f)["text_encoder"][1])
        naive = encoder_cls.from_pretrained(model_dir, subfolder="text_encoder")  # every process joins zero.Init
        result["naive_load_partitions_text_encoder"] = any(is_partitioned(p) for p in naive.parameters())

    # The trained UNet's outputs on fixed inputs, to compare with what diffusers loads from the saved files.
    inputs = _inputs(policy.config, trainer.args.resolution, trainer.family)
    trained = _output(policy, inputs)
    if accelerator.is_main_process:
        output_dir = trainer.args.output_dir
        if trainer.is_lora:
            pipe = load_pipeline(model_dir)  # not partitioned: only this process loads it
            loaded = getattr(pipe, denoiser_name)
            if hasattr(pipe, "load_lora_weights"):
                pipe.load_lora_weights(output_dir)
            else:  # no LoRA loader for the pipeline in diffusers (HunyuanVideo 1.5): the denoiser's own
                loaded.load_lora_adapter(output_dir, prefix=denoiser_name, use_safetensors=True)
            result["saved_files"] = sorted(os.listdir(output_dir))
        else:
            loaded = denoiser_cls.from_pretrained(output_dir, subfolder=denoiser_name)
            result["saved_files"] = sorted(os.listdir(os.path.join(output_dir, denoiser_name)))
        result["saved_vs_trained_max_abs_diff"] = (_output(loaded, inputs) - trained).abs().max().item()
        result["original_vs_trained_max_abs_diff"] = (_output(original, inputs) - trained).abs().max().item()
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main())

"""FSDP: FSDP2 (``fully_shard``), the supported one, and FSDP1, which accelerate still offers."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator

import torch

from ..families.reference_copy import reference_like_policy
from .base import Engine, optimizer_parameters

__all__ = [
    "FSDP1Engine",
    "FSDP2Engine",
    "gather_fsdp2_state_dict",
    "loading_into_shards",
    "shard_reference_fsdp2",
]


def shard_reference_fsdp2(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard a frozen reference ``module`` with FSDP2 exactly as accelerate shards the policy: the same blocks (the
    config's wrap policy), mesh and mixed precision, and no optimizer. Each forward all-gathers one block at a time
    and frees it after use, so a process holds 1/N of the reference plus one block."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    module.requires_grad_(False)
    module = fsdp2_prepare_model(accelerator, module)
    # accelerate keeps the root's own weights (stem and head) gathered after the forward, for the backward that
    # follows; a reference has no backward, so every block, the root included, frees its gathered weights at once.
    module.set_reshard_after_forward(True, recurse=True)
    module.eval()
    return module


def gather_fsdp2_state_dict(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The full state dict of an FSDP2-sharded ``module``, gathered tensor by tensor onto the main process's CPU.

    Every process must call it (each tensor is one all-gather); process 0 gets the dict, the others ``None``. With
    ``trainable_only`` only parameters that require gradients (LoRA adapters) are gathered. Names are the module's
    own (``fully_shard`` does not rename parameters).
    """
    from torch.distributed.tensor import DTensor

    keep = {name for name, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    is_main = torch.distributed.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        if keep is not None and name not in keep:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if is_main:
            state[name] = full.detach().to("cpu", copy=True)
    return state if is_main else None


@contextlib.contextmanager
def loading_into_shards() -> Iterator[None]:
    """Within the block, ``load_state_dict`` of full tensors into an FSDP2-sharded module works: each process copies
    its own shard out of the full tensor (the full tensors are treated as replicated DTensors)."""
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        yield


_SHARD_WEIGHTS, _SHARD_OPTIMIZER = "weights.safetensors", "optimizer.pt"


def _is_dtensor(tensor: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (under ``no_grad``, its local tensor itself: writes go through), or
    ``tensor``."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def reshard_all(module: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP2 module in ``module`` (``FSDPModule.reshard``), registering its shards
    again."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def fsdp_model_copies(folder: str) -> list[str]:
    """accelerate's FSDP copy of the model in a checkpoint ``folder`` (``pytorch_model_fsdp*``, a file or a sharded
    folder), which transformers' ``_save_checkpoint`` writes beside the optimizer's state. A resume never reads it:
    the weights load from the checkpoint's diffusers-format files into the shards (``Engine.loading``)."""
    from accelerate.utils.constants import FSDP_MODEL_NAME

    return sorted(glob.glob(os.path.join(folder, f"{FSDP_MODEL_NAME}*")))


class FSDP2Engine(Engine):
    """FSDP2: parameters and gradients are DTensor shards.

    Each branch's backward reduce-scatters its gradient inside autograd, so the parameter-space safeguard works on
    each process's gradient shards (hook-free) and its inner products are summed over processes: the global scope
    is implied. The update space works on the same shards and the optimizer state's, its sums summed over processes.
    The accumulation window's earlier sum is set aside while the branches run.
    """

    name = "fsdp2"
    replaces_parameters_in_train = True
    # its post-backward hooks end the backward they run in (a process crashed when they ran inside another backward)
    passes_placement = "in_compute_loss"
    samples_whole_denoiser = False
    shards_training_state = True

    @contextlib.contextmanager
    def probing(self, wrapped: torch.nn.Module, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        # fully_shard's own forward all-gathers each block. accelerate keeps the root's weights gathered after a
        # forward for the backward that follows; the probe has none, so every module's gathered weights are freed
        # after it (FSDPModule.reshard): a rewind then writes the shards the next forward gathers.
        try:
            yield policy
        finally:
            reshard_all(policy)

    def save_training_state(self, folder: str, optimizer: torch.optim.Optimizer) -> None:
        """This process's shards (each DTensor's local tensor) of the optimizer's parameters and of their optimizer
        state, in ``folder/process-<rank>/``."""
        from safetensors.torch import save_file

        mine = os.path.join(folder, f"process-{torch.distributed.get_rank()}")
        os.makedirs(mine, exist_ok=True)
        parameters = optimizer_parameters(optimizer)
        save_file({str(i): _local(p).detach().to("cpu", copy=True).contiguous() for i, p in enumerate(parameters)},
                  os.path.join(mine, _SHARD_WEIGHTS))  # fmt: skip
        state = optimizer.state_dict()
        sharded = [[i, k] for i, values in state["state"].items() for k, v in values.items() if _is_dtensor(v)]
        local = {
            i: {k: _local(v).to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            for i, values in state["state"].items()
        }
        torch.save({"state": local, "param_groups": state["param_groups"], "sharded": sharded},
                   os.path.join(mine, _SHARD_OPTIMIZER))  # fmt: skip

    def load_training_state(self, folder: str, optimizer: torch.optim.Optimizer) -> None:
        """This process's shards from ``folder/process-<rank>/`` back into its parameters' local tensors and its
        optimizer state (the state's shards made DTensors again, placed as their parameters are). The module's
        gathered weights must have been freed (:meth:`probing` does after every probe)."""
        from safetensors.torch import load_file
        from torch.distributed.tensor import DTensor

        mine = os.path.join(folder, f"process-{torch.distributed.get_rank()}")
        parameters = optimizer_parameters(optimizer)
        tensors = load_file(os.path.join(mine, _SHARD_WEIGHTS))
        with torch.no_grad():
            for i, parameter in enumerate(parameters):
                _local(parameter).copy_(tensors[str(i)])
        saved = torch.load(os.path.join(mine, _SHARD_OPTIMIZER), map_location="cpu", weights_only=True)
        state = saved["state"]
        for i, key in saved["sharded"]:
            p = parameters[i]
            state[i][key] = DTensor.from_local(state[i][key].to(_local(p).device), p.device_mesh, p.placements,
                                               run_check=False, shape=p.shape, stride=p.stride())  # fmt: skip
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def place_reference(
        self, module: torch.nn.Module, policy: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> torch.nn.Module:
        # In the policy's dtypes before sharding, as the policy is: the mixed-precision policy then casts both alike
        # when it gathers a block, and the models' float32 modules stay float32 in the reference.
        reference_like_policy(module, policy, device, dtype)
        return shard_reference_fsdp2(module, self.accelerator)

    def gathers_for_save(self) -> bool:
        return True

    def whole_parameter(self, parameter: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        # full_tensor, not the module's unshard: the parameter's own dtype, not the mixed precision's
        return parameter.full_tensor().detach() if isinstance(parameter, DTensor) else parameter.detach()

    def load_whole_state(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        # each process copies its own shard out of the whole tensors (as a resume loads full weights)
        with torch.no_grad(), loading_into_shards():
            module.load_state_dict(state, strict=False)

    def gather_state_dict(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        # the module's own names: under torch_compile the sharded root is the compiled wrapper (accelerate compiles
        # before fully_shard), whose names carry its _orig_mod prefix
        module = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return gather_fsdp2_state_dict(module, trainable_only=trainable_only)

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        # Each process copies its own shards out of the full tensors on disk.
        with loading_into_shards():
            yield

    def prepare_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        """Before accelerate's FSDP optimizer checkpoint (transformers writes it; it loads it back with accelerate's
        loader, which is strict: torch's ``set_optimizer_state_dict`` refuses a trainable parameter without saved
        state). A parameter that never received a gradient has none (AdamW creates it at the first gradient):
        Qwen-Image's last block discards its text stream, so its ``to_add_out`` adapters never train. Such a
        parameter gets the empty state it has (torch's optimizers start one lazily from an empty state), so it
        resumes without state, as it trained without."""
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.requires_grad:
                    optimizer.state.setdefault(parameter, {})

    def unused_checkpoint_files(self, folder: str) -> list[str]:
        return fsdp_model_copies(folder)


class FSDP1Engine(Engine):
    """FSDP1 (``FullyShardedDataParallel``): trained as accelerate does it; the parameter-space safeguard cannot
    separate its flattened, sharded gradients per branch."""

    name = "fsdp1"
    replaces_parameters_in_train = True
    passes_placement = "in_compute_loss"  # as FSDP2's: its hooks are not run inside another backward
    refreshes_reference = False  # its flattened shards are not gathered per parameter here

    def gathers_for_save(self) -> bool:
        return True

    def gather_state_dict(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        # accelerate's full state dict (the plugin's FULL_STATE_DICT), on every process
        return self.accelerator.get_state_dict(model)

    def unused_checkpoint_files(self, folder: str) -> list[str]:
        return fsdp_model_copies(folder)

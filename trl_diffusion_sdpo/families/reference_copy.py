"""A frozen copy of the denoiser as the reference (full tuning, or a separate ``ref_model``), placed like the policy
so that at step 0 it computes what the policy computes: each engine's ``place_reference`` calls it. A run whose
reference is the policy with its adapters off (LoRA) never loads this module.
"""

from __future__ import annotations

import torch

from .preparation import keeps_in_float32

__all__ = ["reference_like_policy"]


def reference_like_policy(
    reference: torch.nn.Module, policy: torch.nn.Module, device: torch.device | str, dtype: torch.dtype
) -> torch.nn.Module:
    """``reference`` on ``device`` in the policy's precision, parameter by parameter, so that at step 0 it computes
    exactly what the policy computes (under the same autocast): each parameter takes the dtype of the policy's
    parameter of the same name (PEFT's ``base_layer`` ignored), float32 for full tuning's trainable weights; a
    parameter the policy lacks (a separate ``ref_model``) takes ``dtype``, or float32 where the model keeps it so.

    A bf16 copy beside a float32 policy under autocast computes in another precision: norms, residual sums and the
    float32 ops of autocast run on bf16-rounded weights and activations, and the first loss starts off log 2 (0.02 on
    the tiny SDXL, tests/test_reference_precision.py). The cost is the parameter bytes of a float32 copy instead of a
    bf16 one (docs/reliability.md)."""
    policy_tensors = [*policy.named_parameters(), *policy.named_buffers()]
    policy_dtypes = {name.replace("base_layer.", ""): t.dtype for name, t in policy_tensors}
    reference.to(device=device)
    for name, tensor in [*reference.named_parameters(), *reference.named_buffers()]:
        wanted = policy_dtypes.get(name)
        if wanted is None:
            wanted = torch.float32 if keeps_in_float32(reference, name) else dtype
        if tensor.is_floating_point() and tensor.dtype != wanted:
            tensor.data = tensor.data.to(wanted)
    return reference

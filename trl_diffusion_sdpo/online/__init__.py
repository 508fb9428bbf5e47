"""Online Diffusion-DPO / Diffusion-SDPO: pairs sampled from the policy being trained, scored by reward functions,
and trained on with the offline trainer's step (its objectives, safeguards, engines and families unchanged).

* :class:`OnlineDiffusionSDPOConfig` (:mod:`.config`): the offline config plus the generation's fields;
* :class:`OnlineDiffusionSDPOTrainer` (:mod:`.trainer`): the trainer, a generation stage before the offline step;
* :mod:`.generation`: sample, score and pair one micro-batch; ``RewardFunctions``: the weighted reward functions
  (:mod:`trl_diffusion_sdpo.rewards.functions`, which the offline trainer uses too).
"""

from __future__ import annotations

from ..config._lazy import lazy_attributes

__all__ = ["OnlineDiffusionSDPOConfig", "OnlineDiffusionSDPOTrainer", "RewardFunctions"]

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "OnlineDiffusionSDPOConfig": ".config",
        "OnlineDiffusionSDPOTrainer": ".trainer",
        "RewardFunctions": "..rewards.functions",
    },
    globals(),
)

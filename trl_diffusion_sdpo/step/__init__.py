"""The training step's stages, each a function or a small object taking what it needs as arguments.

batch -> noised pair (:mod:`.stages`, with its keyed random draws) -> predictions of the policy and the reference ->
denoising errors -> objective -> metrics (:mod:`.predictions`; a reference with weights of its own, full tuning's
frozen copy, in :mod:`.frozen_reference`) -> backward (:mod:`.backward`: the engine's, or a safeguard's that keeps the
branches apart). The trainer calls them in this order
(``DiffusionSDPOTrainer.training_step``); a safeguard's hooks (:mod:`trl_diffusion_sdpo.safeguards`) act between them.
"""

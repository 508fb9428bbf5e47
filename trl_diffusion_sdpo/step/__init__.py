"""The training step's stages, each a function or a small object taking what it needs as arguments.

batch -> noised pair (:mod:`.stages`, with its keyed random draws) -> predictions of the policy and the reference ->
denoising errors -> objective -> metrics (:mod:`.predictions`; a reference with weights of its own, full tuning's
frozen copy, in :mod:`.frozen_reference`). The trainer's ``compute_loss`` calls them in this order and
transformers' step runs the backward (a safeguard that keeps the branches apart brings its own passes:
:mod:`trl_diffusion_sdpo.safeguards.passes`); a safeguard's hooks act between them.
"""

"""The training step as stages, each a module taking what it needs as arguments.

batch (:mod:`.batch`: live or cached latents, flips, prompt dropout, all-invalid micro-batches) -> draws
(:mod:`.draws`: keyed random draws) -> noised pair (the family's noiser, :mod:`trl_diffusion_sdpo.families.noising`)
-> predictions and errors (:mod:`.predictions`; :mod:`.pipeline` runs these stages in order) -> safeguard
(:mod:`.safeguard`: output space) -> objective (:mod:`trl_diffusion_sdpo.objectives`) -> backward (transformers', or
:mod:`.parameter_space`: one pass with the branches' gradients split inside it, or one pass per branch, on the
engine's gradient store) -> guard (:mod:`.guard`: non-finite handling) -> metrics (:mod:`.metrics`) -> optimizer
(:mod:`.optimizer`: lean zeroing and clipping).
"""

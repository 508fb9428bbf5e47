"""The training step's stages, each a module taking what it needs as arguments.

batch (:mod:`.batch`: live or cached latents, flips, prompt dropout, all-invalid micro-batches) -> draws
(:mod:`.draws`: keyed random draws) -> noised pair (the family's noiser, :mod:`trl_diffusion_sdpo.families.noising`)
-> predictions, errors and objective (:mod:`.predictions`; :mod:`.pipeline` runs the stages up to the predictions)
-> the safeguard's step (:mod:`trl_diffusion_sdpo.safeguards`; its math in :mod:`.safeguard` and
:mod:`.update_space`) -> guard (:mod:`.guard`: non-finite handling) -> metrics (:mod:`.metrics`) -> optimizer
(:mod:`.optimizer`: lean zeroing and clipping).
"""

"""The training step as stages, each a module taking what it needs as arguments.

batch (:mod:`.batch`: live or cached latents, flips, prompt dropout) -> draws (:mod:`.draws`: keyed random draws)
-> noised pair (the family's noiser, :mod:`trl_diffusion_sdpo.families.noising`) -> predictions and errors
(:mod:`.branches`) -> objective (:mod:`trl_diffusion_sdpo.objectives`) -> safeguard (:mod:`.safeguard`: output and
parameter space) -> backward (:mod:`.branches` for per-branch passes) -> guard (:mod:`.guard`: non-finite handling)
-> optimizer (:mod:`.optimizer`: lean zeroing and clipping).
"""

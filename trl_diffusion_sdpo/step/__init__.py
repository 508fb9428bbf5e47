"""The training step's stages, each a function or a small object taking what it needs as arguments.

batch -> noised pair -> predictions -> errors and objective (:mod:`.stages`, with the keyed random draws of
:mod:`.draws`) -> the safeguard's step (:mod:`trl_diffusion_sdpo.safeguards`: ``lambda`` and the backward) -> guard
(:mod:`.guard`: non-finite handling) -> metrics (:mod:`.metrics`) -> optimizer (:mod:`.optimizer`: lean zeroing
and clipping).
"""

"""Command-line training scripts, as TRL's ``trl/scripts``: :mod:`.train` behind ``trl-diffusion-sdpo train``."""

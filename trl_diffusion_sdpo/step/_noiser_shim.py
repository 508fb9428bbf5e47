"""TEMPORARY (removed when the families branch lands): today's noising behind the Noiser interface."""

from __future__ import annotations

import logging

import torch

from .flow import flow_noising_for
from .noising import check_timestep_range, noise_pairs, sample_pair_noise, training_scheduler

logger = logging.getLogger(__name__)


class _DDPM:
    def __init__(self, scheduler, min_timestep, max_timestep):
        self.scheduler, self.min_timestep, self.max_timestep = scheduler, min_timestep, max_timestep
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw(self, n, shape, generator, device):
        return sample_pair_noise(
            (n, *shape),
            self.num_train_timesteps,
            self.min_timestep,
            self.max_timestep,
            device,
            torch.float32,
            generator,
        )

    def noise_pairs(self, mean, std, levels, noise, eps, vae_config):
        return noise_pairs(self.scheduler, mean, std, levels, noise, eps, vae_config)


class _Flow:
    def __init__(self, flow):
        self.flow = flow
        self.num_train_timesteps = flow.num_train_timesteps

    def draw(self, n, shape, generator, device):
        levels = self.flow.sample_sigmas(n, shape, generator, device)
        return levels, torch.randn((n, *shape), generator=generator, device=device)

    def noise_pairs(self, mean, std, levels, noise, eps, vae_config):
        return self.flow.noise_pairs(mean, std, levels, noise, eps, vae_config)


def noiser_for(family, args):
    if family.flow_matching:
        if args.loss_type in ("dpo", "smpo") and args.beta == 5000.0:
            logger.warning(
                "beta=5000 is Diffusion-DPO's value for SD UNets; the flow-matching anchors use beta=100 on "
                "mean velocity errors (flow_grpo's SD3.5 Flow-DPO). See docs/sd3.md before keeping it."
            )
        return _Flow(flow_noising_for(family, args))
    scheduler = training_scheduler(family.pipeline.scheduler)
    check_timestep_range(args.min_timestep, args.max_timestep, scheduler.config.num_train_timesteps)
    return _DDPM(scheduler, args.min_timestep, args.max_timestep)

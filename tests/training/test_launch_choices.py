"""A multi-process launch without CUDA: the config sets what transformers needs to join the processes on the CPU
(``use_cpu``, ``ddp_backend``) where the caller left them unset and records what it set (``launch_choices``); the
start summary's machine choices print each with its reason. (Making such a config needs the other processes: here the
record is the one a two-process launch writes.)"""

from __future__ import annotations

import copy

from trl_diffusion_sdpo.config import DiffusionSDPOConfig
from trl_diffusion_sdpo.config.defaults import MACHINE, machine_choices


def test_what_the_config_set_for_the_launch_is_printed_with_its_reason(tmp_path):
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert config.launch_choices == {}  # one process: nothing set
    _, choices = machine_choices(config, device_type="cpu", terminal=False, cpus=2, processes=1)
    assert "use_cpu" not in choices and "ddp_backend" not in choices

    launched = copy.copy(config)
    launched.launch_choices = {"ddp_backend": "gloo", "use_cpu": True}
    _, choices = machine_choices(launched, device_type="cpu", terminal=False, cpus=2, processes=2)
    for name, value in launched.launch_choices.items():
        choice = choices[name]
        assert choice.value == value and choice.scope == MACHINE and not choice.given
        assert "2 processes launched without CUDA" in choice.text()

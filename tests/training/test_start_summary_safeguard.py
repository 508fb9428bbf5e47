"""The start summary justifies only what runs: ``safeguard_mu``'s value and source are stated where a safeguard runs
(its value the one the safeguard uses), and never where ``safeguard_space="none"`` runs none, offline or online, in
every safeguard space."""

from __future__ import annotations

import logging
import re

import pytest

from tests.helpers.common import fast_config_values
from tests.helpers.online import make_trainer as make_online_trainer
from tests.helpers.online import online_config
from trl_diffusion_sdpo.config import DiffusionSDPOConfig
from trl_diffusion_sdpo.config.defaults import TINY_BASE, resolved_config
from trl_diffusion_sdpo.config.rules import SAFEGUARD_SPACES
from trl_diffusion_sdpo.families.sd import StableDiffusionFamily
from trl_diffusion_sdpo.io.run_summary import start_summary

LOGGER = "trl_diffusion_sdpo.io.run_summary"
#: the start summary's first line (io/run_summary.py's start_summary)
START = re.compile(r"Training \S+ \((LoRA|full tuning)\) for \d+ optimizer steps:\n")


def _summary(config) -> tuple[str, object]:
    """The summary of a run of ``config`` on the shipped tiny base (whose ``safeguard_mu`` has an entry of its own),
    and the config the trainer would train with."""
    effective, resolved = resolved_config(config, StableDiffusionFamily, TINY_BASE)
    return start_summary(config, effective, StableDiffusionFamily.name, True, "engine", 3, resolved), effective


def _mu_lines(summary: str) -> list[str]:
    return [line.strip() for line in summary.splitlines() if line.strip().startswith("safeguard_mu=")]


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
@pytest.mark.parametrize("space", [None, *SAFEGUARD_SPACES], ids=lambda s: f"space={s}")
def test_safeguard_mu_is_justified_only_where_a_safeguard_runs(tmp_path, online, space):
    config = (
        online_config(tmp_path, safeguard_space=space)
        if online
        else DiffusionSDPOConfig(**fast_config_values(str(tmp_path / "out")), safeguard_space=space)
    )
    summary, effective = _summary(config)
    tiny_source = config.default_for("safeguard_mu", StableDiffusionFamily, TINY_BASE, objective="dpo").source
    assert f"safeguard_space={effective.safeguard_space} (" in summary
    if effective.safeguard_space == "none":
        assert _mu_lines(summary) == [] and tiny_source not in summary, summary
        assert "objective Diffusion-DPO (no safeguard)" in summary
    else:
        # the value the summary justifies is the one the safeguard runs with, stated once with its source
        assert _mu_lines(summary) == [f"safeguard_mu={effective.safeguard_mu:g} (base {TINY_BASE}: {tiny_source})"]
        assert f"safeguard mu={effective.safeguard_mu:g}, {effective.safeguard_space} space" in summary


def test_a_mu_given_without_a_safeguard_is_named_as_unused(tmp_path):
    config = DiffusionSDPOConfig(**fast_config_values(str(tmp_path / "out")), safeguard_space="none", safeguard_mu=0.7)
    summary, _ = _summary(config)
    assert _mu_lines(summary) == ["safeguard_mu=0.7 (as given): unused, safeguard_space=none runs no safeguard"]


def _logged_summary(trainer, caplog) -> str:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer.train()
    # the start summary, not the end-of-run summary a run that warned logs too
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    (summary,) = [message for message in messages if START.match(message)]
    return summary


def test_the_online_default_run_states_no_safeguard_and_justifies_no_mu(tmp_path, caplog):
    trainer = make_online_trainer(tmp_path, max_steps=1)
    summary = _logged_summary(trainer, caplog)
    assert "safeguard_space=none (" in summary and _mu_lines(summary) == [], summary
    # what the run did: no step ran a safeguard
    assert not any(key.startswith("safeguard/") for entry in trainer.state.log_history for key in entry)


def test_an_online_run_with_a_safeguard_justifies_the_mu_it_runs(tmp_path, caplog):
    trainer = make_online_trainer(tmp_path, max_steps=1, safeguard_space="output")
    summary = _logged_summary(trainer, caplog)
    (line,) = _mu_lines(summary)
    logged = {entry["safeguard/mu"] for entry in trainer.state.log_history if "safeguard/mu" in entry}
    assert logged == {trainer.args.safeguard_mu} and line.startswith(f"safeguard_mu={trainer.args.safeguard_mu:g} (")

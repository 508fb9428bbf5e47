"""``disable_tqdm`` also hides ``datasets``' progress bars (and never shows those the program turned off); a streamed
dataset's report says what is known."""

from __future__ import annotations

import datasets
import pytest

from trl_diffusion_sdpo.data.progress import datasets_progress_bars
from trl_diffusion_sdpo.io import console


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_datasets_progress_bars_follow_disable_tqdm(make_trainer, capfd, disable_tqdm, monkeypatch):
    """Given explicitly, whatever the output (unset, off a terminal, the trainer hides them: test_host_settings.py)."""
    monkeypatch.setattr(console, "on_terminal", lambda: True)
    datasets.enable_progress_bars()  # as on a terminal: importing the trainer here, off one, turned them off
    make_trainer(max_steps=1, disable_tqdm=disable_tqdm, cache_latents=True)
    err = capfd.readouterr().err
    shown = "Validating train preference pairs" in err or "Caching train latents" in err
    assert shown is not disable_tqdm, err
    assert datasets.is_progress_bar_enabled(), "the global setting must be restored"


def test_datasets_progress_bars_context_restores_the_setting_and_never_shows_bars_turned_off():
    datasets.enable_progress_bars()
    with datasets_progress_bars(False):
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # as every command does off a terminal
    try:
        with datasets_progress_bars(True):
            assert not datasets.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()


def test_streamed_data_report_is_meaningful(make_trainer, pickapic_dataset):
    trainer = make_trainer(max_steps=1, train_dataset=pickapic_dataset.to_iterable_dataset())
    summary = trainer.train_data_report.summary()
    assert "None" not in summary
    assert "streamed" in summary and "data/skipped_rows" in summary

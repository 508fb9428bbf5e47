"""Every ``report_to`` tracker transformers offers whose package is installed runs a few tiny steps and records
the trainer's metrics and the UNet's config (offline: local files only)."""

from __future__ import annotations

import glob
import json
import os
import sqlite3

import pytest
from diffusers.configuration_utils import FrozenDict

from trl_diffusion_sdpo.io.trackers import TrackableConfig, make_config_trackable


def test_trackable_config_is_the_same_mapping_with_to_dict_and_to_json_string(make_pipeline):
    unet = make_pipeline().unet
    before = dict(unet.config)
    make_config_trackable(unet)
    assert isinstance(unet.config, TrackableConfig) and isinstance(unet.config, FrozenDict)
    assert dict(unet.config) == before
    assert unet.config.cross_attention_dim == before["cross_attention_dim"]
    as_dict = unet.config.to_dict()
    assert as_dict["block_out_channels"] == list(before["block_out_channels"])
    assert "_use_default_values" not in as_dict
    assert json.loads(unet.config.to_json_string()) == json.loads(json.dumps(as_dict))


def test_a_trackable_unet_still_saves_and_loads_in_diffusers(make_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = make_pipeline().unet
    make_config_trackable(unet)
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert list(loaded.config.block_out_channels) == list(unet.config.block_out_channels)


def _tensorboard_check(root: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(events, size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert "train/loss" in scalars and "train/safeguard/lambda_mean" in scalars
    assert len(accumulator.Scalars("train/loss")) == 2
    texts = accumulator.Tags()["tensors"]
    assert any("model_config" in tag for tag in texts), texts


def _mlflow_check(root: str) -> None:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["cross_attention_dim"] == "32"  # the UNet's config, through to_dict()
    assert run.data.params["beta"] == "5000.0"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == 2


def _wandb_check(root: str) -> None:
    # wandb 0.31 ships no Python reader for offline runs; the run file holds the protobuf records uncompressed.
    (path,) = glob.glob(os.path.join(root, "wandb", "offline-run-*", "run-*.wandb"))
    with open(path, "rb") as f:
        records = f.read()
    assert b"train/loss" in records and b"train/safeguard/lambda_mean" in records
    assert b"cross_attention_dim" in records  # the UNet's config


def _trackio_check(root: str) -> None:
    (db,) = glob.glob(os.path.join(root, "trackio", "*.db"))
    with sqlite3.connect(db) as connection:
        metrics = [json.loads(row[0]) for row in connection.execute("select metrics from metrics")]
        (config,) = [json.loads(row[0]) for row in connection.execute("select config from configs")]
    assert sum("train/loss" in m for m in metrics) == 2
    assert config["cross_attention_dim"] == 32


TRACKERS = {
    "tensorboard": ("tensorboard", _tensorboard_check),
    "mlflow": ("mlflow", _mlflow_check),
    "wandb": ("wandb", _wandb_check),
    "trackio": ("trackio", _trackio_check),
}


# MLflow (database migrations) and W&B (its service process) take over 10 s each to start on 2 CPU cores.
SLOW_TO_START = {"mlflow", "wandb"}


@pytest.mark.parametrize(
    "tracker", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW_TO_START else t for t in sorted(TRACKERS)]
)
def test_report_to_tracker_records_metrics_and_the_unet_config(tracker, make_trainer, tmp_path, monkeypatch):
    package, check = TRACKERS[tracker]
    pytest.importorskip(package)
    root = str(tmp_path)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", os.path.join(root, "tb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", root)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    monkeypatch.setenv("TRACKIO_DIR", os.path.join(root, "trackio"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if tracker == "trackio":  # trackio reads TRACKIO_DIR once, at import
        import trackio.sqlite_storage

        monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")
    trainer = make_trainer(max_steps=2, report_to=[tracker], output_dir=os.path.join(root, "out"))
    trainer.train()
    if tracker == "wandb":
        import wandb

        wandb.finish()
    check(root)

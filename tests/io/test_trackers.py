"""Every ``report_to`` tracker transformers offers whose package is installed runs a few tiny steps and records
the trainer's metrics and the UNet's config (offline: local files only); a tracker added with ``add_callback`` after
the trainer is built receives the same."""

from __future__ import annotations

import glob
import json
import logging
import os
import sqlite3
import sys

import pytest
import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from trl_diffusion_sdpo.io.trackers import ModelForTrackers, TrackerCallback


class RecordingWriter:
    """A TensorBoard ``SummaryWriter`` as TensorBoardCallback uses it, keeping what it is handed."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.scalars: dict[tuple[str, int], float] = {}

    def add_text(self, tag: str, text: str) -> None:
        self.texts[tag] = text

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[(tag, step)] = value

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _expected(config) -> dict:
    """The UNet config's public entries as JSON reads them back, computed here from the config itself."""
    public = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    return json.loads(json.dumps(public, default=str))


def test_tensorboard_receives_the_unet_config_and_the_unet_keeps_its_own(make_trainer, make_pipeline, tmp_path):
    """transformers' own TensorBoardCallback (handed a writer through its public argument) calls
    ``model.config.to_json_string()`` when training begins; the UNet's config object is neither replaced nor
    changed."""
    pipe = make_pipeline()
    config = pipe.unet.config
    before = dict(config)
    writer = RecordingWriter()
    trainer = make_trainer(
        pipeline=pipe, max_steps=1, report_to="none", callbacks=[TensorBoardCallback(tb_writer=writer)]
    )
    assert pipe.unet.config is config and dict(pipe.unet.config) == before
    assert type(config).__name__ == "FrozenDict" and not hasattr(config, "to_json_string")
    trainer.train()
    assert pipe.unet.config is config and dict(pipe.unet.config) == before
    received = json.loads(writer.texts["model_config"])
    assert received == _expected(before)
    assert received["cross_attention_dim"] == before["cross_attention_dim"]
    assert received["block_out_channels"] == list(before["block_out_channels"])


class DictReadingTracker(TensorBoardCallback):
    """A tracker that reads the model as MLflow, Comet and Neptune do (``model.config.to_dict()``) and the arguments
    as they all do (``args.to_dict()``), and keeps them; its writer comes through TensorBoardCallback's public
    ``tb_writer`` argument, so nothing is written to disk."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model_config = model.config.to_dict()
        self.args = args.to_dict()
        self.model_type = type(model)
        self.is_module = isinstance(model, torch.nn.Module)
        self.parameters = list(model.parameters())


@pytest.mark.parametrize("when", ["callbacks=", "add_callback"])
def test_to_dict_trackers_receive_the_unet_config_and_its_module_in_every_run(when, make_trainer, make_pipeline):
    pipe = make_pipeline()
    tracker = DictReadingTracker(tb_writer=RecordingWriter())
    given = [tracker] if when == "callbacks=" else []
    trainer = make_trainer(pipeline=pipe, max_steps=1, report_to="none", callbacks=given)
    if when == "add_callback":
        trainer.add_callback(tracker)
    (registered,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrackerCallback)]
    assert registered.tracker is tracker
    # each object says what it is: a TrackerCallback subclass named after the tracker's class, not the tracker's class
    assert type(registered).__name__ == "TrackedDictReadingTracker" and type(registered).__bases__ == (
        TrackerCallback,
    )
    trainer.train()
    assert tracker.model_config == _expected(pipe.unet.config)
    assert tracker.args["beta"] == trainer.args.beta and tracker.args["output_dir"] == trainer.args.output_dir
    assert tracker.model_type is ModelForTrackers and tracker.is_module  # W&B's watch takes torch modules only
    assert [id(p) for p in tracker.parameters] == [id(p) for p in pipe.unet.parameters()]


def _figures(history: list[dict]) -> dict[tuple[str, int], float]:
    """What transformers' TensorBoardCallback writes for ``state.log_history``, computed here: each numeric figure of
    each log under ``train/<name>`` (``eval/<name>`` for an ``eval_`` figure) at the log's step."""
    written = {}
    for entry in history:
        for name, value in entry.items():
            if name in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"
            written[(tag, entry["step"])] = value
    return written


@pytest.mark.parametrize("when", ["report_to", "add_callback"])
def test_tensorboard_receives_the_config_and_every_logged_figure_however_it_was_added(when, make_trainer, monkeypatch):
    """transformers' own TensorBoardCallback, from ``report_to`` or added with ``trainer.add_callback`` once the
    trainer is built (with the UNet's ``FrozenDict`` config it would fail at ``to_json_string``), receives the
    arguments, the UNet's config and every figure that ``state.log_history`` records, the alarm's included."""
    writer = RecordingWriter()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unused")  # the writer is the test's: nothing is written
    trainer = make_trainer(
        max_steps=2,
        logging_steps=1,
        on_pathology="escalate",
        report_to="tensorboard" if when == "report_to" else "none",
    )
    if when == "add_callback":
        trainer.add_callback(TensorBoardCallback(tb_writer=writer))
    else:
        (registered,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrackerCallback)]
        registered.tracker.tb_writer = writer  # the public attribute TensorBoardCallback writes through
    trainer.train()
    assert json.loads(writer.texts["model_config"]) == _expected(trainer.model.config)
    assert json.loads(writer.texts["args"])["beta"] == trainer.args.beta
    expected = _figures(trainer.state.log_history)
    assert ("train/loss", 2) in expected and ("train/health/escalations", 2) in expected
    assert {key: writer.scalars.get(key) for key in expected} == expected


def test_other_callbacks_keep_the_model_itself(make_trainer, make_pipeline):
    seen = []

    class Seeing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model)

    pipe = make_pipeline()
    trainer = make_trainer(pipeline=pipe, max_steps=1, report_to="none", callbacks=[Seeing()])
    trainer.train()
    assert seen == [trainer.model] and seen[0] is pipe.unet


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


def test_a_tracker_given_is_found_by_its_class_and_by_itself(make_trainer):
    """The trainer registers trackers in a TrackerCallback, which hands them the model as they read it; the trainer's
    own ``pop_callback`` / ``remove_callback`` still find the tracker by its class or by the instance given."""
    given, other = TensorBoardCallback(tb_writer=RecordingWriter()), TensorBoardCallback(tb_writer=RecordingWriter())
    trainer = make_trainer(max_steps=1, report_to="none", callbacks=[given])
    trainer.add_callback(other)
    assert [cb.tracker for cb in trainer.callback_handler.callbacks if isinstance(cb, TrackerCallback)] == [
        given,
        other,
    ]
    assert trainer.pop_callback(TensorBoardCallback) is given
    trainer.remove_callback(other)
    assert not [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrackerCallback)]
    trainer.add_callback(TensorBoardCallback)  # a class, as Trainer.add_callback takes it
    (registered,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrackerCallback)]
    assert type(registered.tracker) is TensorBoardCallback


def test_two_trackers_of_different_kinds_draw_no_warning_of_a_second_callback(make_trainer):
    """transformers warns when a callback's class is registered twice: two trackers of different kinds are registered
    in classes of their own (a second tracker of one kind is still warned of, as transformers does)."""

    class OtherTracker(TensorBoardCallback):
        pass

    class Said(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    trainer = make_trainer(max_steps=1, report_to="none", callbacks=[TensorBoardCallback(tb_writer=RecordingWriter())])
    said, logger = Said(), logging.getLogger("transformers.trainer_callback")  # transformers' loggers do not propagate
    logger.addHandler(said)
    try:
        trainer.add_callback(OtherTracker(tb_writer=RecordingWriter()))
        assert not [line for line in said.lines if "there is already one" in line]
        trainer.add_callback(TensorBoardCallback(tb_writer=RecordingWriter()))
        assert [line for line in said.lines if "there is already one" in line]
    finally:
        logger.removeHandler(said)


def test_the_tracker_wrapper_loads_with_the_first_tracker_and_is_found_then(make_trainer, monkeypatch):
    """A run with no tracker has not loaded the wrapper's module (tests/docs/test_imports.py's plain run); the first
    tracker added loads it, is registered in it ahead of the console's callback, found by its class and popped."""
    from transformers import PrinterCallback

    monkeypatch.delitem(sys.modules, "trl_diffusion_sdpo.io.trackers")  # as in a run that registered no tracker
    trainer = make_trainer(max_steps=1, report_to="none", disable_tqdm=True)
    assert "trl_diffusion_sdpo.io.trackers" not in sys.modules
    assert trainer.callbacks_of(TensorBoardCallback) == []
    tracker = TensorBoardCallback(tb_writer=RecordingWriter())
    trainer.add_callback(tracker)
    assert "trl_diffusion_sdpo.io.trackers" in sys.modules
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("TrackedTensorBoardCallback") < names.index(PrinterCallback.__name__)
    assert trainer.callbacks_of(TensorBoardCallback) == [tracker]
    assert trainer.pop_callback(TensorBoardCallback) is tracker and trainer.callbacks_of(TensorBoardCallback) == []


def test_in_a_notebook_its_progress_bar_stays_after_a_tracker_added_late(make_trainer):
    """The notebook's bar counts among the console's callbacks once transformers has loaded its module (in a
    notebook; the trainer does not load it elsewhere, tests/docs/test_imports.py): a tracker added after the trainer
    is built is registered ahead of it, as ahead of the terminal's bar."""
    from transformers.utils.notebook import NotebookProgressCallback

    trainer = make_trainer(max_steps=1, report_to="none", callbacks=[NotebookProgressCallback()])
    trainer.add_callback(TensorBoardCallback(tb_writer=RecordingWriter()))
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("TrackedTensorBoardCallback") < names.index("NotebookProgressCallback")

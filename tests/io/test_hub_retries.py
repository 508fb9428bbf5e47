"""Hub outages: a checkpoint push (transformers', in the background) that fails never stops training, and the next
save pushes what was missed; the final push is retried with backoff, and one that fails leaves everything on disk and
says how to push it later. The Hub is a fake
``HfApi`` whose uploads raise as the real one does (an ``HfHubHTTPError`` with the server's status, or a network
error)."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from trl_diffusion_sdpo.io import hub
from trl_diffusion_sdpo.io.saving import LORA_WEIGHTS_NAME


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/models/someone/tiny/commit/main")
    return HfHubHTTPError(f"{status} from the Hub", response=httpx2.Response(status, request=request))


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(hub, "_sleep", waited.append)
    return waited


class FlakyHfApi:
    """Fails the first ``failures`` uploads with ``error``, then records what it uploads (and what the folder held)."""

    failures = 0
    error: Exception = ConnectionError("network is unreachable")
    instances: list[FlakyHfApi] = []

    def __init__(self, token=None, **kwargs):
        self.attempts = 0
        self.uploaded: list[set[str]] = []
        FlakyHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, run_as_future: bool = False, **kwargs):
        if run_as_future:  # HfApi's background thread: its error lands in the future
            return self.run_as_future(self.upload_folder, **kwargs)
        self.attempts += 1
        if FlakyHfApi.failures > 0:
            FlakyHfApi.failures -= 1
            raise FlakyHfApi.error
        self.uploaded.append(set(os.listdir(kwargs["folder_path"])))
        return "commit-url"

    def run_as_future(self, fn, *args, **kwargs):  # HfApi's background thread, run at once
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:
            future.set_exception(err)
        return future


def test_transient_errors_are_retried_with_doubling_waits(sleeps):
    outcomes = [http_error(503), http_error(429), ConnectionError("reset"), "done"]

    def call():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert hub.with_retries(call, "a push") == "done"
    assert sleeps == [hub.PUSH_BACKOFF_S, 2 * hub.PUSH_BACKOFF_S, 4 * hub.PUSH_BACKOFF_S]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refusal_is_not_retried(sleeps, status):
    def call():
        raise http_error(status)

    with pytest.raises(HfHubHTTPError):
        hub.with_retries(call, "a push")
    assert sleeps == []


def test_training_goes_on_through_an_outage_and_the_next_save_pushes_what_was_missed(
    make_trainer, tmp_path, monkeypatch, sleeps
):
    import transformers.trainer

    FlakyHfApi.instances.clear()
    FlakyHfApi.failures, FlakyHfApi.error = 1, ConnectionError("network is unreachable")
    monkeypatch.setattr(hub, "HfApi", FlakyHfApi)
    monkeypatch.setattr(transformers.trainer, "hf_api", FlakyHfApi)  # the checkpoint pushes are transformers'
    out = str(tmp_path / "push")
    trainer = make_trainer(
        max_steps=2,
        output_dir=out,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="someone/tiny",
        hub_strategy="every_save",
        hub_always_push=True,
    )
    trainer.train()  # the push of step 1 fails in its background thread: training goes on
    assert trainer.state.global_step == 2
    attempts = sum(api.attempts for api in FlakyHfApi.instances)
    uploads = [u for api in FlakyHfApi.instances for u in api.uploaded]
    assert attempts == 2 and len(uploads) == 1
    assert LORA_WEIGHTS_NAME in uploads[-1]  # step 2's push carried the weights step 1's push missed

    FlakyHfApi.failures = 100  # the Hub is down at the end
    with pytest.raises(hub.HubPushError) as info:
        trainer.push_to_hub()
    message = str(info.value)
    assert f"Everything is saved in {out}; push it later with: hf upload someone/tiny {out} ." in message
    assert os.path.isfile(os.path.join(out, LORA_WEIGHTS_NAME))


def test_a_push_with_the_hub_switched_off_fails_at_once_with_the_command_that_pushes_later(
    make_trainer, tmp_path, monkeypatch
):
    """``HF_HUB_OFFLINE=1``: huggingface_hub refuses every request itself (``OfflineModeIsEnabled``, a
    ``ConnectionError``), which no wait changes: the push gives up at the first refusal, in well under the 30 s its
    retries would wait, and says how to push the saved folder later."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read by huggingface_hub when it is imported
    out = str(tmp_path / "offline")
    trainer = make_trainer(max_steps=1, output_dir=out)
    started = time.monotonic()
    with pytest.raises(hub.HubPushError, match="offline mode is enabled") as info:
        trainer.push_to_hub()
    assert time.monotonic() - started < 2.0  # the real sleeps: no retry waited
    assert f"Everything is saved in {out}; push it later with: hf upload" in str(info.value)
    assert os.path.isfile(os.path.join(out, LORA_WEIGHTS_NAME))

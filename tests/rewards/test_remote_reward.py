"""The reward server client (``RemoteReward``, a URL in ``reward_funcs``): what it sends, and that every answer that
cannot be a score (the wrong count, NaN, an HTTP error, non-JSON, no server) raises naming the URL after its retries,
never becoming a reward."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from tests.helpers.served_rewards import free_port, serve_in_thread
from trl_diffusion_sdpo.rewards.functions import (
    PROTOCOL_VERSION,
    RemoteReward,
    RewardError,
    RewardFunctions,
    decode_value,
)

pytest.importorskip("fastapi")  # the `serve` extra (FastAPI and uvicorn)
pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse  # noqa: E402

IMAGES = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (10, 200, 10))]
PROMPTS = ["a", "b", "c"]


def misbehaving_app(answers: list[str], received: list[dict]) -> FastAPI:
    """Answers requests in the order of ``answers`` (the last one repeats), recording each body in ``received``.
    ``ok``: one score per image (its mean red minus mean blue, computed here from the decoded PNG)."""
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request):
        body = await request.json()
        received.append(body)
        answer = answers[min(len(received) - 1, len(answers) - 1)]
        images = [decode_value({"png": text}) for text in body["images"]]
        good = expected_scores(images)
        if answer == "ok":
            return {"version": PROTOCOL_VERSION, "scores": good}
        if answer == "short":
            return {"version": PROTOCOL_VERSION, "scores": good[:-1]}
        if answer == "nan":
            return PlainTextResponse('{"version": 1, "scores": [0.5, NaN, 0.1]}', media_type="application/json")
        if answer == "string":
            return {"version": PROTOCOL_VERSION, "scores": [0.5, "high", 0.1]}
        if answer == "version":
            return {"version": 2, "scores": good}
        if answer == "text":
            return PlainTextResponse("<html>proxy error</html>")
        return JSONResponse({"detail": f"scorer failed ({answer})"}, status_code=int(answer))

    return app


def expected_scores(images) -> list[float]:
    return [(im.getpixel((0, 0))[0] - im.getpixel((0, 0))[2]) / 255 for im in images]


def test_the_client_sends_the_protocol_and_returns_the_servers_scores():
    received: list[dict] = []
    with serve_in_thread(misbehaving_app(["ok"], received)) as base:
        reward = RemoteReward(f"{base}/v1/score", retries=0)
        scores = reward(PROMPTS, IMAGES, source_images=[[im] for im in IMAGES], tag=["x", "y", "z"])
    assert scores == pytest.approx(expected_scores(IMAGES))
    body = received[0]
    assert body["version"] == PROTOCOL_VERSION and body["prompts"] == PROMPTS
    sources = decode_value(body["columns"]["source_images"])
    assert [list(s[0].getdata()) for s in sources] == [list(im.getdata()) for im in IMAGES]  # PNG: lossless
    assert body["columns"]["tag"] == ["x", "y", "z"]


@pytest.mark.parametrize(
    "answer, message",
    [
        ("short", "returned 2 scores for 3 images"),
        ("nan", "returned nan as the score of image 1"),
        ("string", "returned 'high' as the score of image 1"),
        ("version", "answered .*, not protocol version 1"),
        ("text", "answered non-JSON"),
        ("400", "answered HTTP 400: .*scorer failed"),
    ],
)
def test_an_answer_that_is_no_score_raises_at_once_naming_the_url(answer, message):
    received: list[dict] = []
    with serve_in_thread(misbehaving_app([answer], received)) as base:
        reward = RemoteReward(f"{base}/v1/score", retries=3, backoff=0.01)
        with pytest.raises(RewardError, match=f"Reward server {base}/v1/score {message}"):
            reward(PROMPTS, IMAGES)
    assert len(received) == 1  # a wrong answer is not retried: it would come back the same


def test_a_server_error_is_retried_with_backoff_then_raises_naming_the_url_and_its_detail():
    received: list[dict] = []
    with serve_in_thread(misbehaving_app(["500"], received)) as base:
        with pytest.raises(RewardError, match=f"{base}/v1/score answered HTTP 500 after 2 retries.*scorer failed"):
            RemoteReward(f"{base}/v1/score", retries=2, backoff=0.01)(PROMPTS, IMAGES)
    assert len(received) == 3


def test_a_server_that_recovers_within_the_retries_gives_its_scores():
    received: list[dict] = []
    with serve_in_thread(misbehaving_app(["503", "502", "ok"], received)) as base:
        scores = RemoteReward(f"{base}/v1/score", retries=2, backoff=0.01)(PROMPTS, IMAGES)
    assert scores == pytest.approx(expected_scores(IMAGES)) and len(received) == 3


def test_no_server_raises_after_the_retries_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1/score"
    with pytest.raises(RewardError, match=f"Reward server {url} did not answer after 1 retries"):
        RemoteReward(url, retries=1, backoff=0.01)(PROMPTS, IMAGES)


def test_a_url_in_reward_funcs_is_a_remote_reward_with_the_runs_timeout_and_retries():
    rewards = RewardFunctions(["http://127.0.0.1:9/v1/score"], timeout=7.5, retries=3)
    remote = rewards.functions[0]
    assert isinstance(remote, RemoteReward) and (remote.timeout, remote.retries) == (7.5, 3)
    assert rewards.names == ["127.0.0.1:9/v1/score"]
    with pytest.raises(ValueError, match="starts with http"):
        RemoteReward("ftp://host/score")


def test_a_local_reward_function_returning_nan_raises_instead_of_scoring():
    def broken(prompts, images, **columns):
        return [0.1, float("nan"), 0.3]

    with pytest.raises(RewardError, match="'broken' returned nan as the score of image 1"):
        RewardFunctions([broken])(PROMPTS, IMAGES)


def test_a_server_slower_than_the_timeout_raises_after_the_timeout_not_after_its_answer():
    """``reward_timeout`` (RewardFunctions' ``timeout``, the online config's) bounds each attempt: a server that takes
    longer is given up on (without the timeout its answer would come, and be a score), the error naming the URL; the
    same server within the timeout gives its scores."""
    app, received = FastAPI(), []

    @app.post("/v1/score")
    async def slow(request: Request):
        received.append(await request.json())
        await asyncio.sleep(SLOW_S)
        return {"version": PROTOCOL_VERSION, "scores": [0.0] * len(received[-1]["images"])}

    with serve_in_thread(app) as base:
        rewards = RewardFunctions([f"{base}/v1/score"], timeout=SLOW_S / 10, retries=0)
        with pytest.raises(RewardError, match=f"Reward server {base}/v1/score did not answer.*Timeout"):
            rewards(PROMPTS, IMAGES)
        patient = RewardFunctions([f"{base}/v1/score"], timeout=SLOW_S * 10, retries=0)
        total, _ = patient(PROMPTS, IMAGES)
    assert total.tolist() == [0.0, 0.0, 0.0] and len(received) == 2


SLOW_S = 1.0

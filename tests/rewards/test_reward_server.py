"""``trl-diffusion-sdpo reward-server``'s application (FastAPI's TestClient, in process): it scores with the registered
scorer, answers /health and /ready, refuses what the protocol does not allow (400), a body above its bound (413), and
a scorer's non-finite score (500); its queue scores concurrent requests together, in batches of a bounded size."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from PIL import Image

from trl_diffusion_sdpo.demo.scorer import ColourRewardScorer
from trl_diffusion_sdpo.demo.shapes import all_captions
from trl_diffusion_sdpo.rewards.functions import PROTOCOL_VERSION, encode_image
from trl_diffusion_sdpo.rewards.scorers.base import EditScorer, Scorer, register_scorer
from trl_diffusion_sdpo.rewards.server import ScoringQueue, build_app

pytest.importorskip("fastapi")  # the `serve` extra

from fastapi.testclient import TestClient  # noqa: E402

CAPTIONS = [c.text for c in all_captions()[:4]]
IMAGES = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "white", (30, 160, 40))]


def ready_client(app) -> TestClient:
    client = TestClient(app)
    client.__enter__()  # runs the lifespan: the scorer loads in a thread
    deadline = time.monotonic() + 60
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.05)
    return client


def request(prompts=CAPTIONS, images=IMAGES, **extra) -> dict:
    return {"version": PROTOCOL_VERSION, "prompts": prompts, "images": [encode_image(i) for i in images], **extra}


def test_the_server_answers_the_registered_scorers_scores():
    client = ready_client(build_app("colour"))
    try:
        assert client.get("/health").json() == {"status": "ok"}
        answer = client.post("/v1/score", json=request())
        assert answer.status_code == 200
        body = answer.json()
        expected = ColourRewardScorer()(IMAGES, CAPTIONS)  # the scorer itself, in this process
        assert body["version"] == PROTOCOL_VERSION
        torch.testing.assert_close(torch.tensor(body["scores"]), expected)
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(
    "body, message",
    [
        (request(version=2), "version 2: this server speaks version 1"),
        (request(prompts=CAPTIONS[:3]), "4 images for 3 prompts"),
        ({**request(), "images": ["not base64!"] * 4}, "image 0 is not a base64 PNG"),
        (request(columns={"tag": ["a"]}), "column 'tag' needs one value per image"),
        (request(prompts=["a cat"] * 4), "prompt 0 is 'a cat'"),  # the colour scorer reads the demo's captions only
    ],
)
def test_a_request_the_protocol_refuses_is_answered_400_saying_why(body, message):
    client = ready_client(build_app("colour"))
    try:
        answer = client.post("/v1/score", json=body)
        assert answer.status_code == 400 and message in answer.json()["detail"]
    finally:
        client.__exit__(None, None, None)


def test_a_body_above_the_bound_is_refused_with_413():
    client = ready_client(build_app("colour", max_request_bytes=2000))
    try:
        assert client.post("/v1/score", json=request(images=IMAGES[:1], prompts=CAPTIONS[:1])).status_code == 200
        answer = client.post("/v1/score", json=request(prompts=["x" * 3000]))
        assert answer.status_code == 413 and "--max_request_mb" in answer.json()["detail"]
    finally:
        client.__exit__(None, None, None)


class NaNScorer(Scorer):
    name = "nan_for_tests"

    def score(self, images, prompts):
        return torch.tensor([0.5] + [float("nan")] * (len(images) - 1))


def test_a_scorer_that_fails_to_load_is_not_ready_and_a_non_finite_score_is_a_500():
    client = TestClient(build_app("colour", {"no_such_argument": 1}))
    with client:
        deadline = time.monotonic() + 60
        while "failed to load" not in client.get("/ready").json()["detail"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/ready").status_code == 503 and client.get("/health").status_code == 200
        assert client.post("/v1/score", json=request()).status_code == 503
    register_scorer(NaNScorer.name, NaNScorer, overwrite=True)
    client = ready_client(build_app(NaNScorer.name))
    try:
        answer = client.post("/v1/score", json=request())
        assert answer.status_code == 500 and "gave nan for image 1" in answer.json()["detail"]
    finally:
        client.__exit__(None, None, None)


def test_concurrent_requests_are_scored_together_in_batches_of_at_most_max_batch_size():
    calls: list[list[str]] = []

    def score(prompts, images, sources):
        calls.append(list(prompts))
        return [float(p) for p in prompts]

    async def run() -> list[list[float]]:
        queue = ScoringQueue(score, max_batch_size=4, batch_wait=0.5)
        worker = asyncio.create_task(queue.run())
        requests = [[str(10 * r + i) for i in range(n)] for r, n in enumerate((2, 1, 3))]
        answers = await asyncio.gather(*(queue.submit(p, [None] * len(p), None) for p in requests))
        worker.cancel()
        return answers

    answers = asyncio.run(run())
    assert answers == [[0.0, 1.0], [10.0], [20.0, 21.0, 22.0]]  # each request gets its own scores, in order
    assert calls == [["0", "1", "10", "20"], ["21", "22"]]  # one batch of 4 (the bound), the rest after


def test_the_command_binds_this_machine_only_by_default_and_names_the_registered_scorers_for_an_unknown_one(capsys):
    from trl_diffusion_sdpo.cli.main import main
    from trl_diffusion_sdpo.cli.reward_server import build_parser

    args = build_parser().parse_args(["--scorer", "colour"])
    assert (args.host, args.port, args.max_batch_size) == ("127.0.0.1", 8000, 32)
    with pytest.raises(
        SystemExit, match=r"--scorer 'colur' is no registered scorer \(did you mean colour\?\); .*colour"
    ):
        main(["reward-server", "--scorer", "colur"])


class SourceDistance(EditScorer):
    """Mean absolute pixel difference between an edit and its first source, in [0, 1]."""

    name = "source_distance_for_tests"

    def score(self, images, prompts, sources):
        return torch.tensor([(pixels(im) - pixels(src[0])).abs().mean().item() for im, src in zip(images, sources)])


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float64) / 255


def test_an_editing_scorer_receives_each_images_sources_from_the_columns():
    register_scorer(SourceDistance.name, SourceDistance, overwrite=True)
    sources = [Image.new("RGB", (32, 32), c) for c in ("black", "white", "red", "blue")]
    client = ready_client(build_app(SourceDistance.name))
    try:
        columns = {"source_images": [[{"png": encode_image(s)}] for s in sources]}
        answer = client.post("/v1/score", json=request(columns=columns))
        expected = [(pixels(i) - pixels(s)).abs().mean().item() for i, s in zip(IMAGES, sources)]
        assert answer.status_code == 200 and answer.json()["scores"] == pytest.approx(expected)
        refused = client.post("/v1/score", json=request())
        assert refused.status_code == 400 and "send each image's sources as columns.source_images" in refused.text
    finally:
        client.__exit__(None, None, None)

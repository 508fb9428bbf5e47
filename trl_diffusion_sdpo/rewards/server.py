"""``trl-diffusion-sdpo reward-server``: a registered scorer served over HTTP, so that a reward model runs in its own
process (or on its own GPU) and online training sends it the images (``reward_funcs: ["http://host:port/v1/score"]``).

    trl-diffusion-sdpo reward-server --scorer pickscore --port 8000

Endpoints (protocol version 1, docs/reward-server.md):

* ``POST /v1/score``: ``{"version": 1, "prompts": [...], "images": [base64 PNG, ...], "columns": {...}}`` ->
  ``{"version": 1, "scores": [float, ...]}``, one score per image;
* ``GET /health``: 200 while the process serves; ``GET /ready``: 200 once the scorer is loaded, 503 before.

Requests that arrive together are scored together (:class:`ScoringQueue`): up to ``max_batch_size`` images per call
of the scorer, which runs in one worker thread so that one model is never called from two threads. A request body
above ``max_request_bytes`` is refused with 413. FastAPI and uvicorn come with the ``serve`` extra.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at definition.

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .functions import PROTOCOL_VERSION, decode_image, decode_value
from .scorers import build_scorer
from .scorers.registry import register_outside_scorers

__all__ = ["ScoringQueue", "build_app"]

logger = logging.getLogger(__name__)

SOURCES_COLUMN = "source_images"
#: ``(prompts, images, sources or None) -> one float per image``
ScoreFunction = Callable[[list[str], list[Image.Image], list | None], Sequence[float]]


class RequestError(ValueError):
    """A request the protocol refuses (answered 400 with the message)."""


@dataclass
class _Pending:
    prompts: list[str]
    images: list[Image.Image]
    sources: list | None
    future: asyncio.Future = field(repr=False)


class ScoringQueue:
    """Scores the requests that wait together in one call of the scorer: the first request waits ``batch_wait``
    seconds for others, up to ``max_batch_size`` images; a larger request is scored in chunks of that size. A batch
    that fails is scored again request by request, so one bad request fails alone."""

    def __init__(self, score: ScoreFunction, max_batch_size: int, batch_wait: float) -> None:
        self.score, self.max_batch_size, self.batch_wait = score, max_batch_size, batch_wait
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        # One thread: the scorer's model is called from one thread at a time.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scorer")

    async def submit(self, prompts: list[str], images: list[Image.Image], sources: list | None) -> list[float]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(prompts, images, sources, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            size = len(group[0].images)
            deadline = loop.time() + self.batch_wait
            while size < self.max_batch_size and (left := deadline - loop.time()) > 0:
                try:
                    group.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
                size += len(group[-1].images)
            await self._score_group(group)

    async def _score_group(self, group: list[_Pending]) -> None:
        try:
            scores = await self._score_all(group)
        except Exception as err:
            if len(group) == 1:
                if not group[0].future.done():
                    group[0].future.set_exception(err)
                return
            for pending in group:
                await self._score_group([pending])
            return
        start = 0
        for pending in group:
            if not pending.future.done():  # a client that went away leaves its future cancelled
                pending.future.set_result(scores[start : start + len(pending.images)])
            start += len(pending.images)

    async def _score_all(self, group: list[_Pending]) -> list[float]:
        loop = asyncio.get_running_loop()
        prompts = [p for pending in group for p in pending.prompts]
        images = [i for pending in group for i in pending.images]
        with_sources = group[0].sources is not None
        sources = [s for pending in group for s in (pending.sources or [])] if with_sources else None
        scores: list[float] = []
        for start in range(0, len(images), self.max_batch_size):
            end = start + self.max_batch_size
            chunk = await loop.run_in_executor(
                self.executor,
                self.score,
                prompts[start:end],
                images[start:end],
                sources[start:end] if sources else None,
            )
            scores.extend(float(s) for s in chunk)
        return scores


class _Scorer:
    """The registered scorer, loaded in a background thread so that ``/health`` answers while a large model loads."""

    def __init__(self, name: str, kwargs: dict[str, Any]) -> None:
        self.name, self.kwargs = name, kwargs
        self.scorer: Any = None
        self.error: str | None = None
        self.loaded = threading.Event()

    def load(self) -> None:
        try:
            register_outside_scorers()
            self.scorer = build_scorer(self.name, **self.kwargs)
            logger.info("Scorer %s loaded: ready", self.name)
        except Exception as err:  # reported by /ready and every /v1/score, and in the log
            self.error = f"{type(err).__name__}: {err}"
            logger.exception("Scorer %s failed to load", self.name)
        finally:
            self.loaded.set()

    def __call__(self, prompts: list[str], images: list[Image.Image], sources: list | None) -> list[float]:
        scores = self.scorer(images, prompts, sources).tolist()
        for index, score in enumerate(scores):
            if not math.isfinite(score):
                raise RuntimeError(f"scorer {self.name} gave {score} for image {index} ({prompts[index]!r})")
        return scores


def parse_request(body: bytes, edits: bool, name: str) -> tuple[list[str], list[Image.Image], list | None]:
    """A ``/v1/score`` body as ``(prompts, images, sources)``; a :class:`RequestError` says what is wrong."""
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise RequestError(f"the body is not JSON ({err})") from None
    if not isinstance(payload, dict):
        raise RequestError("the body is a JSON object: {version, prompts, images, columns}")
    if payload.get("version") != PROTOCOL_VERSION:
        raise RequestError(f"version {payload.get('version')!r}: this server speaks version {PROTOCOL_VERSION}")
    prompts, encoded, columns = payload.get("prompts"), payload.get("images"), payload.get("columns") or {}
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts is a list of strings, one per image")
    if not isinstance(encoded, list) or len(encoded) != len(prompts):
        count = len(encoded) if isinstance(encoded, list) else type(encoded).__name__
        raise RequestError(f"{count} images for {len(prompts)} prompts: send one base64 PNG per prompt")
    if not isinstance(columns, dict):
        raise RequestError("columns is an object: column name -> one value per image")
    for column, values in columns.items():
        if not isinstance(values, list) or len(values) != len(prompts):
            raise RequestError(f"column {column!r} needs one value per image ({len(prompts)})")
    images = []
    for index, text in enumerate(encoded):
        try:
            images.append(decode_image(text))
        except Exception as err:
            raise RequestError(f"image {index} is not a base64 PNG ({type(err).__name__}: {err})") from None
    sources = None
    if edits:
        if SOURCES_COLUMN not in columns:
            raise RequestError(f"scorer {name} scores edits: send each image's sources as columns.{SOURCES_COLUMN}")
        sources = [v if isinstance(v, list) else [v] for v in decode_value(columns[SOURCES_COLUMN])]
    return prompts, images, sources


def build_app(
    scorer: str,
    scorer_kwargs: dict[str, Any] | None = None,
    max_batch_size: int = 32,
    batch_wait: float = 0.005,
    max_request_bytes: int = 64 * 2**20,
):
    """The FastAPI application serving the registered scorer ``scorer`` (built with ``scorer_kwargs``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    model = _Scorer(scorer, scorer_kwargs or {})
    queue = ScoringQueue(model, max_batch_size, batch_wait)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=model.load, name="scorer-load", daemon=True).start()
        worker = asyncio.create_task(queue.run())
        yield
        worker.cancel()
        queue.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"trl-diffusion-sdpo reward server ({scorer})", lifespan=lifespan)

    def not_ready() -> JSONResponse:
        detail = f"scorer {scorer} failed to load: {model.error}" if model.error else f"scorer {scorer} is loading"
        return JSONResponse({"ready": False, "detail": detail}, status_code=503)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if model.scorer is None:
            return not_ready()
        return {"ready": True, "scorer": scorer, "version": PROTOCOL_VERSION}

    @app.post("/v1/score")
    async def score(request: Request):
        too_large = JSONResponse(
            {
                "detail": f"the request is larger than this server's bound of {max_request_bytes} bytes: send fewer "
                "images per request or start the server with a larger --max_request_mb"
            },
            status_code=413,
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                return too_large
        if model.scorer is None:
            return not_ready()
        try:
            prompts, images, sources = parse_request(bytes(body), model.scorer.edits, scorer)
            model.scorer.check_prompts(prompts)  # a prompt the scorer cannot read fails alone, and is not retried
        except ValueError as err:
            return JSONResponse({"detail": str(err)}, status_code=400)
        try:
            scores = await queue.submit(prompts, images, sources) if images else []
        except Exception as err:
            logger.exception("Scoring failed")
            return JSONResponse({"detail": f"{type(err).__name__}: {err}"}, status_code=500)
        return {"version": PROTOCOL_VERSION, "scores": scores}

    return app

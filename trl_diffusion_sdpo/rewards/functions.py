"""The reward of an image: a weighted sum of reward functions, each a registered scorer or a callable (the online
trainer's ``reward_funcs``, and the offline trainer's for SmPO's scores).

``reward(prompts, images) = sum_f w_f * f(prompts, images, **columns)``, the weights 1 by default, as TRL's GRPO
combines its ``reward_funcs`` with ``reward_weights``. A callable takes the prompts, the PIL images and the prompt
rows' other columns (one list per column, one entry per image) and returns one float per image; a registered scorer
(:mod:`~trl_diffusion_sdpo.rewards.scorers`) is called with the images and prompts (and, for an editing scorer,
each image's sources); a URL (``http://host:port/v1/score``) is a reward server (:class:`RemoteReward`, the protocol
in docs/reward-server.md).

A function that gives no usable score (the wrong count, a NaN, a server unreachable after its retries) raises
:class:`RewardError`: no sample is ever trained on a missing or made-up reward.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..config.messages import advice
from .scorers import available_scorers, build_scorer
from .scorers.registry import register_outside_scorers, unknown_scorer_message

if TYPE_CHECKING:
    from ..data.scoring import RewardFn

__all__ = [
    "PROTOCOL_VERSION",
    "RemoteReward",
    "RewardError",
    "RewardFunction",
    "RewardFunctions",
    "check_reward_names",
    "dataset_scoring_function",
    "decode_value",
    "encode_value",
    "is_reward_url",
]

#: ``f(prompts, images, **columns) -> one float per image``
RewardFunction = Callable[..., Sequence[float] | torch.Tensor]

#: The reward server protocol's version, sent with every request and checked in every answer.
PROTOCOL_VERSION = 1
#: HTTP statuses a request is retried on (with backoff): the server busy, restarting or failing for a moment.
RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)


class RewardError(ValueError):
    """A reward function gave no usable score for a batch (the wrong count, a non-finite value, a server that did
    not answer): raised instead of training on a missing reward."""


def is_reward_url(function: object) -> bool:
    """Whether a ``reward_funcs`` entry names a reward server (an ``http://`` or ``https://`` URL)."""
    return isinstance(function, str) and function.lower().startswith(("http://", "https://"))


def encode_image(image: Image.Image) -> str:
    """An image as the protocol sends it: base64 of its PNG file (lossless, RGB or RGBA as it is)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str) -> Image.Image:
    """:func:`encode_image`'s inverse (RGB)."""
    return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")


def encode_value(value: Any, column: str) -> Any:
    """A column entry as JSON: an image becomes ``{"png": base64}``, a list or tuple a list of encoded entries,
    numbers, strings, booleans and ``None`` stay (a ValueError names the column of anything else)."""
    if isinstance(value, Image.Image):
        return {"png": encode_image(value)}
    if isinstance(value, (list, tuple)):
        return [encode_value(v, column) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): encode_value(v, column) for k, v in value.items()}
    raise ValueError(
        f"Column {column!r} holds a {type(value).__name__}, which a reward server cannot be sent: give the prompt "
        "dataset's columns as strings, numbers, booleans, images or lists of those, or drop the column."
    )


def decode_value(value: Any) -> Any:
    """:func:`encode_value`'s inverse: ``{"png": base64}`` back to an image, lists and dicts entry by entry."""
    if isinstance(value, dict):
        if set(value) == {"png"}:
            return decode_image(value["png"])
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


class RemoteReward:
    """A reward server as a reward function: the images go to ``url`` as base64 PNG with their prompts and columns,
    one float per image comes back (protocol version :data:`PROTOCOL_VERSION`, docs/reward-server.md).

    A refused connection, a timeout and the statuses :data:`RETRIED_STATUSES` are retried ``retries`` times with
    exponential backoff (urllib3's ``Retry``: waits of 0, 2, 4, 8, ... times ``backoff`` seconds, at most 120 s
    each; ``timeout`` bounds each attempt); after that, or at once for an answer that cannot be right (another
    status, non-JSON, another version, the wrong number of scores, a non-finite score), :class:`RewardError` names
    the URL and what came back.

    Args:
        url: the scoring endpoint, e.g. ``http://127.0.0.1:8000/v1/score``.
        timeout: seconds to wait for each attempt's answer.
        retries: attempts after the first.
        backoff: the backoff factor in seconds.
    """

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 5, backoff: float = 1.0) -> None:
        if not is_reward_url(url):
            raise ValueError(f"A reward server's URL starts with http:// or https://, got {url!r}.")
        import urllib3

        self.url, self.timeout, self.retries = url, float(timeout), int(retries)
        self.__name__ = url.split("://", 1)[1]  # the metric name: online/reward/<host:port/path>
        retry = urllib3.Retry(
            total=self.retries,
            backoff_factor=backoff,
            status_forcelist=RETRIED_STATUSES,
            allowed_methods=None,  # scoring is idempotent: retry the POST too
            raise_on_status=False,  # the last answer's status and text go into the error
        )
        self.pool = urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(total=self.timeout))

    def __call__(self, prompts: Sequence[str], images: Sequence[Image.Image], **columns: Any) -> list[float]:
        import urllib3

        payload = {
            "version": PROTOCOL_VERSION,
            "prompts": list(prompts),
            "images": [encode_image(image) for image in images],
            "columns": {name: encode_value(list(values), name) for name, values in columns.items()},
        }
        body = json.dumps(payload).encode()
        try:
            response = self.pool.request("POST", self.url, body=body, headers={"Content-Type": "application/json"})
        except urllib3.exceptions.HTTPError as err:
            reason = getattr(err, "reason", None) or err
            raise RewardError(
                f"Reward server {self.url} did not answer after {self.retries} retries ({type(reason).__name__}: "
                f"{reason}). Check that it runs (`trl-diffusion-sdpo reward-server`, GET /ready), or raise "
                "reward_retries / reward_timeout."
            ) from err
        text = response.data.decode("utf-8", errors="replace")
        if response.status != 200:
            retried = f" after {self.retries} retries" if response.status in RETRIED_STATUSES else ""
            raise RewardError(f"Reward server {self.url} answered HTTP {response.status}{retried}: {text[:500]}")
        try:
            answer = json.loads(text)
        except ValueError:
            raise RewardError(f"Reward server {self.url} answered non-JSON: {text[:200]!r}") from None
        return self._scores(answer, len(images))

    def _scores(self, body: Any, expected: int) -> list[float]:
        """The answer's scores, checked: the protocol's version, one finite number per image."""
        if not isinstance(body, dict) or body.get("version") != PROTOCOL_VERSION or "scores" not in body:
            raise RewardError(
                f"Reward server {self.url} answered {str(body)[:200]}, not protocol version {PROTOCOL_VERSION}'s "
                '{"version": 1, "scores": [...]}.'
            )
        scores = body["scores"]
        if not isinstance(scores, list) or len(scores) != expected:
            count = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardError(f"Reward server {self.url} returned {count} scores for {expected} images.")
        values = []
        for index, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise RewardError(
                    f"Reward server {self.url} returned {score!r} as the score of image {index}; a score is a finite "
                    "number."
                )
            values.append(float(score))
        return values

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"


def check_reward_names(functions: Sequence[object]) -> None:
    """Refuse, before anything loads, a reward function named as a string that is neither a reward server's URL nor a
    registered scorer (the scorers outside the evaluation package, the demo's ``colour``, registered first), naming
    the closest registered one."""
    register_outside_scorers()
    for name in functions:
        if isinstance(name, str) and not is_reward_url(name) and name not in available_scorers():
            raise ValueError(
                f"{unknown_scorer_message(name, advice('--reward_funcs', 'reward_funcs'))} Or give a reward server's "
                "URL (http://host:port/v1/score)"
                + advice(".", ", or a callable (prompts, images, **columns) -> list[float] for your own reward.")
            )


def _scorer_function(name: str) -> tuple[str, RewardFunction]:
    """A registered scorer as a reward function (the scorers outside the evaluation package, the demo's ``colour``,
    registered first)."""
    check_reward_names([name])
    scorer = build_scorer(name)

    def score(prompts: Sequence[str], images: Sequence[Image.Image], **columns: Any) -> torch.Tensor:
        sources = columns.get("source_images") if scorer.edits else None
        return scorer(images, prompts, sources)

    return name, score


class RewardFunctions:
    """The reward functions of a run and their weights.

    Args:
        functions: registered scorer names, reward server URLs (:class:`RemoteReward`) or callables
            ``(prompts, images, **columns) -> list[float]``.
        weights: one weight per function (``None``: 1 each).
        timeout: a reward server's answer timeout in seconds (:class:`RemoteReward`).
        retries: a reward server's retries after a failed attempt.
    """

    def __init__(
        self,
        functions: Sequence[str | RewardFunction],
        weights: Sequence[float] | None = None,
        timeout: float = 60.0,
        retries: int = 5,
    ) -> None:
        if not functions:
            raise ValueError(
                "reward_funcs needs at least one reward function: reward_funcs=['pickscore'] (a registered scorer) "
                "or a callable (prompts, images, **columns) -> list[float]."
            )
        if weights is not None and len(weights) != len(functions):
            raise ValueError(f"{len(weights)} reward_weights for {len(functions)} reward functions; give one each.")
        self.names: list[str] = []
        self.functions: list[RewardFunction] = []
        for function in functions:
            if is_reward_url(function):
                function = RemoteReward(function, timeout, retries)
            name, call = _scorer_function(function) if isinstance(function, str) else (_name_of(function), function)
            if name in self.names:
                name = f"{name}_{len(self.names)}"
            self.names.append(name)
            self.functions.append(call)
        self.weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], columns: dict[str, list[Any]] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(reward, per function)``: the weighted sum (float64, one per image) and each function's scores."""
        columns = columns or {}
        per_function: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(images), dtype=torch.float64)
        for name, function, weight in zip(self.names, self.functions, self.weights):
            scores = torch.as_tensor(function(list(prompts), list(images), **columns), dtype=torch.float64)
            scores = scores.detach().cpu().reshape(-1)
            if scores.numel() != len(images):
                raise RewardError(
                    f"reward function {name!r} returned {scores.numel()} scores for {len(images)} images; it must "
                    "return one float per image."
                )
            if not torch.isfinite(scores).all():
                index = int((~torch.isfinite(scores)).nonzero()[0])
                raise RewardError(
                    f"reward function {name!r} returned {scores[index].item()} as the score of image {index}; a "
                    "score is a finite number (no sample is trained on a missing reward)."
                )
            per_function[name] = scores
            total += weight * scores
        return total, per_function

    def describe(self) -> list[str]:
        """``name`` or ``name (weight w)`` per function, for the model card."""
        return [
            name if math.isclose(w, 1.0) else f"{name} (weight {w:g})" for name, w in zip(self.names, self.weights)
        ]


def _name_of(function: RewardFunction) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def dataset_scoring_function(
    reward_funcs: str | RewardFunction | Sequence[str | RewardFunction] | None,
) -> RewardFn | None:
    """The function that scores a dataset's images, ``(images, prompts) -> scores``, from ``reward_funcs`` (TRL's
    name and argument order, summed over the functions)."""
    if reward_funcs is None:
        return None
    functions = [reward_funcs] if isinstance(reward_funcs, str) or callable(reward_funcs) else list(reward_funcs)
    rewards = RewardFunctions(functions)

    def score(images: list, prompts: list[str]) -> torch.Tensor:
        return rewards(prompts, images)[0]

    return score

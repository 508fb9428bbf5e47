"""Model cards and Hub uploads for trained UNets, pipelines and LoRA adapters.

Every Hub call of the package goes through this module (tests replace :data:`HfApi`). The card is rendered by
huggingface_hub's ``ModelCard.from_template`` (the mechanism behind both TRL's ``generate_model_card`` and
diffusers' ``load_or_create_model_card``) from a diffusion template, then tagged with diffusers'
``populate_model_card``. TRL's generator is bound to its text-generation template, and diffusers' helper first
looks the card up on the Hub and leaves its training template's usage section as a TODO; neither fits as is.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import OfflineModeIsEnabled

from ..config.file_modes import follow_umask
from ..families.loading import SHIPPED_MODELS
from . import saving
from .run_events import run_events
from .run_lock import LOCK_NAME, RECORD_NAME

__all__ = [
    "PUSH_ATTEMPTS",
    "PUSH_BACKOFF_S",
    "CardMethod",
    "HubPushError",
    "RunHub",
    "build_model_card",
    "copy_saved_model",
    "create_hub_repo",
    "hub_base_model",
    "upload_folder_to_hub",
    "with_retries",
]

DIFFUSION_CITATIONS = """@inproceedings{wallace2024diffusion,
  title     = {Diffusion Model Alignment Using Direct Preference Optimization},
  author    = {Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and Purushwalkam,
               Senthil and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
  booktitle = {CVPR},
  year      = {2024},
  note      = {arXiv:2311.12908}
}

@article{fu2025diffusionsdpo,
  title   = {Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion Models},
  author  = {Fu, Minghao and Wang, Guo-Hua and Cui, Tianyu and Chen, Qing-Guo and Xu, Zhao and Luo, Weihua
             and Zhang, Kaifu},
  journal = {arXiv preprint arXiv:2511.03317},
  year    = {2025}
}"""

TRL_CITATION = """@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and
             Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""

CITATIONS = f"```bibtex\n{DIFFUSION_CITATIONS}\n\n{TRL_CITATION}\n```"

# Never uploaded from the output folder: checkpoints, private files, TensorBoard runs and any pickle (transformers
# writes its arguments as a pickled training_args.bin; this package writes training_config.json instead).
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]
OUTPUT_IGNORE_PATTERNS = ["checkpoint-*", "_*", "runs/*", LOCK_NAME, RECORD_NAME, *PICKLE_PATTERNS]

FRAMEWORKS = {
    "trl-diffusion-sdpo": "trl-diffusion-sdpo",
    "TRL": "trl",
    "Diffusers": "diffusers",
    "Transformers": "transformers",
    "PEFT": "peft",
    "PyTorch": "torch",
    "Datasets": "datasets",
}

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ kind }}, fine-tuned from {% if base_model %}[{{ base_model }}](https://huggingface.co/{{ base_model }}){% elif \
base_path %}the local pipeline {{ base_path }}{% else %}a local pipeline{% endif %}{% if dataset_name %} on \
{% if dataset_is_hub %}\
[{{ dataset_name }}](https://huggingface.co/datasets/{{ dataset_name }}){% else %}`{{ dataset_name }}`{% endif %}\
{% endif %} with **{{ method }}** by `trl-diffusion-sdpo`'s `{{ trainer_name }}` (a \
[TRL](https://github.com/huggingface/trl)-style trainer), on {{ pairs }}.

{{ method_description }}
{% if events %}
## Alarms, warnings and rewinds

{% for line in events %}- {{ line }}
{% endfor %}{% endif %}
## Usage

```python
{{ usage }}
```
{% if sample_grid %}
## Samples

Validation prompts at step {{ sample_step }}:

![validation samples]({{ sample_grid }})
{% endif %}
## Training hyperparameters

| parameter | value |
|---|---|
{% for key, value in hyperparameters.items() %}| `{{ key }}` | `{{ value }}` |
{% endfor %}
### Framework versions

{% for name, value in frameworks.items() %}- {{ name }}: {{ value }}
{% endfor %}
## Citations

Cite Diffusion-DPO and Diffusion-SDPO as:

```bibtex
{{ method_citations }}
```

Cite TRL as:

```bibtex
{{ trl_citation }}
```
"""


def hub_base_model(name_or_path: str | None) -> str | None:
    """The base model as the card's ``base_model``: a Hub id, or ``None`` for a local folder (as TRL does)."""
    if not name_or_path or os.path.isdir(name_or_path) or os.path.isabs(name_or_path):
        return None
    return name_or_path


def local_base_label(name_or_path: str | None) -> str | None:
    """How the card's text names a local base (``None`` for a Hub id or none): its folder, and the shipped base's
    short name beside it (``trl-diffusion-sdpo:tiny``)."""
    if not name_or_path or hub_base_model(name_or_path) is not None:
        return None
    path = os.path.realpath(name_or_path)
    shipped = [name for name, folder in SHIPPED_MODELS.items() if os.path.realpath(folder) == path]
    return f"`{name_or_path}`" + (f" (the shipped base `{shipped[0]}`)" if shipped else "")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and not os.path.isabs(name) and name.count("/") <= 1


def framework_versions() -> dict[str, str]:
    versions = {}
    for label, package in FRAMEWORKS.items():
        try:
            versions[label] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def _no_details(trainer: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class CardMethod:
    """What a trainer's model card says of its method: the name (``Diffusion-SDPO`` with a safeguard, else
    ``Diffusion-DPO``, after ``prefix``) and the hyperparameters ``details(trainer)`` adds to the shared ones."""

    prefix: str = ""
    details: Callable[[Any], dict[str, Any]] = _no_details

    def name(self, args: Any) -> str:
        """The method the card names for a run with ``args``."""
        return self.prefix + ("Diffusion-SDPO" if args.safeguarded else "Diffusion-DPO")


def method_description(method: str) -> str:
    if method.startswith("Online "):
        return (
            "Online: every prompt was sampled several times by the model being trained, the samples scored by the "
            "reward functions listed below, and the best against the worst trained on. "
            + method_description(method.removeprefix("Online "))
        )
    if method == "Diffusion-SDPO":
        return (
            "Diffusion-SDPO is Diffusion-DPO with a winner-preserving safeguard: the gradient of the loser's "
            "denoising error is scaled by a closed-form `lambda` so that, to first order, the winner's error does not "
            "increase (Fu et al., 2025)."
        )
    return (
        "Diffusion-DPO optimises a DPO objective on the denoising errors of the policy and a frozen reference model "
        "(Wallace et al., 2024)."
    )


#: The usage example's prompt where the run's data gives none (a streamed dataset, a prebuilt latent cache).
UNKNOWN_PROMPT = "<your prompt>"


@dataclass(frozen=True)
class UsageCall:
    """How the model card's usage example samples the result: a prompt of the run's data at the run's size, with what
    the family's pipeline takes beside it. ``num_frames``: a video family's clip length (the result is
    ``.frames[0]``); ``edits``: the pipeline edits a source image (``image=``); ``max_area``: the pipeline rescales
    the edit to its own area unless given ``max_area`` (FLUX.1 Kontext)."""

    prompt: str
    height: int
    width: int
    num_frames: int | None = None
    edits: bool = False
    max_area: bool = False

    def lines(self) -> list[str]:
        """The example's lines after the pipeline is loaded, as Python that runs as written."""
        size = f"height={self.height}, width={self.width}"
        if self.num_frames is not None:
            return [f"frames = pipe({self.prompt!r}, {size}, num_frames={self.num_frames}).frames[0]"]
        if not self.edits:
            return [f"image = pipe({self.prompt!r}, {size}).images[0]"]
        area = f", max_area={self.height * self.width}" if self.max_area else ""
        return [
            '# the image to edit: a blank stand-in here; load yours with PIL.Image.open(path).convert("RGB")',
            f'source = Image.new("RGB", ({self.width}, {self.height}), "white")',
            f"image = pipe(image=source, prompt={self.prompt!r}, {size}{area}).images[0]",
        ]


def usage_call(pipeline: Any, family: Any, args: Any, prompt: str) -> UsageCall:
    """How a run with ``args`` of ``family`` on ``pipeline`` is sampled in its card's usage example: ``prompt`` at the
    training resolution, a video family's clips of ``num_frames``, an editing family's source image."""
    return UsageCall(
        prompt,
        args.resolution,
        args.resolution,
        num_frames=args.num_frames if family.video else None,
        edits=family.edits,
        max_area="max_area" in inspect.signature(type(pipeline).__call__).parameters,
    )


def usage_snippet(
    repo_id: str,
    base_model: str | None,
    is_lora: bool,
    lora_denoiser: str | None = None,
    call: UsageCall | None = None,
) -> str:
    """How to load the result and sample it; ``repo_id`` is the Hub id the card will live under (or a placeholder).
    ``lora_denoiser``: the denoiser's name for a pipeline without ``load_lora_weights`` (no LoRA loader in diffusers,
    as HunyuanVideo 1.5's), whose adapters load with the denoiser's own ``load_lora_adapter``. ``call``: the run's
    prompt and size (a placeholder prompt at the pipeline's default size without it)."""
    sample = call.lines() if call is not None else [f"image = pipe({UNKNOWN_PROMPT!r}).images[0]"]
    edits = call is not None and call.edits
    imports = "from diffusers import DiffusionPipeline\n" + ("from PIL import Image\n" if edits else "")
    if is_lora:
        base = base_model or "<the base pipeline>"
        load = f'pipe.load_lora_weights("{repo_id}")'
        if lora_denoiser is not None:
            options = f'prefix="{lora_denoiser}", use_safetensors=True'
            load = f'pipe.{lora_denoiser}.load_lora_adapter("{repo_id}", {options})'
        lines = [f'pipe = DiffusionPipeline.from_pretrained("{base}")', load, *sample]
    else:
        lines = [f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")', *sample]
    return imports + "\n" + "\n".join(lines)


def build_model_card(
    *,
    base_model: str | None,
    is_lora: bool,
    method: str,
    hyperparameters: dict[str, Any],
    tags: list[str],
    model_family: str,
    model_name: str,
    hub_model_id: str | None = None,
    dataset_name: str | None = None,
    license: str | None = None,
    sample_grid: str | None = None,
    sample_prompt: str | None = None,
    denoiser: tuple[str, str] = ("unet", "UNet2DConditionModel"),
    pipeline_loads_lora: bool = True,
    trainer_name: str = "DiffusionSDPOTrainer",
    events: Sequence[str] = (),
    usage_call: UsageCall | None = None,
) -> ModelCard:
    """A model card in TRL's and diffusers' shape: metadata (``base_model`` only when it is a Hub id, ``datasets``,
    ``license``, tags), method, usage under ``hub_model_id`` (sampling as ``usage_call`` says: the run's prompt and
    size), the last validation grid (``sample_grid``, a path relative to the card; with ``sample_prompt`` also the
    Hub's widget, as diffusers' training scripts do), key hyperparameters, framework versions and the papers and TRL
    to cite. ``denoiser`` is the trained network's
    pipeline name and class (``("transformer", "FluxTransformer2DModel")`` for FLUX); ``pipeline_loads_lora``: whether
    the pipeline has diffusers' ``load_lora_weights`` (else the usage loads the adapters into the denoiser);
    ``trainer_name``: the trainer class that trained it; ``events``: what the run's warnings and alarms said and did
    (the start's warnings, each alarm, each rewind and each switch of the safeguard, :func:`~.run_events.run_events`),
    a section of its own."""
    base_path = local_base_label(base_model)
    local_base = base_model if base_path else None  # what from_pretrained loads on this machine
    base_model = hub_base_model(base_model)
    label = "UNet" if denoiser[0] == "unet" else "transformer"
    data = ModelCardData(
        base_model=base_model,
        datasets=[dataset_name] if _is_hub_id(dataset_name) else None,
        license=license or "other",
        library_name="diffusers",
        model_name=model_name,
        pipeline_tag="text-to-image",
        tags=[],
        widget=[{"text": sample_prompt, "output": {"url": sample_grid}}] if sample_grid and sample_prompt else None,
    )
    card = ModelCard.from_template(
        data,
        template_str=MODEL_CARD_TEMPLATE,
        model_name=model_name,
        kind=f"LoRA adapters for the {label} of a text-to-image pipeline" if is_lora else "A text-to-image pipeline",
        base_model=base_model,
        base_path=base_path,
        dataset_name=dataset_name,
        dataset_is_hub=_is_hub_id(dataset_name),
        method=method,
        method_description=method_description(method),
        trainer_name=trainer_name,
        pairs="pairs it sampled itself and the reward functions ranked"
        if method.startswith("Online ")
        else "preference pairs: a preferred and a rejected image per prompt",
        usage=usage_snippet(
            hub_model_id or "<this repo>",
            base_model or local_base,
            is_lora,
            None if pipeline_loads_lora else denoiser[0],
            usage_call,
        ),
        sample_grid=sample_grid,
        sample_step=_grid_step(sample_grid) if sample_grid else None,
        hyperparameters=hyperparameters,
        frameworks=framework_versions(),
        method_citations=DIFFUSION_CITATIONS,
        trl_citation=TRL_CITATION,
        events=list(events),
    )
    all_tags = ["diffusers", "trl", "diffusion-sdpo", "text-to-image", model_family] + (["lora"] if is_lora else [])
    all_tags += [t for t in tags if t not in all_tags]
    return populate_model_card(card, tags=all_tags)


def _grid_step(sample_grid: str) -> str:
    return os.path.splitext(os.path.basename(sample_grid))[0].removeprefix("step-").lstrip("0") or "0"


logger = logging.getLogger(__name__)

# A Hub outage (network error, 5xx, rate limit) is retried this many times in all, waiting PUSH_BACKOFF_S, then
# twice as long each time (2 + 4 + 8 + 16 s: half a minute), before a push is given up.
# Not huggingface_hub's http_backoff: it retries one HTTP request, and a push is HfApi.upload_folder, several requests
# behind one call. HfApi retries most of them itself (pre-upload, LFS and Xet transfers, and with hf_xet the commit),
# but sends create_repo's request, and without hf_xet create_commit's commit request, once (huggingface_hub 2.4):
# what is retried here is the whole call, e.g. a commit answered 503.
PUSH_ATTEMPTS = 5
PUSH_BACKOFF_S = 2.0
_sleep = time.sleep  # replaced by the tests


class HubPushError(RuntimeError):
    """The final push failed after its retries; everything is on disk, and the message says how to push it."""


def is_transient_hub_error(err: BaseException) -> bool:
    """Whether retrying may help: a network or timeout error, HTTP 408, 429 (rate limit) or 5xx. An authentication,
    permission or not-found answer (401, 403, 404) is not retried, nor is huggingface_hub's refusal to reach the Hub
    under ``HF_HUB_OFFLINE=1`` (a ``ConnectionError`` that no wait changes)."""
    if isinstance(err, OfflineModeIsEnabled):
        return False
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(status, int):
        return status in (408, 429) or status >= 500
    names = {c.__name__ for c in type(err).__mro__}
    return isinstance(err, (ConnectionError, TimeoutError)) or bool(names & {"TransportError", "TimeoutException"})


def with_retries(fn: Callable[[], Any], what: str) -> Any:
    """``fn()``, retried with exponential backoff (:data:`PUSH_ATTEMPTS`, :data:`PUSH_BACKOFF_S`) on transient
    errors (:func:`is_transient_hub_error`); the last error is raised."""
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == PUSH_ATTEMPTS or not is_transient_hub_error(err):
                raise
            delay = PUSH_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning(
                "%s failed (%s: %s); retry %d of %d in %g s",
                what,
                type(err).__name__,
                err,
                attempt,
                PUSH_ATTEMPTS - 1,
                delay,
            )
            _sleep(delay)
    raise AssertionError("unreachable")


def create_hub_repo(
    repo_id: str, *, token: str | None = None, private: bool | None = None, api: HfApi | None = None
) -> str:
    """Create the model repo if needed; returns its full id (with the namespace the Hub resolved)."""
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return getattr(url, "repo_id", None) or repo_id


def upload_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload trained model",
    ignore_patterns: list[str] | None = None,
    api: HfApi | None = None,
):
    """Create the model repo if needed and upload ``folder`` (no checkpoints, private files or pickles).

    Transient errors are retried with backoff (:func:`with_retries`); if the push still fails,
    :class:`HubPushError` says that everything is on disk and gives the command that pushes it later."""
    api = api or HfApi(token=token)
    try:
        with_retries(lambda: create_hub_repo(repo_id, private=private, api=api), f"Creating Hub repo {repo_id}")
        return with_retries(
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=os.fspath(folder),
                commit_message=commit_message,
                revision=revision,
                ignore_patterns=ignore_patterns or OUTPUT_IGNORE_PATTERNS,
                repo_type="model",
            ),
            f"Pushing {folder} to {repo_id}",
        )
    except Exception as err:
        raise HubPushError(
            f"Pushing {folder} to the Hub repo {repo_id} failed ({type(err).__name__}: {err}). Everything is saved "
            f"in {folder}; push it later with: hf upload {repo_id} {folder} . --repo-type model --exclude "
            + " ".join(f"'{pattern}'" for pattern in ignore_patterns or OUTPUT_IGNORE_PATTERNS)
        ) from err


class RunHub:
    """A run's model card and Hub pushes, for ``trainer`` (its :class:`~.run_files.RunFiles` builds it when the run
    first writes a card or reaches the Hub): what ``transformers.Trainer``'s ``create_model_card``,
    ``init_hf_repo`` and ``push_to_hub`` do, done with this module's card and uploads, and the output folder readied
    for transformers' own checkpoint push. Keeps transformers' own ``hub_model_id`` and ``push_in_progress`` on the
    trainer, where transformers reads them.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.card_arguments: dict[str, Any] = {}  # create_model_card's arguments, remembered for later pushes

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
    ) -> None:
        """Write ``README.md`` in ``output_dir`` (TRL's signature, plus transformers' ``license``): base model (when
        a Hub id), dataset, method, usage, the last validation grid, key hyperparameters, framework versions and
        citations. Arguments given once are remembered for the cards of later pushes."""
        trainer = self.trainer
        given = {"model_name": model_name, "dataset_name": dataset_name, "tags": tags, "license": license}
        self.card_arguments.update({k: v for k, v in given.items() if v is not None})
        if not trainer.is_world_process_zero():
            return
        args, card_args, family = trainer.args, self.card_arguments, trainer.family
        given_rate = trainer.args_as_given.learning_rate
        hyperparameters: dict[str, Any] = {
            "loss_type": args.loss_type,
            "beta": args.beta,
            "safeguard_mu": args.safeguard_mu if args.safeguarded else None,
            "safeguard_space": args.safeguard_space,
            "on_pathology": args.on_pathology,  # what its alarms did: the card's own section
            # as given (before scale_lr); unset, the family's rate the run resolved (scale_lr then needs it given)
            "learning_rate": args.learning_rate if given_rate is None else given_rate,
            "scale_lr": args.scale_lr,
            "effective_learning_rate": args.learning_rate,
            "effective_batch_size": args.world_size
            * args.per_device_train_batch_size
            * args.gradient_accumulation_steps,
            "max_steps": trainer.state.max_steps or args.max_steps,
            "resolution": args.resolution,
            "tuning": "LoRA" if trainer.is_lora else f"full {family.denoiser_name.replace('unet', 'UNet')}",
        }
        if trainer.is_lora:
            lora = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False).peft_config["default"]
            hyperparameters["lora_rank"] = lora.r
            hyperparameters["lora_alpha"] = lora.lora_alpha
        if trainer.probe is not None:  # where its pairs came from: rows held back are pairs the run did not train on
            hyperparameters["held_out_probe"] = trainer.probe.summary()
        hyperparameters.update(trainer.card_method.details(trainer))  # the online trainer's rewards and generation
        tags = card_args.get("tags") or []
        hub_model_id = trainer.hub_model_id or args.hub_model_id
        card = build_model_card(
            base_model=trainer.base_model_name,
            is_lora=trainer.is_lora,
            method=trainer.card_method.name(args),
            hyperparameters=hyperparameters,
            tags=list(trainer._tag_names) + ([tags] if isinstance(tags, str) else list(tags)),
            model_family=family.name,
            model_name=card_args.get("model_name")
            or (hub_model_id or os.path.basename(os.path.abspath(args.output_dir))).split("/")[-1],
            hub_model_id=hub_model_id,
            dataset_name=card_args.get("dataset_name"),
            license=card_args.get("license"),
            sample_grid=self._last_validation_grid(),
            sample_prompt=self._validation_prompt(),
            denoiser=(family.denoiser_name, type(family.denoiser).__name__),
            pipeline_loads_lora=hasattr(type(trainer.pipeline), "load_lora_weights"),
            trainer_name=type(trainer).__name__,
            events=run_events(trainer),
            usage_call=self._usage_call(),
        )
        os.makedirs(args.output_dir, exist_ok=True)
        card.save(os.path.join(args.output_dir, "README.md"))

    def _usage_call(self) -> UsageCall:
        """How the card's usage example samples: the validation grids' first prompt, else the first training prompt
        (:func:`usage_call`)."""
        trainer = self.trainer
        prompt = self._validation_prompt() or trainer.example_prompt or UNKNOWN_PROMPT
        return usage_call(trainer.pipeline, trainer.family, trainer.args, prompt)

    def _validation_prompt(self) -> str | None:
        """The first prompt of the run's validation grids (the Hub widget's text), or ``None`` without them."""
        grids = self.trainer.callbacks_of("trl_diffusion_sdpo.callbacks.validation:ValidationCallback")
        return grids[0].prompts[0] if grids else None

    def _last_validation_grid(self) -> str | None:
        """The newest ``validation/step-*.png`` in ``output_dir``, relative to it (for the model card)."""
        folder = os.path.join(self.trainer.args.output_dir, "validation")
        grids = sorted(f for f in os.listdir(folder) if f.startswith("step-")) if os.path.isdir(folder) else []
        return f"validation/{grids[-1]}" if grids else None

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo (``hub_model_id``, else the output folder's name) through :mod:`.hub`."""
        trainer = self.trainer
        if not trainer.is_world_process_zero():
            return
        trainer.hub_model_id = create_hub_repo(
            trainer.args.hub_model_id or os.path.basename(os.path.abspath(trainer.args.output_dir)),
            token=token or trainer.args.hub_token,
            private=private if private is not None else trainer.args.hub_private_repo,
        )
        trainer.push_in_progress = None

    def ready_output_dir(self, checkpoint_folder: str) -> None:
        """Before transformers' checkpoint push (``push_to_hub``; its ``on_push_begin``) uploads ``output_dir``: the
        checkpoint's weights copied there (with the rest of the pipeline for full tuning) and a model card written,
        since transformers copies only files named as its own weights. The upload, its ``hub_strategy`` and
        ``push_in_progress`` are transformers'."""
        trainer = self.trainer
        output_dir = trainer.args.output_dir
        copy_saved_model(checkpoint_folder, output_dir)
        if not trainer.is_lora and not saving.has_pipeline_components(output_dir):
            saving.save_pipeline_components(trainer.pipeline, output_dir, trainer.family.denoiser_name)
        trainer.create_model_card()

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ):
        """Save the weights and a model card (``kwargs``: :meth:`create_model_card`'s) to ``output_dir`` and upload
        that folder to ``hub_model_id``, once the checkpoint pushes still running are done."""
        trainer = self.trainer
        args = trainer.args
        trainer.save_model(_internal_call=True)
        if not trainer.is_world_process_zero():
            return None
        trainer.create_model_card(**kwargs)
        pending = getattr(trainer, "push_in_progress", None)  # init_hf_repo's: None before any checkpoint push
        if pending is not None and not pending.is_done():
            logger.info("Waiting for the checkpoint pushes still running")
            pending.wait_until_done()
        repo_id = trainer.hub_model_id or args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        return upload_folder_to_hub(
            args.output_dir,
            repo_id,
            token=token or args.hub_token,
            private=private if private is not None else args.hub_private_repo,
            revision=revision or args.hub_revision,
            commit_message=commit_message or "End of training",
        )


def copy_saved_model(source: str, destination: str) -> None:
    """Copy the weights and ``training_config.json`` that :func:`~.saving.save_lora_adapters` /
    :func:`~.saving.save_full_denoiser` wrote in ``source`` (a checkpoint) into ``destination``, replacing older
    copies."""
    os.makedirs(destination, exist_ok=True)
    # shutil's copies keep the source's mode: each copy is then given the umask's, as a file written here would be.
    for name in (saving.LORA_WEIGHTS_NAME, saving.TRAINING_CONFIG_NAME):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(destination, name))
            follow_umask(os.path.join(destination, name))
    for subfolder in (saving.UNET_SUBFOLDER, saving.TRANSFORMER_SUBFOLDER):
        if os.path.isdir(os.path.join(source, subfolder)):
            shutil.rmtree(os.path.join(destination, subfolder), ignore_errors=True)
            shutil.copytree(os.path.join(source, subfolder), os.path.join(destination, subfolder))
            follow_umask(os.path.join(destination, subfolder))

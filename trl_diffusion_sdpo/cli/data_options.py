"""How ``train`` reads its data as the data-preparation options say: the split in its format (``--dataset_format``,
``--dataset_columns``, ``--ranking_pairs``), the columns renamed (``--rename_columns``), the loss masks derived and
grown (``--auto_mask``, ``--mask_dilate``), and the evaluation split that ``--early_stopping_patience`` needs, refused
in one line where there is none. ``train`` and ``cache`` import it to run, not for their parsers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..data.columns import CAPTION, IMAGE_0, IMAGE_1, LABEL_0
from ..data.formats import load_preference_dataset
from ..data.masks import add_loss_masks

if TYPE_CHECKING:
    from trl import ScriptArguments

    from ..config import DiffusionSDPOConfig

# ``diffusion_args``: the train command's ``DiffusionScriptArguments`` (cli/train_options.py).
__all__ = ["column_renames", "early_stopping_split", "load_split", "load_train_split"]


def load_split(
    script_args: ScriptArguments,
    diffusion_args: Any,
    split: str | None = None,
    training_args: DiffusionSDPOConfig | None = None,
):
    """A split as the arguments name it, in any format of :mod:`~trl_diffusion_sdpo.data.formats`
    (``dataset_format``, ``ranking_pairs``). ``None``: the training split, streamed with ``dataset_streaming`` and
    cut to ``max_train_rows``; another split (the evaluation split) is read whole. With ``dataset_columns:
    pickapic`` the label form is mapped (:mod:`~trl_diffusion_sdpo.data.columns`)."""
    renames = column_renames(diffusion_args.rename_columns)
    # Pick-a-Pic's columns are mapped at load under the names they have in the files; the others are renamed after.
    names = tuple(
        next((old for old, new in renames.items() if new == n), n) for n in (CAPTION, IMAGE_0, IMAGE_1, LABEL_0)
    )
    train = split is None
    dataset = load_preference_dataset(
        script_args.dataset_name,
        script_args.dataset_train_split if train else split,
        train and script_args.dataset_streaming,
        diffusion_args.max_train_rows if train else None,
        config_name=script_args.dataset_config,
        dataset_format=diffusion_args.dataset_format,
        ranking_pairs=diffusion_args.ranking_pairs,
        dataset_columns=diffusion_args.dataset_columns,
        pickapic_names=names,
    )
    known = dataset.column_names  # None for a stream whose columns are only known when read: renamed all the same
    others = {old: new for old, new in renames.items() if old not in names and (known is None or old in known)}
    if others:
        dataset = dataset.rename_columns(others)
    return add_loss_masks(
        dataset, diffusion_args.auto_mask, diffusion_args.auto_mask_threshold, diffusion_args.mask_dilate
    )


def column_renames(text: str | None) -> dict[str, str]:
    """``"a:b,c:d"`` (``--rename_columns``) as ``{"a": "b", "c": "d"}``; a ValueError names a malformed pair."""
    renames = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        old, sep, new = (part.strip() for part in pair.partition(":"))
        if not (sep and old and new):
            raise ValueError(f"rename_columns: {pair.strip()!r} is not old:new (e.g. instruction:caption)")
        renames[old] = new
    return renames


def load_train_split(
    script_args: ScriptArguments,
    diffusion_args: Any,
    training_args: DiffusionSDPOConfig | None = None,
):
    """The training split: :func:`load_split` with no split named."""
    return load_split(script_args, diffusion_args, training_args=training_args)


def early_stopping_split(script_args: ScriptArguments, training_args: DiffusionSDPOConfig, diffusion_args: Any):
    """The evaluation split that ``--early_stopping_patience`` watches, or a ``ValueError`` in one line naming
    ``--dataset_test_split`` (and ``eval_dataset``, the trainer's argument from Python) when there is none."""
    split = script_args.dataset_test_split
    remedy = (
        "name the evaluation split with --dataset_test_split (from Python: pass eval_dataset to the trainer), or "
        "drop --early_stopping_patience"
    )
    if diffusion_args.latent_cache:
        raise ValueError(f"--early_stopping_patience needs an evaluation split; --latent_cache has none: {remedy}")
    if not split:
        raise ValueError(f"--early_stopping_patience needs an evaluation split: {remedy}")
    try:
        return load_split(script_args, diffusion_args, split, training_args)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f"--early_stopping_patience needs an evaluation split, and {script_args.dataset_name} has no split "
            f"{split!r} ({' '.join(str(err).split())[:200]}): {remedy}"
        ) from err

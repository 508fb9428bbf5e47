"""SmPO's data path: score columns, the score-ordered pair, ``pair_scores`` (plain and cached), the weights SmPO makes
of them, and ``reward_fn``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset

from tests.helpers.common import lora_config, pickapic_rows
from tests.helpers.rewards import GAMMA, SCORE_MAX, SCORE_MIN, colour_reward
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.data.collators import PreferenceCollator
from trl_diffusion_sdpo.data.columns import order_pair
from trl_diffusion_sdpo.data.latent_cache import CachedPreferenceCollator, build_latent_cache
from trl_diffusion_sdpo.data.pickapic import pickapic_to_trl
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.scoring import add_reward_scores
from trl_diffusion_sdpo.data.transforms import PairTransform, load_image
from trl_diffusion_sdpo.data.validation import resolve_columns
from trl_diffusion_sdpo.families import family_for_pipeline
from trl_diffusion_sdpo.objectives import build_objective

SMPO = dict(loss_type="smpo", smpo_gamma=GAMMA, smpo_score_min=SCORE_MIN, smpo_score_max=SCORE_MAX)


def expected_weight(score_0: float, score_1: float) -> float:
    """SmPO's weight of the score-ordered pair, written out in float64 (numpy, not the package's torch code)."""
    winner, loser = max(score_0, score_1), min(score_0, score_1)
    span = SCORE_MAX - SCORE_MIN
    p = 1.0 / (1.0 + np.exp(-((winner - SCORE_MIN) / span - (loser - SCORE_MIN) / span)))
    return float(GAMMA * (2.0 * p - 1.0))


def scored_rows(scores: list[tuple[float, float]], labels: list[float] | None = None) -> list[dict]:
    rows = pickapic_rows(len(scores), labels)
    for row, (s0, s1) in zip(rows, scores):
        row["score_0"], row["score_1"] = s0, s1
    return rows


def as_trl(rows: list[dict]) -> list[dict]:
    """Pick-a-Pic rows in TRL's columns, as training reads them (scores follow their images)."""
    return list(pickapic_to_trl(IterableDataset.from_generator(lambda: iter(rows))))


def chosen_first(row: dict) -> list:
    """A Pick-a-Pic row's two images decoded, the chosen one (by its label) first: the order of TRL's columns."""
    images = [load_image(row["jpg_0"]), load_image(row["jpg_1"])]
    return images if row["label_0"] == 1 else images[::-1]


def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[len(p)] for p in prompts])}


class RecordingObjective:
    """Wraps the trainer's objective and keeps every ``pair_scores`` it is called with."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seen: list[torch.Tensor | None] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, predictions, errors, *, pair_scores=None):
        self.seen.append(None if pair_scores is None else pair_scores.detach().cpu().clone())
        return self.inner(predictions, errors, pair_scores=pair_scores)


# ------------------------------------------------------------------------------------------ order and weights


# label 1 says image 0 wins, label 0 image 1; the scores disagree in rows 0 and 1, agree in row 2, tie in row 3
SCORES = [(0.12, 0.25), (0.28, 0.11), (0.2, 0.15), (0.2, 0.2)]
LABELS = [1.0, 0.0, 1.0, 1.0]


def test_winner_is_the_higher_scored_image_even_when_the_label_disagrees(make_config):
    mapped = as_trl(scored_rows(SCORES, LABELS))
    columns = resolve_columns(list(mapped[0]), make_config(**SMPO))
    assert (columns.score_0, columns.score_1) == ("score_0", "score_1") and {"score_0", "score_1"} <= set(columns.all)
    for row, trl_row, (s0, s1) in zip(scored_rows(SCORES, LABELS), mapped, SCORES):
        winner, loser, scores = order_pair(trl_row, columns)
        first_wins = s0 > s1  # equal scores (row 3, label 1): image 1, the rejected one, wins (SmPO's strict >)
        assert (winner, loser) == ((row["jpg_0"], row["jpg_1"]) if first_wins else (row["jpg_1"], row["jpg_0"]))
        assert scores == ((s0, s1) if first_wins else (s1, s0))
    tie = as_trl(scored_rows([(0.3, 0.1)], [0.5]))[0]
    assert order_pair(tie, columns) is None  # a human tie is still dropped


def test_collator_puts_the_higher_scored_image_first_and_smpo_weights_equal_a_float64_computation(make_config):
    rows = scored_rows(SCORES + [(0.29, 0.1)], LABELS + [0.5])  # the last row is a human tie
    columns = resolve_columns(list(as_trl(rows)[0]), make_config(**SMPO))
    transform = PairTransform(32)
    batch = PreferenceCollator(columns, tokenize, transform, train=False)(as_trl(rows))
    assert batch["num_skipped"].item() == 1
    scores = batch["pair_scores"]  # (winner, loser): the higher score first
    assert scores.dtype == torch.float32 and scores.shape == (4, 2)
    assert torch.equal(scores, torch.tensor([(max(s), min(s)) for s in SCORES], dtype=torch.float32))
    smpo = build_objective("smpo", beta=1.0, smpo_gamma=GAMMA, smpo_score_min=SCORE_MIN, smpo_score_max=SCORE_MAX)
    weights = smpo.pair_weights(scores)
    expected = torch.tensor([expected_weight(*s) for s in SCORES], dtype=torch.float64)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-7)
    assert weights[3].item() == 0.0 and (weights[:3] > 0).all()
    for i, (row, (s0, s1)) in enumerate(zip(rows, SCORES)):
        first, second = load_image(row["jpg_0"]), load_image(row["jpg_1"])
        pixels, _ = transform(*((first, second) if s0 > s1 else (second, first)), train=False)
        assert torch.equal(batch["pixel_values"][i], pixels)


def test_streamed_rows_with_bad_scores_are_skipped_and_counted(make_config):
    rows = as_trl(scored_rows([(0.2, 0.1), (math.nan, 0.1), (0.2, "high"), (0.15, 0.25)]))
    columns = resolve_columns(list(rows[0]), make_config(**SMPO))
    batch = PreferenceCollator(columns, tokenize, PairTransform(32), train=False)(rows)
    assert batch["num_skipped"].item() == 2
    assert torch.equal(batch["pair_scores"], torch.tensor([[0.2, 0.1], [0.25, 0.15]]))
    empty = PreferenceCollator(columns, tokenize, PairTransform(32), train=False)(rows[1:3])
    assert empty["pair_scores"].shape == (0, 2) and empty["pixel_values"].shape[0] == 0


def test_pair_scores_through_the_latent_cache_equal_the_uncached_ones(make_pipeline, make_config, tmp_path):
    pipeline = make_pipeline()
    args = make_config(**SMPO)
    prepared, columns, _ = prepare_preference_dataset(Dataset.from_list(scored_rows(SCORES, LABELS)), args)
    family = family_for_pipeline(pipeline)
    cache = build_latent_cache(
        prepared, columns, family, resolution=32, random_flip=False, cache_dir=str(tmp_path / "cache")
    )
    rows = [prepared[i] for i in range(len(prepared))]
    plain = PreferenceCollator(columns, tokenize, PairTransform(32), train=False)(rows)
    cached = CachedPreferenceCollator()([cache.dataset[i] for i in range(len(cache.dataset))])
    assert torch.equal(cached["pair_scores"], plain["pair_scores"])
    ordered = [(max(s), min(s)) for s in SCORES]
    assert [tuple(s) for s in cache.dataset["scores"]] == ordered
    with torch.no_grad():  # the cached pair is in score order: its winner is the encoding of the higher-scored image
        mean = family.vae.encode(plain["pixel_values"].flatten(0, 1)).latent_dist.mean
    torch.testing.assert_close(cached["latent_mean"], mean.reshape(cached["latent_mean"].shape), rtol=1e-4, atol=1e-5)
    # A cache made without score columns (another loss type) lives elsewhere and is never taken for this one.
    dpo_data = Dataset.from_list(scored_rows(SCORES, LABELS))
    dpo_prepared, dpo_columns, _ = prepare_preference_dataset(dpo_data, make_config())
    dpo_cache = build_latent_cache(
        dpo_prepared, dpo_columns, family, resolution=32, random_flip=False, cache_dir=str(tmp_path / "cache")
    )
    assert dpo_cache.directory != cache.directory and "scores" not in dpo_cache.dataset.column_names
    assert "pair_scores" not in CachedPreferenceCollator()([dpo_cache.dataset[0]])


# ------------------------------------------------------------------------------------------------ validation


def test_missing_score_column_raises_naming_it_the_columns_found_and_reward_fn(make_config):
    rows = scored_rows(SCORES)
    for row in rows:
        del row["score_1"]
    with pytest.raises(ValueError, match=r"missing score column\(s\) \['score_1'\]") as error:
        prepare_preference_dataset(Dataset.from_list(rows), make_config(**SMPO))
    assert "score_0" in str(error.value) and "chosen" in str(error.value) and "reward_funcs" in str(error.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_a_bad_score_raises_naming_the_row_and_column_or_is_skipped_and_counted(make_config, bad):
    rows = scored_rows(SCORES, LABELS)
    rows[2]["score_0"] = bad
    dataset = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"row 2, column 'score_0'"):
        prepare_preference_dataset(dataset, make_config(**SMPO))
    prepared, _, report = prepare_preference_dataset(dataset, make_config(skip_invalid_rows=True, **SMPO))
    assert report.invalid_skipped == 1 and len(prepared) == len(rows) - 1


def test_scores_that_are_not_numbers_raise(make_config):
    rows = scored_rows(SCORES, LABELS)
    for row in rows:
        row["score_1"] = str(row["score_1"])
    # Text in one score column makes the other text too where Pick-a-Pic's rows are mapped (their scores swap with
    # their images, one type per column): every row is still invalid, the first named by its row.
    with pytest.raises(ValueError, match=r"row 0, column 'score_[01]': score '0.(25|12)' is not a real number"):
        prepare_preference_dataset(Dataset.from_list(rows), make_config(**SMPO))


def test_a_tie_with_a_bad_score_is_dropped_as_a_tie(make_config):
    rows = scored_rows(SCORES, [0.5] + LABELS[1:])
    rows[0]["score_0"] = math.nan
    _, _, report = prepare_preference_dataset(Dataset.from_list(rows), make_config(**SMPO))
    assert report.ties_dropped == 1 and report.invalid_skipped == 0


def test_a_streamed_first_row_with_a_nan_score_raises(make_config):
    rows = scored_rows(SCORES)
    rows[0]["score_1"] = math.nan
    stream = IterableDataset.from_generator(lambda: iter(rows))
    with pytest.raises(ValueError, match=r"row 0, column 'score_1'"):
        prepare_preference_dataset(stream, make_config(**SMPO))


# ------------------------------------------------------------------------------------------------- reward_fn


def test_reward_fn_scores_a_streamed_dataset_lazily(make_config):
    args = make_config(**SMPO)
    rows = pickapic_rows(4, [1.0, 0.5, 0.0, 1.0])
    calls = []

    def reward(images, prompts):
        calls.append(len(images))
        return colour_reward(images, prompts)

    stream = add_reward_scores(IterableDataset.from_generator(lambda: iter(rows)), args, reward, batch_size=2)
    assert calls == []  # nothing scored until read
    prepared, columns, _ = prepare_preference_dataset(stream, args)
    scored = list(prepared)
    assert all(not math.isnan(r["score_0"]) for i, r in enumerate(scored) if i != 1)
    assert math.isnan(scored[1]["score_0"])  # a human tie is not scored (it is dropped anyway)
    batch = PreferenceCollator(columns, tokenize, PairTransform(32), train=False)(scored)
    assert batch["num_skipped"].item() == 1 and batch["pair_scores"].shape == (3, 2)


def trls_colour_reward(prompts, images, **columns):
    """colour_reward in TRL's argument order (prompts first), as reward_funcs take it."""
    return colour_reward(images, prompts)


@pytest.mark.parametrize(
    "given",
    [
        {"reward_funcs": trls_colour_reward},
        {"reward_funcs": [trls_colour_reward]},
    ],
)
def test_reward_funcs_fill_the_score_columns_and_smpo_trains_with_the_weights(
    make_pickapic, make_pipeline, make_config, given
):
    dataset = make_pickapic(4)
    trainer = DiffusionSDPOTrainer(
        make_pipeline(),
        args=make_config(max_steps=2, **SMPO),
        train_dataset=dataset,
        peft_config=lora_config(),
        **given,
    )
    prepared = trainer.train_dataset
    scores = list(zip(prepared["score_0"], prepared["score_1"]))
    for row, (s0, s1) in zip(dataset, scores):  # the columns hold reward_fn's scores of the chosen, rejected images
        assert [s0, s1] == colour_reward(chosen_first(row), [row["caption"]] * 2).tolist()
    recording = RecordingObjective(trainer.objective)
    trainer.objective = recording
    trainer.train()
    assert trainer.state.global_step == 2
    seen = torch.cat(recording.seen)  # one epoch: every pair once, (winner, loser) in score order
    expected = torch.tensor(sorted((max(s), min(s)) for s in scores), dtype=torch.float32)
    assert torch.equal(torch.tensor(sorted(seen.tolist()), dtype=torch.float32), expected)
    logged = [log["smpo/mean_pair_weight"] for log in trainer.state.log_history if "smpo/mean_pair_weight" in log]
    weights = [np.mean([expected_weight(*pair) for pair in step.tolist()]) for step in recording.seen]
    assert len(logged) == 2
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64), torch.tensor(weights), rtol=1e-5, atol=1e-6)


def test_smpo_without_score_columns_or_reward_fn_raises_the_column_error(make_trainer):
    with pytest.raises(ValueError, match="reward_funcs"):
        make_trainer(**SMPO)


def test_reward_fn_with_another_loss_type_is_an_error(make_config, pickapic_dataset):
    with pytest.raises(ValueError, match="only used by loss_type='smpo'"):
        add_reward_scores(pickapic_dataset, make_config(), colour_reward)


@pytest.mark.parametrize("cache_latents", [False, True])
def test_other_loss_types_never_get_pair_scores_even_with_score_columns(make_trainer, tmp_path, cache_latents):
    dataset = Dataset.from_list(scored_rows(SCORES, LABELS))
    trainer = make_trainer(
        train_dataset=dataset, cache_latents=cache_latents, latent_cache_dir=str(tmp_path / "cache"), max_steps=1
    )
    assert "score_0" not in trainer.train_dataset.column_names
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert "pair_scores" not in batch
    recording = RecordingObjective(trainer.objective)
    trainer.objective = recording
    trainer.train()
    assert recording.seen == [None]


def test_a_registered_objective_that_reads_pair_scores_gets_them_from_the_data(make_trainer, objective_registry):
    """The data path asks the objective (``needs_pair_scores``), not the name "smpo": an objective of one's own script
    that reads the scores gets the score columns kept and ``pair_scores`` in score order, and its own name in the
    missing-column error."""
    from dataclasses import dataclass

    from trl_diffusion_sdpo.objectives import ObjectiveOutput, PreferenceObjective, register_objective

    @register_objective
    @dataclass(frozen=True)
    class ScoreGapSFT(PreferenceObjective):
        name = "score_gap_sft"
        requires_reference = False
        uses_loser = False
        needs_pair_scores = True

        def loss(self, predictions, errors, pair_scores) -> ObjectiveOutput:
            gap = (pair_scores[:, 0] - pair_scores[:, 1]).to(errors.policy_winner)
            return ObjectiveOutput((gap * errors.policy_winner).mean(), gap.detach())

    with pytest.raises(ValueError, match=r"loss_type='score_gap_sft' needs a score per image"):
        make_trainer(loss_type="score_gap_sft", safeguard_space="none")
    rows = scored_rows(SCORES[:3], LABELS[:3])  # no tie: every pair is kept
    trainer = make_trainer(
        train_dataset=Dataset.from_list(rows), loss_type="score_gap_sft", safeguard_space="none", max_steps=1
    )
    assert {"score_0", "score_1"} <= set(trainer.train_dataset.column_names)
    recording = RecordingObjective(trainer.objective)
    trainer.objective = recording
    trainer.train()
    (seen,) = recording.seen
    assert seen is not None and bool((seen[:, 0] > seen[:, 1]).all())  # (winner, loser) in score order
    assert {tuple(round(v, 4) for v in pair) for pair in seen.tolist()} <= {
        (round(max(s), 4), round(min(s), 4)) for s in SCORES[:3]
    }


def test_reward_funcs_take_a_registered_scorer_name(make_pipeline, make_config):
    """A name resolves through the scorer registry (the demo's colour scorer), as the online trainer's do."""
    from trl_diffusion_sdpo.rewards.scorers import build_scorer
    from trl_diffusion_sdpo.rewards.scorers.registry import register_outside_scorers

    register_outside_scorers()
    rows = pickapic_rows(2)
    for row, caption in zip(rows, ("red circle on white", "blue square on black")):  # captions the scorer reads
        row["caption"] = caption
    dataset = Dataset.from_list(rows)
    trainer = DiffusionSDPOTrainer(
        make_pipeline(),
        args=make_config(max_steps=1, **SMPO),
        train_dataset=dataset,
        peft_config=lora_config(),
        reward_funcs="colour",
    )
    scorer = build_scorer("colour")
    for row, s0, s1 in zip(dataset, trainer.train_dataset["score_0"], trainer.train_dataset["score_1"]):
        assert [s0, s1] == scorer(chosen_first(row), [row["caption"]] * 2, None).tolist()

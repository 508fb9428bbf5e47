"""Every loss_type against an independent computation (float64 numpy, or torch written another way)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import HfArgumentParser

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.objectives import (
    OBJECTIVES,
    DenoisingErrors,
    DiffusionDPOObjective,
    DMPOObjective,
    DSPOObjective,
    MaPOObjective,
    ObjectiveOutput,
    PreferenceObjective,
    PreferencePredictions,
    build_objective,
    diffusion_dpo_loss,
    hyperparameter,
    mapo_score,
    objective_class,
    objective_from_config,
    register_objective,
    smoothed_preference_weights,
)
from trl_diffusion_sdpo.objectives import base as objectives_base
from trl_diffusion_sdpo.step.predictions import scale_gradient

B, SHAPE = 4, (4, 2, 3, 3)
EXPECTED_FLAGS = {  # name: (requires_reference, uses_loser, needs_pair_scores)
    "dpo": (True, True, False),
    "dspo": (True, True, False),
    "dmpo": (True, True, False),
    "sft": (False, False, False),
    "mapo": (False, True, False),
    "smpo": (True, True, True),
}
# SmPO's PickScore normalisation range, copied from SmPO's train.py (not from the package).
PICKSCORE_MIN, PICKSCORE_MAX = 0.11543526500463486, 0.28201571106910706
# (winner, loser) scores of 4 pairs, and SmPO's weights of them with gamma 10 written out here in float64:
# 10 * (2 sigmoid(x) - 1) = 10 * tanh(x / 2), x = (s_w - s_l) / (max - min).
PAIR_SCORES = np.array([[0.25, 0.12], [0.2, 0.19], [0.28, 0.11], [0.21, 0.2]])
PAIR_WEIGHTS = 10.0 * np.tanh((PAIR_SCORES[:, 0] - PAIR_SCORES[:, 1]) / (PICKSCORE_MAX - PICKSCORE_MIN) / 2)
# Small betas keep u = O(1) on these random tensors, where every objective is far from saturation.
BETAS = {"dpo": 2.0, "dspo": 2.0, "dmpo": 2.0, "sft": 2.0, "mapo": 2.0, "smpo": 2.0}


# ---------------------------------------------------------------------------------------------------- fixtures


def arrays(seed: int = 0, reference_offset: float = 0.3) -> dict[str, np.ndarray]:
    """Float64 policy, target and reference tensors of 4 pairs; the reference sits near the policy."""
    rng = np.random.default_rng(seed)
    a = {k: rng.normal(size=SHAPE) for k in ("pw", "pl", "tw", "tl")}
    a["rw"] = a["pw"] + reference_offset * rng.normal(size=SHAPE)
    a["rl"] = a["pl"] + reference_offset * rng.normal(size=SHAPE)
    return a


def np_errors(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    def sq(p: np.ndarray, t: np.ndarray) -> np.ndarray:
        return ((p - t) ** 2).reshape(B, -1).mean(axis=1)

    pairs = {"w": ("pw", "tw"), "l": ("pl", "tl"), "rw": ("rw", "tw"), "rl": ("rl", "tl")}
    return {k: sq(a[p], a[t]) for k, (p, t) in pairs.items()}


def np_logits(a: dict[str, np.ndarray], beta: float) -> np.ndarray:
    e = np_errors(a)
    return -0.5 * beta * ((e["w"] - e["l"]) - (e["rw"] - e["rl"]))


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def batch(a: dict[str, np.ndarray], loser_scale: float | None = None, with_reference: bool = True):
    """Leaf policy predictions (as the parameter-space safeguard passes them) and errors computed from them."""
    t = {k: torch.tensor(v) for k, v in a.items()}
    pred_w, pred_l = t["pw"].clone().requires_grad_(), t["pl"].clone().requires_grad_()
    err = lambda p, y: (p - y).pow(2).flatten(1).mean(1)  # noqa: E731
    e_l = err(pred_l, t["tl"])
    if loser_scale is not None:
        e_l = scale_gradient(e_l, loser_scale)
    predictions = PreferencePredictions(pred_w, pred_l, t["tw"], t["tl"])
    errors = DenoisingErrors(err(pred_w, t["tw"]), e_l)
    if with_reference:
        predictions.reference_winner, predictions.reference_loser = t["rw"], t["rl"]
        errors.reference_winner, errors.reference_loser = err(t["rw"], t["tw"]), err(t["rl"], t["tl"])
    return predictions, errors


def scores_for(name: str) -> torch.Tensor | None:
    return torch.tensor(PAIR_SCORES) if name == "smpo" else None


def build(name: str, beta: float = 1.0, **fields) -> PreferenceObjective:
    """``build_objective`` with ``beta`` for the objectives that declare it (sft and mapo have none)."""
    if "beta" in objective_class(name).hyperparameter_names():
        fields["beta"] = beta
    return build_objective(name, **fields)


# ---------------------------------------------------------------------------------------------------- interface


def test_objectives_lists_the_six_loss_types():
    assert set(OBJECTIVES) == set(EXPECTED_FLAGS) and len(OBJECTIVES) == 6


@pytest.mark.parametrize("name", sorted(EXPECTED_FLAGS))
def test_each_objective_declares_what_the_trainer_must_run(name):
    objective = build(name)
    assert isinstance(objective, PreferenceObjective)
    assert objective.name == name
    assert (objective.requires_reference, objective.uses_loser, objective.needs_pair_scores) == EXPECTED_FLAGS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_FLAGS))
def test_each_objective_returns_a_scalar_loss_per_pair_logits_and_its_declared_metrics(name):
    objective = build(name, BETAS[name])
    predictions, errors = batch(arrays(), with_reference=objective.requires_reference)
    out = objective(predictions, errors, pair_scores=scores_for(name))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (B,)
    assert tuple(out.metrics) == objective.metric_names
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("name", ["sft", "mapo"])
def test_reference_free_objectives_work_with_the_reference_fields_none(name):
    predictions, errors = batch(arrays(), with_reference=False)
    assert predictions.reference_winner is None and errors.reference_loser is None
    build(name)(predictions, errors).loss.backward()
    assert torch.isfinite(predictions.policy_winner.grad).all()


@pytest.mark.parametrize("name", ["dpo", "dspo", "dmpo", "smpo"])
def test_objectives_with_a_reference_say_so_when_it_is_missing(name):
    predictions, errors = batch(arrays(), with_reference=False)
    with pytest.raises(ValueError, match="reference"):
        build(name)(predictions, errors, pair_scores=scores_for(name))


@pytest.mark.parametrize("name", ["dpo", "dspo", "dmpo", "sft", "mapo"])
def test_objectives_that_do_not_weight_pairs_ignore_pair_scores(name):
    objective = build(name, BETAS[name])
    without = objective(*batch(arrays())).loss.item()
    assert objective(*batch(arrays()), pair_scores=torch.tensor(PAIR_SCORES)).loss.item() == without


def test_unknown_loss_type_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="not-a-loss") as info:
        build_objective("not-a-loss", beta=1.0)
    assert all(name in str(info.value) for name in EXPECTED_FLAGS)
    with pytest.raises(ValueError, match=r"loss_type must be one of \[.*'dpo'.*'smpo'\], got 'not-a-loss'"):
        config(tmp_path, loss_type="not-a-loss")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta", 0.0),
        ("beta", -5.0),
        ("beta", float("nan")),
        ("beta", float("inf")),
        ("beta", "5000"),
        ("dmpo_alpha", 0.0),
        ("dmpo_alpha", 1.0),
        ("dmpo_alpha", float("nan")),
        ("dspo_form", "sd21"),
        ("mapo_beta", 0.0),
        ("mapo_beta", float("inf")),
        ("mapo_snr_value", -0.5),
        ("mapo_snr_value", float("nan")),
        ("num_train_timesteps", 0),
        ("num_train_timesteps", 1000.0),
        ("smpo_gamma", 0.0),
        ("smpo_score_min", float("nan")),
    ],
)
def test_bad_hyperparameters_raise_naming_the_field(field, value):
    owners = [name for name in OBJECTIVES if field in objective_class(name).hyperparameter_names()]
    assert owners, f"no objective declares {field}"
    for name in owners:  # beta: every objective over the Diffusion-DPO logit checks it, by the same rule
        fields = {"beta": 1.0} if "beta" in objective_class(name).hyperparameter_names() else {}
        with pytest.raises(ValueError, match=field):
            build_objective(name, **{**fields, field: value})


def test_smpo_refuses_a_score_range_that_is_empty():
    with pytest.raises(ValueError, match=r"smpo_score_max \(0.1\) must be larger than smpo_score_min \(0.2\)"):
        build_objective("smpo", beta=1.0, smpo_score_min=0.2, smpo_score_max=0.1)


@pytest.mark.parametrize(
    ("name", "fields", "stray"),
    [
        ("mapo", {"beta": 1.0}, "beta"),
        ("dpo", {"beta": 1.0, "dspo_form": "sdxl"}, "dspo_form"),
        ("sft", {"x": 1}, "x"),
    ],
)
def test_build_objective_refuses_a_field_the_objective_does_not_declare(name, fields, stray):
    with pytest.raises(ValueError, match=f"no hyperparameter '{stray}'") as info:
        build_objective(name, **fields)
    assert str(list(objective_class(name).hyperparameter_names())) in str(info.value)  # lists what it does take


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="dmpo_alpha"):
        DMPOObjective(beta=1.0, dmpo_alpha=1.5)
    with pytest.raises(ValueError, match="dspo_form"):
        DSPOObjective(beta=1.0, dspo_form="sd3")
    with pytest.raises(ValueError, match="mapo_snr_value"):
        MaPOObjective(mapo_snr_value=0.0)
    with pytest.raises(ValueError, match="beta"):
        DiffusionDPOObjective(beta=float("nan"))


def test_each_objective_declares_its_fields_with_the_papers_defaults():
    assert DMPOObjective(beta=2000.0) == DMPOObjective(beta=2000.0, dmpo_alpha=0.01)
    assert DSPOObjective(beta=1.0).dspo_form == "sd15"
    assert MaPOObjective() == MaPOObjective(mapo_beta=0.1, mapo_snr_value=0.5, num_train_timesteps=1000)
    smpo = build_objective("smpo", beta=1.0)
    assert (smpo.smpo_gamma, smpo.smpo_score_min, smpo.smpo_score_max) == (10.0, PICKSCORE_MIN, PICKSCORE_MAX)
    assert repr(DMPOObjective(beta=2)) == "DMPOObjective(beta=2.0, dmpo_alpha=0.01)"


# ------------------------------------------------------------------------------------------------ from the config


def config(tmp_path, **fields) -> DiffusionSDPOConfig:
    """The config, checked by the objective it names, as the trainer and the train command check it."""
    from trl_diffusion_sdpo.objectives import check_objective_config

    made = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **fields)
    check_objective_config(made)
    return made


def test_config_fields_reach_dmpo(tmp_path):
    a, beta, alpha = arrays(), 2.0, 0.2
    objective = objective_from_config(
        config(tmp_path, loss_type="dmpo", beta=beta, dmpo_alpha=alpha), num_train_timesteps=1
    )
    p, q = np_sigmoid(np_logits(a, beta)), 1 - alpha
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    assert objective(*batch(a)).loss.item() == pytest.approx(kl.mean(), rel=1e-10)


def test_config_fields_reach_dspo(tmp_path):
    a, beta = arrays(seed=5, reference_offset=1.0), 3.0
    objective = objective_from_config(
        config(tmp_path, loss_type="dspo", beta=beta, dspo_form="sdxl"), num_train_timesteps=1
    )
    d2 = ((a["pw"] - a["rw"]) ** 2).reshape(B, -1).mean(axis=1)
    expected = np.mean((1 - np_sigmoid(np_logits(a, beta))) ** 2 * d2)  # the sdxl form, not the default sd15
    assert objective(*batch(a)).loss.item() == pytest.approx(expected, rel=1e-12)


def test_config_fields_and_the_schedulers_timesteps_reach_mapo(tmp_path):
    a, g, mapo_beta, T = arrays(), 0.3, 0.7, 50
    args = config(tmp_path, loss_type="mapo", mapo_beta=mapo_beta, mapo_snr_value=g)
    objective = objective_from_config(args, num_train_timesteps=T)
    e = np_errors(a)
    f = lambda x: g * x / np.expm1(g * x)  # noqa: E731
    expected = e["w"].mean() + mapo_beta * np.mean(np.logaddexp(0, -T * (f(e["w"]) - f(e["l"]))))
    assert objective(*batch(a, with_reference=False)).loss.item() == pytest.approx(expected, rel=1e-12)


def test_config_fields_reach_smpo(tmp_path):
    a, beta, gamma, lo, hi = arrays(), 2.0, 3.0, 0.1, 0.3
    args = config(tmp_path, loss_type="smpo", beta=beta, smpo_gamma=gamma, smpo_score_min=lo, smpo_score_max=hi)
    objective = objective_from_config(args, num_train_timesteps=1)
    weights = gamma * np.tanh((PAIR_SCORES[:, 0] - PAIR_SCORES[:, 1]) / (hi - lo) / 2)
    expected = np.mean(np.logaddexp(0, -weights * np_logits(a, beta)))
    out = objective(*batch(a), pair_scores=torch.tensor(PAIR_SCORES))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_a_bad_objective_field_fails_when_its_objective_is_chosen(tmp_path):
    config(tmp_path, loss_type="dpo", dmpo_alpha=1.5)  # DPO never reads it
    with pytest.raises(ValueError, match=r"dmpo_alpha must lie in \(0, 1\), got 1.5"):
        config(tmp_path, loss_type="dmpo", dmpo_alpha=1.5)
    with pytest.raises(ValueError, match="winners only"):  # SFT declares no loser term: nothing to safeguard
        config(tmp_path, loss_type="sft")


def test_a_registered_objective_is_built_from_the_config_field_of_its_name(tmp_path, objective_registry):

    @register_objective
    @dataclass(frozen=True)
    class ScaledSFT(PreferenceObjective):
        mapo_beta: float = hyperparameter(objectives_base.Range(0, low_open=True), 1.0)  # any config field works

        name = "scaled_sft"
        requires_reference = False
        uses_loser = False

        def loss(self, predictions, errors) -> ObjectiveOutput:
            return ObjectiveOutput(self.mapo_beta * errors.policy_winner.mean(), errors.policy_winner.detach())

    # The config takes the registered name as it takes a built-in one, from Python and from the command line.
    args = config(tmp_path, safeguard_space="none", mapo_beta=4.0, loss_type="scaled_sft")
    (parsed,) = HfArgumentParser(DiffusionSDPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--safeguard_space", "none", "--loss_type", "scaled_sft"]
    )
    assert parsed.loss_type == "scaled_sft"
    objective = objective_from_config(args, num_train_timesteps=1)
    a = arrays()
    assert objective.mapo_beta == 4.0
    assert objective(*batch(a)).loss.item() == pytest.approx(4.0 * np_errors(a)["w"].mean(), rel=1e-12)
    with pytest.raises(ValueError, match="already registered"):
        register_objective(ScaledSFT)
    with pytest.raises(TypeError, match="dataclass"):
        register_objective(type("Plain", (PreferenceObjective,), {"name": "plain", "loss": lambda self, p, e: None}))


def test_a_registered_objective_reads_a_new_field_from_a_config_subclass(tmp_path, objective_registry):
    """docs/objectives.md: an objective of one's own script with a hyperparameter no built-in config field has reads it
    from a ``DiffusionSDPOConfig`` subclass, from Python and from the command line, and checks it when the objective
    checks the config (when it is made)."""

    @register_objective
    @dataclass(frozen=True)
    class WeightedSFT(PreferenceObjective):
        winner_weight: float = hyperparameter(objectives_base.Range(0, low_open=True), 1.0)

        name = "weighted_sft"
        requires_reference = False
        uses_loser = False

        def loss(self, predictions, errors) -> ObjectiveOutput:
            return ObjectiveOutput(self.winner_weight * errors.policy_winner.mean(), errors.policy_winner.detach())

    @dataclass
    class WeightedSFTConfig(DiffusionSDPOConfig):
        winner_weight: float = 1.0

    (args,) = HfArgumentParser(WeightedSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--safeguard_space", "none", "--loss_type", "weighted_sft"]
        + ["--winner_weight", "3.0"]
    )
    objective = objective_from_config(args, num_train_timesteps=1)
    a = arrays()
    assert objective.winner_weight == 3.0
    assert objective(*batch(a)).loss.item() == pytest.approx(3.0 * np_errors(a)["w"].mean(), rel=1e-12)
    with pytest.raises(ValueError, match="winner_weight must be positive, got -1"):  # when the config is made
        WeightedSFTConfig(
            output_dir=str(tmp_path), use_cpu=True, safeguard_space="none", loss_type="weighted_sft", winner_weight=-1
        )


# ---------------------------------------------------------------------------------------------------- safeguard


LOSER_USING = [(name, "sd15") for name, flags in EXPECTED_FLAGS.items() if flags[1]] + [("dspo", "sdxl")]


@pytest.mark.parametrize(("name", "form"), LOSER_USING)
def test_the_safeguard_scales_exactly_the_loser_gradient_of_every_objective(name, form):
    lam = 0.3
    # A large reference offset puts DSPO's SDXL form on its D_w^2-weighted branch, where pred_w gets a gradient.
    a = arrays(seed=1, reference_offset=1.0)
    objective = build(name, BETAS[name], **({"dspo_form": form} if name == "dspo" else {}))
    plain_predictions, plain_errors = batch(a)
    plain = objective(plain_predictions, plain_errors, pair_scores=scores_for(name))
    plain.loss.backward()
    guarded_predictions, guarded_errors = batch(a, loser_scale=lam)
    guarded = objective(guarded_predictions, guarded_errors, pair_scores=scores_for(name))
    guarded.loss.backward()

    assert guarded.loss.item() == plain.loss.item()
    loser_grad = plain_predictions.policy_loser.grad
    assert loser_grad.abs().max() > 1e-6
    torch.testing.assert_close(guarded_predictions.policy_loser.grad, lam * loser_grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(guarded_predictions.policy_winner.grad, plain_predictions.policy_winner.grad)


def test_sft_gives_the_loser_no_gradient_so_the_safeguard_has_nothing_to_scale():
    predictions, errors = batch(arrays())
    build_objective("sft")(predictions, errors).loss.backward()
    assert predictions.policy_loser.grad is None


# ---------------------------------------------------------------------------------------------------- dpo, smpo


def test_dpo_object_matches_numpy():
    a = arrays()
    u = np_logits(a, 2.0)
    out = build_objective("dpo", beta=2.0)(*batch(a))
    assert out.loss.item() == pytest.approx(np.mean(np.log1p(np.exp(-u))), rel=1e-12)
    np.testing.assert_allclose(out.logits.detach().numpy(), u, rtol=1e-12)


def test_smpo_is_dpo_with_the_weights_of_its_pair_scores():
    a = arrays()
    weighted_predictions, weighted_errors = batch(a)
    dpo = diffusion_dpo_loss(weighted_errors, 2.0, pair_weights=torch.tensor(PAIR_WEIGHTS))
    dpo.loss.backward()
    smpo_predictions, smpo_errors = batch(a)
    smpo = build_objective("smpo", beta=2.0)(smpo_predictions, smpo_errors, pair_scores=torch.tensor(PAIR_SCORES))
    smpo.loss.backward()
    assert smpo.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-12)
    torch.testing.assert_close(smpo.logits, dpo.logits)
    torch.testing.assert_close(smpo_predictions.policy_winner.grad, weighted_predictions.policy_winner.grad)
    torch.testing.assert_close(smpo_predictions.policy_loser.grad, weighted_predictions.policy_loser.grad)
    assert smpo.metrics["smpo/mean_pair_weight"].item() == pytest.approx(PAIR_WEIGHTS.mean(), rel=1e-6)


def test_smpo_with_equal_scores_gives_log_two_and_no_gradient():
    predictions, errors = batch(arrays())
    equal = torch.tensor([[0.2, 0.2]] * B, dtype=torch.float32)
    out = build_objective("smpo", beta=2.0)(predictions, errors, pair_scores=equal)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-14)
    assert predictions.policy_winner.grad.abs().max() == 0 and predictions.policy_loser.grad.abs().max() == 0
    assert out.metrics["smpo/mean_pair_weight"].item() == 0.0


def test_smpo_matches_numpy_with_per_pair_weights():
    a = arrays()
    wu = PAIR_WEIGHTS * np_logits(a, 2.0)
    out = build_objective("smpo", beta=2.0)(*batch(a), pair_scores=torch.tensor(PAIR_SCORES))
    assert out.loss.item() == pytest.approx(np.mean(np.log1p(np.exp(-wu))), rel=1e-12)
    np.testing.assert_allclose(out.logits.detach().numpy(), np_logits(a, 2.0), rtol=1e-12)  # unweighted


def test_smpo_from_float32_pair_scores_equals_the_collators_former_weights():
    """Before, the collators made the weights from the float64 scores (then float32); now SmPO makes them from the
    float32 ``pair_scores`` the collators hand on. The loss agrees to float32 rounding."""
    scores = [[0.2473, 0.1310], [0.2011, 0.1989], [0.27, 0.12], [0.1502, 0.1501]]  # (winner, loser)
    span = 0.28201571106910706 - 0.11543526500463486
    # the former formula, sigmoid written out, in float64, then rounded to float32 as the collators did
    former = np.array([10.0 * (2.0 / (1.0 + math.exp(-(w - x) / span)) - 1.0) for w, x in scores], dtype=np.float32)
    a = arrays()
    expected = np.mean(np.logaddexp(0, -former.astype(np.float64) * np_logits(a, 2.0)))
    out = build_objective("smpo", beta=2.0)(*batch(a), pair_scores=torch.tensor(scores, dtype=torch.float32))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["smpo/mean_pair_weight"].item() == pytest.approx(former.mean(), rel=1e-6)
    swapped = build_objective("smpo", beta=2.0)(*batch(a), pair_scores=torch.tensor(scores).flip(1))
    assert swapped.metrics["smpo/mean_pair_weight"].item() == pytest.approx(-former.mean(), rel=1e-6)


def test_smpo_without_pair_scores_says_what_is_missing():
    with pytest.raises(ValueError, match="pair_scores"):
        build_objective("smpo", beta=1.0)(*batch(arrays()))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        build_objective("smpo", beta=1.0)(*batch(arrays()), pair_scores=torch.tensor(PAIR_WEIGHTS))


def test_smoothed_preference_weights_match_numpy():
    lo, hi = 0.11543526500463486, 0.28201571106910706
    s_w = np.array([0.20, 0.25, hi, 0.19, 0.30])
    s_l = np.array([0.20, 0.18, lo, 0.21, 0.10])
    # 10 * (2 sigmoid(x) - 1) = 10 * tanh(x / 2): written with tanh, not sigmoid.
    expected = 10.0 * np.tanh(((s_w - s_l) / (hi - lo)) / 2)
    got = smoothed_preference_weights(torch.tensor(s_w), torch.tensor(s_l))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert got[0].item() == 0.0  # equal scores: no preference
    assert got[2].item() == pytest.approx(10 * (2 / (1 + math.exp(-1)) - 1))  # the range's extremes: p = sigmoid(1)
    assert got[3].item() < 0  # a pair ordered against the scores reverses


def test_smoothed_preference_weights_take_gamma_and_the_range():
    got = smoothed_preference_weights(
        torch.tensor([3.0]), torch.tensor([1.0]), gamma=2.0, score_min=0.0, score_max=4.0
    )
    assert got.item() == pytest.approx(2.0 * math.tanh(0.25))
    assert smoothed_preference_weights(torch.tensor([2]), torch.tensor([1])).dtype == torch.float32
    with pytest.raises(ValueError, match="score_max"):
        smoothed_preference_weights(torch.tensor([1.0]), torch.tensor([0.0]), score_min=1.0, score_max=1.0)
    with pytest.raises(ValueError, match="gamma"):
        smoothed_preference_weights(torch.tensor([1.0]), torch.tensor([0.0]), gamma=0.0)


# ---------------------------------------------------------------------------------------------------- dspo


def test_dspo_sd15_matches_numpy():
    a, beta = arrays(), 2.0
    u = np_logits(a, beta)
    c = beta * (1 - np_sigmoid(u))
    r, d = a["pw"] - a["tw"], a["pw"] - a["rw"]
    expected = np.mean([np.mean((r[i] - c[i] * d[i]) ** 2) for i in range(B)])
    out = build_objective("dspo", beta=beta, dspo_form="sd15")(*batch(a))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(out.logits.detach().numpy(), u, rtol=1e-12)
    assert out.metrics["dspo/winner_reference_gap"].item() == pytest.approx(np.mean(d**2), rel=1e-12)


def test_dspo_sd15_gradient_flows_through_the_residual_the_gap_and_the_logit():
    # Independent torch: the square expanded, mean(r^2) - 2 c mean(r D) + c^2 mean(D^2), with u written out by hand.
    a, beta = arrays(seed=2), 2.0
    predictions, errors = batch(a)
    build_objective("dspo", beta=beta)(predictions, errors).loss.backward()

    t = {k: torch.tensor(v) for k, v in a.items()}
    pw, pl = t["pw"].clone().requires_grad_(), t["pl"].clone().requires_grad_()
    mse = lambda x: (x * x).mean(dim=(1, 2, 3))  # noqa: E731
    u = 0.5 * beta * ((mse(pl - t["tl"]) - mse(t["rl"] - t["tl"])) - (mse(pw - t["tw"]) - mse(t["rw"] - t["tw"])))
    c = beta * torch.exp(-u) / (1 + torch.exp(-u))
    r, d = pw - t["tw"], pw - t["rw"]
    loss = (mse(r) - 2 * c * (r * d).mean(dim=(1, 2, 3)) + c**2 * mse(d)).mean()
    loss.backward()
    torch.testing.assert_close(predictions.policy_winner.grad, pw.grad)
    torch.testing.assert_close(predictions.policy_loser.grad, pl.grad)
    assert pl.grad.abs().max() > 1e-6  # the loser enters through u


@pytest.mark.parametrize("gap", [0.0999, 0.1001])
def test_dspo_sdxl_switches_on_the_mean_squared_winner_gap_at_0_1(gap):
    a, beta = arrays(seed=3), 2.0
    # D_w = +-sqrt(gap) everywhere, so m = mean(D_w^2) = gap on each side of the threshold.
    signs = np.sign(np.random.default_rng(4).normal(size=SHAPE))
    a["rw"] = a["pw"] - signs * math.sqrt(gap)
    shortfall_sq = (1 - np_sigmoid(np_logits(a, beta))) ** 2
    expected = np.mean(shortfall_sq * gap) if gap >= 0.1 else np.mean(shortfall_sq)
    out = build_objective("dspo", beta=beta, dspo_form="sdxl")(*batch(a))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["dspo/winner_reference_gap"].item() == pytest.approx(gap, rel=1e-12)


def test_dspo_sdxl_uses_the_per_pair_gap_on_the_upper_branch():
    a, beta = arrays(seed=5, reference_offset=1.0), 3.0
    d2 = ((a["pw"] - a["rw"]) ** 2).reshape(B, -1).mean(axis=1)
    assert d2.mean() >= 0.1 and np.ptp(d2) > 0.05
    expected = np.mean((1 - np_sigmoid(np_logits(a, beta))) ** 2 * d2)
    out = build_objective("dspo", beta=beta, dspo_form="sdxl")(*batch(a))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_dspo_sdxl_at_policy_equal_to_reference_is_a_quarter():
    a = arrays()
    a["rw"], a["rl"] = a["pw"].copy(), a["pl"].copy()
    out = build_objective("dspo", beta=5000.0, dspo_form="sdxl")(*batch(a))
    assert out.loss.item() == pytest.approx(0.25, rel=1e-12)  # u = 0, m = 0: (1 - 1/2)^2


# ---------------------------------------------------------------------------------------------------- dmpo


def test_dmpo_is_the_bernoulli_kl_computed_from_p():
    a, beta, alpha = arrays(), 2.0, 0.01
    p, q = np_sigmoid(np_logits(a, beta)), 1 - alpha
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    out = build_objective("dmpo", beta=beta, dmpo_alpha=alpha)(*batch(a))
    assert out.loss.item() == pytest.approx(kl.mean(), rel=1e-10)
    assert out.metrics["dmpo/mean_p"].item() == pytest.approx(p.mean(), rel=1e-12)


def errors_with_logit(u: list[float], beta: float) -> DenoisingErrors:
    """Errors whose Diffusion-DPO logit is ``u`` (reference errors equal, loser error 1)."""
    e_l = torch.ones(len(u), dtype=torch.float64, requires_grad=True)
    e_w = (e_l.detach() - 2 * torch.tensor(u, dtype=torch.float64) / beta).requires_grad_()
    return DenoisingErrors(e_w, e_l, torch.ones_like(e_l.detach()), torch.ones_like(e_l.detach()))


@pytest.mark.parametrize("alpha", [0.01, 0.2])
def test_dmpo_is_minimised_at_u_star_and_pushes_u_back_from_both_sides(alpha):
    beta = 10.0
    u_star = math.log((1 - alpha) / alpha)
    u = [u_star - 1.0, u_star, u_star + 1.0]
    errors = errors_with_logit(u, beta)
    objective = build_objective("dmpo", beta=beta, dmpo_alpha=alpha)
    objective(None, errors).loss.backward()
    # dL/du = -dL/de_w * 2/beta; expected p(1-p)(u - u*) / n per pair.
    dl_du = -errors.policy_winner.grad.numpy() * 2 / beta
    p = np_sigmoid(np.array(u))
    np.testing.assert_allclose(dl_du, p * (1 - p) * (np.array(u) - u_star) / 3, rtol=1e-9, atol=1e-15)
    assert dl_du[0] < 0 and dl_du[2] > 0 and abs(dl_du[1]) < 1e-12
    losses = [objective(None, errors_with_logit([x], beta)).loss.item() for x in u]
    assert losses[1] < losses[0] and losses[1] < losses[2] and losses[1] == pytest.approx(0.0, abs=1e-12)


def test_dmpo_is_finite_at_saturated_logits():
    alpha = 0.01
    out = build_objective("dmpo", beta=10.0, dmpo_alpha=alpha)(None, errors_with_logit([-200.0, 200.0], 10.0))
    # p -> 0: KL -> -log(1 - q) = -log(alpha); p -> 1: KL -> -log(q).
    assert out.loss.item() == pytest.approx((-math.log(alpha) - math.log(1 - alpha)) / 2, rel=1e-12)


# ---------------------------------------------------------------------------------------------------- sft


def test_sft_is_the_mean_squared_winner_error_ignoring_loser_and_reference():
    a = arrays()
    out = build_objective("sft")(*batch(a))
    assert out.loss.item() == pytest.approx(np.mean((a["pw"] - a["tw"]) ** 2), rel=1e-12)
    e = np_errors(a)
    np.testing.assert_allclose(out.logits.numpy(), e["l"] - e["w"], rtol=1e-12)
    other = dict(a, pl=a["pl"] + 5.0, rw=a["rw"] - 3.0, rl=a["rl"] * 2)
    assert build_objective("sft")(*batch(other)).loss.item() == out.loss.item()


# ---------------------------------------------------------------------------------------------------- mapo


def test_mapo_score_matches_numpy_across_the_series_threshold():
    e = np.array([0.0, 1e-9, 1e-6, 1e-3, 0.019, 0.02, 0.021, 0.05, 1.0, 10.0, 80.0])
    g = 0.5
    with np.errstate(invalid="ignore"):
        expected = np.where(e == 0, 1.0, g * e / np.expm1(g * e))
    got = mapo_score(torch.tensor(e), g)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14, atol=0)
    assert got[0].item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mapo_score_at_zero_is_one_with_the_exact_finite_gradient(dtype):
    e = torch.zeros(3, dtype=dtype, requires_grad=True)
    f = mapo_score(e, 0.5)
    f.sum().backward()
    assert (f == 1).all()
    torch.testing.assert_close(e.grad, torch.full_like(e, -0.25))  # d/de [g e / expm1(g e)] at 0 = -g/2


def test_mapo_score_gradient_matches_the_analytic_derivative():
    g, e = 0.5, np.array([1e-5, 0.019, 0.021, 0.3, 2.0])
    x = g * e
    # d/dx [x / (e^x - 1)] = (e^x - 1 - x e^x) / (e^x - 1)^2, evaluated with a series where it cancels
    series = -0.5 + x / 6 - x**3 / 180 + x**5 / 5040
    analytic = np.where(x < 1e-2, series, (np.expm1(x) - x * np.exp(x)) / np.expm1(x) ** 2)
    t = torch.tensor(e, requires_grad=True)
    mapo_score(t, g).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), g * analytic, rtol=1e-9)


def test_mapo_matches_numpy_without_a_reference():
    a, g, beta, T = arrays(), 0.5, 0.1, 1000
    e = np_errors(a)
    f = lambda x: g * x / np.expm1(g * x)  # noqa: E731
    margin = T * (f(e["w"]) - f(e["l"]))
    log_sigmoid = -np.logaddexp(0, -margin)
    expected = e["w"].mean() - beta * log_sigmoid.mean()
    out = build_objective("mapo", mapo_beta=beta, mapo_snr_value=g, num_train_timesteps=T)(
        *batch(a, with_reference=False)
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(out.logits.detach().numpy(), margin, rtol=1e-10)
    assert out.metrics["mapo/win_score"].item() == pytest.approx(f(e["w"]).mean(), rel=1e-12)
    assert out.metrics["mapo/lose_score"].item() == pytest.approx(f(e["l"]).mean(), rel=1e-12)
    assert out.metrics["mapo/ratio_loss"].item() == pytest.approx(-beta * log_sigmoid.mean(), rel=1e-12)


def test_mapo_is_finite_with_zero_errors():
    zero = torch.zeros(2, requires_grad=True)
    errors = DenoisingErrors(zero, torch.tensor([0.0, 0.5], requires_grad=True))
    out = build_objective("mapo")(None, errors)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(zero.grad).all()


def test_diffusion_dpo_loss_is_still_exported():
    a = arrays()
    _, errors = batch(a)
    u = np_logits(a, 2.0)
    assert diffusion_dpo_loss(errors, 2.0).loss.item() == pytest.approx(np.mean(np.log1p(np.exp(-u))), rel=1e-12)


def test_smpo_caps_its_weighted_logit_at_max_margin(tmp_path):
    """``max_margin`` caps SmPO's weighted logit ``w * u`` before the log-sigmoid, as it caps Diffusion-DPO's (numpy
    reference), from the config as from the objective's own field; the capped pairs are counted."""
    a = arrays()
    weighted = PAIR_WEIGHTS * np_logits(a, 2.0)
    cap = float(weighted.max()) / 2  # the pair of the largest weighted logit is capped, the others are not
    assert cap > 0 and np.sum(weighted >= cap) == 1
    expected = np.mean(np.log1p(np.exp(-np.minimum(weighted, cap))))
    assert expected != pytest.approx(np.mean(np.log1p(np.exp(-weighted))), rel=1e-6)  # the cap matters here
    objective = objective_from_config(
        config(tmp_path, loss_type="smpo", beta=2.0, max_margin=cap, safeguard_space="none"), num_train_timesteps=1
    )
    out = objective(*batch(a), pair_scores=torch.tensor(PAIR_SCORES))
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.metrics["guard/capped_fraction"].item() == pytest.approx(np.mean(weighted >= cap))

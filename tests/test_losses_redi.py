"""REDI (Xu et al. 2025): values against a hand-written float64 loop, gradients, masking, the
per-pair (sequence-unit) reductions and their behaviour under gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import redi
from distill.losses.redi import count_pairs, sequence_log_likelihoods
from distill.objective import Objective, Term
from distill.registry import LOSSES
from tests.loss_references import Side, pair_reference

B, T, V = 4, 6, 5


def _pairs(seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Pairs [B, 2, T, V] / [B, 2, T]: position 0 is prompt everywhere; pair 1's positive is padded
    at the end (mask False); pair 2's negative has no target at all (only the positive counts);
    pair 3's negative has an interior ignored label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, 2, T), generator=g)
    labels[..., 0] = -100
    labels[2, 1, :] = -100
    labels[3, 1, 3] = -100
    mask = torch.ones(B, 2, T, dtype=torch.bool)
    mask[1, 0, -2:] = False
    return {"student": (torch.randn(B, 2, T, V, generator=g) * scale).to(dtype), "labels": labels, "mask": mask}


def _reference(data: dict, *, alpha: float, positive_weight: float, negative_gamma: float | None, reduction: str):
    def pair_loss(b: int, positive: Side, negative: Side) -> float:
        negative_term = alpha * negative[0]
        if negative_gamma is not None:
            negative_term *= math.exp(negative_gamma * negative[0])
        return -positive_weight * positive[0] + negative_term

    return pair_reference(data, pair_loss, reduction)


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {"alpha": 0.8, "positive_weight": 1.0, "negative_gamma": None},
        {"alpha": 0.3, "positive_weight": 0.5, "negative_gamma": None},
        {"alpha": 1.0, "positive_weight": 1.0, "negative_gamma": 0.7},
    ],
)
def test_matches_loop(options: dict, reduction: str) -> None:
    data = _pairs(1)
    value = redi(data["student"], data["labels"], mask=data["mask"], reduction=reduction, **options)
    expected = _reference(data, reduction="batchmean" if reduction == "mean" else reduction, **options)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_defaults_are_the_released_recipe() -> None:
    """alpha = reinforce_rejected_coef = 0.8, reinforce_chosen_coef = 1, no negative weighting."""
    data = _pairs(2)
    torch.testing.assert_close(
        redi(data["student"], data["labels"], mask=data["mask"]),
        _reference(data, alpha=0.8, positive_weight=1.0, negative_gamma=None, reduction="batchmean"),
    )


def test_alpha_zero_is_length_normalised_sft_on_positives() -> None:
    data = _pairs(3)
    value = redi(data["student"], data["labels"], alpha=0.0, mask=data["mask"], reduction="none")
    log_likelihood, length, _ = sequence_log_likelihoods(data["student"], data["labels"], mask=data["mask"])
    token_ce = torch.nn.functional.cross_entropy(
        data["student"][:, 0].reshape(-1, V), data["labels"][:, 0].masked_fill(~data["mask"][:, 0], -100).reshape(-1),
        ignore_index=-100, reduction="none",
    ).view(B, T)
    expected = token_ce.sum(-1) / length[:, 0]
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(log_likelihood[:, 0], -token_ce.sum(-1))


# --- gradients ------------------------------------------------------------------------------------


def test_gradcheck_float64() -> None:
    data = _pairs(4, scale=1.0)
    student = data["student"].clone().requires_grad_(True)
    for options in ({}, {"alpha": 0.4, "negative_gamma": 0.5}, {"reduction": "none"}, {"reduction": "sum"}):
        assert torch.autograd.gradcheck(
            lambda x, o=options: redi(x, data["labels"], mask=data["mask"], **o), (student,), eps=1e-6, atol=1e-7
        )


def test_gradient_matches_per_token_formula() -> None:
    """d/dz of -log pi(y+)/|y+| + a log pi(y-)/|y-| at a counted position of trace s is
    c_s (softmax(z) - onehot(y)) with c = +1/|y+| (positive) and -a/|y-| (negative), over B pairs."""
    data = _pairs(5)
    student = data["student"].clone().requires_grad_(True)
    redi(student, data["labels"], alpha=0.6, mask=data["mask"], reduction="sum").backward()
    counted = (data["labels"] != -100) & data["mask"]
    lengths = counted.sum(-1).double()
    coefficient = torch.stack([1.0 / lengths[:, 0].clamp_min(1), -0.6 / lengths[:, 1].clamp_min(1)], dim=1)
    onehot = torch.nn.functional.one_hot(data["labels"].clamp_min(0), V).double()
    expected = coefficient[..., None, None] * (torch.softmax(data["student"], -1) - onehot)
    expected[~counted] = 0.0
    torch.testing.assert_close(student.grad, expected)


def test_descent_raises_positive_and_lowers_negative_likelihood() -> None:
    data = _pairs(6)
    student = data["student"].clone().requires_grad_(True)
    redi(student, data["labels"], mask=data["mask"]).backward()
    stepped = (student - 0.5 * student.grad).detach()
    before, _, _ = sequence_log_likelihoods(data["student"], data["labels"], mask=data["mask"])
    after, _, _ = sequence_log_likelihoods(stepped, data["labels"], mask=data["mask"])
    assert torch.all(after[:, 0] > before[:, 0])
    present = torch.tensor([True, True, False, True])  # pair 2 has no negative
    assert torch.all(after[present, 1] < before[present, 1])


# --- masking, reductions, accumulation ------------------------------------------------------------


def test_masked_and_ignored_positions_change_nothing() -> None:
    clean = _pairs(7, dtype=torch.float32)
    counted = (clean["labels"] != -100) & clean["mask"]
    garbage = {k: v.clone() for k, v in clean.items()}
    garbage["student"][~counted] = 1e30
    garbage["labels"][~clean["mask"]] = V - 1
    results = []
    for data in (clean, garbage):
        student = data["student"].clone().requires_grad_(True)
        value = redi(student, data["labels"], mask=data["mask"])
        value.backward()
        results.append((value.detach(), student.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert torch.isfinite(results[1][0])
    assert torch.all(results[1][1][~counted] == 0) and torch.isfinite(results[1][1]).all()
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_fully_masked_gives_zero_and_zero_gradient(reduction: str) -> None:
    data = _pairs(8, dtype=torch.float32)
    student = data["student"].clone().requires_grad_(True)
    value = redi(student, data["labels"], mask=torch.zeros(B, 2, T, dtype=torch.bool), reduction=reduction)
    assert torch.all(value == 0)
    value.sum().backward()
    assert student.grad is None or torch.all(student.grad == 0)
    labels = torch.full_like(data["labels"], -100)
    assert torch.all(redi(data["student"], labels, reduction=reduction) == 0)


def test_reductions_are_per_pair() -> None:
    data = _pairs(9)
    labels = data["labels"].clone()
    labels[0] = -100  # pair 0 no longer counts
    none = redi(data["student"], labels, mask=data["mask"], reduction="none")
    total = redi(data["student"], labels, mask=data["mask"], reduction="sum")
    mean = redi(data["student"], labels, mask=data["mask"], reduction="batchmean")
    assert none.shape == (B,) and float(none[0]) == 0.0
    assert count_pairs(labels, data["mask"]) == 3
    torch.testing.assert_close(none.sum(), total)
    torch.testing.assert_close(mean * 3, total)


def test_two_micro_batches_summed_over_total_pairs_equal_one_batch_mean() -> None:
    """The engine's normalisation of a sequence-unit term: sum of the micro-batches' "sum" values
    divided by the step's number of pairs is the mean over all pairs, value and gradient."""
    data = _pairs(10)
    student = data["student"].clone().requires_grad_(True)
    whole = redi(student, data["labels"], mask=data["mask"], reduction="batchmean")
    (whole_grad,) = torch.autograd.grad(whole, student)
    parts = [slice(0, 1), slice(1, B)]  # unequal micro-batches with unequal token counts
    pairs = sum(count_pairs(data["labels"][p], data["mask"][p]) for p in parts)
    assert pairs == B
    student = data["student"].clone().requires_grad_(True)
    accumulated = sum(redi(student[p], data["labels"][p], mask=data["mask"][p], reduction="sum") for p in parts) / pairs
    (accumulated_grad,) = torch.autograd.grad(accumulated, student)
    torch.testing.assert_close(accumulated, whole)
    torch.testing.assert_close(accumulated_grad, whole_grad)
    # token normalisation would not give the per-pair mean: the pairs have different lengths
    tokens = int(((data["labels"] != -100) & data["mask"]).sum())
    assert not torch.allclose(accumulated * pairs / tokens, whole)


def test_low_precision_and_extreme_inputs() -> None:
    data = _pairs(11, dtype=torch.bfloat16)
    value = redi(data["student"], data["labels"], mask=data["mask"])
    assert value.dtype == torch.float32 and torch.isfinite(value)
    extreme = _pairs(11, dtype=torch.float32, scale=1e4)
    student = extreme["student"].clone().requires_grad_(True)
    value = redi(student, extreme["labels"], mask=extreme["mask"], negative_gamma=0.5)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


# --- contract and errors --------------------------------------------------------------------------


def test_registered_as_a_sequence_unit_term() -> None:
    assert LOSSES.get("redi").builder is redi and redi.unit == "sequence"
    data = _pairs(12)
    objective = Objective([Term("redi", "redi", params={"alpha": 0.5})])
    out = objective({"student.logits": data["student"], "batch.labels": data["labels"]}, mask=data["mask"], reduction="sum")
    torch.testing.assert_close(out.terms["redi"], redi(data["student"], data["labels"], alpha=0.5, mask=data["mask"], reduction="sum"))


def test_errors_name_the_problem() -> None:
    data = _pairs(13)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, T, V\]"):
        redi(data["student"][:, 0], data["labels"][:, 0])
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        redi(data["student"], data["labels"], alpha=-0.1)
    bad = data["labels"].clone()
    bad[0, 0, 2] = V
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        redi(data["student"], bad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        redi(data["student"], data["labels"], reduction="max")

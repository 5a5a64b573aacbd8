"""KD^3's teacher-student instance selection: which samples are kept, and the weighted KD term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.losses import hinton_kd, kd3, kd3_weights, kept_fraction
from distill.objective import Objective, Term
from distill.registry import LOSSES

LOG = np.log


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one intra-op thread is fastest


def _logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (log-probabilities)."""
    return torch.tensor(LOG(np.asarray(probs, dtype=np.float64)), dtype=torch.float32)


# Four web samples, three classes. Combined prediction p_c = (p_t + p_s) / 2 by default.
TEACHER = _logits_for(
    [
        [0.90, 0.05, 0.05],  # 0: both confident, same class          -> p_c max = 0.90   kept
        [0.90, 0.05, 0.05],  # 1: teacher confident, student unsure    -> p_c max = 0.616  kept at 0.6
        [1 / 3, 1 / 3, 1 / 3],  # 2: both unsure (out of distribution) -> p_c max = 0.333  dropped
        [0.90, 0.05, 0.05],  # 3: confident but disagreeing            -> p_c max = 0.475  dropped
    ]
)
STUDENT = _logits_for(
    [
        [0.90, 0.05, 0.05],
        [1 / 3, 1 / 3, 1 / 3],
        [1 / 3, 1 / 3, 1 / 3],
        [0.05, 0.90, 0.05],
    ]
)
COMBINED_MAX = np.array([0.90, (0.90 + 1 / 3) / 2, 1 / 3, (0.90 + 0.05) / 2])


def test_weights_select_the_samples_teacher_and_student_are_jointly_confident_about() -> None:
    weights = kd3_weights(STUDENT, TEACHER, threshold=0.6)
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    assert weights.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert kd3_weights(STUDENT, TEACHER, threshold=0.7).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert kd3_weights(STUDENT, TEACHER, threshold=0.3).tolist() == [1.0, 1.0, 1.0, 1.0]
    # the student's vote matters: the teacher alone would keep samples 1 and 3
    assert kd3_weights(STUDENT, TEACHER, threshold=0.6, student_weight=0.0).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert kd3_weights(STUDENT, TEACHER, threshold=0.6, student_weight=1.0).tolist() == [1.0, 0.0, 0.0, 1.0]
    # soft weights are the combined confidence of the kept samples
    soft = kd3_weights(STUDENT, TEACHER, threshold=0.6, soft=True)
    np.testing.assert_allclose(soft.numpy(), [COMBINED_MAX[0], COMBINED_MAX[1], 0, 0], rtol=1e-5)
    assert kept_fraction(kd3_weights(STUDENT, TEACHER, threshold=0.6)) == 0.5


def test_top_fraction_keeps_the_most_confident_share_of_the_valid_samples() -> None:
    order = np.argsort(-COMBINED_MAX, kind="stable")
    for keep in (0.0, 0.25, 0.5, 0.75, 1.0):
        weights = kd3_weights(STUDENT, TEACHER, selection="top_fraction", keep=keep)
        expected = np.zeros(4)
        expected[order[: round(keep * 4)]] = 1
        assert weights.tolist() == expected.tolist(), keep
    # masked samples are never kept and do not count: keep half of the 2 valid ones
    mask = torch.tensor([False, True, True, False])
    weights = kd3_weights(STUDENT, TEACHER, selection="top_fraction", keep=0.5, mask=mask)
    assert weights.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert kept_fraction(weights, mask) == 0.5


def _independent_kd3(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    per = hinton_kd(student, teacher, temperature=temperature, reduction="none")
    return (per * weights).sum() / weights.sum()


def test_kd3_is_hinton_kd_averaged_over_the_kept_samples() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(32, 5, generator=generator) * 3
    teacher = torch.randn(32, 5, generator=generator) * 3
    weights = kd3_weights(student, teacher, threshold=0.6)
    assert 0 < int(weights.sum()) < 32
    for temperature in (1.0, 4.0):
        value = kd3(student, teacher, temperature=temperature, threshold=0.6)
        torch.testing.assert_close(value, _independent_kd3(student, teacher, weights, temperature))
        per = kd3(student, teacher, temperature=temperature, threshold=0.6, reduction="none")
        torch.testing.assert_close(per, hinton_kd(student, teacher, temperature=temperature, reduction="none") * weights)
        total = kd3(student, teacher, temperature=temperature, threshold=0.6, reduction="sum")
        torch.testing.assert_close(total, per.sum())
        valid = kd3(student, teacher, temperature=temperature, threshold=0.6, normalize="valid")
        torch.testing.assert_close(valid, per.mean())
    soft = kd3_weights(student, teacher, threshold=0.6, soft=True)
    torch.testing.assert_close(kd3(student, teacher, threshold=0.6, soft=True), _independent_kd3(student, teacher, soft, 4.0))


def test_selection_passes_no_gradient_and_gradcheck_float64() -> None:
    generator = torch.Generator().manual_seed(3)  # 5 of 8 kept, none within 0.1 of the threshold
    student = (torch.randn(8, 4, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = torch.randn(8, 4, generator=generator, dtype=torch.float64) * 3
    weights = kd3_weights(student, teacher, threshold=0.6).double()
    value = kd3(student, teacher, threshold=0.6)
    (grad,) = torch.autograd.grad(value, student)
    (expected,) = torch.autograd.grad(_independent_kd3(student, teacher, weights, 4.0), student)
    torch.testing.assert_close(grad, expected)
    assert torch.all(grad[weights == 0] == 0)
    # away from the threshold the selection is locally constant, so finite differences apply
    confidence = (0.5 * torch.softmax(student.detach(), -1) + 0.5 * torch.softmax(teacher, -1)).max(-1).values
    assert float((confidence - 0.6).abs().min()) > 1e-3
    mask = torch.rand(8, generator=generator) > 0.3
    for reduction in ("batchmean", "sum"):
        assert torch.autograd.gradcheck(lambda s, r=reduction: kd3(s, teacher, threshold=0.6, mask=mask, reduction=r), (student,))


def test_kd3_contract_masking_nothing_kept_low_precision_extremes() -> None:
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(8, 6, generator=generator) * 3
    teacher = torch.randn(8, 6, generator=generator) * 3
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    clean = student.clone().requires_grad_(True)
    value = kd3(clean, teacher, threshold=0.4, mask=mask)
    value.backward()
    garbage_student, garbage_teacher = student.clone(), teacher.clone()
    garbage_student[~mask] = 1e30
    garbage_teacher[~mask] = 1e30
    garbage_student.requires_grad_(True)
    garbage_teacher.requires_grad_(True)
    value_garbage = kd3(garbage_student, garbage_teacher, threshold=0.4, mask=mask)
    value_garbage.backward()
    torch.testing.assert_close(value_garbage, value)
    assert torch.all(garbage_student.grad[~mask] == 0) and torch.isfinite(garbage_student.grad).all()
    torch.testing.assert_close(garbage_student.grad[mask], clean.grad[mask])
    assert garbage_teacher.grad is None  # the teacher is detached
    per = kd3(student, teacher, threshold=0.4, mask=mask, reduction="none")
    assert per.shape == (8,) and torch.all(per[~mask] == 0)
    assert kd3_weights(garbage_student, garbage_teacher, threshold=0.4, mask=mask)[~mask].eq(0).all()
    # fully masked, or nothing confident enough: exactly 0 and a zero gradient
    for kwargs in ({"mask": torch.zeros(8, dtype=torch.bool)}, {"threshold": 1.0}):
        empty = student.clone().requires_grad_(True)
        zero = kd3(empty, teacher, **kwargs)
        zero.backward()
        assert float(zero.detach()) == 0.0 and torch.all(empty.grad == 0), kwargs
    assert kept_fraction(torch.zeros(3), torch.zeros(3, dtype=torch.bool)) == 0.0
    # low precision in, float32 out; extreme logits stay finite
    assert kd3(student.bfloat16(), teacher.bfloat16()).dtype == torch.float32
    extreme = (student * 1e4).requires_grad_(True)
    big = kd3(extreme, teacher * 1e4)
    big.backward()
    assert torch.isfinite(big) and torch.isfinite(extreme.grad).all()
    with pytest.raises(ValueError, match="selection"):
        kd3(student, teacher, selection="random")
    with pytest.raises(ValueError, match="normalize"):
        kd3(student, teacher, normalize="all")


def test_registered_and_usable_as_an_objective_term() -> None:
    assert "kd3" in LOSSES and LOSSES.get("kd3").builder is kd3
    term = Term("kd3", "kd3", params={"threshold": 0.6, "temperature": 2.0})
    assert term.sources == {"student_logits": "student.logits", "teacher_logits": "teacher.logits"}
    output = Objective([term])({"student.logits": STUDENT, "teacher.logits": TEACHER})
    expected = _independent_kd3(STUDENT, TEACHER, torch.tensor([1.0, 1.0, 0.0, 0.0]), 2.0)
    torch.testing.assert_close(output.total, expected)

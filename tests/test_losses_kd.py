"""Hinton KD and cross-entropy against independent NumPy formulas, plus the shared contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import cross_entropy, hinton_kd


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def numpy_hinton(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
    p = numpy_softmax(teacher / temperature)
    q = numpy_softmax(student / temperature)
    return temperature**2 * np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def test_hinton_matches_numpy_and_a_hand_computed_case() -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(5, 7, 11)), rng.normal(size=(5, 7, 11)) * 3
    for temperature in (1.0, 2.0, 4.0):
        expected = numpy_hinton(student, teacher, temperature)
        value = hinton_kd(torch.tensor(student), torch.tensor(teacher), temperature=temperature, reduction="none")
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, atol=1e-12)
        mean = hinton_kd(torch.tensor(student), torch.tensor(teacher), temperature=temperature)
        assert float(mean) == pytest.approx(expected.mean(), rel=1e-10)
    # two classes, worked by hand: p = (0.5, 0.5), q = softmax(0, log 3) = (0.25, 0.75), T = 1
    value = hinton_kd(torch.tensor([[0.0, np.log(3.0)]]), torch.tensor([[1.0, 1.0]]), temperature=1.0)
    assert float(value) == pytest.approx(0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75), rel=1e-6)


def test_temperature_scaling_keeps_gradient_magnitude() -> None:
    """At high T the KD gradient approaches (z_s - z_t) / C for zero-mean logits (Hinton et al. sec. 2.1)."""
    torch.manual_seed(0)
    classes = 10
    teacher = torch.randn(1, classes, dtype=torch.float64)
    teacher -= teacher.mean()
    student = torch.randn(1, classes, dtype=torch.float64)
    student -= student.mean()
    student.requires_grad_(True)
    hinton_kd(student, teacher, temperature=1000.0).backward()
    np.testing.assert_allclose(student.grad.numpy(), ((student - teacher) / classes).detach().numpy(), rtol=5e-3, atol=1e-4)


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 4))
    mask = torch.rand(3, 4) > 0.3
    for reduction in ("batchmean", "sum"):
        assert torch.autograd.gradcheck(lambda s: hinton_kd(s, teacher, temperature=2.5, mask=mask, reduction=reduction), (student,))
        assert torch.autograd.gradcheck(
            lambda s: cross_entropy(s, labels, label_smoothing=0.1, mask=mask, reduction=reduction), (student,)
        )


def test_masking_reductions_and_fully_masked() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 6, 9, requires_grad=True)
    teacher = torch.randn(4, 6, 9)
    mask = torch.rand(4, 6) > 0.5
    per_position = hinton_kd(student, teacher, mask=mask, reduction="none")
    assert per_position.shape == (4, 6) and torch.all(per_position[~mask] == 0)
    total = hinton_kd(student, teacher, mask=mask, reduction="sum")
    mean = hinton_kd(student, teacher, mask=mask)
    assert float(total.detach()) == pytest.approx(float(per_position.detach().sum()), rel=1e-6)
    assert float(mean.detach()) == pytest.approx(float(per_position.detach().sum() / mask.sum()), rel=1e-6)
    # the masked positions receive no gradient, even if their logits are garbage
    student_bad = student.detach().clone()
    student_bad[~mask] = float("inf")
    student_bad.requires_grad_(True)
    hinton_kd(student_bad, teacher, mask=mask).backward()
    assert torch.all(student_bad.grad[~mask] == 0) and torch.isfinite(student_bad.grad).all()
    # fully masked: zero value and zero gradient, not NaN
    nothing = torch.zeros(4, 6, dtype=torch.bool)
    for loss in (lambda s: hinton_kd(s, teacher, mask=nothing), lambda s: cross_entropy(s, torch.zeros(4, 6, dtype=torch.long), mask=nothing)):
        s = student.detach().clone().requires_grad_(True)
        value = loss(s)
        value.backward()
        assert float(value.detach()) == 0.0 and torch.all(s.grad == 0)


def test_extreme_logits_and_low_precision_inputs() -> None:
    student = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]])
    teacher = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, 5.0]])
    value = hinton_kd(student.requires_grad_(True), teacher, temperature=1.0, reduction="none")
    assert torch.isfinite(value).all() and value[1] == 0 and value[0] > 0
    value.sum().backward()
    assert torch.isfinite(student.grad).all()
    bf16 = hinton_kd(torch.randn(8, 50).bfloat16(), torch.randn(8, 50).bfloat16())
    assert bf16.dtype == torch.float32 and bf16 >= 0


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6), st.integers(2, 30), st.floats(0.5, 8.0), st.floats(0.1, 20.0), st.integers(0, 2**31 - 1)
)
def test_nonnegative_and_zero_on_equal_inputs(rows: int, classes: int, temperature: float, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, classes, generator=generator) * scale
    teacher = torch.randn(rows, classes, generator=generator) * scale
    assert torch.all(hinton_kd(student, teacher, temperature=temperature, reduction="none") >= 0)
    assert torch.all(hinton_kd(teacher, teacher, temperature=temperature, reduction="none") == 0)


def test_teacher_gets_no_gradient() -> None:
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    hinton_kd(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_cross_entropy_matches_torch_with_smoothing_and_ignore_index() -> None:
    torch.manual_seed(0)
    logits = torch.randn(10, 7)
    labels = torch.randint(0, 7, (10,))
    labels[3] = -100
    for smoothing in (0.0, 0.2):
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing, ignore_index=-100)
        assert float(cross_entropy(logits, labels, label_smoothing=smoothing)) == pytest.approx(float(expected), rel=1e-6)


def test_accumulated_micro_batches_equal_the_whole_batch() -> None:
    """Sum-normalized over the step: two uneven micro-batches give the gradient of the whole batch."""
    torch.manual_seed(0)
    student = torch.randn(2, 8, 12, dtype=torch.float64)
    teacher = torch.randn(2, 8, 12, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :7] = True  # 7 valid tokens in the first micro-batch
    mask[1, :2] = True  # 2 in the second
    whole = student.clone().requires_grad_(True)
    hinton_kd(whole, teacher, mask=mask).backward()
    parts = student.clone().requires_grad_(True)
    valid_total = int(mask.sum())
    for row in range(2):
        share = int(mask[row].sum()) / valid_total
        (hinton_kd(parts[row : row + 1], teacher[row : row + 1], mask=mask[row : row + 1]) * share).backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-14)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        hinton_kd(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        hinton_kd(torch.randn(2, 3), torch.randn(2, 3), temperature=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        hinton_kd(torch.randn(2, 3), torch.randn(2, 3), reduction="mean")
    with pytest.raises(ValueError, match="mask has shape"):
        hinton_kd(torch.randn(2, 3), torch.randn(2, 3), mask=torch.ones(3, dtype=torch.bool))

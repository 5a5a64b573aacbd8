"""DKD, SinKD, BD-KD, swing distillation, DAC-KL, Margin-MSE and ground-truth-weighted self-distillation.

Each loss is checked against an independent NumPy formula or a hand computation, and for the
shared contract of :mod:`distill.losses._common` (float32, mask, reductions, extreme logits,
fully masked input, detached teacher, float64 gradcheck).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import cross_entropy, hinton_kd
from distill.losses.bdkd import balance_weights, bdkd, entropy
from distill.losses.dac_kl import dac_kl, dense_region
from distill.losses.dkd import dkd
from distill.losses.ranking import margin_mse
from distill.losses.self_distill import gt_weighted_kd, optimal_ground_truth_weight, weighted_targets
from distill.losses.sinkhorn import sinkhorn
from distill.losses.swing import swing_kd, swing_temperatures
from distill.registry import LOSSES

# ----------------------------------------------------------------------------- NumPy references


def np_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    safe_p = np.where(p > 0, p, 1.0)
    return np.sum(np.where(p > 0, p * (np.log(safe_p) - np.log(q)), 0.0), axis=-1)


def np_entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def np_dkd_mdistiller(student, teacher, labels, alpha, beta, temperature):
    """The official ``dkd_loss`` per sample, written again in NumPy (large negative masking)."""
    classes = student.shape[-1]
    gt = np.eye(classes)[labels]
    ps, pt = np_softmax(student / temperature), np_softmax(teacher / temperature)
    bs = np.stack([(ps * gt).sum(-1), (ps * (1 - gt)).sum(-1)], axis=-1)
    bt = np.stack([(pt * gt).sum(-1), (pt * (1 - gt)).sum(-1)], axis=-1)
    tckd = np.sum(bt * (np.log(bt) - np.log(bs)), axis=-1)
    log_pt2 = np_log_softmax(teacher / temperature - 1000.0 * gt)
    log_ps2 = np_log_softmax(student / temperature - 1000.0 * gt)
    nckd = np.sum(np.exp(log_pt2) * (log_pt2 - log_ps2), axis=-1)
    return (alpha * tckd + beta * nckd) * temperature**2


def np_sinkhorn(student, teacher, temperature, epsilon, iterations):
    """SinKD's ``sinkhorn_loss`` (plain kernel, row then column normalization), per row of the plan."""
    ps, pt = np_softmax(student / temperature), np_softmax(teacher / temperature)
    cost = np.abs(ps[:, None, :] - pt[None, :, :]).sum(-1)
    plan = np.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(axis=1, keepdims=True)
        plan = plan / plan.sum(axis=0, keepdims=True)
    return (plan * cost).sum(axis=1)


# ----------------------------------------------------------------------------- the shared contract

LossCall = Callable[..., torch.Tensor]


def _swing_fixed_noise(s, t, y, **kw):
    return swing_kd(s, t, y, noise_scale=0.01, generator=torch.Generator().manual_seed(7), **kw)


CASES: dict[str, tuple[LossCall, int]] = {
    "dkd": (lambda s, t, y, **kw: dkd(s, t, y, temperature=2.0, **kw), 5),
    "sinkhorn": (lambda s, t, y, **kw: sinkhorn(s, t, temperature=1.5, **kw), 5),
    "bdkd": (lambda s, t, y, **kw: bdkd(s, t, temperature=2.0, detach_weights=False, **kw), 5),
    "swing_kd": (_swing_fixed_noise, 5),
    "dac_kl": (lambda s, t, y, **kw: dac_kl(s, t, temperature=1.5, upper_quantile=0.8, **kw), 5),
    "margin_mse": (lambda s, t, y, **kw: margin_mse(s, t, **kw), 2),
    "gt_weighted_kd": (lambda s, t, y, **kw: gt_weighted_kd(s, t, y, ground_truth_weight=0.3, temperature=2.0, **kw), 5),
}
NAMES = sorted(CASES)


def _inputs(classes: int, shape=(3, 4), seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, classes, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(*shape, classes, generator=generator, dtype=dtype) * 2
    labels = torch.randint(0, classes, shape, generator=generator)
    return student, teacher, labels


@pytest.mark.parametrize("name", NAMES)
def test_registered(name: str) -> None:
    assert name in LOSSES
    assert LOSSES.get(name).summary


@pytest.mark.parametrize("name", NAMES)
def test_reductions_and_masked_positions_have_no_influence(name: str) -> None:
    loss, classes = CASES[name]
    student, teacher, labels = _inputs(classes)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, False, True]])
    per_position = loss(student, teacher, labels, mask=mask, reduction="none")
    assert per_position.shape == (3, 4) and per_position.dtype == torch.float32
    assert torch.all(per_position[~mask] == 0) and torch.all(per_position >= 0)
    total = loss(student, teacher, labels, mask=mask, reduction="sum")
    mean = loss(student, teacher, labels, mask=mask)
    assert float(total) == pytest.approx(float(per_position.sum()), rel=1e-5)
    assert float(mean) == pytest.approx(float(per_position.sum()) / int(mask.sum()), rel=1e-5)
    # garbage at masked positions changes nothing, and gets no gradient
    bad_student, bad_teacher, bad_labels = student.clone(), teacher.clone(), labels.clone()
    bad_student[~mask] = float("inf")
    bad_teacher[~mask] = -float("inf")
    bad_labels[~mask] = 10**6
    bad_student.requires_grad_(True)
    value = loss(bad_student, bad_teacher, bad_labels, mask=mask)
    torch.testing.assert_close(value.detach(), mean, rtol=0, atol=0)
    value.backward()
    assert torch.all(bad_student.grad[~mask] == 0) and torch.isfinite(bad_student.grad).all()
    assert bad_student.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_gives_zero_and_zero_gradient(name: str) -> None:
    loss, classes = CASES[name]
    student, teacher, labels = _inputs(classes)
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    for reduction in ("batchmean", "sum", "none"):
        s = student.clone().requires_grad_(True)
        value = loss(s, teacher, labels, mask=nothing, reduction=reduction)
        value.sum().backward()
        assert torch.all(value.detach() == 0) and torch.all(s.grad == 0)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_low_precision_and_detached_teacher(name: str) -> None:
    loss, classes = CASES[name]
    base = torch.tensor([1e4, -1e4, 0.0, 5.0, -3.0])[:classes]
    student = torch.stack([base, base.flip(0), base]).unsqueeze(0).clone().requires_grad_(True)
    teacher = torch.stack([base.flip(0), base, base]).unsqueeze(0).clone().requires_grad_(True)
    labels = torch.tensor([[0, 1, classes - 1]])
    value = loss(student, teacher, labels, reduction="none")
    assert torch.isfinite(value).all() and torch.all(value >= 0)
    value.sum().backward()
    assert torch.isfinite(student.grad).all() and teacher.grad is None
    s16, t16, labels16 = _inputs(classes, dtype=torch.bfloat16)
    low = loss(s16, t16, labels16)
    assert low.dtype == torch.float32 and torch.isfinite(low) and low >= 0


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name: str) -> None:
    loss, classes = CASES[name]
    student, teacher, labels = _inputs(classes, shape=(2, 3), seed=3, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    student.requires_grad_(True)
    for reduction in ("batchmean", "none"):
        assert torch.autograd.gradcheck(
            lambda s: loss(s, teacher, labels, mask=mask, reduction=reduction), (student,)
        )


NONNEGATIVE_ZERO_AT_EQUALITY = {
    "dkd": lambda s, t, y, T: dkd(s, t, y, temperature=T, reduction="none"),
    "bdkd": lambda s, t, y, T: bdkd(s, t, temperature=T, reduction="none"),
    "swing_kd": lambda s, t, y, T: swing_kd(s, t, y, temperature=T, max_temperature=2 * T, training=False, reduction="none"),
    "margin_mse": lambda s, t, y, T: margin_mse(s[..., :2], t[..., :2], reduction="none"),
}
NONNEGATIVE_ONLY = {
    "sinkhorn": lambda s, t, y, T: sinkhorn(s, t, temperature=T, reduction="none"),
    "dac_kl": lambda s, t, y, T: dac_kl(s, t, temperature=T, lower_quantile=0.1, upper_quantile=0.7, reduction="none"),
    "gt_weighted_kd": lambda s, t, y, T: gt_weighted_kd(s, t, y, temperature=T, reduction="none"),
    "swing_noisy": lambda s, t, y, T: swing_kd(s, t, y, temperature=T, noise_scale=0.05, reduction="none"),
}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(2, 20), st.floats(0.5, 6.0), st.floats(0.1, 30.0), st.integers(0, 2**31 - 1))
def test_nonnegative_and_zero_at_equality(rows: int, classes: int, temperature: float, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, classes, generator=generator) * scale
    teacher = torch.randn(rows, classes, generator=generator) * scale
    labels = torch.randint(0, classes, (rows,), generator=generator)
    for loss in NONNEGATIVE_ZERO_AT_EQUALITY.values():
        assert torch.all(loss(student, teacher, labels, temperature) >= 0)
        assert torch.all(loss(teacher, teacher, labels, temperature) == 0)
    for loss in NONNEGATIVE_ONLY.values():
        value = loss(student, teacher, labels, temperature)
        assert torch.isfinite(value).all() and torch.all(value >= 0)


# ----------------------------------------------------------------------------- DKD


def test_dkd_matches_mdistiller_in_numpy() -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 10)) * 2, rng.normal(size=(6, 10)) * 3
    labels = rng.integers(0, 10, size=6)
    for alpha, beta, temperature in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.5)):
        expected = np_dkd_mdistiller(student, teacher, labels, alpha, beta, temperature)
        value = dkd(
            torch.tensor(student), torch.tensor(teacher), torch.tensor(labels),
            alpha=alpha, beta=beta, temperature=temperature, reduction="none",
        )
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, atol=1e-12)
        mean = dkd(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), alpha=alpha, beta=beta, temperature=temperature)
        assert float(mean) == pytest.approx(expected.mean(), rel=1e-10)


def test_dkd_decomposes_classical_kd() -> None:
    """The paper's decomposition KD = TCKD + (1 - p_t^T) * NCKD: DKD with alpha = 1, beta = 1 - p_t^T."""
    torch.manual_seed(0)
    student = torch.randn(4, 6, 9, dtype=torch.float64) * 3
    teacher = torch.randn(4, 6, 9, dtype=torch.float64) * 3
    labels = torch.randint(0, 9, (4, 6))
    for temperature in (1.0, 4.0):
        tckd = dkd(student, teacher, labels, alpha=1.0, beta=0.0, temperature=temperature, reduction="none")
        nckd = dkd(student, teacher, labels, alpha=0.0, beta=1.0, temperature=temperature, reduction="none")
        teacher_target = torch.softmax(teacher / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        kd = hinton_kd(student, teacher, temperature=temperature, reduction="none")
        torch.testing.assert_close(tckd + (1 - teacher_target) * nckd, kd, rtol=1e-10, atol=1e-12)


def test_dkd_accumulated_micro_batches_equal_the_whole_batch() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 8, 12, dtype=torch.float64)
    teacher = torch.randn(2, 8, 12, dtype=torch.float64)
    labels = torch.randint(0, 12, (2, 8))
    labels[1, 5] = -100  # ignored position
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :7] = True
    mask[1, :6] = True
    valid = mask & (labels != -100)
    whole = student.clone().requires_grad_(True)
    dkd(whole, teacher, labels, mask=mask).backward()
    parts = student.clone().requires_grad_(True)
    for row in range(2):
        share = int(valid[row].sum()) / int(valid.sum())
        (dkd(parts[row : row + 1], teacher[row : row + 1], labels[row : row + 1], mask=mask[row : row + 1]) * share).backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-14)


def test_dkd_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd(torch.randn(3, 1), torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels have shape"):
        dkd(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        dkd(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.long), reduction="mean")


# ----------------------------------------------------------------------------- SinKD


def test_sinkhorn_matches_numpy_sinkhorn() -> None:
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(7, 5)) * 2, rng.normal(size=(7, 5)) * 2
    for temperature, epsilon, iterations in ((1.0, 0.1, 20), (2.0, 0.5, 5), (1.0, 0.05, 50)):
        expected = np_sinkhorn(student, teacher, temperature, epsilon, iterations)
        kwargs = dict(temperature=temperature, epsilon=epsilon, iterations=iterations)
        value = sinkhorn(torch.tensor(student), torch.tensor(teacher), reduction="none", **kwargs)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-9, atol=1e-12)
        total = sinkhorn(torch.tensor(student), torch.tensor(teacher), reduction="sum", **kwargs)
        mean = sinkhorn(torch.tensor(student), torch.tensor(teacher), **kwargs)
        assert float(total) == pytest.approx(expected.sum(), rel=1e-9)
        assert float(mean) == pytest.approx(expected.sum() / 7, rel=1e-9)
        detached_plan = sinkhorn(torch.tensor(student), torch.tensor(teacher), plan_gradient=False, **kwargs)
        assert float(detached_plan) == pytest.approx(float(mean), rel=1e-12)


def test_sinkhorn_zero_at_equality_and_blur_shrinks_with_epsilon() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 8, dtype=torch.float64) * 3
    other = torch.randn(6, 8, dtype=torch.float64) * 3
    values = [float(sinkhorn(logits, logits, epsilon=eps, iterations=50)) for eps in (0.2, 0.05, 0.01, 0.005)]
    assert values[0] > values[1] > values[2] > values[3] >= 0 and values[3] < 1e-6
    assert float(sinkhorn(other, logits, epsilon=0.01, iterations=50)) > 0.1
    # a single sample: the plan is [[1]] and the value is the L1 distance of the two distributions
    single = sinkhorn(other[:1], logits[:1])
    expected = (torch.softmax(other[:1], -1) - torch.softmax(logits[:1], -1)).abs().sum()
    torch.testing.assert_close(single, expected)


def test_sinkhorn_masked_rows_are_dropped_before_the_batch_is_formed() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    mask = torch.rand(2, 5) > 0.4
    masked = sinkhorn(student, teacher, mask=mask, reduction="none")
    subset = sinkhorn(student[mask], teacher[mask], reduction="none")
    torch.testing.assert_close(masked[mask], subset, rtol=0, atol=0)


def test_sinkhorn_arguments() -> None:
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn(torch.randn(3, 4), torch.randn(3, 4), epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(torch.randn(3, 4), torch.randn(3, 4), iterations=0)


# ----------------------------------------------------------------------------- BD-KD


def test_bdkd_weights_by_hand_and_limits() -> None:
    # student (0.5, 0.5): H_S = log 2; teacher (0.25, 0.75): H_T = -(0.25 log 0.25 + 0.75 log 0.75)
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, np.log(3.0)]], dtype=torch.float64)
    h_s, h_t = np.log(2.0), -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    w_fwd, w_rev = balance_weights(torch.tensor([h_s]), torch.tensor([h_t]))
    assert float(w_rev) == pytest.approx(h_s / (h_s + h_t)) and float(w_fwd) == pytest.approx(h_t / (h_s + h_t))
    assert float(w_rev) > 0.5  # the student is less confident: the reverse KL gets more weight
    forward = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    reverse = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    expected = (h_t * forward + h_s * reverse) / (h_s + h_t)
    assert float(bdkd(student, teacher)) == pytest.approx(expected, rel=1e-12)
    assert float(bdkd(student, teacher, temperature=2.0)) != pytest.approx(expected)
    # limits: equal entropies -> 1/2, 1/2; one-hot teacher -> reverse KL; one-hot student -> forward KL
    w_fwd, w_rev = balance_weights(torch.tensor([0.7, 0.0, 0.0, 1.3]), torch.tensor([0.7, 0.0, 1.3, 0.0]))
    torch.testing.assert_close(w_rev, torch.tensor([0.5, 0.5, 0.0, 1.0]))
    torch.testing.assert_close(w_fwd + w_rev, torch.ones(4))
    permuted = bdkd(torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64), torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64))
    p_s, p_t = np_softmax(np.array([1.0, 2.0, 0.0])), np_softmax(np.array([2.0, 0.0, 1.0]))
    assert float(permuted) == pytest.approx(0.5 * (np_kl(p_t, p_s) + np_kl(p_s, p_t)), rel=1e-12)
    uniform, sharp = torch.zeros(1, 4, dtype=torch.float64), torch.tensor([[30.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    p_u, p_sharp = np.full(4, 0.25), np_softmax(np.array([30.0, 0, 0, 0]))
    assert float(bdkd(uniform, sharp)) == pytest.approx(np_kl(p_u, p_sharp), rel=1e-6)  # reverse KL
    assert float(bdkd(sharp, uniform)) == pytest.approx(np_kl(p_u, p_sharp), rel=1e-6)  # forward KL


def test_bdkd_matches_numpy_and_detaches_weights() -> None:
    rng = np.random.default_rng(2)
    student, teacher = rng.normal(size=(5, 7)) * 2, rng.normal(size=(5, 7)) * 2
    p_s, p_t = np_softmax(student / 1.5), np_softmax(teacher / 1.5)
    h_s, h_t = np_entropy(p_s), np_entropy(p_t)
    expected = 1.5**2 * (h_t * np_kl(p_t, p_s) + h_s * np_kl(p_s, p_t)) / (h_s + h_t)
    value = bdkd(torch.tensor(student), torch.tensor(teacher), temperature=1.5, reduction="none")
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10)
    torch.testing.assert_close(entropy(torch.log(torch.tensor(p_s))), torch.tensor(h_s))
    # detached weights: the gradient is that of the KLs with the weights held fixed
    s = torch.tensor(student, requires_grad=True)
    bdkd(s, torch.tensor(teacher), temperature=1.5).backward()
    fixed = torch.tensor(student, requires_grad=True)
    log_q, log_p = torch.log_softmax(fixed / 1.5, -1), torch.log_softmax(torch.tensor(teacher) / 1.5, -1)
    w_f, w_r = torch.tensor(h_t / (h_s + h_t)), torch.tensor(h_s / (h_s + h_t))
    manual = 1.5**2 * (w_f * (log_p.exp() * (log_p - log_q)).sum(-1) + w_r * (log_q.exp() * (log_q - log_p)).sum(-1))
    manual.mean().backward()
    torch.testing.assert_close(s.grad, fixed.grad)


# ----------------------------------------------------------------------------- swing distillation


def test_swing_temperature_rule_by_hand() -> None:
    likelihood = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(
        swing_temperatures(likelihood, temperature=2.0, max_temperature=6.0, threshold=0.0), torch.tensor([2.0, 3.0, 4.0, 6.0])
    )
    torch.testing.assert_close(
        swing_temperatures(likelihood, temperature=2.0, max_temperature=6.0, threshold=0.5), torch.tensor([2.0, 2.0, 2.0, 6.0])
    )
    # end to end: the teacher gives its label 0.9 (row 0) or 0.1 (row 1) at T = 1
    teacher = torch.tensor([[np.log(9.0), 0.0], [0.0, np.log(9.0)]], dtype=torch.float64)
    student = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    value = swing_kd(student, teacher, labels, temperature=4.0, max_temperature=8.0, training=False, reduction="none")
    for row, t_row in enumerate((4.0 + 4.0 * 0.9, 4.0 + 4.0 * 0.1)):
        expected = hinton_kd(student[row : row + 1], teacher[row : row + 1], temperature=t_row)
        assert float(value[row]) == pytest.approx(float(expected), rel=1e-10)
    # the "max" score uses the teacher's top probability (0.9 in both rows) instead of the label's
    value_max = swing_kd(student, teacher, labels, privacy_score="max", training=False, reduction="none")
    expected = hinton_kd(student, teacher, temperature=4.0 + 4.0 * 0.9, reduction="none")
    torch.testing.assert_close(value_max, expected)


def test_swing_without_noise_is_kl_at_the_adaptive_temperature() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 11, dtype=torch.float64) * 2, torch.randn(6, 11, dtype=torch.float64) * 4
    labels = torch.randint(0, 11, (6,))
    temperatures = 2.0 + 3.0 * torch.softmax(teacher, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected = torch.stack(
        [hinton_kd(student[i : i + 1], teacher[i : i + 1], temperature=float(temperatures[i])) for i in range(6)]
    )
    for kwargs in ({"noise_scale": 0.0}, {"noise_scale": 0.1, "training": False}):
        value = swing_kd(student, teacher, labels, temperature=2.0, max_temperature=5.0, reduction="none", **kwargs)
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_swing_noise_is_reproducible_and_only_in_training() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 9), torch.randn(5, 9)
    labels = torch.randint(0, 9, (5,))
    teacher.requires_grad_(True)

    def run(seed: int, **kw) -> torch.Tensor:
        return swing_kd(student, teacher, labels, noise_scale=0.05, generator=torch.Generator().manual_seed(seed), reduction="none", **kw)

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))
    clean = swing_kd(student, teacher, labels, noise_scale=0.0, reduction="none")
    assert not torch.allclose(run(1), clean)
    torch.testing.assert_close(run(1, training=False), clean, rtol=0, atol=0)
    laplace = run(3, noise="laplace")
    assert torch.isfinite(laplace).all() and torch.all(laplace >= 0) and not torch.allclose(laplace, clean)
    s = student.clone().requires_grad_(True)
    swing_kd(s, teacher, labels, noise_scale=0.05).backward()
    assert teacher.grad is None and s.grad is not None


def test_swing_arguments() -> None:
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="privacy_score"):
        swing_kd(s, t, y, privacy_score="ner")
    with pytest.raises(ValueError, match="noise must be one of"):
        swing_kd(s, t, y, noise="uniform")
    with pytest.raises(ValueError, match="confidence_threshold"):
        swing_kd(s, t, y, confidence_threshold=1.0)


# ----------------------------------------------------------------------------- DAC-KL


def test_dac_kl_clipping_rule_on_a_hand_made_distribution() -> None:
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]], dtype=torch.float64)  # sorted: 0.5, 0.3, 0.15, 0.05
    # cumulative mass before each class (in class order): 0.8, 0, 0.95, 0.5

    def kept(lower, upper, keep_top1=True):
        return dense_region(probs, lower_quantile=lower, upper_quantile=upper, keep_top1=keep_top1)[0].tolist()

    assert kept(0.0, 1.0) == [True, True, True, True]
    assert kept(0.0, 0.9) == [True, True, False, True]
    assert kept(0.0, 0.79) == [False, True, False, True]
    assert kept(0.0, 0.3) == [False, True, False, False]
    assert kept(0.6, 0.9) == [True, True, False, True]  # the head is clipped but kept as top-1
    assert kept(0.6, 0.9, keep_top1=False) == [True, False, False, True]
    # value: the clipped teacher renormalized, against the student's full distribution
    student = np.array([0.2, -0.4, 1.0, 0.3])
    q = np_softmax(student)
    p_clip = np.array([0.15, 0.0, 0.0, 0.3]) / 0.45
    value = dac_kl(
        torch.tensor(student[None]), torch.log(probs), lower_quantile=0.6, upper_quantile=0.9, keep_top1=False
    )
    assert float(value) == pytest.approx(float(np_kl(p_clip, q)), rel=1e-10)
    assert float(value) >= -np.log(q[0] + q[3]) - 1e-12


def test_dac_kl_without_clipping_is_forward_kl() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 17, dtype=torch.float64) * 2, torch.randn(3, 5, 17, dtype=torch.float64) * 3
    for temperature in (1.0, 3.0):
        value = dac_kl(student, teacher, temperature=temperature, lower_quantile=0.0, upper_quantile=1.0, reduction="none")
        torch.testing.assert_close(value, hinton_kd(student, teacher, temperature=temperature, reduction="none"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lower_quantile"):
        dac_kl(student, teacher, lower_quantile=0.5, upper_quantile=0.5)


# ----------------------------------------------------------------------------- Margin-MSE


def test_margin_mse_by_hand_and_against_numpy() -> None:
    value = margin_mse(torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0, 1.5]]))
    assert float(value) == pytest.approx(2.25)  # ((3 - 1) - (2 - 1.5))^2
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(4, 6, 2)), rng.normal(size=(4, 6, 2)) * 5
    expected = ((student[..., 0] - student[..., 1]) - (teacher[..., 0] - teacher[..., 1])) ** 2
    np.testing.assert_allclose(margin_mse(torch.tensor(student), torch.tensor(teacher), reduction="none").numpy(), expected)
    assert float(margin_mse(torch.tensor(student), torch.tensor(teacher))) == pytest.approx(expected.mean())
    # only margins matter: shifting a triple's two scores together changes nothing
    shifted = torch.tensor(student) + torch.tensor(rng.normal(size=(4, 6, 1)))
    torch.testing.assert_close(margin_mse(shifted, torch.tensor(teacher)), margin_mse(torch.tensor(student), torch.tensor(teacher)))
    with pytest.raises(ValueError, match=r"\[..., 2\]"):
        margin_mse(torch.randn(3, 3), torch.randn(3, 3))


# ----------------------------------------------------------------------------- ground-truth-weighted self-distillation


def test_gt_weighted_kd_targets_and_limits() -> None:
    rng = np.random.default_rng(4)
    student, teacher = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) * 2
    labels = rng.integers(0, 5, size=6)
    for xi, temperature in ((0.3, 1.0), (0.7, 2.5)):
        targets = xi * np.eye(5)[labels] + (1 - xi) * np_softmax(teacher / temperature)
        got = weighted_targets(torch.tensor(teacher), torch.tensor(labels), ground_truth_weight=xi, temperature=temperature)
        np.testing.assert_allclose(got.numpy(), targets, rtol=1e-12)
        expected = -(targets * np_log_softmax(student / temperature)).sum(-1)
        value = gt_weighted_kd(
            torch.tensor(student), torch.tensor(teacher), torch.tensor(labels),
            ground_truth_weight=xi, temperature=temperature, reduction="none",
        )
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-12)
    s, t, y = torch.tensor(student), torch.tensor(teacher), torch.tensor(labels)
    torch.testing.assert_close(gt_weighted_kd(s, t, y, ground_truth_weight=1.0), cross_entropy(s, y))
    soft_ce = -(np_softmax(teacher / 2.0) * np_log_softmax(student / 2.0)).sum(-1)
    np.testing.assert_allclose(
        gt_weighted_kd(s, t, y, ground_truth_weight=0.0, temperature=2.0, reduction="none").numpy(), soft_ce, rtol=1e-12
    )
    with pytest.raises(ValueError, match="ground_truth_weight"):
        gt_weighted_kd(s, t, y, ground_truth_weight=1.5)


def test_optimal_ground_truth_weight() -> None:
    rng = np.random.default_rng(5)
    f1, f0 = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    direction = f1 - f0
    # targets on the line between the fits plus an orthogonal residual: the optimum is the line's weight
    residual = rng.normal(size=(20, 3))
    residual -= (residual * direction).sum() / (direction * direction).sum() * direction
    y = 0.3 * f1 + 0.7 * f0 + residual
    assert optimal_ground_truth_weight(torch.tensor(f1), torch.tensor(f0), torch.tensor(y)) == pytest.approx(0.3)
    # a brute-force search over the weight agrees
    grid = np.linspace(0, 1, 10001)
    errors = [np.square(w * f1 + (1 - w) * f0 - y).sum() for w in grid]
    assert grid[int(np.argmin(errors))] == pytest.approx(0.3, abs=1e-4)
    # clipping, integer labels
    beyond = 1.5 * f1 - 0.5 * f0
    assert optimal_ground_truth_weight(torch.tensor(f1), torch.tensor(f0), torch.tensor(beyond)) == 1.0
    assert optimal_ground_truth_weight(torch.tensor(f1), torch.tensor(f0), torch.tensor(beyond), clip=False) == pytest.approx(1.5)
    labels = torch.tensor([0, 2, 1])
    onehot = torch.eye(3, dtype=torch.float64)[labels]
    teacher_fit = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    assert optimal_ground_truth_weight(onehot, teacher_fit, labels) == 1.0
    with pytest.raises(ValueError, match="identical"):
        optimal_ground_truth_weight(teacher_fit, teacher_fit, labels)

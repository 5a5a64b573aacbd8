"""Divergence and logit-matching losses against independent NumPy/SciPy formulas, plus the shared contract."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon as scipy_jensenshannon
from scipy.special import rel_entr

from distill.losses import (
    forward_kl,
    generalized_jsd,
    jensen_shannon,
    logit_cosine,
    logit_mse,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    symmetric_kl,
    total_variation,
)
from distill.objective import Objective, Term
from distill.registry import LOSSES


pytestmark = pytest.mark.usefixtures("single_thread")


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return rel_entr(a, b).sum(axis=-1)


def ref_gjsd(p: np.ndarray, q: np.ndarray, beta: float) -> np.ndarray:
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def ref_cosine(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))


@dataclass
class Case:
    """A loss, its hyper-parameters, and an independent formula ``(p_teacher, q_student) -> [...]``."""

    name: str
    fn: Callable[..., torch.Tensor]
    ref: Callable[[np.ndarray, np.ndarray], np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    on_logits: bool = False  # ref takes (student_logits, teacher_logits) and the loss has no temperature

    @property
    def id(self) -> str:
        return self.name + "".join(f"-{k}={v}" for k, v in self.params.items())

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float | None = None, **kw: Any) -> torch.Tensor:
        if temperature is not None and not self.on_logits:
            kw["temperature"] = temperature
        return self.fn(student, teacher, **self.params, **kw)

    def expected(self, student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
        if self.on_logits:
            return self.ref(student, teacher)
        return self.ref(numpy_softmax(teacher / temperature), numpy_softmax(student / temperature))


CASES = [
    Case("forward_kl", forward_kl, lambda p, q: kl(p, q)),
    Case("reverse_kl", reverse_kl, lambda p, q: kl(q, p)),
    Case("symmetric_kl", symmetric_kl, lambda p, q: kl(p, q) + kl(q, p)),
    Case("jensen_shannon", jensen_shannon, lambda p, q: scipy_jensenshannon(p, q, axis=-1) ** 2),
    Case("generalized_jsd", generalized_jsd, lambda p, q: ref_gjsd(p, q, 0.5)),
    Case("generalized_jsd", generalized_jsd, lambda p, q: ref_gjsd(p, q, 0.1), {"beta": 0.1}),
    Case("generalized_jsd", generalized_jsd, lambda p, q: ref_gjsd(p, q, 0.9), {"beta": 0.9}),
    Case("skew_forward_kl", skew_forward_kl, lambda p, q: kl(p, 0.1 * p + 0.9 * q)),
    Case("skew_forward_kl", skew_forward_kl, lambda p, q: kl(p, 0.3 * p + 0.7 * q), {"alpha": 0.3}),
    Case("skew_reverse_kl", skew_reverse_kl, lambda p, q: kl(q, 0.9 * p + 0.1 * q)),
    Case("skew_reverse_kl", skew_reverse_kl, lambda p, q: kl(q, 0.7 * p + 0.3 * q), {"alpha": 0.3}),
    Case("total_variation", total_variation, lambda p, q: 0.5 * np.abs(p - q).sum(-1)),
    Case("logit_mse", logit_mse, lambda s, t: ((s - t) ** 2).sum(-1), on_logits=True),
    Case("logit_cosine", logit_cosine, ref_cosine, on_logits=True),
]
DEFAULT_CASES = [c for c in CASES if not c.params]
NAMES = [c.name for c in DEFAULT_CASES]
assert len(set(NAMES)) == len(NAMES) == 10

cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
default_cases = pytest.mark.parametrize("case", DEFAULT_CASES, ids=[c.id for c in DEFAULT_CASES])


@cases
def test_matches_numpy_and_scipy(case: Case) -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(4, 7, 11)), rng.normal(size=(4, 7, 11)) * 3
    for temperature in (1.0, 2.5):
        expected = case.expected(student, teacher, temperature)
        value = case(torch.tensor(student), torch.tensor(teacher), temperature, reduction="none")
        assert value.dtype == torch.float64 and value.shape == (4, 7)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-9, atol=1e-12)
        mean = case(torch.tensor(student), torch.tensor(teacher), temperature)
        assert float(mean) == pytest.approx(expected.mean(), rel=1e-9)
        if case.on_logits:
            break


def test_hand_worked_cases() -> None:
    # float64, so the comparison checks the formula rather than float32 rounding
    # two classes: teacher p = (1/2, 1/2), student q = softmax(0, log 3) = (1/4, 3/4), T = 1
    student, teacher = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(forward_kl(student, teacher)) == pytest.approx(fkl, rel=1e-12)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(reverse_kl(student, teacher)) == pytest.approx(rkl, rel=1e-12)
    assert float(symmetric_kl(student, teacher)) == pytest.approx(fkl + rkl, rel=1e-12)
    # m = (3/8, 5/8)
    js = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) + 0.5 * (
        0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    )
    assert float(jensen_shannon(student, teacher)) == pytest.approx(js, rel=1e-12)
    assert float(total_variation(student, teacher)) == pytest.approx(0.25, rel=1e-12)
    # T = 2 halves the logits: q = softmax(0, log 3 / 2) = (1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3))
    q1 = 1 / (1 + math.sqrt(3.0))
    assert float(total_variation(student, teacher, temperature=2.0)) == pytest.approx(0.5 - q1, rel=1e-12)
    # three classes, TVD: p = (1/2, 1/4, 1/4), q = (1/4, 1/4, 1/2) -> 1/2 (1/4 + 0 + 1/4) = 1/4
    p3 = torch.tensor([[math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    q3 = torch.tensor([[0.0, 0.0, math.log(2.0)]], dtype=torch.float64)
    assert float(total_variation(q3, p3)) == pytest.approx(0.25, rel=1e-12)
    assert float(forward_kl(q3, p3)) == pytest.approx(0.5 * math.log(2.0) + 0.25 * math.log(0.5), rel=1e-12)
    # skew forward KL with alpha = 1/2 on the two-class case: KL(p || (p + q) / 2)
    skl = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    assert float(skew_forward_kl(student, teacher, alpha=0.5)) == pytest.approx(skl, rel=1e-12)
    # logits directly
    assert float(logit_mse(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3))) == pytest.approx(14.0)
    assert float(logit_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(1.0)
    assert float(logit_cosine(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]]))) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_cosine(torch.tensor([[1.0, 1.0]]), torch.tensor([[-3.0, -3.0]]))) == pytest.approx(2.0)


@cases
def test_gradcheck_float64(case: Case) -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.3
    for reduction in ("batchmean", "sum"):
        assert torch.autograd.gradcheck(lambda s: case(s, teacher, 2.5, mask=mask, reduction=reduction), (student,))


@default_cases
def test_masking_reductions_and_fully_masked(case: Case) -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 6, 9)
    teacher = torch.randn(4, 6, 9)
    mask = torch.rand(4, 6) > 0.5
    # garbage (inf) at masked positions, on both sides
    student[~mask] = float("inf")
    teacher[~mask] = float("-inf")
    student.requires_grad_(True)
    per_position = case(student, teacher, 2.0, mask=mask, reduction="none")
    assert per_position.shape == (4, 6) and torch.all(per_position[~mask] == 0)
    assert torch.isfinite(per_position).all()
    total = case(student, teacher, 2.0, mask=mask, reduction="sum")
    mean = case(student, teacher, 2.0, mask=mask)
    assert float(total.detach()) == pytest.approx(float(per_position.detach().sum()), rel=1e-6)
    assert float(mean.detach()) == pytest.approx(float(per_position.detach().sum() / mask.sum()), rel=1e-6)
    mean.backward()
    assert torch.isfinite(student.grad).all() and torch.all(student.grad[~mask] == 0)
    assert student.grad[mask].abs().sum() > 0
    # fully masked: an exact 0 and a zero gradient, for every reduction
    nothing = torch.zeros(4, 6, dtype=torch.bool)
    for reduction in ("batchmean", "sum", "none"):
        s = student.detach().clone().requires_grad_(True)
        value = case(s, teacher, 2.0, mask=nothing, reduction=reduction)
        value.sum().backward()
        assert torch.all(value.detach() == 0) and torch.all(s.grad == 0)


@default_cases
def test_extreme_logits_and_low_precision_inputs(case: Case) -> None:
    student = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0], [3.0, -1e4, 1e4]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, 5.0], [1e4, 2.0, -1e4]])
    value = case(student, teacher, 1.0, reduction="none")
    assert torch.isfinite(value).all() and torch.all(value >= 0)
    assert float(value[1].detach()) == pytest.approx(0.0, abs=1e-6) and value[0] > 0
    value.sum().backward()
    assert torch.isfinite(student.grad).all()
    torch.manual_seed(0)
    bf16 = case(torch.randn(8, 50).bfloat16(), torch.randn(8, 50).bfloat16())
    assert bf16.dtype == torch.float32 and bf16 >= 0 and torch.isfinite(bf16)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(2, 30),
    st.floats(0.5, 8.0),
    st.floats(0.1, 20.0),
    st.floats(0.0, 1.0),
    st.floats(0.0, 0.99),
    st.integers(0, 2**31 - 1),
)
def test_nonnegative_and_zero_on_equal_inputs(
    rows: int, classes: int, temperature: float, scale: float, beta: float, alpha: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, classes, generator=generator) * scale
    teacher = torch.randn(rows, classes, generator=generator) * scale
    for case in DEFAULT_CASES:
        params = {"generalized_jsd": {"beta": beta}, "skew_forward_kl": {"alpha": alpha}, "skew_reverse_kl": {"alpha": alpha}}
        kw = params.get(case.name, {})
        assert torch.all(case(student, teacher, temperature, reduction="none", **kw) >= 0), case.name
        same = case(teacher, teacher.clone(), temperature, reduction="none", **kw)
        torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-6, msg=case.name)


@default_cases
def test_teacher_gets_no_gradient(case: Case) -> None:
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    case(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None


def test_limits_between_the_divergences() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 7, 11, dtype=torch.float64) * 2
    teacher = torch.randn(4, 7, 11, dtype=torch.float64) * 3
    for temperature in (1.0, 2.5):
        kw = {"temperature": temperature, "reduction": "none"}
        fkl, rkl = forward_kl(student, teacher, **kw), reverse_kl(student, teacher, **kw)
        # exact endpoints: special-cased, as in TRL
        torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0, **kw), fkl, rtol=0, atol=0)
        torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0, **kw), rkl, rtol=0, atol=0)
        # the limits: JSD(beta) = beta FKL + O(beta^2) as beta -> 0, (1 - beta) RKL + O((1 - beta)^2) as beta -> 1
        # (the O() term grows with the ratios p / q resp. q / p, so mild logits are used here)
        mild_s, mild_t = student / 2, teacher / 3
        mild_fkl, mild_rkl = forward_kl(mild_s, mild_t, **kw), reverse_kl(mild_s, mild_t, **kw)
        beta = 1e-8
        torch.testing.assert_close(generalized_jsd(mild_s, mild_t, beta=beta, **kw) / beta, mild_fkl, rtol=1e-5, atol=1e-9)
        beta = 1 - 1e-8
        torch.testing.assert_close(
            generalized_jsd(mild_s, mild_t, beta=beta, **kw) / (1 - beta), mild_rkl, rtol=1e-5, atol=1e-9
        )
        # the definitions agree at beta = 1/2
        torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.5, **kw), jensen_shannon(student, teacher, **kw))
        # JSD(beta)(p || q) = JSD(1 - beta)(q || p)
        torch.testing.assert_close(
            generalized_jsd(student, teacher, beta=0.3, **kw), generalized_jsd(teacher, student, beta=0.7, **kw)
        )
        # skew KLs at alpha = 0 are the plain KLs, and tend to them
        torch.testing.assert_close(skew_forward_kl(student, teacher, alpha=0.0, **kw), fkl, rtol=0, atol=0)
        torch.testing.assert_close(skew_reverse_kl(student, teacher, alpha=0.0, **kw), rkl, rtol=0, atol=0)
        torch.testing.assert_close(skew_forward_kl(mild_s, mild_t, alpha=1e-9, **kw), mild_fkl, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(skew_reverse_kl(mild_s, mild_t, alpha=1e-9, **kw), mild_rkl, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(symmetric_kl(student, teacher, **kw), fkl + rkl)
        # symmetric ones
        for fn in (jensen_shannon, total_variation, symmetric_kl):
            torch.testing.assert_close(fn(student, teacher, **kw), fn(teacher, student, **kw))
    for fn in (logit_mse, logit_cosine):
        torch.testing.assert_close(fn(student, teacher, reduction="none"), fn(teacher, student, reduction="none"))
    # bounds: JS <= log 2, TVD <= 1
    far_s = torch.tensor([[50.0, -50.0]])
    far_t = torch.tensor([[-50.0, 50.0]])
    assert float(jensen_shannon(far_s, far_t)) == pytest.approx(math.log(2.0), rel=1e-5)
    assert float(total_variation(far_s, far_t)) == pytest.approx(1.0, rel=1e-5)


@default_cases
def test_accumulated_micro_batches_equal_the_whole_batch(case: Case) -> None:
    """Sum-normalized over the step: two uneven micro-batches give the gradient of the whole batch."""
    torch.manual_seed(0)
    student = torch.randn(2, 8, 12, dtype=torch.float64)
    teacher = torch.randn(2, 8, 12, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :7] = True  # 7 valid tokens in the first micro-batch
    mask[1, :2] = True  # 2 in the second
    whole = student.clone().requires_grad_(True)
    case(whole, teacher, 2.0, mask=mask).backward()
    parts = student.clone().requires_grad_(True)
    valid_total = int(mask.sum())
    for row in range(2):
        share = int(mask[row].sum()) / valid_total
        (case(parts[row : row + 1], teacher[row : row + 1], 2.0, mask=mask[row : row + 1]) * share).backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-14)


def test_generalized_jsd_matches_trl() -> None:
    """Same beta, same side: TRL's mixture is beta * teacher + (1 - beta) * student, and it also
    special-cases beta = 0 (forward KL) and beta = 1 (reverse KL). TRL's batchmean with labels
    divides by the number of valid tokens, as ours does; its "none" is per class (summed here)."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer  # older TRL
    trl_jsd = GKDTrainer.generalized_jsd_loss
    torch.manual_seed(0)
    student = torch.randn(3, 5, 17, dtype=torch.float64) * 2
    teacher = torch.randn(3, 5, 17, dtype=torch.float64) * 3
    labels = torch.randint(0, 17, (3, 5))
    labels[0, 3:] = -100
    labels[2, 0] = -100
    mask = labels != -100
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for temperature in (1.0, 2.5):
            for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
                s, t = student.to(dtype), teacher.to(dtype)
                ours = generalized_jsd(s, t, beta=beta, temperature=temperature, mask=mask)
                theirs = trl_jsd(s, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
                torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=tol, atol=tol)
                per_position = generalized_jsd(s, t, beta=beta, temperature=temperature, reduction="none")
                theirs_none = trl_jsd(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
                torch.testing.assert_close(per_position, theirs_none.to(per_position.dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_buildable_as_a_term(name: str) -> None:
    assert name in LOSSES
    term = Term(name, name)
    assert term.sources == {"student_logits": "student.logits", "teacher_logits": "teacher.logits"}
    torch.manual_seed(0)
    out = Objective([term])({"student.logits": torch.randn(2, 3, 5), "teacher.logits": torch.randn(2, 3, 5)})
    assert out.total.dim() == 0 and torch.isfinite(out.total) and out.total >= 0


def test_bad_arguments_are_clear_errors() -> None:
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    for beta in (-0.1, 1.1):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
            generalized_jsd(s, t, beta=beta)
    for alpha in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
            skew_forward_kl(s, t, alpha=alpha)
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
            skew_reverse_kl(s, t, alpha=alpha)
    for case in DEFAULT_CASES:
        with pytest.raises(ValueError, match="same shape"):
            case(torch.randn(2, 3), torch.randn(2, 4))
        with pytest.raises(ValueError, match="reduction must be one of"):
            case(s, t, reduction="mean")
        with pytest.raises(ValueError, match="mask has shape"):
            case(s, t, mask=torch.ones(3, dtype=torch.bool))
        if not case.on_logits:
            with pytest.raises(ValueError, match="temperature must be > 0"):
                case(s, t, 0.0)

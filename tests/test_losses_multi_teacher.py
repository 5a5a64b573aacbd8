"""Multi-teacher losses: combine_teachers, multi_teacher_kd and MST-Distill (against independent formulas)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from distill.losses.kd import hinton_kd
from distill.losses.multi_teacher import (
    MSTDistill,
    combine_teachers,
    load_balancing_loss,
    mask_reconstruction_rows,
    mask_teacher_logits,
    multi_teacher_kd,
    route_weights,
)
from distill.objective import Objective, Term
from distill.registry import LOSSES


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def loop_mixture(
    teachers: np.ndarray,
    weights: np.ndarray | None,
    labels: np.ndarray | None,
    method: str,
    confidence: str,
    tau: float,
    temperature: float = 1.0,
) -> np.ndarray:
    """sum_k a_k softmax(z_k / T), one sample and one teacher at a time (probabilities)."""
    rows, teachers_count, classes = teachers.shape
    out = np.zeros((rows, classes))
    for i in range(rows):
        w = np.ones(teachers_count) if weights is None else weights[i].astype(float)
        w = w / w.sum()
        if method == "mean":
            a = w
        else:
            p = [numpy_softmax(teachers[i, k]) for k in range(teachers_count)]
            if confidence == "entropy":
                scores = np.array([-(pk * np.log(pk)).sum() for pk in p])
                c = np.exp(-scores / tau) / np.exp(-scores / tau).sum()
            else:
                ce = np.array([-math.log(p[k][labels[i]]) for k in range(teachers_count)])
                if confidence == "label":
                    c = np.exp(-ce / tau) / np.exp(-ce / tau).sum()
                else:  # camkd
                    soft = np.exp(ce / tau) / np.exp(ce / tau).sum()
                    c = (1.0 - soft) / (teachers_count - 1)
            a = w * c / (w * c).sum()
        for k in range(teachers_count):
            out[i] += a[k] * numpy_softmax(teachers[i, k] / temperature)
    return out


# ------------------------------------------------------------------------- combine_teachers


@pytest.mark.parametrize(
    ("method", "confidence"),
    [("mean", "label"), ("confidence", "label"), ("confidence", "entropy"), ("confidence", "camkd")],
)
def test_combine_teachers_equals_a_loop_formula(method: str, confidence: str) -> None:
    rng = np.random.default_rng(0)
    teachers = rng.normal(size=(6, 3, 5)) * 2
    labels = rng.integers(0, 5, size=6)
    weights = rng.uniform(0.1, 2.0, size=(6, 3))
    weights[0, 1] = 0.0  # a zero weight: that teacher does not count for that sample
    for w, tau, temperature in ((None, 1.0, 1.0), (weights, 0.5, 1.0), (weights, 2.0, 3.0)):
        expected = loop_mixture(teachers, w, labels, method, confidence, tau, temperature)
        value = combine_teachers(
            torch.tensor(teachers),
            None if w is None else torch.tensor(w),
            torch.tensor(labels),
            method=method,
            confidence=confidence,
            confidence_temperature=tau,
            temperature=temperature,
        )
        assert value.dtype == torch.float64 and value.shape == (6, 5)
        np.testing.assert_allclose(value.exp().numpy(), expected, rtol=1e-10, atol=1e-13)


def test_combine_teachers_weights_shapes_leading_dims_and_labels() -> None:
    torch.manual_seed(0)
    teachers = torch.randn(2, 3, 4, 7)  # [B, L, K, C]
    weights = torch.tensor([1.0, 3.0, 0.0, 4.0])
    by_vector = combine_teachers(teachers, weights)
    by_rows = combine_teachers(teachers, weights.expand(2, 3, 4))
    torch.testing.assert_close(by_vector, by_rows)
    expected = (torch.tensor([1.0, 3.0, 0.0, 4.0]) / 8.0).view(4, 1) * torch.softmax(teachers, -1)
    torch.testing.assert_close(by_vector.exp(), expected.sum(-2))
    # the fixed weights only set the proportions
    torch.testing.assert_close(combine_teachers(teachers, weights * 10), by_vector)
    # a position without a label (ignore_index) keeps the fixed weights
    labels = torch.randint(0, 7, (2, 3))
    labels[0, 1] = -100
    confident = combine_teachers(teachers, weights, labels, method="confidence")
    torch.testing.assert_close(confident[0, 1], by_vector[0, 1])
    assert not torch.allclose(confident[1], by_vector[1])
    with pytest.raises(ValueError, match="needs the labels"):
        combine_teachers(teachers, method="confidence")
    with pytest.raises(ValueError, match=">= 0"):
        combine_teachers(teachers, -weights)
    with pytest.raises(ValueError, match="positive sum"):
        combine_teachers(teachers, torch.zeros(4))
    with pytest.raises(ValueError, match="method"):
        combine_teachers(teachers, method="median")


def test_combine_teachers_is_a_float32_log_distribution_without_gradient() -> None:
    torch.manual_seed(1)
    teachers = (torch.randn(5, 3, 6) * 1e4).bfloat16().requires_grad_(True)  # extreme logits
    value = combine_teachers(teachers, method="confidence", confidence="entropy")
    assert value.dtype == torch.float32 and not value.requires_grad
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value.exp().sum(-1), torch.ones(5))
    one = torch.randn(4, 1, 6)
    assert torch.equal(combine_teachers(one), F.log_softmax(one[:, 0], -1))
    # a teacher whose weight is 0 is ignored even where it puts all its mass
    sharp = torch.stack([torch.full((2, 6), -1e30), torch.zeros(2, 6)], dim=1)
    sharp[:, 0, 0] = 0.0
    value = combine_teachers(sharp, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(value, torch.full((2, 6), -math.log(6)))


# ------------------------------------------------------------------------- multi_teacher_kd


def test_multi_teacher_kd_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    student = rng.normal(size=(5, 6))
    teachers = rng.normal(size=(5, 3, 6)) * 2
    weights = rng.uniform(0.2, 1.0, size=(5, 3))
    labels = rng.integers(0, 6, size=5)
    for method, temperature in (("mean", 1.0), ("mean", 4.0), ("confidence", 2.0)):
        p = loop_mixture(teachers, weights, labels, method, "label", 1.0, temperature)
        q = numpy_softmax(student / temperature)
        expected = temperature**2 * (p * (np.log(p) - np.log(q))).sum(-1)
        value = multi_teacher_kd(
            torch.tensor(student),
            torch.tensor(teachers),
            torch.tensor(weights),
            torch.tensor(labels),
            temperature=temperature,
            method=method,
            reduction="none",
        )
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, atol=1e-12)
        mean = multi_teacher_kd(
            torch.tensor(student), torch.tensor(teachers), torch.tensor(weights), torch.tensor(labels),
            temperature=temperature, method=method,
        )
        assert float(mean) == pytest.approx(expected.mean(), rel=1e-10)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_one_teacher_is_exactly_hinton_kd(reduction: str) -> None:
    torch.manual_seed(3)
    student = torch.randn(4, 5, 9)
    teacher = torch.randn(4, 5, 9) * 3
    mask = torch.rand(4, 5) > 0.3
    for dtype in (torch.float32, torch.bfloat16):
        s, t = student.to(dtype), teacher.to(dtype)
        ours = multi_teacher_kd(s, t.unsqueeze(-2), torch.full((4, 5, 1), 0.7), temperature=3.0, mask=mask, reduction=reduction)
        theirs = hinton_kd(s, t, temperature=3.0, mask=mask, reduction=reduction)
        assert torch.equal(ours, theirs)


def test_multi_teacher_kd_gradcheck_float64() -> None:
    torch.manual_seed(4)
    student = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    teachers = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    weights = torch.rand(3, 4, 2, dtype=torch.float64) + 0.1
    labels = torch.randint(0, 5, (3, 4))
    mask = torch.rand(3, 4) > 0.3
    for method in ("mean", "confidence"):
        for reduction in ("batchmean", "sum", "none"):

            def fn(s: torch.Tensor, method: str = method, reduction: str = reduction) -> torch.Tensor:
                return multi_teacher_kd(
                    s, teachers, weights, labels, temperature=2.5, method=method, mask=mask, reduction=reduction
                )

            assert torch.autograd.gradcheck(fn, (student,), fast_mode=True)


def test_multi_teacher_kd_masked_positions_contribute_nothing() -> None:
    torch.manual_seed(5)
    student = torch.randn(6, 4, requires_grad=True)
    teachers = torch.randn(6, 3, 4)
    labels = torch.randint(0, 4, (6,))
    mask = torch.tensor([True, False, True, True, False, True])
    garbage_student = student.detach().clone()
    garbage_teachers = teachers.clone()
    garbage_student[~mask] = 1e30
    garbage_teachers[~mask] = float("inf")
    garbage_student.requires_grad_(True)
    kwargs = {"method": "confidence", "mask": mask}
    clean = multi_teacher_kd(student, teachers, None, labels, **kwargs)
    dirty = multi_teacher_kd(garbage_student, garbage_teachers, None, labels.masked_fill(~mask, 99), **kwargs)
    clean.backward()
    dirty.backward()
    torch.testing.assert_close(clean, dirty)
    assert torch.all(garbage_student.grad[~mask] == 0)
    torch.testing.assert_close(garbage_student.grad[mask], student.grad[mask])
    # only the valid positions: the same as the loss on those rows alone
    alone = multi_teacher_kd(student[mask], teachers[mask], None, labels[mask], method="confidence")
    torch.testing.assert_close(clean, alone)
    none = multi_teacher_kd(student, teachers, None, labels, method="confidence", mask=mask, reduction="none")
    assert torch.all(none[~mask] == 0)
    # fully masked: 0 and a zero gradient
    fresh = student.detach().clone().requires_grad_(True)
    zero = multi_teacher_kd(fresh, teachers, None, mask=torch.zeros(6, dtype=torch.bool))
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.all(fresh.grad == 0)


def test_multi_teacher_kd_in_an_objective() -> None:
    torch.manual_seed(6)
    assert "multi_teacher_kd" in LOSSES and "mst_distill" in LOSSES
    term = Term(
        "mkd",
        "multi_teacher_kd",
        params={"temperature": 2.0, "method": "confidence", "confidence": "entropy"},
    )  # teachers_logits and teachers_weights read teachers.logits / teachers.weights by default
    objective = Objective([term])
    student = torch.randn(4, 5, requires_grad=True)
    teachers = torch.randn(4, 2, 5, requires_grad=True)
    weights = torch.tensor([[0.25, 0.75]]).expand(4, 2)
    out = objective({"student.logits": student, "teachers.logits": teachers, "teachers.weights": weights})
    out.total.backward()
    expected = multi_teacher_kd(student, teachers, weights, temperature=2.0, method="confidence", confidence="entropy")
    torch.testing.assert_close(out.terms["mkd"], expected)
    assert teachers.grad is None and student.grad is not None


# ----------------------------------------------------------------------------- MST-Distill


def build_mst(teachers: int = 3, classes: int = 5, features: int = 6, **params: object) -> MSTDistill:
    torch.manual_seed(7)
    shapes = {"teachers_logits": (teachers, classes), "student_logits": (classes,), "student_features": (features,)}
    return MSTDistill(num_classes=classes, input_shapes=shapes, **params)


def mst_inputs(rows: int = 8, teachers: int = 3, classes: int = 5, features: int = 6, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(8)
    student = (torch.randn(rows, classes, generator=generator) * 2).to(dtype).requires_grad_(True)
    teacher = (torch.randn(rows, teachers, classes, generator=generator) * 3).to(dtype)
    feats = torch.randn(rows, features, generator=generator).to(dtype)
    return student, teacher, feats


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_routing_weights_are_a_sparse_distribution(top_k: int) -> None:
    loss = build_mst(teachers=4, top_k=top_k)
    student, teachers, _ = mst_inputs(teachers=4)
    loss(student, teachers)
    weights = loss.last_weights
    assert weights.shape == (8, 4) and torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(8))
    assert torch.all((weights == 0).sum(-1) == 4 - top_k)
    # the kept teachers are the router's top-k, with their probabilities renormalised
    probs = loss.last_probs
    kept = probs.topk(top_k, dim=-1).indices
    torch.testing.assert_close(weights.gather(-1, kept), probs.gather(-1, kept) / probs.gather(-1, kept).sum(-1, keepdim=True))
    torch.testing.assert_close(loss.route(student, teachers), weights)
    for straight_through in (True, False):
        torch.testing.assert_close(route_weights(probs, top_k, straight_through=straight_through), weights)


@pytest.mark.parametrize("router_objective", ["dense", "routed"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_router_and_masks_receive_gradient(router_objective: str, top_k: int) -> None:
    loss = build_mst(top_k=top_k, router_objective=router_objective, balance="none")
    student, teachers, _ = mst_inputs()
    value = loss(student, teachers)
    value.backward()
    # the KD term alone (balance="none") trains the router, also through a top-1 selection
    for name, parameter in loss.router.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # the masks learn from their own objective (the output layer first: it starts at zero)
    assert loss.mask_weight2.grad.abs().sum() > 0 and loss.mask_bias2.grad.abs().sum() > 0
    # ... and from nothing else: with mask_weight=0 they get no gradient at all
    quiet = build_mst(top_k=top_k, router_objective=router_objective, mask_weight=0.0)
    quiet(student, teachers).backward()
    for parameter in (quiet.mask_weight1, quiet.mask_bias1, quiet.mask_weight2, quiet.mask_bias2):
        assert parameter.grad is None or torch.all(parameter.grad == 0)


def test_value_and_student_gradient_are_the_kd_to_the_routed_target() -> None:
    loss = build_mst(top_k=2, balance="kl", balance_weight=0.5)
    student, teachers, _ = mst_inputs()
    value = loss(student, teachers)
    value.backward()
    weights = loss.last_weights
    # untrained masks are exactly the identity
    torch.testing.assert_close(loss.masked_teachers(teachers), teachers, rtol=0, atol=0)
    target = (weights.unsqueeze(-1) * torch.softmax(teachers / 4.0, -1)).sum(-2)
    reference_student = student.detach().clone().requires_grad_(True)
    log_q = F.log_softmax(reference_student / 4.0, -1)
    kd = 16.0 * (target * (target.log() - log_q)).sum(-1).mean()
    kd.backward()
    probs = loss.last_probs
    balance = (torch.full((3,), 1 / 3) * (math.log(1 / 3) - probs.mean(0).log())).sum() / 3
    torch.testing.assert_close(value, kd + 0.5 * balance)
    torch.testing.assert_close(student.grad, reference_student.grad)
    torch.testing.assert_close(loss.last_losses["kd"], kd)


def test_load_balancing_matches_the_official_formulas() -> None:
    probs = torch.softmax(torch.randn(10, 4, dtype=torch.float64), -1)
    mean = probs.mean(0).numpy()
    uniform = np.full(4, 0.25)
    expected_kl = (uniform * (np.log(uniform) - np.log(mean))).sum() / 4  # KLDivLoss(batchmean) on [K]
    assert float(load_balancing_loss(probs, mode="kl")) == pytest.approx(expected_kl, rel=1e-10)
    importance = probs.sum(0).numpy()
    expected_cv = importance.std(ddof=1) / importance.mean()
    assert float(load_balancing_loss(probs, mode="cv")) == pytest.approx(expected_cv, rel=1e-10)
    assert float(load_balancing_loss(torch.full((5, 4), 0.25), mode="kl")) == pytest.approx(0.0, abs=1e-7)
    assert float(load_balancing_loss(probs[:0], mode="kl")) == 0.0
    # finite when a teacher's mean probability underflows
    log_probs = torch.tensor([[0.0, -1e4], [0.0, -2e4]])
    assert torch.isfinite(load_balancing_loss(log_probs.exp(), mode="kl", log_probs=log_probs))


def test_masking_module_gradcheck_float64() -> None:
    torch.manual_seed(9)
    teachers = torch.randn(4, 2, 3, dtype=torch.float64) * 2
    student = torch.randn(4, 3, dtype=torch.float64)
    params = (
        torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 5, dtype=torch.float64, requires_grad=True),
        (torch.randn(2, 5, 3, dtype=torch.float64) * 0.3).requires_grad_(),
        (torch.randn(2, 3, dtype=torch.float64) * 0.3).requires_grad_(),
    )

    def objective(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        return mask_reconstruction_rows(student, mask_teacher_logits(teachers, w1, b1, w2, b2), temperature=2.0)

    assert torch.autograd.gradcheck(objective, params)
    # its value: sum over teachers of T^2 KL(q || masked teacher)
    masked = mask_teacher_logits(teachers, *params).detach()
    q = torch.softmax(student / 2.0, -1).unsqueeze(1)
    p = torch.softmax(masked / 2.0, -1)
    expected = 4.0 * (q * (q.log() - p.log())).sum(-1).sum(-1)
    torch.testing.assert_close(objective(*params), expected)
    # the student gets no gradient from it
    attached = student.clone().requires_grad_(True)
    assert not mask_reconstruction_rows(attached, masked, temperature=2.0).requires_grad


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_mst_gradcheck_float64_with_mask(reduction: str) -> None:
    loss = build_mst(top_k=2, router_input="student_features").double()
    student, teachers, feats = mst_inputs(dtype=torch.float64)
    # masks away from their identity start, so the masked teachers differ from the teachers
    with torch.no_grad():
        loss.mask_weight2.normal_(0.0, 0.3)
    mask = torch.tensor([True, True, False, True, True, False, True, True])

    def fn(s: torch.Tensor) -> torch.Tensor:
        return loss(s, teachers, feats, mask=mask, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (student.detach().requires_grad_(True),))


@pytest.mark.parametrize("router_objective", ["dense", "routed"])
def test_router_gradient_is_the_gradient_of_the_value_when_dense(router_objective: str) -> None:
    """With top_k = K the router's surrogate gradient is the exact gradient of the returned value."""
    loss = build_mst(top_k=3, router_objective=router_objective, masking=False, balance_weight=0.3).double()
    student, teachers, _ = mst_inputs(dtype=torch.float64)
    student = student.detach()
    named = dict(loss.named_parameters())
    bias_name = "router.2.bias"

    def fn(bias: torch.Tensor) -> torch.Tensor:
        return functional_call(loss, {**named, bias_name: bias}, (student, teachers))

    assert torch.autograd.gradcheck(fn, (named[bias_name].detach().clone().requires_grad_(True),))


def test_mst_masked_positions_and_fully_masked_batch() -> None:
    loss = build_mst(top_k=2, router_input="student_features")
    student, teachers, feats = mst_inputs()
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    dirty_student = student.detach().clone()
    dirty_teachers, dirty_feats = teachers.clone(), feats.clone()
    dirty_student[~mask] = 1e30
    dirty_teachers[~mask] = 1e30
    dirty_feats[~mask] = float("nan")
    dirty_student.requires_grad_(True)
    clean = loss(student, teachers, feats, mask=mask)
    clean.backward()
    clean_router = [p.grad.clone() for p in loss.router.parameters()]
    loss.zero_grad()
    dirty = loss(dirty_student, dirty_teachers, dirty_feats, mask=mask)
    dirty.backward()
    torch.testing.assert_close(clean, dirty)
    assert torch.all(dirty_student.grad[~mask] == 0)
    torch.testing.assert_close(dirty_student.grad[mask], student.grad[mask])
    for before, parameter in zip(clean_router, loss.router.parameters()):
        torch.testing.assert_close(parameter.grad, before)
    assert loss.last_weights.shape == (int(mask.sum()), 3)
    none = loss(student, teachers, feats, mask=mask, reduction="none")
    assert torch.all(none[~mask] == 0)
    torch.testing.assert_close(none.sum(), loss(student, teachers, feats, mask=mask, reduction="sum"))
    torch.testing.assert_close(none.sum() / mask.sum(), clean)
    fresh = student.detach().clone().requires_grad_(True)
    loss.zero_grad()
    zero = loss(fresh, teachers, feats, mask=torch.zeros(8, dtype=torch.bool))
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.all(fresh.grad == 0)
    assert all(p.grad is None or torch.all(p.grad == 0) for p in loss.parameters())


def test_mst_low_precision_extreme_inputs_and_errors() -> None:
    loss = build_mst()
    student, teachers, _ = mst_inputs(dtype=torch.bfloat16)
    value = loss(student, teachers)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    extreme = (torch.randn(6, 5) * 1e4).requires_grad_(True)
    value = loss(extreme, torch.randn(6, 3, 5) * 1e4)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(extreme.grad).all()
    with pytest.raises(ValueError, match="top_k"):
        build_mst(top_k=4)
    with pytest.raises(ValueError, match="built for 3 teachers"):
        loss(torch.randn(2, 5), torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match="student_features"):
        build_mst(router_input="student_features")(torch.randn(2, 5), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="router_input"):
        build_mst(router_input="labels")


def test_mst_in_an_objective_gets_its_shapes_and_trains_its_parameters() -> None:
    term = Term(
        "mst",
        "mst_distill",
        params={"top_k": 1, "router_input": "student_features"},
        inputs={"teachers_logits": "teachers.logits", "student_features": "student.features"},
    )
    shapes = {"student.logits": (5,), "teachers.logits": (2, 5), "student.features": (7,)}
    objective = Objective([Term("ce", "cross_entropy"), term], num_classes=5, source_shapes=shapes)
    module = objective.losses["mst"]
    assert module.num_teachers == 2 and module.router[0].in_features == 7
    names = {name for name, _ in objective.named_parameters()}
    assert "losses.mst.router.0.weight" in names and "losses.mst.mask_weight2" in names
    sources = {
        "student.logits": torch.randn(4, 5, requires_grad=True),
        "teachers.logits": torch.randn(4, 2, 5),
        "student.features": torch.randn(4, 7),
        "batch.labels": torch.randint(0, 5, (4,)),
    }
    out = objective(sources)
    out.total.backward()
    assert module.router[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------- the toy problem: instance-level routing


def toy_problem(halves: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 classes; teacher A is right (confident on y) on one half of the inputs, teacher B on the
    other, and each is confidently wrong (on y + 1) where the other is right. The halves are two
    class groups (``"class"``) or the sign of the first input coordinate (``"input"``)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=generator)
    y = (x @ torch.randn(4, 4, generator=generator)).argmax(-1)
    half = (y >= 2).long() if halves == "class" else (x[:, 0] > 0).long()
    wrong = (y + 1) % 4
    a = torch.where(half == 0, y, wrong)
    b = torch.where(half == 1, y, wrong)
    teachers = torch.stack([F.one_hot(a, 4), F.one_hot(b, 4)], dim=1).float() * 6.0
    return x, y, half, teachers


@pytest.mark.parametrize(("router_input", "halves"), [("student_logits", "class"), ("student_features", "input")])
def test_router_learns_which_teacher_is_right_per_instance(router_input: str, halves: str) -> None:
    x, y, half, teachers = toy_problem(halves)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    shapes = {"teachers_logits": (2, 4), "student_features": (32,)}
    loss = MSTDistill(num_classes=4, input_shapes=shapes, router_input=router_input, top_k=1)
    optimizer = torch.optim.Adam([*student.parameters(), *loss.parameters()], lr=1e-2)
    hidden = torch.nn.Sequential(*list(student)[:2])
    for _ in range(300):
        features = hidden(x)
        logits = student[2](features)
        total = F.cross_entropy(logits, y) + loss(logits, teachers, features)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    with torch.no_grad():
        features = hidden(x)
        loss(student[2](features), teachers, features)
    right_weight = torch.where(half == 0, loss.last_weights[:, 0], loss.last_weights[:, 1])
    right_prob = torch.where(half == 0, loss.last_probs[:, 0], loss.last_probs[:, 1])
    for part in (0, 1):
        chosen = half == part
        assert right_weight[chosen].mean() >= 0.75, (part, right_weight[chosen].mean())  # top-1 on the right teacher
        assert right_prob[chosen].mean() >= 0.6, (part, right_prob[chosen].mean())


def test_the_documented_example_runs() -> None:
    """docs/multi_teacher_losses.md: the block under "Python example" runs and routes correctly."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "multi_teacher_losses.md").read_text()
    section = page.split("## Python example", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "multi_teacher_losses.md", "exec"), namespace)  # noqa: S102 - our own documentation
    routed, right = namespace["routed_to_a"], namespace["a_right"]
    assert (routed == right).float().mean() >= 0.8


def test_the_mask_anchor_keeps_masked_teachers_from_collapsing_onto_a_flat_student() -> None:
    """Masks trained against an untrained (flat) student drift to flat teachers unless anchored."""
    _, teachers, _ = mst_inputs(rows=32)
    flat_student = torch.zeros(32, 5)

    def entropy_after_training(anchor: float) -> tuple[float, float]:
        loss = build_mst(mask_anchor=anchor, balance="none")
        masks = [loss.mask_weight1, loss.mask_bias1, loss.mask_weight2, loss.mask_bias2]
        optimizer = torch.optim.Adam(masks, lr=0.05)
        for _ in range(200):
            optimizer.zero_grad()
            loss(flat_student, teachers).backward()
            optimizer.step()
        with torch.no_grad():
            masked = loss.masked_teachers(teachers.reshape(-1, 3, 5))
            p = F.softmax(masked / 4.0, dim=-1)
            q = F.softmax(teachers / 4.0, dim=-1)
            entropy = float(-(p * p.log()).sum(-1).mean())
            drift = float((q * (q.log() - p.log())).sum(-1).mean())
        return entropy, drift

    flat_entropy = math.log(5)
    collapsed, collapsed_drift = entropy_after_training(0.0)
    anchored, anchored_drift = entropy_after_training(1.0)
    original = float((-(F.softmax(teachers / 4.0, -1) * F.log_softmax(teachers / 4.0, -1)).sum(-1)).mean())
    assert collapsed > anchored and flat_entropy - collapsed < 0.5 * (flat_entropy - original)
    assert anchored_drift < 0.5 * collapsed_drift

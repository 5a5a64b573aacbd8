"""Module losses with parameters or state: TAID, Dual-Head KD, TGeo-KD (against independent formulas)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from distill.losses.dual_head import DualHeadKD, binary_kl, binary_kl_norm
from distill.losses.kd import hinton_kd
from distill.losses.taid import TAID, taid_loss, taid_target
from distill.losses.tgeo import TGeoKD
from distill.objective import Objective, Term


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def numpy_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def numpy_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------- TAID


def test_taid_target_is_a_logit_interpolation_with_the_right_ends() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6) * 3
    at_zero = taid_target(student, teacher, 0.0)
    at_one = taid_target(student, teacher, 1.0)
    torch.testing.assert_close(at_zero, torch.softmax(student.detach(), -1))
    torch.testing.assert_close(at_one, torch.softmax(teacher, -1))
    assert not at_zero.requires_grad
    # in between: softmax of the interpolated logits, not a mixture of the probabilities
    s, t = student.detach().double().numpy(), teacher.double().numpy()
    expected = numpy_softmax(0.7 * s + 0.3 * t)
    np.testing.assert_allclose(taid_target(student.double(), teacher.double(), 0.3).numpy(), expected, rtol=1e-12)
    mixture = 0.7 * numpy_softmax(s) + 0.3 * numpy_softmax(t)
    assert not np.allclose(expected, mixture)
    with pytest.raises(ValueError, match="t must be in"):
        taid_target(student, teacher, 1.5)


def test_taid_loss_matches_numpy_and_is_zero_for_a_perfect_student() -> None:
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 5, 7)), rng.normal(size=(3, 5, 7)) * 2
    for t_value, temperature in ((0.4, 1.0), (0.8, 2.0)):
        target = numpy_softmax(((1 - t_value) * s + t_value * t) / temperature)
        q = numpy_softmax(s / temperature)
        expected = temperature**2 * numpy_kl(target, q)
        value = taid_loss(torch.tensor(s), torch.tensor(t), t=t_value, temperature=temperature, reduction="none")
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, atol=1e-12)
        cross = taid_loss(torch.tensor(s), torch.tensor(t), t=t_value, temperature=temperature, form="cross_entropy", reduction="sum")
        assert float(cross) == pytest.approx(temperature**2 * float(-(target * np.log(q)).sum()), rel=1e-10)
    same = torch.randn(6, 9)
    for t_value in (0.0, 0.3, 1.0):
        assert float(taid_loss(same, same.clone(), t=t_value)) == pytest.approx(0.0, abs=1e-7)
    module = TAID(t_start=0.2)
    assert float(module(same, same.clone())) == pytest.approx(0.0, abs=1e-7)


def test_taid_gradient_flows_only_through_the_student_distribution() -> None:
    torch.manual_seed(2)
    student = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    teacher = (torch.randn(5, 8, dtype=torch.float64) * 2).requires_grad_()
    t_value, temperature = 0.6, 2.0
    loss = taid_loss(student, teacher, t=t_value, temperature=temperature)
    loss.backward()
    target = taid_target(student, teacher, t_value, temperature=temperature)
    expected = temperature * (torch.softmax(student.detach() / temperature, -1) - target) / 5
    torch.testing.assert_close(student.grad, expected, rtol=1e-10, atol=1e-12)
    assert teacher.grad is None


def test_taid_gradcheck_at_t_one_and_the_mask_contract() -> None:
    torch.manual_seed(3)
    student = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.3
    # at t = 1 the target does not involve the student, so finite differences see the same function
    assert torch.autograd.gradcheck(lambda s: taid_loss(s, teacher, t=1.0, temperature=2.0, mask=mask), (student,))
    module = TAID(t_start=0.5)
    module.t.fill_(1.0)
    assert torch.autograd.gradcheck(lambda s: module(s, teacher, mask=mask, reduction="sum"), (student,))
    # garbage at masked positions cannot reach value or gradient; "none" has zeros there
    dirty = student.detach().clone()
    dirty[~mask] = float("inf")
    dirty.requires_grad_()
    value = taid_loss(dirty, teacher, t=0.5, mask=mask, reduction="none")
    assert torch.isfinite(value).all() and (value[~mask] == 0).all()
    value.sum().backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[~mask] == 0).all()
    # fully masked: an exact 0 with a zero gradient
    empty = taid_loss(student, teacher, t=0.5, mask=torch.zeros(3, 4, dtype=torch.bool))
    empty.backward()
    assert float(empty.detach()) == 0.0 and float(student.grad.abs().sum()) == 0.0


def hand_taid(values: list[float], steps: list[int], total: int, t_start: float, t_end: float, alpha: float, beta: float) -> list[float]:
    """TAID's update rule written out independently (official update_t, step counted after the update)."""
    t, momentum, previous, trace = t_start, 0.0, None, []
    for value, step in zip(values, steps):
        if previous is None:
            previous = value
            trace.append(t)
            continue
        delta = (previous - value) / (previous + 1e-15)
        momentum = beta * momentum + (1 - beta) * delta
        linear = t_start + (t_end - t_start) * step / total
        t = min(t_end, max(linear, t + alpha * (1 / (1 + math.exp(-momentum))) * (1 - t)))
        previous = value
        trace.append(t)
    return trace


def test_taid_update_follows_the_official_rule() -> None:
    values = [2.0, 1.6, 1.5, 1.55, 1.2, 1.25, 1.0, 0.9, 0.95, 0.7]
    steps = list(range(1, len(values) + 1))
    # (1) the adaptive increment dominates (large alpha, long schedule)
    module = TAID(t_start=0.2, t_end=0.9, alpha=0.05, beta=0.9)
    expected = hand_taid(values, steps, 1000, 0.2, 0.9, 0.05, 0.9)
    for value, step, t_expected in zip(values, steps, expected):
        module.update(step=step, total_steps=1000, value=value)
        assert float(module.t) == pytest.approx(t_expected, rel=1e-12)
    assert float(module.t) > 0.2 + 0.7 * 10 / 1000  # ahead of the linear floor
    # worked by hand for the first two updates: m = 0.1 * 0.2 = 0.02, t = 0.2 + 0.05 * sigmoid(0.02) * 0.8
    fresh = TAID(t_start=0.2, t_end=0.9, alpha=0.05, beta=0.9)
    fresh.update(step=1, total_steps=1000, value=2.0)
    assert float(fresh.t) == 0.2 and float(fresh.prev_loss) == 2.0
    fresh.update(step=2, total_steps=1000, value=1.6)
    assert float(fresh.momentum) == pytest.approx(0.02, rel=1e-12)
    assert float(fresh.t) == pytest.approx(0.2 + 0.05 * (1 / (1 + math.exp(-0.02))) * 0.8, rel=1e-12)
    # (2) the linear floor dominates (short schedule) and t_end caps it
    module = TAID(t_start=0.4, alpha=5e-4, beta=0.99)
    expected = hand_taid(values, steps, 8, 0.4, 1.0, 5e-4, 0.99)
    for value, step, t_expected in zip(values, steps, expected):
        module.update(step=step, total_steps=8, value=value)
        assert float(module.t) == pytest.approx(t_expected, rel=1e-12)
    assert float(module.t) == 1.0
    # (3) non-adaptive: the linear schedule alone
    linear = TAID(t_start=0.1, t_end=0.7, adaptive=False)
    for step in range(1, 6):
        linear.update(step=step, total_steps=10, value=1.0 / step)
    assert float(linear.t) == pytest.approx(0.1 + 0.6 * 5 / 10)
    # a non-finite value leaves the state alone
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.update(step=11, total_steps=8, value=float("nan"))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1, max_size=40),
    t_start=st.floats(min_value=0.0, max_value=0.9),
    span=st.floats(min_value=0.01, max_value=1.0),
    alpha=st.floats(min_value=0.0, max_value=1.0),
    total=st.integers(min_value=1, max_value=60),
)
def test_taid_t_is_monotone_and_stays_in_its_range(values, t_start, span, alpha, total) -> None:
    t_end = min(1.0, t_start + span)
    module = TAID(t_start=t_start, t_end=t_end, alpha=alpha)
    previous = float(module.t)
    for step, value in enumerate(values, start=1):
        module.update(step=step, total_steps=total, value=value)
        t = float(module.t)
        assert previous <= t <= t_end + 1e-12 and t >= t_start
        previous = t


def test_taid_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    values = [3.0, 2.5, 2.7, 2.0, 1.9, 1.7, 1.8, 1.2]
    module = TAID(t_start=0.3, alpha=0.02, beta=0.95)
    for step, value in enumerate(values[:4], start=1):
        module.update(step=step, total_steps=50, value=value)
    save_file(module.state_dict(), str(tmp_path / "taid.safetensors"))
    restored = TAID(t_start=0.3, alpha=0.02, beta=0.95)
    restored.load_state_dict(load_file(str(tmp_path / "taid.safetensors")))
    assert set(module.state_dict()) == {"t", "momentum", "prev_loss", "updates"}
    for step, value in enumerate(values[4:], start=5):
        module.update(step=step, total_steps=50, value=value)
        restored.update(step=step, total_steps=50, value=value)
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, restored.state_dict()[key]), key
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(module(student, teacher), restored(student, teacher))


def test_taid_term_in_an_objective_is_updatable() -> None:
    objective = Objective([Term("taid", TAID, params={"t_start": 0.2})])
    assert objective.updatable == ["taid"]
    objective.update(step=1, total_steps=10, values={"taid": 1.0})
    objective.update(step=2, total_steps=10, values={"taid": 0.5})
    assert float(objective.losses["taid"].t) > 0.2
    assert "losses.taid.t" in objective.state_dict()


# ----------------------------------------------------------------------------- Dual-Head KD


def numpy_binary_kl_norm(a: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
    d = numpy_sigmoid((a - t) / temperature)
    return temperature**2 * np.sum(0.5 * np.log(0.5 / d) + 0.5 * np.log(0.5 / (1 - d)), axis=-1)


def numpy_binary_kl(a: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
    p, q = numpy_sigmoid(t / temperature), numpy_sigmoid(a / temperature)
    return temperature**2 * np.sum(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)), axis=-1)


def test_binary_kl_losses_match_numpy() -> None:
    rng = np.random.default_rng(4)
    a, t = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
    for temperature in (1.0, 2.0):
        np.testing.assert_allclose(
            binary_kl_norm(torch.tensor(a), torch.tensor(t), temperature=temperature, reduction="none").numpy(),
            numpy_binary_kl_norm(a, t, temperature),
            rtol=1e-10,
        )
        np.testing.assert_allclose(
            binary_kl(torch.tensor(a), torch.tensor(t), temperature=temperature, reduction="none").numpy(),
            numpy_binary_kl(a, t, temperature),
            rtol=1e-10,
        )
    # BinaryKL-Norm depends on the difference only and is 0 at equality; BinaryKL sees a shift
    shift = torch.tensor(t) + 3.0
    assert float(binary_kl_norm(torch.tensor(t), torch.tensor(t))) == pytest.approx(0.0, abs=1e-12)
    assert float(binary_kl(shift, torch.tensor(t))) > 0.1
    # one class, by hand: d = 2, T = 1: 0.5 log(0.5/s(2)) + 0.5 log(0.5/s(-2))
    value = binary_kl_norm(torch.tensor([[2.0]]), torch.tensor([[0.0]]), temperature=1.0)
    s2 = 1 / (1 + math.exp(-2))
    assert float(value) == pytest.approx(0.5 * math.log(0.5 / s2) + 0.5 * math.log(0.5 / (1 - s2)), rel=1e-6)


def test_dual_head_builds_its_head_from_the_input_shapes() -> None:
    module = DualHeadKD(num_classes=7, input_shapes={"student_features": (12,), "teacher_logits": (7,)})
    assert tuple(module.aux_head.weight.shape) == (7, 12) and tuple(module.aux_head.bias.shape) == (7,)
    nonlinear = DualHeadKD(num_classes=7, input_shapes={"student_features": (12,)}, aux_head="nonlinear", aux_hidden=20)
    shapes = [tuple(p.shape) for p in nonlinear.aux_head.parameters()]
    assert shapes == [(20, 12), (20,), (20,), (20,), (7, 20), (7,)]
    # the head follows whatever source the term wires to student_features
    term = Term("dhkd", DualHeadKD, inputs={"student_features": "student.blocks.0.output"})
    objective = Objective([term], num_classes=7, source_shapes={
        "student.blocks.0.output": (5,), "student.logits": (7,), "teacher.logits": (7,)})
    assert tuple(objective.losses["dhkd"].aux_head.weight.shape) == (7, 5)
    term = Term("dhkd", DualHeadKD)
    assert term.injected_arguments() == {"num_classes", "input_shapes"}
    assert term.sources == {
        "student_features": "student.features",
        "student_logits": "student.logits",
        "teacher_logits": "teacher.logits",
    }


def test_dual_head_value_matches_an_independent_computation() -> None:
    torch.manual_seed(5)
    module = DualHeadKD(num_classes=6, input_shapes={"student_features": (9,)}, kd_weight=0.3, logit_weight=0.7).double()
    features, student, teacher = torch.randn(2, 4, 9, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    weight, bias = module.aux_head.weight.detach().numpy(), module.aux_head.bias.detach().numpy()
    aux = features.numpy() @ weight.T + bias
    kd = 16.0 * numpy_kl(numpy_softmax(teacher.numpy() / 4.0), numpy_softmax(student.numpy() / 4.0))
    expected = 0.7 * numpy_binary_kl_norm(aux, teacher.numpy(), 2.0) + 0.3 * kd
    np.testing.assert_allclose(module(features, student, teacher, reduction="none").detach().numpy(), expected, rtol=1e-10)
    assert float(module(features, student, teacher).detach()) == pytest.approx(expected.mean(), rel=1e-10)
    assert float(module(features, student, teacher, reduction="sum").detach()) == pytest.approx(expected.sum(), rel=1e-10)


def test_dual_head_logit_loss_reaches_backbone_and_aux_head_but_not_the_main_head() -> None:
    torch.manual_seed(6)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU())
    main_head = torch.nn.Linear(8, 4)
    module = DualHeadKD(num_classes=4, input_shapes={"student_features": (8,)})
    x, teacher = torch.randn(10, 5), torch.randn(10, 4)
    features = backbone(x)
    logits = main_head(features)
    module(features, logits, teacher).backward()
    assert main_head.weight.grad is None or float(main_head.weight.grad.abs().sum()) == 0.0
    assert main_head.bias.grad is None or float(main_head.bias.grad.abs().sum()) == 0.0
    assert float(backbone[0].weight.grad.abs().sum()) > 0
    assert float(module.aux_head.weight.grad.abs().sum()) > 0
    # with the optional main-head KL, the main head's gradient is exactly that of Hinton KD alone
    for p in [*backbone.parameters(), *main_head.parameters(), *module.parameters()]:
        p.grad = None
    with_kd = DualHeadKD(num_classes=4, input_shapes={"student_features": (8,)}, kd_weight=0.5, kd_temperature=3.0)
    features = backbone(x)
    logits = main_head(features)
    with_kd(features, logits, teacher).backward()
    combined = main_head.weight.grad.clone()
    main_head.weight.grad = None
    (0.5 * hinton_kd(main_head(backbone(x).detach()), teacher, temperature=3.0)).backward()
    torch.testing.assert_close(combined, main_head.weight.grad)


def test_dual_head_gradcheck_and_mask_contract() -> None:
    torch.manual_seed(7)
    module = DualHeadKD(num_classes=5, input_shapes={"student_features": (6,)}, kd_weight=0.4).double()
    features = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    student = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.3
    assert torch.autograd.gradcheck(lambda f, s: module(f, s, teacher, mask=mask), (features, student))
    for kind in ("linear", "nonlinear"):
        head = DualHeadKD(num_classes=5, input_shapes={"student_features": (6,)}, aux_head=kind, kd_weight=0.2)
        f = torch.randn(3, 4, 6, requires_grad=True)
        s = torch.randn(3, 4, 5, requires_grad=True)
        dirty = f.detach().clone()
        dirty[~mask] = float("nan")
        dirty.requires_grad_()
        value = head(dirty, s, teacher.float(), mask=mask, reduction="none")
        assert value.shape == (3, 4) and torch.isfinite(value).all() and (value[~mask] == 0).all()
        value.sum().backward()
        assert torch.isfinite(dirty.grad).all() and (dirty.grad[~mask] == 0).all()
        head.zero_grad()
        empty = head(f, s, teacher.float(), mask=torch.zeros(3, 4, dtype=torch.bool))
        empty.backward()
        assert float(empty.detach()) == 0.0
        assert f.grad is None or float(f.grad.abs().sum()) == 0.0
        assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in head.parameters())


# ---------------------------------------------------------------------------------- TGeo-KD


def randomized_tgeo(num_classes: int, seed: int = 0, **params) -> TGeoKD:
    module = TGeoKD(num_classes=num_classes, **params)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.ratio_net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module


def test_tgeo_alpha_is_per_sample_in_the_unit_interval_and_is_trained() -> None:
    torch.manual_seed(8)
    module = randomized_tgeo(5)
    student = torch.randn(12, 5, requires_grad=True)
    teacher, labels, features = torch.randn(12, 5) * 2, torch.randint(0, 5, (12,)), torch.randn(12, 7)
    alpha = module.ratio(student, teacher, labels)
    assert alpha.shape == (12,) and bool(((alpha > 0) & (alpha < 1)).all())
    assert float(alpha.detach().std()) > 1e-3  # one ratio per sample
    assert alpha.requires_grad and not student.grad
    module(student, teacher, labels, features).backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in module.ratio_net.parameters())
    # the student's gradient is that of the fused loss with the ratio held fixed
    alpha_fixed = module.ratio(student, teacher, labels).detach()
    reference = student.detach().clone().requires_grad_()
    kd = hinton_kd(reference, teacher, temperature=4.0, reduction="none")
    ce = torch.nn.functional.cross_entropy(reference, labels, reduction="none")
    (alpha_fixed * kd + (1 - alpha_fixed) * ce).mean().backward()
    torch.testing.assert_close(student.grad, reference.grad)
    # the relations: 6 C inputs with the class-average teacher, 3 C without
    assert module.ratio_net[0].in_features == 30
    assert TGeoKD(num_classes=5, inter_sample=False).ratio_net[0].in_features == 15


def test_tgeo_with_a_constant_ratio_is_the_fixed_mixture() -> None:
    rng = np.random.default_rng(9)
    s, t, y = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 6, 4)) * 2, rng.integers(0, 4, size=(2, 6))
    features = torch.randn(2, 6, 3, dtype=torch.float64)
    kd = 4.0 * numpy_kl(numpy_softmax(t / 2.0), numpy_softmax(s / 2.0))
    ce = -np.log(np.take_along_axis(numpy_softmax(s), y[..., None], axis=-1))[..., 0]
    for c in (0.2, 0.5, 0.9):
        module = TGeoKD(num_classes=4, temperature=2.0, init_ratio=c).double()  # zero output layer: alpha == c
        c_module = float(torch.sigmoid(module.ratio_net[-1].bias.detach()))
        assert c_module == pytest.approx(c, rel=1e-6)  # c up to the float32 initialisation
        expected = c_module * kd + (1 - c_module) * ce
        args = (torch.tensor(s), torch.tensor(t), torch.tensor(y), features)
        np.testing.assert_allclose(module(*args, reduction="none").detach().numpy(), expected, rtol=1e-10)
        assert float(module(*args).detach()) == pytest.approx(expected.mean(), rel=1e-10)
        assert float(module(*args, reduction="sum").detach()) == pytest.approx(expected.sum(), rel=1e-10)
    # the outer (lookahead) term changes no value
    trained = randomized_tgeo(4).double()
    frozen = randomized_tgeo(4, ratio_training="none").double()
    args = (torch.tensor(s), torch.tensor(t), torch.tensor(y), features)
    assert float(trained(*args).detach()) == float(frozen(*args).detach())


def test_tgeo_gradcheck_masking_and_ignore_index() -> None:
    torch.manual_seed(10)
    module = TGeoKD(num_classes=5, init_ratio=0.3).double()
    student = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 4))
    features = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.3
    assert torch.autograd.gradcheck(lambda s: module(s, teacher, labels, features, mask=mask), (student,))
    module = randomized_tgeo(5)
    dirty = student.detach().float().clone()
    dirty[~mask] = float("inf")
    dirty.requires_grad_()
    value = module(dirty, teacher.float(), labels, features.float(), mask=mask, reduction="none")
    assert torch.isfinite(value).all() and (value[~mask] == 0).all()
    value.sum().backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[~mask] == 0).all()
    # ignore_index counts as masked
    ignored = labels.clone()
    ignored[~mask] = -100
    torch.testing.assert_close(
        module(student.float(), teacher.float(), ignored, features.float(), reduction="none"),
        module(student.float(), teacher.float(), labels, features.float(), mask=mask, reduction="none"),
    )
    # fully masked: 0, zero gradient everywhere
    module.zero_grad()
    s = student.detach().float().requires_grad_()
    empty = module(s, teacher.float(), labels, features.float(), mask=torch.zeros(3, 4, dtype=torch.bool))
    empty.backward()
    assert float(empty.detach()) == 0.0 and float(s.grad.abs().sum()) == 0.0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in module.parameters())


def test_tgeo_outer_step_lowers_the_ratio_when_the_teacher_is_wrong() -> None:
    # all samples of class 0, similar features, a teacher confidently saying class 1
    n = 16
    labels = torch.zeros(n, dtype=torch.long)
    student = torch.zeros(n, 3)
    teacher = torch.tensor([[0.0, 8.0, 0.0]]).repeat(n, 1)
    features = torch.ones(n, 4) + 0.1 * torch.randn(n, 4)
    module = TGeoKD(num_classes=3, temperature=1.0)
    module(student, teacher, labels, features).backward()
    bias = module.ratio_net[-1].bias
    assert float(bias.grad) > 0  # gradient descent lowers alpha: less from this teacher
    # a correct, confident teacher whose KD gradient (T (q_T - p_T), T = 4) is the larger step on
    # the held-out samples' label loss: the outer gradient raises alpha
    module = TGeoKD(num_classes=3, temperature=4.0)
    module(student, torch.tensor([[40.0, 0.0, 0.0]]).repeat(n, 1), labels, features).backward()
    assert float(module.ratio_net[-1].bias.grad) < 0


def test_tgeo_class_average_teacher_is_a_running_class_mean() -> None:
    module = TGeoKD(num_classes=3)
    teacher = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    module(torch.randn(6, 3), teacher, labels, torch.randn(6, 2))
    probs = torch.softmax(teacher, -1).double()
    torch.testing.assert_close(module.class_count, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(module.class_sum[0] / 3, probs[labels == 0].mean(0))
    module.eval()
    module(torch.randn(6, 3), teacher, labels, torch.randn(6, 2))
    assert float(module.class_count.sum()) == 6.0  # no update in eval mode
    assert {"class_sum", "class_count"} <= set(module.state_dict())


# ---------------------------------------------------------------------------------- engine


def test_the_three_train_in_a_tiny_experiment_and_checkpoint_their_state(tmp_path: Path) -> None:
    from distill.config import load_experiment
    from distill.engine.runner import run_experiment
    from tests.conftest import tiny_experiment

    experiment = tiny_experiment(tmp_path, training={"epochs": 1})
    experiment["checkpoint"] = {"every_steps": 4, "keep_last": 10}
    experiment["stages"][1]["objective"]["terms"] = [
        {"name": "ce", "loss": "cross_entropy", "weight": 0.5},
        {"name": "taid", "loss": "taid", "weight": 0.5, "params": {"t_start": 0.2, "alpha": 0.01}},
        {"name": "dhkd", "loss": "dual_head_kd", "weight": 0.5},
        {"name": "tgeo", "loss": "tgeo_kd", "weight": 0.5, "params": {"temperature": 2.0}},
    ]
    result = run_experiment(load_experiment(experiment))
    run_dir = result.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train" and r["stage"] == "distilled"]
    assert set(train[0]["terms"]) == {"ce", "taid", "dhkd", "tgeo"}
    assert all(math.isfinite(v) for r in train for v in r["terms"].values())
    assert train[-1]["terms"]["ce"] < train[0]["terms"]["ce"]
    assert train[-1]["terms"]["dhkd"] < train[0]["terms"]["dhkd"]
    summary = json.loads((run_dir / "stages" / "distilled" / "summary.json").read_text())
    assert summary["final"]["test"]["accuracy"] > 0.3  # 10 classes; ce + hinton_kd reaches about 0.4 here
    checkpoints = sorted((run_dir / "checkpoints" / "distilled").iterdir())
    assert len(checkpoints) >= 2
    t_values = []
    for checkpoint in checkpoints:
        weights = load_file(str(checkpoint / "model.safetensors"))
        step = int(checkpoint.name.split("-")[1])
        assert int(weights["objective.losses.taid.updates"]) == step
        t_values.append(float(weights["objective.losses.taid.t"]))
        assert tuple(weights["objective.losses.dhkd.aux_head.weight"].shape) == (10, 16)
        assert "objective.losses.tgeo.ratio_net.0.weight" in weights
        assert float(weights["objective.losses.tgeo.class_count"].sum()) > 0
    assert t_values == sorted(t_values) and t_values[-1] > t_values[0] > 0.2
    student = load_file(str(run_dir / "stages" / "distilled" / "model.safetensors"))
    assert not any(k.startswith("objective") for k in student)


def test_tgeo_ratio_skips_ignored_labels() -> None:
    module = TGeoKD(num_classes=4)
    torch.manual_seed(0)
    alpha = module.ratio(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1, -100, 2]))
    assert torch.isnan(alpha[1]) and bool(((alpha[[0, 2]] > 0) & (alpha[[0, 2]] < 1)).all())

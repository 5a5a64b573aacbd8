"""Feature- and relation-level losses: FitNets, AT, RKD, CKA, ND, TRG, OFA (against independent formulas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    NDLoss,
    attention_transfer,
    cka_loss,
    cka_table,
    feature_mse,
    hinton_kd,
    linear_cka,
    ofa_loss,
    ofa_target_weights,
    rkd_angle,
    rkd_distance,
    trg,
)
from distill.objective import Objective, Term


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def numpy_huber(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) <= 1.0, 0.5 * x * x, np.abs(x) - 0.5)


def gradcheck(fn, *inputs: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def teacher_gets_no_gradient(loss, student: torch.Tensor, teacher: torch.Tensor, *rest, **kwargs) -> None:  # type: ignore[no-untyped-def]
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    loss(student, teacher, *rest, **kwargs).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


# ------------------------------------------------------------------------------------- FitNets


def test_feature_mse_matches_numpy_on_vectors_maps_and_tokens() -> None:
    rng = np.random.default_rng(0)
    for shape in ((4, 7), (3, 2, 5, 5)):
        s, t = rng.normal(size=shape), rng.normal(size=shape)
        per_sample = ((s - t) ** 2).reshape(shape[0], -1).sum(axis=1)
        value = feature_mse(torch.tensor(s), torch.tensor(t), reduction="none")
        np.testing.assert_allclose(value.numpy(), per_sample, rtol=1e-12)
        assert float(feature_mse(torch.tensor(s), torch.tensor(t))) == pytest.approx(per_sample.mean(), rel=1e-12)
        assert float(feature_mse(torch.tensor(s), torch.tensor(t), reduction="sum")) == pytest.approx(per_sample.sum(), rel=1e-12)
    # tokens [B, N, D]: one position per token, batchmean over valid tokens
    s, t = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    per_token = ((s - t) ** 2).sum(axis=-1)
    token_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    value = feature_mse(torch.tensor(s), torch.tensor(t), mask=torch.tensor(token_mask))
    assert float(value) == pytest.approx(per_token[token_mask].mean(), rel=1e-12)
    sample_mask = torch.tensor([True, False, True])
    value = feature_mse(torch.tensor(s), torch.tensor(t), mask=sample_mask, reduction="none")
    assert value.shape == (3, 4)
    np.testing.assert_allclose(value.numpy(), per_token * np.array([1, 0, 1])[:, None], rtol=1e-12)
    assert float(feature_mse(torch.tensor(s), torch.tensor(t))) == pytest.approx(per_token.mean(), rel=1e-12)


def test_feature_mse_normalize_shape_errors_gradient() -> None:
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)) * 5
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    expected = ((unit(s) - unit(t)) ** 2).sum(axis=-1).mean()
    assert float(feature_mse(torch.tensor(s), torch.tensor(t), normalize=True)) == pytest.approx(expected, rel=1e-12)
    assert float(feature_mse(torch.tensor(s), torch.tensor(s * 3), normalize=True)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"student_features \(4, 6\) and teacher_features \(4, 5\)"):
        feature_mse(torch.zeros(4, 6), torch.zeros(4, 5))
    gradcheck(lambda a: feature_mse(a, torch.tensor(t), normalize=True), torch.tensor(s, requires_grad=True))
    gradcheck(lambda a: feature_mse(a, torch.tensor(t)), torch.tensor(s, requires_grad=True))
    teacher_gets_no_gradient(feature_mse, torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4))


# ---------------------------------------------------------------------------- attention transfer


def numpy_attention(a: np.ndarray) -> np.ndarray:
    q = (a**2).sum(axis=1).reshape(a.shape[0], -1)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def test_attention_transfer_matches_numpy_and_the_official_form() -> None:
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 7, 5, 5))
    per_sample = 500.0 * ((numpy_attention(s) - numpy_attention(t)) ** 2).mean(axis=-1)
    value = attention_transfer(torch.tensor(s), torch.tensor(t), reduction="none")
    np.testing.assert_allclose(value.numpy(), per_sample, rtol=1e-12)
    # official code: at(x) = normalize(x.pow(2).mean(1).view(B, -1)); beta / 2 * (at(x) - at(y)).pow(2).mean()
    at = lambda x: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
    official = 1000.0 / 2 * (at(torch.tensor(s)) - at(torch.tensor(t))).pow(2).mean()
    torch.testing.assert_close(attention_transfer(torch.tensor(s), torch.tensor(t)), official)
    assert float(attention_transfer(torch.tensor(s), torch.tensor(t), beta=2.0, reduction="sum")) == pytest.approx(
        per_sample.sum() / 500.0, rel=1e-12
    )


def test_attention_transfer_defining_properties() -> None:
    torch.manual_seed(3)
    maps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    # only the normalised spatial attention counts: scaling and channel content do not, |A| does not
    assert float(attention_transfer(maps, maps.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(attention_transfer(3.0 * maps, -maps)) == pytest.approx(0.0, abs=1e-12)
    assert float(attention_transfer(maps[:, [2, 0, 1]], maps)) == pytest.approx(0.0, abs=1e-12)
    # different spatial size: the student's attention map is resized to the teacher's
    small = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    q = small.pow(2).sum(1, keepdim=True)
    resized = F.interpolate(q, size=(4, 4), mode="bilinear", align_corners=False).squeeze(1).flatten(1)
    expected = 500.0 * (F.normalize(resized) - F.normalize(maps.pow(2).sum(1).flatten(1))).pow(2).mean(-1)
    torch.testing.assert_close(attention_transfer(small, maps, reduction="none"), expected)
    with pytest.raises(ValueError, match="spatial sizes differ"):
        attention_transfer(small, maps, resize=False)
    gradcheck(lambda a: attention_transfer(a, maps), torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True))
    gradcheck(lambda a: attention_transfer(a, maps, p=3.0), torch.randn(2, 5, 2, 2, dtype=torch.float64, requires_grad=True))
    teacher_gets_no_gradient(attention_transfer, torch.randn(3, 2, 4, 4), torch.randn(3, 6, 4, 4))


# ------------------------------------------------------------------------------------------ RKD


def numpy_rkd_distance_rows(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    count = len(s)

    def psi(x: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(count)] for i in range(count)])
        return d / d[~np.eye(count, dtype=bool)].mean()

    ds, dt = psi(s), psi(t)
    return np.array([sum(numpy_huber(ds[i, j] - dt[i, j]) for j in range(count) if j != i) / (count - 1) for i in range(count)])


def numpy_rkd_angle_rows(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    count = len(s)

    def cos(x: np.ndarray, a: int, b: int, c: int) -> float:
        u, v = x[b] - x[a], x[c] - x[a]
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    rows = []
    for a in range(count):
        terms = [
            numpy_huber(cos(s, a, b, c) - cos(t, a, b, c))
            for b in range(count)
            for c in range(count)
            if len({a, b, c}) == 3
        ]
        rows.append(sum(terms) / len(terms))
    return np.array(rows)


def test_rkd_matches_numpy_with_different_dims() -> None:
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 3))
    s[0] *= 8.0  # an outlier, so the linear part of the Huber loss is exercised too
    for loss, reference in ((rkd_distance, numpy_rkd_distance_rows), (rkd_angle, numpy_rkd_angle_rows)):
        rows = reference(s, t)
        np.testing.assert_allclose(loss(torch.tensor(s), torch.tensor(t), reduction="none").numpy(), rows, rtol=1e-10)
        assert float(loss(torch.tensor(s), torch.tensor(t))) == pytest.approx(rows.mean(), rel=1e-10)
        assert float(loss(torch.tensor(s), torch.tensor(t), reduction="sum")) == pytest.approx(rows.sum(), rel=1e-10)
    assert np.abs(numpy_rkd_distance_rows(s, t)).max() > 0


def test_rkd_relations_drop_masked_rows_and_match_the_official_mean() -> None:
    torch.manual_seed(5)
    s, t = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True, True])
    for loss in (rkd_distance, rkd_angle):
        garbage = s.clone()
        garbage[~mask] = 1e6
        masked = loss(garbage, t, mask=mask, reduction="none")
        subset = loss(s[mask], t[mask], reduction="none")
        torch.testing.assert_close(masked[mask], subset)
        assert torch.all(masked[~mask] == 0)
    # official RKD distance: smooth_l1 over all P^2 entries (zero diagonal included) = (P-1)/P * ours
    count = 7

    def official_psi(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, x)
        return d / d[d > 0].mean()

    official = F.smooth_l1_loss(official_psi(s), official_psi(t))
    torch.testing.assert_close(official, rkd_distance(s, t) * (count - 1) / count)


def test_rkd_defining_properties_and_gradients() -> None:
    torch.manual_seed(6)
    t = torch.randn(6, 5, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    # relations are invariant to rotation, translation and (distance: mean-normalised) scale
    moved = 2.5 * t @ rotation + 3.0
    for loss in (rkd_distance, rkd_angle):
        assert float(loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-12)
        assert float(loss(moved, t)) == pytest.approx(0.0, abs=1e-10)
        assert float(loss(torch.randn(6, 5, dtype=torch.float64), t)) > 1e-3
        gradcheck(lambda a, loss=loss: loss(a, t), torch.randn(6, 3, dtype=torch.float64, requires_grad=True))
        teacher_gets_no_gradient(loss, torch.randn(5, 3), torch.randn(5, 4))
    # too few rows for one relation: 0 with a zero gradient
    for loss, rows in ((rkd_distance, 1), (rkd_angle, 2)):
        x = torch.randn(4, 3, requires_grad=True)
        mask = torch.zeros(4, dtype=torch.bool)
        mask[:rows] = True
        value = loss(x, torch.randn(4, 3), mask=mask)
        value.backward()
        assert float(value.detach()) == 0.0 and torch.all(x.grad == 0)


# ------------------------------------------------------------------------------------------ CKA


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_linear_cka_matches_numpy_and_its_invariances() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 7))
    y[:, 0] += 2 * x[:, 0]
    assert float(linear_cka(torch.tensor(x), torch.tensor(y))) == pytest.approx(numpy_linear_cka(x, y), rel=1e-10)
    xt = torch.tensor(x)
    assert float(linear_cka(xt, xt)) == pytest.approx(1.0, rel=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    base = float(linear_cka(xt, torch.tensor(y)))
    assert float(linear_cka(3.0 * xt @ rotation + 1.0, torch.tensor(y))) == pytest.approx(base, rel=1e-10)
    assert float(linear_cka(xt, torch.tensor(y) * 0.1)) == pytest.approx(base, rel=1e-10)
    assert float(linear_cka(xt, torch.ones(10, 3, dtype=torch.float64))) == 0.0  # a constant side


def test_cka_loss_reductions_masking_gradient() -> None:
    rng = np.random.default_rng(8)
    s, t = rng.normal(size=(9, 5)), rng.normal(size=(9, 3))
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    expected = 1.0 - numpy_linear_cka(s[mask], t[mask])
    garbage = s.copy()
    garbage[~mask] = 1e8
    kwargs = {"mask": torch.tensor(mask)}
    assert float(cka_loss(torch.tensor(garbage), torch.tensor(t), **kwargs)) == pytest.approx(expected, rel=1e-10)
    assert float(cka_loss(torch.tensor(s), torch.tensor(t), reduction="sum", **kwargs)) == pytest.approx(7 * expected, rel=1e-10)
    rows = cka_loss(torch.tensor(s), torch.tensor(t), reduction="none", **kwargs)
    assert float(rows.sum() / mask.sum()) == pytest.approx(expected, rel=1e-10) and torch.all(rows[~torch.tensor(mask)] == 0)
    assert float(cka_loss(torch.tensor(s) * 4.0, torch.tensor(s))) == pytest.approx(0.0, abs=1e-12)
    gradcheck(lambda a: cka_loss(a, torch.tensor(t)), torch.tensor(s, requires_grad=True))
    teacher_gets_no_gradient(cka_loss, torch.randn(6, 3), torch.randn(6, 5))


def test_cka_table_lists_every_pair() -> None:
    torch.manual_seed(9)
    a, b = torch.randn(12, 4), torch.randn(12, 2, 3)
    table = cka_table({"s1": a, "s2": b}, {"t1": a * 2, "t2": b})
    assert [(s, t) for s, t, _ in table] == [("s1", "t1"), ("s1", "t2"), ("s2", "t1"), ("s2", "t2")]
    values = {(s, t): v for s, t, v in table}
    assert values[("s1", "t1")] == pytest.approx(1.0) and values[("s2", "t2")] == pytest.approx(1.0)
    assert values[("s1", "t2")] == pytest.approx(numpy_linear_cka(a.double().numpy(), b.reshape(12, -1).double().numpy()), rel=1e-8)
    with pytest.raises(ValueError, match="samples"):
        cka_table({"s": a}, {"t": torch.randn(5, 4)})


# ------------------------------------------------------------------------------------------- ND


def _nd(num_classes: int = 3, dim: int = 4) -> NDLoss:
    return NDLoss(num_classes=num_classes, input_shapes={"student_features": (dim,), "teacher_features": (dim,), "labels": ()})


def test_nd_setup_computes_raw_class_means_and_forward_matches_numpy() -> None:
    rng = np.random.default_rng(10)
    features, labels = rng.normal(size=(30, 4)) + 1.0, rng.integers(0, 3, size=30)
    labels[:3] = -100  # ignored
    loss = _nd()
    with pytest.raises(RuntimeError, match="setup"):
        loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]))
    asked: list[list[str]] = []

    def collect(names: list[str]) -> dict[str, torch.Tensor]:
        asked.append(names)
        return {"teacher_features": torch.tensor(features), "labels": torch.tensor(labels)}

    loss.setup(collect)
    assert asked == [["teacher_features", "labels"]] and bool(loss.ready)
    means = np.stack([features[labels == k].mean(axis=0) for k in range(3)])
    np.testing.assert_allclose(loss.class_means.numpy(), means, rtol=1e-6)
    assert set(loss.state_dict()) == {"class_means", "ready"}
    s, t, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)) * 2, np.array([0, 2, 1, 1, 0])
    e = means / np.linalg.norm(means, axis=1, keepdims=True)
    expected = 1.0 - np.sum(s * e[y], axis=1) / np.maximum(np.linalg.norm(s, axis=1), np.linalg.norm(t, axis=1))
    value = loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), reduction="none")
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)
    assert float(loss(torch.tensor(s), torch.tensor(t), torch.tensor(y))) == pytest.approx(expected.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="adapter"):
        loss(torch.randn(2, 5), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="adapter"):
        NDLoss(num_classes=3, input_shapes={"student_features": (5,), "teacher_features": (4,)})


def test_nd_pushes_the_norm_up_to_the_teachers_and_the_direction_to_the_class_mean() -> None:
    loss = _nd(num_classes=2, dim=3).double()
    centers = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    loss.setup(lambda names: {"teacher_features": centers, "labels": torch.tensor([0, 1])})
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)  # norms 3 and sqrt 3
    labels = torch.tensor([0, 1])
    # aligned with the class mean and at least as long as the teacher's feature: exactly 0
    aligned = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    assert float(loss(aligned, teacher, labels)) == pytest.approx(0.0, abs=1e-15)
    # shorter than the teacher: the gradient lengthens the feature along the class direction
    short = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss(short, teacher[:1], labels[:1]).backward()
    assert short.grad is not None and float(short.grad[0, 0]) < 0
    # longer than the teacher: only the direction counts (a radial step changes nothing)
    long = torch.tensor([[4.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    value = loss(long, teacher[:1], labels[:1])
    assert float(value.detach()) == pytest.approx(1 - 4 / np.sqrt(17), rel=1e-12)
    value.backward()
    assert long.grad is not None and float(long.grad[0] @ long.detach()[0]) == pytest.approx(0.0, abs=1e-14)
    gradcheck(lambda a: loss(a, teacher, labels), torch.tensor([[0.5, 0.2, -0.1], [0.3, 2.0, 1.0]], dtype=torch.float64, requires_grad=True))
    teacher_gets_no_gradient(loss, torch.randn(2, 3, dtype=torch.float64), teacher, labels)
    # ignore_index masks
    value = loss(aligned, teacher, torch.tensor([0, -100]), reduction="none")
    assert float(value[1]) == 0.0


def test_nd_in_an_objective_reads_its_three_sources() -> None:
    objective = Objective(
        [Term("nd", "nd")], num_classes=3, source_shapes={"student.features": (4,), "teacher.features": (4,), "batch.labels": ()}
    )
    assert objective.terms[0].sources == {
        "student_features": "student.features",
        "teacher_features": "teacher.features",
        "labels": "batch.labels",
    }
    module = objective.losses["nd"]
    assert isinstance(module, NDLoss) and module.dim == 4 and not bool(module.ready)


# ------------------------------------------------------------------------------------------ TRG


def numpy_trg_rows(s: np.ndarray, t: np.ndarray, tau: float, h: float, weights: tuple[float, float, float]) -> np.ndarray:
    images, tokens = s.shape[:2]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    us, ut = unit(s), unit(t)

    def kl_row(ts: np.ndarray, ss: np.ndarray) -> float:
        p, q = numpy_softmax(ts / tau), numpy_softmax(ss / tau)
        return float(np.sum(p * (np.log(p) - np.log(q))))

    rows = []
    for b in range(images):
        intra = np.mean(
            [kl_row(np.delete(ut[b] @ ut[b, i], i), np.delete(us[b] @ us[b, i], i)) for i in range(tokens)]
        )
        others = [c for c in range(images) if c != b]
        inter = np.mean(
            [
                kl_row(np.concatenate([ut[c] @ ut[b, i] for c in others]), np.concatenate([us[c] @ us[b, i] for c in others]))
                for i in range(tokens)
            ]
        )
        mu = t[b].mean(axis=0)
        xs, yt = unit(s[b] - mu), unit(t[b] - mu)
        d = np.maximum(1.0 - xs @ yt.T, 0.0)
        relative = d / (d.min(axis=1, keepdims=True) + 1e-5)
        cx = numpy_softmax((1.0 - relative) / h)
        context = -np.log(cx.max(axis=0).mean())
        rows.append(weights[0] * intra + weights[1] * inter + weights[2] * context)
    return np.array(rows)


def test_trg_matches_numpy() -> None:
    rng = np.random.default_rng(11)
    s, t = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    kwargs = {"temperature": 0.5, "context_bandwidth": 0.5, "inter_tokens": None}
    for weights in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 2.0, 0.5)):
        expected = numpy_trg_rows(s, t, 0.5, 0.5, weights)
        value = trg(
            torch.tensor(s), torch.tensor(t), intra_weight=weights[0], inter_weight=weights[1], context_weight=weights[2],
            reduction="none", **kwargs,
        )
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert float(trg(torch.tensor(s), torch.tensor(t), **kwargs)) == pytest.approx(
        numpy_trg_rows(s, t, 0.5, 0.5, (1, 1, 1)).mean(), rel=1e-9
    )


def test_trg_defining_properties() -> None:
    torch.manual_seed(12)
    s, t = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
    # zero when the student's tokens equal the teacher's
    assert float(trg(t.clone(), t)) == pytest.approx(0.0, abs=1e-9)
    assert float(trg(s, t)) > 0.01
    # invariant to one permutation of the tokens applied to both
    permutation = torch.randperm(6)
    for inter_tokens in (None, 6):
        base = trg(s, t, inter_tokens=inter_tokens, reduction="none")
        torch.testing.assert_close(trg(s[:, permutation], t[:, permutation], inter_tokens=inter_tokens, reduction="none"), base)
    # the graph terms compare similarities only: scaling tokens, or a rotation of the student's
    # space, leaves them at 0; they also accept a different width
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    assert float(trg(3.0 * t @ rotation, t, context_weight=0.0)) == pytest.approx(0.0, abs=1e-9)
    wide = torch.randn(4, 6, 9, dtype=torch.float64)
    assert float(trg(s, wide, context_weight=0.0)) > 0
    with pytest.raises(ValueError, match="context_weight"):
        trg(s, wide)
    # the inter-instance graph of a subsample: the same tokens of every image
    sub = trg(s, t, intra_weight=0.0, context_weight=0.0, inter_tokens=3, reduction="none")
    index = torch.tensor([0, 2, 5])  # linspace(0, 5, 3).round()
    torch.testing.assert_close(sub, trg(s[:, index], t[:, index], intra_weight=0.0, context_weight=0.0, inter_tokens=None, reduction="none"))
    # masked images are dropped from the cross-image graph
    mask = torch.tensor([True, False, True, True])
    garbage = s.clone()
    garbage[~mask] = 1e6
    torch.testing.assert_close(trg(garbage, t, mask=mask, reduction="none")[mask], trg(s[mask], t[mask], reduction="none"))
    gradcheck(lambda a: trg(a, t[:3, :4], temperature=0.5), torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True))
    teacher_gets_no_gradient(trg, s.float(), t.float())


# ------------------------------------------------------------------------------------------ OFA


def test_ofa_matches_the_official_formula_in_numpy() -> None:
    rng = np.random.default_rng(13)
    s, t, y = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 3, rng.integers(0, 5, size=6)
    for eps, temperature in ((1.0, 1.0), (1.5, 1.0), (0.7, 2.0)):
        p, q = numpy_softmax(t / temperature), numpy_softmax(s / temperature)
        onehot = np.eye(5)[y]
        expected = -np.sum(((p + onehot) ** eps - onehot) * np.log(q), axis=-1)
        value = ofa_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), eps=eps, temperature=temperature, reduction="none")
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10)


def test_ofa_reduces_to_soft_cross_entropy_and_enhances_the_target() -> None:
    torch.manual_seed(14)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 0])
    # eps = 1: soft cross-entropy = KL(p || q) + H(p) = hinton_kd / T^2 + H(p)
    p = torch.softmax(t / 2.0, -1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(
        ofa_loss(s, t, y, eps=1.0, temperature=2.0, reduction="none"),
        hinton_kd(s, t, temperature=2.0, reduction="none") / 4.0 + entropy,
    )
    # eps > 1: the target's weight exceeds p_y, increasingly with the teacher's confidence; the others shrink
    confident = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    log_p = torch.log_softmax(confident, -1)
    weights = ofa_target_weights(log_p, torch.zeros(3, dtype=torch.long), eps=1.5)
    ratio = weights[:, 0] / log_p[:, 0].exp()
    assert torch.all(ratio > 1) and torch.all(ratio[1:] > ratio[:-1])
    assert torch.all(weights[:, 1:] < log_p[:, 1:].exp())
    # ignore_index masks; gradient; teacher detached
    value = ofa_loss(s, t, torch.tensor([0, -100, 2, 3, 0]), reduction="none")
    assert float(value[1]) == 0.0
    gradcheck(lambda a: ofa_loss(a, t, y, eps=1.5, temperature=2.0), s.clone().requires_grad_(True))
    teacher_gets_no_gradient(ofa_loss, s, t, y, eps=1.5)
    with pytest.raises(ValueError, match="eps"):
        ofa_loss(s, t, y, eps=0.0)

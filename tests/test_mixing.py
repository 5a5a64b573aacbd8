"""Mixup / CutMix batches (full and partial) and the mixed cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.augment import MIXING_PRESETS, MixedBatch, mix_batch, mixed_cross_entropy, sample_beta
from distill.engine.forward import ForwardPass
from distill.objective import Objective, Term
from distill.registry import LOSSES


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one intra-op thread is fastest


def _images(batch: int = 8, channels: int = 2, size: int = 6) -> torch.Tensor:
    # all values distinct, so "which image does this pixel come from" has one answer
    return torch.randperm(batch * channels * size * size).reshape(batch, channels, size, size).float()


def test_mixup_rows_are_the_lam_weighted_blend_of_a_row_and_its_partner() -> None:
    inputs, labels = _images(), torch.arange(8) % 3
    out = mix_batch(inputs, labels, method="mixup", alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, MixedBatch) and out.inputs.shape == inputs.shape and out.inputs.dtype == inputs.dtype
    assert out.lam.shape == (8,) and out.lam.dtype == torch.float32 and bool(out.mixed.all())
    assert len(set(out.lam.tolist())) == 8  # one lambda per sample, not one per batch
    assert bool(((out.lam >= 0) & (out.lam <= 1)).all())
    for i in range(8):
        j = int(out.partner[i])
        lam = float(out.lam[i])
        torch.testing.assert_close(out.inputs[i], lam * inputs[i] + (1 - lam) * inputs[j], rtol=1e-5, atol=1e-4)
        assert int(out.labels_a[i]) == int(labels[i]) and int(out.labels_b[i]) == int(labels[j])
    assert sorted(out.partner.tolist()) == list(range(8))  # partners: a permutation of the batch


def test_mixup_works_on_feature_vectors_and_rejects_integer_inputs() -> None:
    inputs = torch.randn(5, 7)
    out = mix_batch(inputs, torch.zeros(5, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    j = out.partner
    torch.testing.assert_close(out.inputs, out.lam[:, None] * inputs + (1 - out.lam[:, None]) * inputs[j])
    with pytest.raises(ValueError, match="floating-point"):
        mix_batch(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cutmix needs image batches"):
        mix_batch(inputs, torch.zeros(5, dtype=torch.long), method="cutmix")
    with pytest.raises(ValueError, match="method"):
        mix_batch(inputs, torch.zeros(5, dtype=torch.long), method="mixcut")


@pytest.mark.parametrize("batch", [1, 5, 8, 13])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_partial_mixing_mixes_exactly_round_fraction_rows(batch: int, fraction: float, method: str) -> None:
    inputs, labels = _images(batch), torch.arange(batch)
    out = mix_batch(inputs, labels, method=method, fraction=fraction, generator=torch.Generator().manual_seed(batch))
    assert int(out.mixed.sum()) == round(fraction * batch)
    kept = ~out.mixed
    assert torch.equal(out.inputs[kept], inputs[kept])  # unmixed rows are untouched, bit for bit
    assert torch.equal(out.lam[kept], torch.ones(int(kept.sum())))
    assert torch.equal(out.labels_b[kept], labels[kept])
    assert torch.equal(out.labels_b[out.mixed], labels[out.partner[out.mixed]])


def test_cutmix_pastes_one_box_and_lam_is_its_actual_area() -> None:
    inputs, labels = _images(16, size=8), torch.arange(16)
    out = mix_batch(inputs, labels, method="cutmix", alpha=1.0, generator=torch.Generator().manual_seed(3))
    saw_partial_box = False
    for i in range(16):
        j = int(out.partner[i])
        if j == i:
            continue
        from_partner = (out.inputs[i] == inputs[j]).all(dim=0)  # [H, W]
        from_self = (out.inputs[i] == inputs[i]).all(dim=0)
        assert bool((from_partner ^ from_self).all())  # every pixel is one image's, channels together
        rows, cols = torch.nonzero(from_partner, as_tuple=True)
        area = int(from_partner.sum())
        if area:
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(box) == area  # the pasted pixels form a rectangle
            saw_partial_box = saw_partial_box or 0 < area < 64
        assert float(out.lam[i]) == pytest.approx(1 - area / 64)
    assert saw_partial_box


def test_same_rng_state_gives_the_same_mix_and_a_generator_leaves_the_global_rng_alone() -> None:
    inputs, labels = _images(), torch.arange(8)
    for method in ("mixup", "cutmix"):
        torch.manual_seed(5)
        first = mix_batch(inputs, labels, method=method, fraction=0.5)
        torch.manual_seed(5)
        second = mix_batch(inputs, labels, method=method, fraction=0.5)
        assert torch.equal(first.inputs, second.inputs) and torch.equal(first.lam, second.lam)
        other = mix_batch(inputs, labels, method=method, fraction=0.5)  # RNG moved on: a new draw
        assert not torch.equal(first.lam, other.lam)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    a = mix_batch(inputs, labels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)
    b = mix_batch(inputs, labels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.inputs, b.inputs)


def test_beta_draws_follow_the_distribution() -> None:
    draws = sample_beta(1.0, 20000, torch.Generator().manual_seed(0)).numpy()
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / 12) < 0.005  # Beta(1,1) = U(0,1)
    draws = sample_beta(0.2, 20000, torch.Generator().manual_seed(0)).numpy()
    assert abs(draws.var() - 0.25 / 1.4) < 0.01  # Var Beta(a,a) = 1 / (4 (2a + 1))
    tiny = sample_beta(1e-3, 1000, torch.Generator().manual_seed(0))
    assert torch.isfinite(tiny).all() and bool(((tiny >= 0) & (tiny <= 1)).all())


def test_kd_preset_is_partial_mixup_of_a_tenth_with_uniform_lambda() -> None:
    assert MIXING_PRESETS["kd"] == {"method": "mixup", "alpha": 1.0, "fraction": 0.1}
    out = mix_batch(_images(20), torch.arange(20), **MIXING_PRESETS["kd"], generator=torch.Generator().manual_seed(0))
    assert int(out.mixed.sum()) == 2


def assert_teacher_and_student_consume_the_same_mixed_batch(batch: MixedBatch) -> None:
    """Run the engine's ForwardPass on a mixed batch and check both models received ``batch.inputs``."""
    seen: dict[str, torch.Tensor] = {}
    student = nn.Sequential(nn.Flatten(), nn.Linear(batch.inputs[0].numel(), 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(batch.inputs[0].numel(), 3))
    student.register_forward_pre_hook(lambda module, args: seen.__setitem__("student", args[0]))
    teacher.register_forward_pre_hook(lambda module, args: seen.__setitem__("teacher", args[0]))
    with ForwardPass(student, teacher, {"student.logits", "teacher.logits", "batch.labels"}) as forward:
        sources = forward(batch.inputs, batch.labels_a)
    assert seen["student"] is batch.inputs and seen["teacher"] is batch.inputs
    assert sources["batch.inputs"] is batch.inputs
    assert sources["student.logits"].shape == sources["teacher.logits"].shape == (batch.inputs.shape[0], 3)


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_mixed_batch_is_one_tensor_that_teacher_and_student_both_consume(method: str) -> None:
    batch = mix_batch(_images(), torch.arange(8) % 3, method=method, fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert_teacher_and_student_consume_the_same_mixed_batch(batch)


def _independent_mixed_ce(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> np.ndarray:
    ce_a = F.cross_entropy(logits.double(), a, reduction="none")
    ce_b = F.cross_entropy(logits.double(), b, reduction="none")
    return (lam.double() * ce_a + (1 - lam.double()) * ce_b).detach().numpy()


def test_mixed_cross_entropy_is_the_lam_weighted_sum_of_two_cross_entropies() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 5, generator=generator) * 3
    a, b = torch.randint(0, 5, (10,), generator=generator), torch.randint(0, 5, (10,), generator=generator)
    lam = torch.rand(10, generator=generator)
    expected = _independent_mixed_ce(logits, a, b, lam)
    value = mixed_cross_entropy(logits, a, b, lam, reduction="none")
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(mixed_cross_entropy(logits, a, b, lam)) == pytest.approx(expected.mean(), rel=1e-5)
    assert float(mixed_cross_entropy(logits, a, b, lam, reduction="sum")) == pytest.approx(expected.sum(), rel=1e-5)
    # lam = 1 (an unmixed row) is plain cross-entropy whatever labels_b says
    ones = torch.ones(10)
    np.testing.assert_allclose(
        mixed_cross_entropy(logits, a, b, ones, reduction="none").numpy(),
        F.cross_entropy(logits, a, reduction="none").numpy(),
        rtol=1e-6,
    )
    # a scalar lam broadcasts
    torch.testing.assert_close(
        mixed_cross_entropy(logits, a, b, torch.tensor(0.3)), mixed_cross_entropy(logits, a, b, torch.full((10,), 0.3))
    )


def test_mixed_cross_entropy_gradcheck_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    a, b = torch.randint(0, 5, (3, 4), generator=generator), torch.randint(0, 5, (3, 4), generator=generator)
    lam = torch.rand(3, 4, dtype=torch.float64, generator=generator)
    mask = torch.rand(3, 4, generator=generator) > 0.3
    for reduction in ("batchmean", "sum"):
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: mixed_cross_entropy(z, a, b, lam, mask=mask, reduction=r), (logits,)
        )
    assert mixed_cross_entropy(logits, a, b, lam).dtype == torch.float64


def test_mixed_cross_entropy_masking_contract() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator)
    a, b = torch.randint(0, 4, (8,), generator=generator), torch.randint(0, 4, (8,), generator=generator)
    lam = torch.rand(8, generator=generator)
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    clean = logits.clone().requires_grad_(True)
    value = mixed_cross_entropy(clean, a, b, lam, mask=mask)
    value.backward()
    garbage = logits.clone()
    garbage[~mask] = 1e30
    lam_garbage = lam.clone()
    lam_garbage[~mask] = float("nan")
    garbage.requires_grad_(True)
    value_garbage = mixed_cross_entropy(garbage, a, b, lam_garbage, mask=mask)
    value_garbage.backward()
    torch.testing.assert_close(value_garbage, value)
    assert torch.all(garbage.grad[~mask] == 0) and torch.isfinite(garbage.grad).all()
    expected = _independent_mixed_ce(logits[mask], a[mask], b[mask], lam[mask])
    assert float(value.detach()) == pytest.approx(expected.mean(), rel=1e-5)
    per_position = mixed_cross_entropy(logits, a, b, lam, mask=mask, reduction="none")
    assert per_position.shape == (8,) and torch.all(per_position[~mask] == 0)
    # fully masked: exactly 0 and a zero gradient
    empty = logits.clone().requires_grad_(True)
    zero = mixed_cross_entropy(empty, a, b, lam, mask=torch.zeros(8, dtype=torch.bool))
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.all(empty.grad == 0)
    # low precision in, float32 out; extreme logits stay finite
    assert mixed_cross_entropy(logits.bfloat16(), a, b, lam).dtype == torch.float32
    extreme = (logits * 1e4).requires_grad_(True)
    big = mixed_cross_entropy(extreme, a, b, lam)
    big.backward()
    assert torch.isfinite(big) and torch.isfinite(extreme.grad).all()
    with pytest.raises(ValueError, match="labels_b"):
        mixed_cross_entropy(logits, a, b[:4], lam)


def test_mixed_cross_entropy_through_an_objective_with_the_mixed_batch_sources() -> None:
    assert "mixed_cross_entropy" in LOSSES
    batch = mix_batch(torch.randn(6, 4), torch.arange(6) % 3, fraction=0.5, generator=torch.Generator().manual_seed(0))
    term = Term("mix", "mixed_cross_entropy", inputs={"labels_b": "batch.labels_b", "mix_lam": "batch.mix_lam"})
    assert term.sources == {
        "student_logits": "student.logits",
        "labels": "batch.labels",
        "labels_b": "batch.labels_b",
        "mix_lam": "batch.mix_lam",
    }
    logits = torch.randn(6, 3)
    output = Objective([term])({"student.logits": logits, **batch.sources()})
    expected = _independent_mixed_ce(logits, batch.labels_a, batch.labels_b, batch.lam).mean()
    assert float(output.total) == pytest.approx(expected, rel=1e-5)

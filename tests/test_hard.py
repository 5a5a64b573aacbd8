"""HARD's learned spatial augmentation: identity start, bounds, frozen models, disagreement ascent, state."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from distill.augment import HardAugmentation, SpatialAugmenter

SIZE = 16
CLASSES = 4


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one intra-op thread is fastest


class RingTeacher(nn.Module):
    """Rotation-invariant: a linear read-out of the mean intensity of concentric rings inside the
    inscribed circle (rotating the image about its centre leaves each ring's mean unchanged)."""

    def __init__(self, rings: int = 4) -> None:
        super().__init__()
        centre = (SIZE - 1) / 2
        grid = torch.arange(SIZE, dtype=torch.float32) - centre
        radius = torch.sqrt(grid[:, None] ** 2 + grid[None, :] ** 2)
        width = (SIZE / 2) / rings
        masks = torch.stack([((radius >= k * width) & (radius < (k + 1) * width)).float() for k in range(rings)])
        self.register_buffer("masks", masks / masks.sum(dim=(1, 2), keepdim=True))
        self.readout = nn.Linear(rings, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.einsum("bchw,khw->bk", x, self.masks) * 4.0)


def _student() -> nn.Module:
    """Not rotation-invariant (a dense layer on pixels), with batch norm whose statistics could move."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES)
    )


def _images(batch: int = 16, seed: int = 0) -> torch.Tensor:
    """Gaussian blobs straight above the centre, at random distances: an "upright" distribution.

    Rotations move the blobs where the student has never seen one; the ring teacher does not care."""
    generator = torch.Generator().manual_seed(seed)
    centre = (SIZE - 1) / 2
    distance = 1.0 + 5.0 * torch.rand(batch, generator=generator)
    rows = centre - distance
    cols = centre + 0.5 * torch.randn(batch, generator=generator)
    grid = torch.arange(SIZE, dtype=torch.float32)
    dy = grid[None, :, None] - rows[:, None, None]
    dx = grid[None, None, :] - cols[:, None, None]
    blobs = torch.exp(-(dx**2 + dy**2) / 3.0)
    return (blobs + 0.02 * torch.randn(batch, SIZE, SIZE, generator=generator))[:, None]


def _models() -> tuple[nn.Module, nn.Module]:
    """Fresh copies of a rotation-invariant teacher and a student distilled from it on upright images only."""
    teacher, student = _trained_models()
    return copy.deepcopy(teacher), copy.deepcopy(student)


@functools.cache
def _trained_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher, student = RingTeacher(), _student()
    teacher.eval()
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    for step in range(80):
        x = _images(32, seed=1000 + step)
        with torch.no_grad():
            target = torch.softmax(teacher(x), dim=-1)
        loss = torch.nn.functional.kl_div(torch.log_softmax(student(x), dim=-1), target, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for parameter in student.parameters():
        parameter.grad = None
    return teacher, student


def _disagreement(hard: HardAugmentation, teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    """KL(teacher || student) on the augmented batch with a fixed noise draw, models in eval mode."""
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        with torch.no_grad():
            noise = hard.augmenter.sample_noise(x.shape[0], torch.Generator().manual_seed(123))
            return hard.objective(teacher, student, x, noise)[1]["disagreement"]
    finally:
        teacher.train(modes[0])
        student.train(modes[1])


def test_augmenter_starts_at_the_identity() -> None:
    torch.manual_seed(0)
    for use_image in (True, False):
        hard = HardAugmentation(in_channels=3, use_image=use_image, max_rotation=45, max_shear=0.3)
        x = torch.randn(5, 3, 12, 10)
        out = hard.augment(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
        theta = hard.augmenter.theta(x, hard.augmenter.sample_noise(5))
        torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(5, 2, 3))


def test_transforms_stay_within_their_bounds() -> None:
    torch.manual_seed(0)
    augmenter = SpatialAugmenter(in_channels=1, max_rotation=20, max_scale=0.25, max_translation=0.1, max_shear=0.2)
    with torch.no_grad():
        for parameter in augmenter.parameters():
            parameter.normal_(0, 10.0)  # drive the raw outputs far into tanh's saturation
    x = torch.randn(64, 1, 8, 8)
    params = augmenter.transform_parameters(x, augmenter.sample_noise(64) * 10)
    assert params["rotation"].abs().max() <= 20 and params["rotation"].abs().max() > 10
    assert params["scale"].min() >= 1 / 1.25 - 1e-6 and params["scale"].max() <= 1.25 + 1e-6
    assert params["shear"].abs().max() <= 0.2 and params["translation"].abs().max() <= 0.1
    # theta is rotation @ shear / scale: its determinant is 1 / scale^2
    theta = augmenter.theta(x, augmenter.sample_noise(64))
    det = torch.linalg.det(theta[:, :, :2])
    assert torch.all(det >= 1 / 1.25**2 - 1e-5) and torch.all(det <= 1.25**2 + 1e-5)
    with pytest.raises(ValueError, match="padding_mode"):
        SpatialAugmenter(in_channels=1, padding_mode="wrap")


def test_a_pure_rotation_rotates_the_image() -> None:
    """theta's convention: a +90 degree rotation of a square image is a transpose-and-flip of its pixels."""
    augmenter = SpatialAugmenter(in_channels=1, use_image=False, noise_dim=1, max_rotation=90, max_scale=0, max_translation=0)
    with torch.no_grad():
        last = augmenter.head[-1]
        last.bias.copy_(torch.tensor([50.0, 0, 0, 0, 0]))  # tanh(50) = 1 in float32: +90 degrees
    x = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)
    out = augmenter(x, torch.zeros(1, 1))
    # affine_grid maps output to input coordinates: out[row, col] = in[col, n - 1 - row], i.e. rot90
    torch.testing.assert_close(out, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4, rtol=0)


def test_augment_passes_no_gradient_and_is_deterministic() -> None:
    torch.manual_seed(0)
    hard = HardAugmentation(in_channels=1)
    x = _images(4)
    out = hard.augment(x, generator=torch.Generator().manual_seed(1))
    assert not out.requires_grad
    assert all(p.grad is None for p in hard.augmenter.parameters())
    again = hard.augment(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again)
    torch.manual_seed(7)
    a = hard.augment(x)
    torch.manual_seed(7)
    assert torch.equal(a, hard.augment(x))


def test_update_increases_disagreement_while_teacher_and_student_stay_frozen() -> None:
    teacher, student = _models()
    torch.manual_seed(1)
    hard = HardAugmentation(
        in_channels=1, lr=0.05, steps=5, max_rotation=90, max_scale=0.0, max_translation=0.0, noise_dim=4, hidden=16
    )
    x = _images(16)
    teacher_state = copy.deepcopy(teacher.state_dict())
    student_state = copy.deepcopy(student.state_dict())
    before = _disagreement(hard, teacher, student, x)
    generator = torch.Generator().manual_seed(0)
    stats = {}
    for _ in range(4):
        stats = hard.update(teacher, student, x, generator=generator)
    after = _disagreement(hard, teacher, student, x)
    assert after > 1.5 * before, (before, after)
    assert stats["disagreement_last"] > stats["disagreement"] * 0.9 and stats["updates"] == 4.0
    # the teacher is rotation-invariant: the learned rotations barely move its prediction
    assert stats["teacher_shift"] < 0.05 * after
    # the augmenter learned to rotate
    rotation = hard.augmenter.transform_parameters(x, hard.augmenter.sample_noise(16, torch.Generator().manual_seed(3)))
    assert float(rotation["rotation"].detach().abs().mean()) > 5.0
    # teacher and student: same weights and buffers (batch-norm statistics), no gradients, modes restored
    for model, state in ((teacher, teacher_state), (student, student_state)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert all(p.grad is None for p in model.parameters())
    assert student.training and not teacher.training
    assert all(p.requires_grad for p in student.parameters())


def test_teacher_weight_keeps_the_teacher_prediction_in_place() -> None:
    """With a teacher that is NOT invariant, the teacher term restrains the augmentation."""
    torch.manual_seed(0)
    teacher = _student().eval()
    student = _student().eval()
    with torch.no_grad():
        teacher(_images(8)), student(_images(8))
    x = _images(16)
    shifts = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(1)
        hard = HardAugmentation(in_channels=1, lr=0.05, steps=10, teacher_weight=weight, max_rotation=90)
        hard.update(teacher, student, x, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            noise = hard.augmenter.sample_noise(16, torch.Generator().manual_seed(9))
            shifts[weight] = hard.objective(teacher, student, x, noise)[1]["teacher_shift"]
    assert shifts[10.0] < shifts[0.0]


def test_schedule_every_steps_and_steps_per_update() -> None:
    teacher, student = _models()
    hard = HardAugmentation(in_channels=1, every_steps=3, steps=4)
    assert [s for s in range(10) if hard.should_update(s)] == [0, 3, 6, 9]
    x = _images(4)
    hard.update(teacher, student, x)
    hard.update(teacher, student, x)
    step_counts = {int(state["step"]) for state in hard.optimizer.state.values()}
    assert step_counts == {8}
    with pytest.raises(ValueError, match="every_steps"):
        HardAugmentation(in_channels=1, every_steps=0)
    with pytest.raises(ValueError, match="steps"):
        HardAugmentation(in_channels=1, steps=0)


def test_average_gradients_hook_sees_the_augmenter_gradients() -> None:
    teacher, student = _models()
    hard = HardAugmentation(in_channels=1)
    seen = []

    def average(grads: list[torch.Tensor]) -> None:
        seen.append(len(grads))
        for grad in grads:
            grad.zero_()  # e.g. an all-reduce that returns zeros: then nothing may move

    before = copy.deepcopy(hard.augmenter.state_dict())
    hard.update(teacher, student, _images(4), average_gradients=average)
    assert seen == [len(list(hard.augmenter.parameters()))]
    for key, value in hard.augmenter.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_round_trip_restores_augmenter_and_optimizer() -> None:
    teacher, student = _models()
    x = _images(8)
    torch.manual_seed(0)
    original = HardAugmentation(in_channels=1, lr=0.05, max_rotation=60)
    original.update(teacher, student, x, generator=torch.Generator().manual_seed(0))
    original.update(teacher, student, x, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(99)  # a differently initialized copy
    restored = HardAugmentation(in_channels=1, lr=0.05, max_rotation=60)
    assert not torch.equal(restored.augment(x, generator=torch.Generator().manual_seed(4)),
                           original.augment(x, generator=torch.Generator().manual_seed(4)))
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    assert restored.updates == 2
    torch.testing.assert_close(
        restored.augment(x, generator=torch.Generator().manual_seed(4)),
        original.augment(x, generator=torch.Generator().manual_seed(4)),
    )
    # the optimizer state came along: one more identical update keeps them identical
    original.update(teacher, student, x, generator=torch.Generator().manual_seed(2))
    restored.update(teacher, student, x, generator=torch.Generator().manual_seed(2))
    for (name, a), b in zip(original.augmenter.state_dict().items(), restored.augmenter.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    fresh = HardAugmentation(in_channels=1, lr=0.05, max_rotation=60)
    fresh.augmenter.load_state_dict(copy.deepcopy(original.augmenter.state_dict()))  # weights only, no Adam moments
    fresh.update(teacher, student, x, generator=torch.Generator().manual_seed(3))
    original.update(teacher, student, x, generator=torch.Generator().manual_seed(3))
    assert not all(
        torch.allclose(a, b) for a, b in zip(original.augmenter.parameters(), fresh.augmenter.parameters(), strict=True)
    )


def test_rejects_non_image_inputs() -> None:
    hard = HardAugmentation(in_channels=1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        hard.augment(torch.randn(4, 16))
    assert math.isclose(hard.augmenter.max_rotation, 30.0)

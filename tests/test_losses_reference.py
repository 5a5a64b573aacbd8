"""Equality with peer libraries' implementations of the same quantity (skipped when absent).

torchdistill is installed without its dependencies (`pip install --no-deps torchdistill`; its
loss modules need only torch): `make install` does this for the test suite.
"""

from __future__ import annotations

import pytest
import torch

from distill.losses import cross_entropy, hinton_kd


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.1), (2.5, 0.9)])
def test_hinton_kd_equals_torchdistill_kd_loss(temperature: float, alpha: float) -> None:
    mid_level = pytest.importorskip("torchdistill.losses.mid_level")
    torch.manual_seed(0)
    student, teacher = torch.randn(32, 10) * 3, torch.randn(32, 10) * 3
    labels = torch.randint(0, 10, (32,))
    reference = mid_level.KDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=alpha)
    expected = reference({"fc": {"output": student}}, {"fc": {"output": teacher}}, labels)
    ours = alpha * cross_entropy(student, labels) + (1 - alpha) * hinton_kd(student, teacher, temperature=temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    # the soft part alone (torchdistill returns it without the T^2 factor when alpha is 0)
    soft = mid_level.KDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=0)
    torch.testing.assert_close(
        hinton_kd(student, teacher, temperature=temperature) / temperature**2,
        soft({"fc": {"output": student}}, {"fc": {"output": teacher}}, labels),
        rtol=1e-6,
        atol=1e-6,
    )

"""G2SD: masked student inputs, the generic loss, and the two-stage example on digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.config import ConfigError, load_experiment
from distill.engine.forward import mask_patches
from distill.engine.runner import run_experiment
from distill.losses import masked_feature_mse
from tests.conftest import ROOT


def test_mask_patches_hides_whole_patches_in_row_major_order() -> None:
    images = torch.randn(5, 2, 8, 12) + 3.0
    torch.manual_seed(0)
    masked, mask = mask_patches(images, 4, 0.5)
    assert mask.shape == (5, 6) and mask.sum(1).tolist() == [3] * 5
    for b in range(5):
        for p in range(6):
            row, col = divmod(p, 3)
            patch = masked[b, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            original = images[b, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            assert torch.equal(patch, torch.zeros_like(patch)) if mask[b, p] else torch.equal(patch, original)
    torch.manual_seed(0)
    assert torch.equal(mask_patches(images, 4, 0.5)[1], mask)  # drawn from the global RNG
    with pytest.raises(ValueError, match="must divide the image size 8x12"):
        mask_patches(images, 5, 0.5)


def _np_reference(student, teacher, hidden, visible_weight, normalize):
    s, t = student[:, -hidden.shape[1] :], teacher[:, -hidden.shape[1] :]
    if normalize:
        t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    error = ((s - t) ** 2).sum(-1)
    out = []
    for e, h in zip(error, hidden):
        value = e[h].mean() if h.any() else 0.0
        if visible_weight:
            value += visible_weight * (e[~h].mean() if (~h).any() else 0.0)
        out.append(value)
    return np.array(out)


@pytest.mark.parametrize(("visible_weight", "normalize"), [(0.0, True), (0.5, False), (0.25, True)])
def test_the_generic_loss_against_numpy(visible_weight, normalize) -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)  # 1 class token + 4 patches
    teacher = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64) * 2 + 1
    hidden = torch.rand(4, 4, generator=generator) < 0.5
    hidden[0] = True
    kwargs = {"visible_weight": visible_weight, "normalize_target": normalize}
    per_sample = masked_feature_mse(student, teacher, hidden, reduction="none", **kwargs)
    expected = _np_reference(student.numpy(), teacher.numpy(), hidden.numpy(), visible_weight, normalize)
    np.testing.assert_allclose(per_sample.numpy(), expected, rtol=1e-10)
    assert float(masked_feature_mse(student, teacher, hidden, **kwargs)) == pytest.approx(expected.mean())
    rows = torch.tensor([True, False, True, True])
    assert float(masked_feature_mse(student, teacher, hidden, mask=rows, **kwargs)) == pytest.approx(expected[[0, 2, 3]].mean())
    s = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: masked_feature_mse(x, teacher, hidden, mask=rows, **kwargs), (s,))
    t = teacher.clone().requires_grad_(True)
    masked_feature_mse(s, t, hidden, **kwargs).backward()
    assert t.grad is None


def test_only_the_hidden_patches_count_by_default() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8)
    hidden = torch.tensor([[True, False, True, False], [False, False, False, True]])
    target = torch.nn.functional.layer_norm(teacher, (8,), eps=1e-6)
    prediction = torch.where(hidden[..., None], target[:, 1:], torch.randn(2, 4, 8))  # wrong where visible
    prediction = torch.cat([torch.randn(2, 1, 8), prediction], dim=1)  # and on the class token
    assert float(masked_feature_mse(prediction, teacher, hidden)) == pytest.approx(0.0, abs=1e-10)
    assert float(masked_feature_mse(prediction, teacher, hidden, visible_weight=1.0)) > 1.0


def test_reading_the_patch_mask_needs_an_input_mask(tmp_path: Path) -> None:
    experiment = load_experiment(ROOT / "examples" / "g2sd_digits.yaml", [f"output_dir={tmp_path}"])
    raw = experiment.model_dump(exclude_unset=True)
    raw["stages"][1].pop("input_mask")
    with pytest.raises(ConfigError, match=r"stages\[1\].objective.terms\[0\].inputs.patch_mask: loss 'masked_feature_mse' reads batch.patch_mask"):
        load_experiment(raw)


def test_g2sd_two_stages_on_digits(tmp_path: Path) -> None:
    experiment = load_experiment(
        ROOT / "examples" / "g2sd_digits.yaml",
        [f"output_dir={tmp_path}", "training.epochs=2", "evaluation.latency=false", "compare.seeds=[0]"],
    )
    result = run_experiment(experiment)
    rows = {row["name"]: row for row in result.rows}
    assert set(rows) >= {"teacher", "generic", "specific", "specific_only"}
    run_dir = result.run_dir
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    generic = [r["terms"]["generic"] for r in records if r["kind"] == "train" and r["stage"] == "generic"]
    assert generic[-1] < generic[0]  # the decoder learns to predict the teacher's hidden tokens
    assert rows["specific"]["params"] == rows["specific_only"]["params"]

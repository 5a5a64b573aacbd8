"""Linear probing and random teachers (Sarnthein et al., ICML 2023)."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import load_experiment
from distill.data.base import ArraySplit
from distill.engine.probe import features_of, fit_linear_probe
from distill.engine.runner import run_experiment
from distill.models.zoo import mlp
from tests.conftest import tiny_experiment


def test_the_probe_separates_separable_classes_and_not_random_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=generator) * 4
    labels = torch.randint(0, 4, (400,), generator=generator)
    features = centers[labels] + torch.randn(400, 16, generator=generator) + 100.0  # offset: standardization matters
    probe = fit_linear_probe(features[:300], labels[:300], 4)
    assert float((probe(features[300:]).argmax(-1) == labels[300:]).float().mean()) == 1.0
    noise = torch.randn(400, 16, generator=generator)
    random_labels = torch.randint(0, 4, (400,), generator=generator)
    chance = fit_linear_probe(noise[:300], random_labels[:300], 4)
    assert float((chance(noise[300:]).argmax(-1) == random_labels[300:]).float().mean()) < 0.45
    again = fit_linear_probe(features[:300], labels[:300], 4)
    torch.testing.assert_close(again.weight, probe.weight)  # deterministic


def test_features_of_reads_the_penultimate_layer() -> None:
    model = mlp(num_classes=3, input_shape=(4,), hidden=[8]).train()
    split = ArraySplit(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    features = features_of(model, split, "student.features", 4)
    assert features.shape == (10, 8) and model.training
    model.eval()
    torch.testing.assert_close(model.head(features), model(split.inputs))


def test_a_random_teacher_with_linear_probing(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path)
    experiment["models"]["teacher"]["random_init"] = True
    experiment["evaluation"]["linear_probe"] = {}
    experiment["stages"] = [
        {"name": "from_random", "model": "student", "teacher": "teacher",
         "objective": {"terms": [{"loss": "hinton_kd", "params": {"temperature": 1.0}}]}},
    ]
    result = run_experiment(load_experiment(experiment))
    rows = {row["name"]: row for row in result.rows}
    assert set(rows) == {"teacher", "from_random"}
    assert "best" not in rows["teacher"]  # the random teacher was never trained
    for row in rows.values():
        assert 0.5 < row["test"]["probe_accuracy"] <= 1.0  # digits features, even random ones, are fairly separable
    # no label was used, so the student's own head only matches the random teacher: near chance on labels
    assert rows["from_random"]["test"]["accuracy"] < 0.5
    assert "linear probe acc" in (result.run_dir / "report.md").read_text()

"""CKA diagnostics between a student's and a teacher's layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.diagnostics import cka_matrix, default_layers
from distill.models.zoo import mlp, resnet_cifar, vit
from tests.conftest import tiny_experiment, write_yaml


def test_default_layers_are_the_stages() -> None:
    assert default_layers(resnet_cifar(num_classes=10, input_shape=(1, 28, 28), depth=8)) == ["layer1", "layer2", "layer3"]
    assert default_layers(vit(num_classes=10, input_shape=(1, 8, 8), patch_size=2, dim=16, depth=3, heads=2)) == [
        "blocks.0", "blocks.1", "blocks.2"
    ]
    assert default_layers(mlp(num_classes=3, input_shape=(4,), hidden=[8, 8])) == ["features.0", "features.2"]


def test_a_model_against_itself_has_ones_on_the_matching_layers() -> None:
    torch.manual_seed(0)
    model = resnet_cifar(num_classes=10, input_shape=(1, 16, 16), depth=8)
    inputs = torch.randn(64, 1, 16, 16)
    rows, cols, matrix = cka_matrix(model, model, inputs)
    assert rows == cols == ["layer1", "layer2", "layer3"]
    torch.testing.assert_close(matrix.diagonal(), torch.ones(3, dtype=torch.float64))
    assert bool((matrix >= 0).all() and (matrix <= 1 + 1e-9).all())
    with pytest.raises(KeyError, match="nearest existing paths"):
        cka_matrix(model, model, inputs, student_layers=["layer4"])


def test_cka_command_on_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_yaml(tmp_path / "exp.yaml", tiny_experiment(tmp_path / "runs"))
    assert main(["run", str(config), "--set", "training.epochs=1", "--no-progress"]) == 0
    [run_dir] = (tmp_path / "runs" / "tiny").iterdir()
    capsys.readouterr()
    assert main(["cka", str(run_dir), "--student", "distilled", "--teacher", "teacher", "--samples", "200"]) == 0
    out = capsys.readouterr().out
    assert "linear CKA, distilled (rows) vs teacher (columns)" in out and "features.0" in out
    result = json.loads((run_dir / "cka-distilled-teacher.json").read_text())
    assert result["samples"] == 200 and result["student_layers"] == ["features.0"]
    assert 0.0 < result["cka"][0][0] <= 1.0
    assert main(["cka", str(run_dir), "--student", "nope", "--teacher", "teacher"]) == 2
    assert "'nope' is neither a stage of this run" in capsys.readouterr().err

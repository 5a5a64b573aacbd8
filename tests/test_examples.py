"""The shipped examples, run for real (slow: skipped by default, `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import load_experiment
from distill.data.vision import FASHION_MNIST_ROOT
from distill.engine.runner import run_experiment
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_runs_and_reports(tmp_path: Path) -> None:
    experiment = load_experiment(ROOT / "examples" / "quickstart.yaml", [f"output_dir={tmp_path}"])
    result = run_experiment(experiment)
    rows = {row["name"]: row for row in result.rows}
    assert set(rows) == {"teacher", "scratch", "distilled"}
    assert rows["teacher"]["test"]["accuracy"] > 0.95
    assert rows["distilled"]["params"] == rows["scratch"]["params"] < rows["teacher"]["params"] / 10
    for name in ("scratch", "distilled"):
        assert rows[name]["test"]["accuracy"] > 0.8 and 0.8 < rows[name]["test"]["agreement"] <= 1.0
    report = (result.run_dir / "report.md").read_text()
    assert "| distilled | student | teacher |" in report


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_example_for_two_epochs(tmp_path: Path) -> None:
    experiment = load_experiment(
        ROOT / "examples" / "fashion_mnist.yaml",
        [f"output_dir={tmp_path}", "training.epochs=2", "data.train_subset=4000", "scheduler.warmup_steps=4",
         "evaluation.latency=false"],
    )
    result = run_experiment(experiment)
    rows = {row["name"]: row for row in result.rows}
    assert rows["teacher"]["test"]["accuracy"] > 0.5  # 2 epochs on 4,000 images, full 10,000-image test set
    assert all(0.0 <= row["test"]["ece"] <= 1.0 for row in rows.values())

"""The command line: run, validate, list, report, compare, and how errors look."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distill.cli import main
from tests.conftest import ROOT, tiny_experiment, write_yaml


def test_list_prints_every_registry_with_docs(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for expected in ("models", "resnet_cifar", "datasets", "fashion_mnist", "losses", "hinton_kd", "optimizers", "adamw", "schedulers", "cosine"):
        assert expected in out
    assert "Hinton KD" in out  # the one-line docs
    assert main(["list", "losses"]) == 0
    out = capsys.readouterr().out
    assert "cross_entropy" in out and "resnet_cifar" not in out


def test_validate_reports_problems_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("loss: hinton_kd", "loss: hinton").replace("epochs: 20", "epochs: 0").replace("lr: 0.003", "lr: -1"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "2 problems in the experiment" in err
    assert "training.epochs: Input should be greater than or equal to 1 (got 0)" in err
    assert "optimizer.lr: Input should be greater than 0 (got -1)" in err
    # schema problems come first; once they are fixed, the registry checks report the rest
    bad.write_text(text.replace("loss: hinton_kd", "loss: hinton"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "1 problem in the experiment" in err
    assert "unknown loss 'hinton' (did you mean 'hinton_kd'?)" in err
    assert main(["validate", str(ROOT / "examples" / "quickstart.yaml"), "--set", "seed=4", "--print"]) == 0
    captured = capsys.readouterr()
    assert "seed: 4" in captured.out and "ok" in captured.err


def test_run_prints_the_table_and_report_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_yaml(tmp_path / "exp.yaml", tiny_experiment(tmp_path / "runs"))
    assert main(["run", str(config), "--set", "training.epochs=1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Results on the test split" in out and "report:" in out
    [run_dir] = (tmp_path / "runs" / "tiny").iterdir()
    (run_dir / "report.md").unlink()
    shutil.rmtree(run_dir / "plots")
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "| teacher (reference) |" in report and (run_dir / "plots" / "loss.png").is_file()
    assert main(["report", str(tmp_path)]) == 1


def test_resume_refuses_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_yaml(tmp_path / "exp.yaml", tiny_experiment(tmp_path / "runs"))
    assert main(["run", str(config), "--resume", "--no-progress"]) == 2
    assert "no earlier run of 'tiny'" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--set", "seed=1"]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_compare_variants_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    experiment = tiny_experiment(tmp_path / "runs")
    experiment["training"]["epochs"] = 2
    experiment["compare"] = {
        "seeds": [0, 1],
        "variants": {
            "T2": {},
            "T8": {"stages.distilled.objective.terms.kd.params.temperature": 8.0},
        },
    }
    config = write_yaml(tmp_path / "exp.yaml", experiment)
    assert main(["compare", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    [folder] = (tmp_path / "runs" / "tiny").glob("compare-*")
    result = json.loads((folder / "compare.json").read_text())
    rows = {(r["variant"], r["model"]): r for r in result["rows"]}
    # the teacher is identical across variants: one row for all of them
    assert set(rows) == {("(all)", "teacher"), ("T2", "distilled"), ("T8", "distilled")}
    assert all(r["seeds"] == [0, 1] and r["final"]["n"] == 2 for r in rows.values())
    # ... because it was trained once per seed and reused
    t8_teacher = json.loads((folder / "T8" / "seed-0" / "stages" / "teacher" / "summary.json").read_text())
    assert t8_teacher["reused_from"].startswith(str(folder / "T2" / "seed-0"))
    # mean and std across seeds are those of the per-seed finals
    finals = [
        {r["name"]: r for r in json.loads((folder / "T8" / f"seed-{s}" / "final.json").read_text())["rows"]}["distilled"]["test"]["accuracy"]
        for s in (0, 1)
    ]
    assert rows[("T8", "distilled")]["final"]["mean"] == pytest.approx(sum(finals) / 2)
    table = (folder / "compare.md").read_text()
    assert "test accuracy (%), final epoch" in table and "best-val epoch" in table and "±" in table
    assert (folder / "compare.png").is_file()
    assert "T8" in out
    # a later run reuses identical finished stages from the comparison instead of training them
    assert main(["run", str(config), "--set", "seed=1", "--reuse", str(folder), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("reused") == 2 and "stage teacher:" not in err  # nothing was trained
    # a bad variant is refused before anything runs
    experiment["compare"]["variants"]["broken"] = {"stages.distilled.epochs": 0}
    write_yaml(config, experiment)
    assert main(["compare", str(config)]) == 2
    assert "variant 'broken'" in capsys.readouterr().err

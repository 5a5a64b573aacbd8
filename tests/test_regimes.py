"""Training regimes beyond one frozen teacher: online (mutual) distillation, born-again generations,
CoMD's competitive rounds and teacher-assistant chains, on the real digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distill.config import load_experiment
from distill.config.loader import ConfigError
from distill.engine.runner import run_experiment
from distill.losses import mutual_kd
from tests.conftest import tiny_experiment

CE = {"terms": [{"loss": "cross_entropy"}]}


def weights(run_dir: Path, stage: str, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "stages" / stage / name))


# -- the mutual loss -------------------------------------------------------------------------


def reference_dml(logits: torch.Tensor, labels: torch.Tensor, temperature: float, balanced: set[int]) -> torch.Tensor:
    """DML by hand, one sample and one pair at a time (no vectorization shared with the loss)."""
    batch, members, _ = logits.shape
    total = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        for i in range(members):
            value = F.cross_entropy(logits[b, i][None], labels[b][None]).double()
            for j in range(members):
                if j == i:
                    continue
                p_j = torch.softmax(logits[b, j].detach().double() / temperature, -1)  # a peer is a fixed target
                p_i = torch.softmax(logits[b, i].double() / temperature, -1)
                forward = (p_j * (p_j.log() - p_i.log())).sum()
                if i in balanced:
                    reverse = (p_i * (p_i.log() - p_j.log())).sum()
                    q_i = p_i.detach()
                    h_i, h_j = -(q_i * q_i.log()).sum(), -(p_j * p_j.log()).sum()
                    w_rev = h_i / (h_i + h_j)
                    forward = (1 - w_rev) * forward + w_rev * reverse
                value = value + temperature**2 * forward / (members - 1)
            total = total + value
    return total / batch


@pytest.mark.parametrize("balanced", [set(), {0}])
def test_mutual_kd_matches_the_formula_written_out(balanced: set[int]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 7) * 2
    labels = torch.randint(0, 7, (5,))
    value = mutual_kd(logits, labels, temperature=2.0, balanced=sorted(balanced))
    assert value.item() == pytest.approx(reference_dml(logits, labels, 2.0, balanced).item(), rel=1e-5)


def test_mutual_kd_gives_each_network_only_its_own_gradient() -> None:
    """Peers are detached targets: network i's gradient is that of its own DML loss alone."""
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (4,))
    mutual_kd(logits, labels, temperature=3.0).backward()
    own = logits.detach().clone().requires_grad_(True)
    target = torch.softmax(logits.detach()[:, 1] / 3.0, -1)
    loss0 = F.cross_entropy(own[:, 0], labels) + 9.0 * F.kl_div(
        F.log_softmax(own[:, 0] / 3.0, -1), target, reduction="batchmean"
    )
    loss0.backward()
    torch.testing.assert_close(logits.grad[:, 0], own.grad[:, 0])


def test_mutual_kd_gradients_in_float64_masking_and_reduction() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (4,))
    # gradients against the written-out formula's (peers and BD-KD weights held fixed, as in the loss)
    (grad,) = torch.autograd.grad(mutual_kd(logits, labels, temperature=2.0, balanced=[2]), logits)
    (expected,) = torch.autograd.grad(reference_dml(logits, labels, 2.0, {2}), logits)
    torch.testing.assert_close(grad, expected)
    mask = torch.tensor([True, False, True, True])
    garbage = logits.detach().clone()
    garbage[1] = float("inf")
    masked = mutual_kd(garbage, labels, mask=mask)
    assert torch.isfinite(masked)
    assert masked.item() == pytest.approx(mutual_kd(logits.detach()[mask], labels[mask]).item())
    per = mutual_kd(logits.detach(), labels, reduction="none")
    assert per.shape == (4,) and mutual_kd(logits.detach(), labels, reduction="sum").item() == pytest.approx(per.sum().item())
    with pytest.raises(ValueError, match="cohort positions"):
        mutual_kd(logits, labels, balanced=[3])


# -- online distillation from YAML ------------------------------------------------------------


def test_an_online_stage_updates_every_network_of_its_cohort(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 1})
    experiment["models"]["peer"] = {"arch": "mlp", "params": {"hidden": [32]}}
    experiment["stages"] = [
        {
            "name": "mutual",
            "model": "student",
            "cohort": ["peer", "student"],  # a key twice: its copies must start differently
            "objective": {"terms": [{"loss": "mutual_kd", "params": {"temperature": 2.0, "balanced": [0]}}]},
        }
    ]
    result = run_experiment(load_experiment(experiment))
    run_dir = result.run_dir
    summary = json.loads((run_dir / "stages" / "mutual" / "summary.json").read_text())
    assert set(summary["cohort"]) == {"student.0", "peer", "student.2"}
    assert all(r["test"]["accuracy"] > 0.3 for r in summary["cohort"].values())  # chance: 0.1
    # every network moved away from its seeded initialization, and the two copies differ
    from distill.engine.context import RunContext  # noqa: F401  (the runner built them the same way)
    from distill.models.build import build_model

    spec = load_experiment(experiment)
    for name, key in (("model.safetensors", "student"), ("cohort-peer.safetensors", "peer"), ("cohort-student.2.safetensors", "student")):
        trained = weights(run_dir, "mutual", name)
        fresh = build_model(spec.models[key], num_classes=10, input_shape=(64,)).state_dict()
        assert any(not torch.equal(trained[k], fresh[k]) for k in trained), name
    first, copy = weights(run_dir, "mutual"), weights(run_dir, "mutual", "cohort-student.2.safetensors")
    assert any(not torch.equal(first[k], copy[k]) for k in first)
    rows = {row["name"] for row in result.rows}
    assert {"mutual", "mutual:peer", "mutual:student.2"} <= rows


def test_cohort_sources_are_checked_before_anything_runs(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path / "runs")
    experiment["stages"][1]["objective"] = {"terms": [{"loss": "mutual_kd"}]}
    with pytest.raises(ConfigError, match="trains no cohort"):
        load_experiment(experiment)
    experiment["stages"][1]["cohort"] = ["nope"]
    with pytest.raises(ConfigError, match="no model 'nope'"):
        load_experiment(experiment)


# -- born-again generations, competitive rounds, assistant chains -------------------------------


def test_generations_expand_into_stages_each_teaching_the_next(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 1})
    experiment["stages"][1] = {
        "name": "ban",
        "model": "teacher",
        "teacher": "teacher",
        "generations": 3,
        "objective": {"terms": [{"loss": "gt_weighted_kd", "params": {"ground_truth_weight": 0.3, "temperature": 1.0}}]},
    }
    spec = load_experiment(experiment)
    assert [(s.name, s.teacher) for s in spec.stages] == [
        ("teacher", None), ("ban-g1", "teacher"), ("ban-g2", "ban-g1"), ("ban", "ban-g2")
    ]
    result = run_experiment(spec)
    rows = {row["name"]: row for row in result.rows}
    assert {"ban-g1", "ban-g2", "ban"} <= set(rows)
    assert rows["ban"]["teacher"] == "ban-g2"
    # each generation is its own network (trained from its predecessor, not a copy of it)
    assert any(not torch.equal(a, b) for a, b in zip(weights(result.run_dir, "ban-g1").values(), weights(result.run_dir, "ban").values()))


def test_competitive_rounds_update_the_teacher_where_the_student_wins(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 1})
    experiment["stages"][1]["competitive"] = {"rounds": 2, "teacher_epochs": 1, "teacher_lr": 0.001}
    spec = load_experiment(experiment)
    names = [(s.name, s.model, s.teacher, s.init_from) for s in spec.stages]
    assert names == [
        ("teacher", "teacher", None, None),
        ("distilled-r1", "student", "teacher", None),
        ("distilled-r1-teacher", "teacher", "distilled-r1", "teacher"),
        ("distilled", "student", "distilled-r1-teacher", "distilled-r1"),
    ]
    assert spec.stages[2].train_rows.model == "distilled-r1" and spec.stages[2].optimizer.lr == 0.001
    result = run_experiment(spec)
    summary = json.loads((result.run_dir / "stages" / "distilled-r1-teacher" / "summary.json").read_text())
    kept = summary["train_rows"]
    # the rows are exactly those where the round-1 student's cross-entropy is below the teacher's
    from distill.engine.context import RunContext
    from distill.engine.teachers import per_sample_cross_entropy
    from distill.data import load_data

    data = load_data(spec.data)
    context = RunContext.__new__(RunContext)  # only stage_model / frozen are needed
    context.experiment, context.data, context.run_dir = spec, data, result.run_dir
    student = context.stage_model("distilled-r1")
    teacher = context.stage_model("teacher")
    a = per_sample_cross_entropy(student, data.train.inputs, data.train.labels, 256, torch.device("cpu"))
    b = per_sample_cross_entropy(teacher, data.train.inputs, data.train.labels, 256, torch.device("cpu"))
    assert kept["rows"] == int((a < b).sum()) or kept["rows"] == spec.data.batch_size
    assert 0 < kept["rows"] < kept["of"] == len(data.train)
    # the updated teacher continued from the first one and changed
    assert any(
        not torch.equal(weights(result.run_dir, "teacher")[k], v) for k, v in weights(result.run_dir, "distilled-r1-teacher").items()
    )


def test_competitive_needs_a_teacher_stage(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path / "runs")
    experiment["models"]["teacher"]["random_init"] = True
    experiment["stages"] = [dict(experiment["stages"][1], competitive={"rounds": 2})]
    with pytest.raises(ConfigError, match="must name an earlier stage"):
        load_experiment(experiment)


def test_a_teacher_assistant_chain_runs_as_successive_stages(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 1})
    experiment["models"]["assistant"] = {"arch": "mlp", "params": {"hidden": [32]}}
    kd = {"terms": [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "hinton_kd", "weight": 0.5}]}
    experiment["stages"] = [
        {"name": "teacher", "model": "teacher", "objective": CE},
        {"name": "assistant", "model": "assistant", "teacher": "teacher", "objective": kd},
        {"name": "student", "model": "student", "teacher": "assistant", "objective": kd},
    ]
    result = run_experiment(load_experiment(experiment))
    rows = {row["name"]: row for row in result.rows}
    assert rows["assistant"]["teacher"] == "teacher" and rows["student"]["teacher"] == "assistant"
    assert rows["teacher"]["params"] > rows["assistant"]["params"] > rows["student"]["params"]
    # the agreement column compares with the last stage's teacher: the assistant
    assert rows["assistant"]["is_reference"]


# -- several teachers ----------------------------------------------------------------------------


def multi_teacher_experiment(tmp_path: Path, **stage: object) -> dict:
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 1})
    experiment["models"]["wide"] = {"arch": "mlp", "params": {"hidden": [128]}}
    experiment["stages"] = [
        {"name": "teacher", "model": "teacher", "objective": CE},
        {"name": "wide", "model": "wide", "objective": CE},
        {
            "name": "distilled",
            "model": "student",
            "teachers": ["teacher", {"model": "wide", "weight": 3.0, "temperature": 2.0}],
            "objective": {
                "terms": [
                    {"name": "ce", "loss": "cross_entropy", "weight": 0.5},
                    {"name": "kd", "loss": "multi_teacher_kd", "weight": 0.5, "params": {"temperature": 2.0}},
                ]
            },
            **stage,
        },
    ]
    return experiment


def test_a_multi_teacher_stage_runs_every_teacher_and_combines_them(tmp_path: Path) -> None:
    from distill.data import load_data
    from distill.engine.context import RunContext
    from distill.engine.forward import ForwardPass
    from distill.engine.teachers import TeacherEnsemble
    from distill.losses.multi_teacher import combine_teachers

    spec = load_experiment(multi_teacher_experiment(tmp_path, combine={"method": "confidence", "offload": True}))
    result = run_experiment(spec)
    rows = {row["name"]: row for row in result.rows}
    assert {"teacher", "wide", "distilled:ensemble", "distilled"} <= set(rows)
    assert rows["distilled"]["test"]["accuracy"] > 0.3
    # the sources: each teacher's logits over its own temperature, the weights, the ensemble
    data = load_data(spec.data)
    context = RunContext.__new__(RunContext)
    context.experiment, context.data, context.run_dir = spec, data, result.run_dir
    context.accelerator = type("A", (), {"device": torch.device("cpu")})()
    ensemble = context.teacher_of(spec.stages[2])
    assert isinstance(ensemble, TeacherEnsemble) and ensemble.offload
    x, y = data.test.inputs[:8], data.test.labels[:8]
    student = context.build_network("student")
    with ForwardPass(student, ensemble, {"student.logits", "teachers.logits", "teachers.weights", "teacher.logits"}) as forward:
        sources = forward(x, y)
    first, second = context.stage_model("teacher").eval(), context.stage_model("wide").eval()
    with torch.no_grad():
        expected = torch.stack([first(x), second(x) / 2.0], dim=1)
    torch.testing.assert_close(sources["teachers.logits"], expected)
    torch.testing.assert_close(sources["teachers.weights"], torch.tensor([[0.25, 0.75]]).expand(8, 2))
    combined = combine_teachers(expected, torch.tensor([0.25, 0.75]), y, method="confidence", confidence="label")
    torch.testing.assert_close(sources["teacher.logits"], combined)
    assert torch.allclose(sources["teacher.logits"].exp().sum(-1), torch.ones(8))


def test_teachers_are_checked_before_anything_runs(tmp_path: Path) -> None:
    experiment = multi_teacher_experiment(tmp_path)
    experiment["stages"][2]["teacher"] = "teacher"
    with pytest.raises(ConfigError, match="not both"):
        load_experiment(experiment)
    experiment = multi_teacher_experiment(tmp_path)
    experiment["stages"][2]["teachers"] = ["teacher", "nope"]
    with pytest.raises(ConfigError, match="'nope' is neither an earlier stage"):
        load_experiment(experiment)
    experiment["stages"][2]["teachers"] = ["teacher"]
    with pytest.raises(ConfigError, match="two or more"):
        load_experiment(experiment)
    experiment = multi_teacher_experiment(tmp_path)
    experiment["stages"][2]["objective"]["terms"][1]["inputs"] = {"teachers_logits": "teachers.logits"}
    experiment["stages"][1]["objective"] = {"terms": [{"loss": "multi_teacher_kd"}]}
    with pytest.raises(ConfigError, match="has one teacher or none"):
        load_experiment(experiment)


def test_precomputed_teachers_train_exactly_like_live_ones(tmp_path: Path) -> None:
    """`combine.precompute` runs each teacher alone, once; the student's training is unchanged."""
    live = run_experiment(load_experiment(multi_teacher_experiment(tmp_path / "live")))
    experiment = multi_teacher_experiment(tmp_path / "pre", combine={"precompute": True})
    experiment["stages"][2]["objective"]["terms"][1]["loss"] = "multi_teacher_kd"
    pre = run_experiment(load_experiment(experiment))
    for key, value in weights(live.run_dir, "distilled").items():
        torch.testing.assert_close(weights(pre.run_dir, "distilled")[key], value, rtol=1e-5, atol=1e-6)
    summary = json.loads((pre.run_dir / "stages" / "distilled" / "summary.json").read_text())
    assert "agreement" in summary["final"]["test"]  # with the ensemble, from the precomputed logits
    augmented = multi_teacher_experiment(tmp_path / "aug", combine={"precompute": True})
    augmented["data"]["augment"] = {"hflip": True}
    with pytest.raises(ValueError, match="must not change between epochs"):
        run_experiment(load_experiment(augmented))


# -- augmentation in the engine -------------------------------------------------------------------


def test_mixup_gives_teacher_and_student_the_same_mixed_inputs() -> None:
    from distill.config.schema import MixSpec
    from distill.engine.forward import ForwardPass

    seen: dict[str, torch.Tensor] = {}
    student, teacher = torch.nn.Linear(12, 4), torch.nn.Linear(12, 4)
    student.register_forward_hook(lambda m, args, out: seen.__setitem__("student", args[0].clone()))
    teacher.register_forward_hook(lambda m, args, out: seen.__setitem__("teacher", args[0].clone()))
    x, y = torch.randn(10, 12), torch.arange(10) % 4
    spec = MixSpec.model_validate({"preset": "kd"})  # MIX-KD: partial mixup of 10% of the batch
    assert (spec.method, spec.alpha, spec.fraction) == ("mixup", 1.0, 0.1)
    spec = MixSpec(method="mixup", alpha=1.0, fraction=0.5)
    torch.manual_seed(0)
    with ForwardPass(student, teacher, {"student.logits", "teacher.logits", "batch.labels_b", "batch.mix_lam"}, mix=spec) as forward:
        sources = forward(x, y)
    assert torch.equal(seen["student"], seen["teacher"])
    changed = (seen["student"] != x).any(dim=1)
    assert int(changed.sum()) == 5  # exactly half the rows were mixed
    lam = sources["batch.mix_lam"]
    assert torch.all(lam[~changed] == 1.0) and torch.all((lam[changed] >= 0) & (lam[changed] <= 1))
    # a mixed row is lam * x_a + (1 - lam) * x_b for a row b of the batch whose label is labels_b
    for row in torch.nonzero(changed).flatten():
        partners = [b for b in range(10) if torch.allclose(seen["student"][row], lam[row] * x[row] + (1 - lam[row]) * x[b], atol=1e-6)]
        assert partners and int(y[partners[0]]) == int(sources["batch.labels_b"][row])
    # evaluation passes are never mixed
    student.eval()
    with ForwardPass(student, teacher, {"student.logits", "teacher.logits"}, mix=spec) as forward:
        forward(x, y)
    assert torch.equal(seen["student"], x)


def test_mix_and_hard_stages_run_from_yaml_and_resume(tmp_path: Path) -> None:
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 2})
    experiment["models"]["student"] = {"arch": "resnet8", "params": {"width": 0.25}}
    experiment["checkpoint"] = {"every_steps": 5}
    stage = experiment["stages"][1]
    stage["mix"] = {"method": "cutmix", "alpha": 1.0, "fraction": 0.5}
    stage["hard"] = {"every_steps": 2, "params": {"lr": 0.01, "max_rotation": 20.0}}
    stage["objective"]["terms"][0] = {"name": "ce", "loss": "mixed_cross_entropy", "weight": 0.5}
    result = run_experiment(load_experiment(experiment))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    hard = [r for r in records if r["kind"] == "hard"]
    assert hard and all(r["disagreement"] >= 0 for r in hard)
    # stopped after its first checkpoint and resumed, the stage ends exactly where it did: the
    # augmenter and its optimizer are part of the checkpoint
    import shutil

    checkpoints = sorted((result.run_dir / "checkpoints" / "distilled").glob("step-*"))
    assert checkpoints
    finished = weights(result.run_dir, "distilled")
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    shutil.rmtree(result.run_dir / "stages" / "distilled")
    (result.run_dir / "final.json").unlink()
    resumed = run_experiment(load_experiment(experiment), run_dir=result.run_dir)
    for key, value in finished.items():
        assert torch.equal(value, weights(resumed.run_dir, "distilled")[key]), key
    rows = {row["name"]: row for row in result.rows}
    assert rows["distilled"]["test"]["accuracy"] > 0.2


def test_the_python_examples_of_the_regimes_page_run() -> None:
    """docs/regimes.md: every ```python block runs as written."""
    import contextlib
    import io
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "regimes.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    outputs = []
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "regimes.md", "exec"), {})  # noqa: S102 - our own documentation
        outputs.append(out.getvalue().strip())
    assert outputs == ["(4, 2, 3) True", "True"]

"""Active distillation: the selection strategies (random, PCoreSet, RAD) and the round loop on digits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distill.active import (
    ActiveSpec,
    check_active,
    informativeness,
    rad_probabilities,
    run_active,
    sample_inclusion,
    select_pcoreset,
    select_rad,
    select_random,
    teacher_mistake_rate,
)
from distill.config import load_experiment
from distill.data import load_data
from distill.selection import load_selection
from tests.conftest import tiny_experiment


def _dirichlet(n: int, classes: int, seed: int, concentration: float = 0.5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.dirichlet(np.full(classes, concentration), size=n))


def _probs_with_margin(margins: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Probability rows whose top-2 margin is exactly ``margins`` (top class 0, runner-up 1)."""
    rest = 0.02
    second = (1.0 - rest - margins) / 2.0
    probs = torch.full((len(margins), classes), rest / (classes - 2), dtype=torch.float64)
    probs[:, 0] = second + margins
    probs[:, 1] = second
    return probs


# ---------------------------------------------------------------------------------- random


def test_random_selection_has_the_size_asked_no_duplicates_and_skips_queried_rows() -> None:
    queried = torch.arange(0, 100, 3)
    generator = torch.Generator().manual_seed(0)
    new = select_random(100, 40, queried=queried, generator=generator)
    assert len(new) == 40 and len(set(new.tolist())) == 40
    assert not set(new.tolist()) & set(queried.tolist())
    everything = select_random(100, 100 - len(queried), queried=queried, generator=generator)
    assert sorted(everything.tolist() + queried.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="only 66 are not queried"):
        select_random(100, 67, queried=queried)


# ---------------------------------------------------------------------------------- PCoreSet


def test_pcoreset_picks_the_farthest_row_from_everything_selected_so_far() -> None:
    probs = _dirichlet(200, 5, seed=1)
    queried = torch.tensor([3, 50, 120])
    picks = select_pcoreset(probs, 25, queried=queried)
    assert len(picks) == 25 and len(set(picks.tolist())) == 25
    assert not set(picks.tolist()) & set(queried.tolist())
    centers = queried.tolist()
    for pick in picks.tolist():
        candidates = [i for i in range(200) if i not in centers]
        nearest = torch.cdist(probs[candidates], probs[centers]).min(dim=1).values
        assert pick == candidates[int(torch.argmax(nearest))]
        assert float(torch.cdist(probs[[pick]], probs[centers]).min()) == pytest.approx(float(nearest.max()))
        centers.append(pick)


def test_pcoreset_covers_every_cluster_before_repeating_one() -> None:
    # Five tight clusters in the probability simplex, of very unequal sizes (400, 10, 10, 10, 10).
    generator = torch.Generator().manual_seed(2)
    sizes = [400, 10, 10, 10, 10]
    cluster = torch.cat([torch.full((size,), c) for c, size in enumerate(sizes)])
    probs = torch.full((len(cluster), 5), 0.02, dtype=torch.float64)
    probs[torch.arange(len(cluster)), cluster] = 0.92
    probs = probs + 0.01 * torch.rand(probs.shape, generator=generator, dtype=torch.float64)
    probs = probs / probs.sum(dim=1, keepdim=True)
    queried = torch.tensor([0])  # one row of the big cluster is already queried
    picks = select_pcoreset(probs, 4, queried=queried)
    assert sorted(cluster[picks].tolist()) == [1, 2, 3, 4]  # each small cluster once, none of the big one
    more = select_pcoreset(probs, 9, queried=queried)
    assert sorted(cluster[more[:4]].tolist()) == [1, 2, 3, 4]
    # with nothing queried, the first five picks cover the five clusters
    assert sorted(cluster[select_pcoreset(probs, 5)].tolist()) == [0, 1, 2, 3, 4]
    # random selection, for contrast, lands mostly in the big cluster
    random_rows = select_random(len(cluster), 4, queried=queried, generator=torch.Generator().manual_seed(0))
    assert (cluster[random_rows] == 0).sum() >= 3


# ---------------------------------------------------------------------------------- RAD


def _worst_case_value(p: np.ndarray, gains: np.ndarray, k: float) -> float:
    """sum p_i g_i minus the k largest p_i g_i (fractional k: a share of the next one)."""
    values = np.sort(p * gains)[::-1]
    whole = int(np.floor(k))
    spoiled = values[:whole].sum() + (k - whole) * (values[whole] if whole < len(values) else 0.0)
    return float(values.sum() - spoiled)


def _linear_program_optimum(gains: np.ndarray, count: int, k: float) -> float:
    from scipy.optimize import linprog

    n = len(gains)
    # variables: p (n), t, s (n); maximize sum g p - k t - sum s, s_i >= g_i p_i - t, s >= 0, 0 <= p <= 1, sum p = count
    c = np.concatenate([-gains, [k], np.ones(n)])
    a_ub = np.hstack([np.diag(gains), -np.ones((n, 1)), -np.eye(n)])
    a_eq = np.concatenate([np.ones(n), [0.0], np.zeros(n)])[None]
    bounds = [(0, 1)] * n + [(None, None)] + [(0, None)] * n
    result = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[count], bounds=bounds, method="highs")
    assert result.success
    return float(-result.fun)


@pytest.mark.parametrize("k", [0.0, 1.0, 3.5, 12.0, 40.0])
def test_rad_probabilities_solve_the_robust_game(k: float) -> None:
    gains = torch.rand(60, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.9 + 0.05
    p = rad_probabilities(gains, 8, k).numpy()
    assert p.sum() == pytest.approx(8.0) and p.min() >= 0.0 and p.max() <= 1.0
    assert _worst_case_value(p, gains.numpy(), k) == pytest.approx(_linear_program_optimum(gains.numpy(), 8, k), abs=1e-6)


def test_rad_differs_from_uncertainty_sampling_by_hedging_against_the_teachers_mistakes() -> None:
    gains = torch.linspace(0.99, 0.01, 100, dtype=torch.float64)  # row 0 is the most informative
    top = rad_probabilities(gains, 10, 0.0)
    assert top.tolist() == [1.0] * 10 + [0.0] * 90  # no mistakes: plain uncertainty sampling, the top 10
    p = rad_probabilities(gains, 10, 15.0)
    support = (p > 0).nonzero().squeeze(1)
    assert len(support) > 15 + 10 and support.tolist() == list(range(len(support)))  # a top set, wider than k + count
    fractional = (p > 0) & (p < 1)
    level = (p * gains)[fractional]
    assert torch.allclose(level[:-1], level[0])  # p_i g_i equalized (the last row may hold a remainder)
    assert p[0] < p[len(support) // 2]  # the most uncertain row is drawn *less* often: p ~ 1/g
    assert p[len(support):].sum() == 0


def test_rad_prefers_informative_rows_the_teacher_likely_labels_correctly() -> None:
    # 300 unqueried rows with the student's margins spread over (0, 1); as the paper observes, the
    # teacher errs on the hardest rows: here on the 30 rows of smallest student margin.
    margins = torch.linspace(0.0, 0.98, 300, dtype=torch.float64)
    student = _probs_with_margin(margins)
    teacher_wrong = torch.zeros(300, dtype=torch.bool)
    teacher_wrong[:30] = True
    gains = informativeness(student)
    # the teacher's soft labels on 50 rows queried before: 90% confident on average, so k = 0.1 * 300 = 30
    queried_teacher = torch.full((50, 10), 0.1 / 9, dtype=torch.float64)
    queried_teacher[:, 0] = 0.9
    assert teacher_mistake_rate(queried_teacher) == pytest.approx(0.1)
    student_all = torch.cat([student, _probs_with_margin(torch.full((50,), 0.5, dtype=torch.float64))])
    queried = torch.arange(300, 350)

    uncertainty = torch.argsort(gains, descending=True, stable=True)[:20]
    assert teacher_wrong[uncertainty].all()  # plain uncertainty sampling queries only rows the teacher gets wrong

    correct, informative = [], []
    for seed in range(20):
        picks = select_rad(student_all, 20, queried=queried, teacher_probs=queried_teacher, generator=torch.Generator().manual_seed(seed))
        assert len(picks) == 20 and len(set(picks.tolist())) == 20 and int(picks.max()) < 300
        correct.append(float((~teacher_wrong[picks]).double().mean()))
        informative.append(float(gains[picks].mean()))
    assert np.mean(correct) > 0.7  # mostly rows the teacher labels correctly ...
    assert np.mean(informative) > float(gains.mean()) + 0.2  # ... that are far more informative than average
    random_gain = float(gains[select_random(300, 20, generator=torch.Generator().manual_seed(0))].mean())
    assert np.mean(informative) > random_gain + 0.15


def test_sample_inclusion_draws_distinct_rows_with_the_given_probabilities() -> None:
    p = torch.tensor([1.0, 0.5, 0.5, 0.25, 0.75, 0.0, 1.0], dtype=torch.float64)
    counts = torch.zeros(len(p))
    for seed in range(4000):
        rows = sample_inclusion(p, 4, generator=torch.Generator().manual_seed(seed))
        assert len(rows) == 4 and len(set(rows.tolist())) == 4
        counts[rows] += 1
    assert torch.allclose(counts / 4000, p.float(), atol=0.03)
    assert counts[5] == 0 and counts[0] == counts[6] == 4000


# ---------------------------------------------------------------------------------- config checks


def _tiny(tmp_path: Path, **stage_changes) -> dict:
    raw = tiny_experiment(tmp_path / "runs")
    raw["training"]["epochs"] = 3
    raw["stages"][1]["objective"] = {"terms": [{"loss": "hinton_kd", "params": {"temperature": 2.0}}]}
    raw["stages"][1].update(stage_changes)
    return raw


def test_active_spec_rejects_unknown_keys_and_repeated_strategies() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ActiveSpec(stage="s", budget=5)
    with pytest.raises(ValidationError, match="distinct"):
        ActiveSpec(stage="s", strategies=["rad", "rad"])
    with pytest.raises(ValidationError):
        ActiveSpec(stage="s", strategies=["badge"])
    assert ActiveSpec(stage="s", initial=10, per_round=5, rounds=3).budgets() == [10, 15, 20, 25]


def test_check_active_names_the_key_at_fault(tmp_path: Path) -> None:
    experiment = load_experiment(_tiny(tmp_path))
    check_active(experiment, ActiveSpec(stage="distilled"))
    with pytest.raises(ValueError, match=r"active.stage: no stage 'student'; stages: teacher, distilled"):
        check_active(experiment, ActiveSpec(stage="student"))
    with pytest.raises(ValueError, match=r"active.stage: stage 'teacher' has no `teacher`"):
        check_active(experiment, ActiveSpec(stage="teacher"))
    with pytest.raises(ValueError, match=r"active.pool: 100 rows cannot hold the last budget, 500 rows"):
        check_active(experiment, ActiveSpec(stage="distilled", pool=100))
    with pytest.raises(ValueError, match=r"active: the experiment has no `active:` section"):
        check_active(experiment)
    raw = _tiny(tmp_path, init_from="teacher")
    raw["models"]["student"] = raw["models"]["teacher"]
    with pytest.raises(ValueError, match=r"active.stage: stage 'distilled' starts from `init_from: teacher`"):
        check_active(load_experiment(raw), ActiveSpec(stage="distilled"))
    raw = _tiny(tmp_path)
    raw["stages"] = raw["stages"][1:]
    raw["models"]["teacher"]["random_init"] = True
    with pytest.raises(ValueError, match=r"models.teacher, which has no `weights:`"):
        check_active(load_experiment(raw), ActiveSpec(stage="distilled"))


# ---------------------------------------------------------------------------------- the round loop


SPEC = ActiveSpec(stage="distilled", initial=30, per_round=20, rounds=2, seeds=[0, 1], pool=400, data={"batch_size": 16})


class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __getattr__(self, name: str):
        return lambda *args: None

    def on_message(self, text: str) -> None:
        self.lines.append(text)


@pytest.fixture(scope="module")
def digits_active(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("active")
    experiment = load_experiment(_tiny(root))
    messages = Messages()
    cells: list[tuple[str, int, int, int]] = []
    result = run_active(
        experiment, output_dir=root / "active", spec=SPEC, callbacks=[messages], on_cell=lambda *cell: cells.append(cell)
    )
    return {"root": root, "experiment": experiment, "result": result, "messages": messages.lines, "cells": cells}


def test_the_loop_writes_every_round_with_the_right_budgets(digits_active: dict) -> None:
    folder = digits_active["result"].folder
    result = json.loads((folder / "active.json").read_text())
    assert result["budgets"] == [30, 50, 70] and result["pool"] == 400
    assert len(result["cells"]) == 3 * 2 * 3
    assert {(c["strategy"], c["seed"], c["round"], c["queried"]) for c in result["cells"]} == {
        (s, seed, r, 30 + 20 * r) for s in ("random", "pcoreset", "rad") for seed in (0, 1) for r in range(3)
    }
    for cell in result["cells"]:
        assert 0.0 <= cell["accuracy"] <= 1.0 and 0.0 <= cell["teacher_accuracy_on_queried"] <= 1.0
    for seed in (0, 1):  # round 0 is trained once per seed and shared by the strategies
        firsts = {c["accuracy"] for c in result["cells"] if c["seed"] == seed and c["round"] == 0}
        assert len(firsts) == 1
    # trainings: 2 seeds x (1 shared round 0 + 3 strategies x 2 rounds)
    assert len(digits_active["cells"]) == 2 * (1 + 3 * 2)
    summary = result["summary"]["pcoreset"][2]
    accuracies = [c["accuracy"] for c in result["cells"] if c["strategy"] == "pcoreset" and c["round"] == 2]
    assert summary["queried"] == 70 and summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
    markdown = (folder / "active.md").read_text()
    assert "| strategy | 30 queried | 50 queried | 70 queried |" in markdown
    assert markdown.index("| random |") < markdown.index("| pcoreset |") < markdown.index("| rad |")
    assert (folder / "active.png").stat().st_size > 0
    assert any("pcoreset, round 2/2: queried 20 new rows" in line for line in digits_active["messages"])


def test_selections_grow_by_distinct_new_rows_that_a_run_trains_on(digits_active: dict) -> None:
    folder = digits_active["result"].folder
    experiment = digits_active["experiment"]
    train = load_data(experiment.data).train
    for seed in (0, 1):
        for strategy in ("random", "pcoreset", "rad"):
            previous: set[int] = set()
            for round_index, budget in enumerate((30, 50, 70)):
                cell = folder / f"seed-{seed}" / ("initial" if round_index == 0 else f"{strategy}/round-{round_index}")
                rows = load_selection(cell, train).tolist()
                assert len(rows) == budget == len(set(rows))
                assert previous < set(rows)  # the queried set only grows; no row is queried twice
                previous = set(rows)
            run_config = cell / "run" / "config.yaml"
            assert f"select: {cell.resolve()}" in run_config.read_text()
            run = load_experiment(run_config)
            assert len(load_data(run.data).train) == 70  # the round's run trained on the queried rows only
            assert [stage.name for stage in run.stages] == ["distilled"]
    # different seeds query different rows
    first = [load_selection(folder / f"seed-{s}" / "initial", train).tolist() for s in (0, 1)]
    assert first[0] != first[1]


def test_a_rerun_resumes_without_recomputation(digits_active: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.active
    import distill.engine.runner

    folder = digits_active["result"].folder
    before = json.loads((folder / "active.json").read_text())["cells"]

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    real_run = distill.engine.runner.run_experiment
    monkeypatch.setattr(distill.engine.runner, "run_experiment", refuse)
    monkeypatch.setattr(distill.active, "_probabilities", refuse)
    again = run_active(digits_active["experiment"], output_dir=folder, spec=SPEC)
    assert [(c["strategy"], c["seed"], c["round"], c["accuracy"]) for c in again.result["cells"]] == [
        (c["strategy"], c["seed"], c["round"], c["accuracy"]) for c in before
    ]
    # an interrupted last round (its selection written, no result) trains again, and only it
    cell = folder / "seed-1" / "rad" / "round-2"
    (cell / "result.json").unlink()
    shutil.rmtree(cell / "run")
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["run_dir"])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(distill.engine.runner, "run_experiment", counting)
    resumed = run_active(digits_active["experiment"], output_dir=folder, spec=SPEC)
    assert calls == [cell / "run"]
    accuracy = {(c["strategy"], c["seed"], c["round"]): c["accuracy"] for c in resumed.result["cells"]}
    assert accuracy[("rad", 1, 2)] == next(c["accuracy"] for c in before if (c["strategy"], c["seed"], c["round"]) == ("rad", 1, 2))
    # another configuration in the same folder is refused
    with pytest.raises(ValueError, match="another configuration"):
        run_active(digits_active["experiment"], output_dir=folder, spec=SPEC.model_copy(update={"initial": 40}))


def test_a_models_teacher_with_weights_needs_no_teacher_stage(digits_active: dict, tmp_path: Path) -> None:
    weights = digits_active["result"].folder / "teacher" / "stages" / "teacher" / "model.safetensors"
    raw = _tiny(tmp_path)
    raw["stages"] = raw["stages"][1:]
    raw["models"]["teacher"]["weights"] = str(weights)
    spec = SPEC.model_copy(update={"strategies": ["rad"], "rounds": 1, "seeds": [0]})
    result = run_active(load_experiment(raw), output_dir=tmp_path / "active", spec=spec)
    assert [(c["round"], c["queried"]) for c in result.result["cells"]] == [(0, 30), (1, 50)]
    assert not (tmp_path / "active" / "teacher").exists()
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "active" / "teacher_pool.safetensors"))["probs"]
    theirs = load_file(str(digits_active["result"].folder / "teacher_pool.safetensors"))["probs"]
    assert torch.equal(ours, theirs)  # the same teacher over the same pool
    # round 0 with the same seed and teacher gives the same student as in the teacher-stage run
    first = next(c for c in digits_active["result"].result["cells"] if c["seed"] == 0 and c["round"] == 0)
    assert result.result["cells"][0]["accuracy"] == pytest.approx(first["accuracy"])


def test_the_cli_runs_the_active_section_of_a_yaml_file(digits_active: dict, tmp_path: Path) -> None:
    """`distill active exp.yaml`: the section from YAML, a table on stdout and the report files."""
    import yaml

    from distill.cli import main

    weights = digits_active["result"].folder / "teacher" / "stages" / "teacher" / "model.safetensors"
    raw = _tiny(tmp_path)
    raw["stages"] = raw["stages"][1:]
    raw["models"]["teacher"]["weights"] = str(weights)
    raw["active"] = {"stage": "distilled", "strategies": ["random", "pcoreset"], "initial": 30, "per_round": 20,
                     "rounds": 1, "pool": 400, "data": {"batch_size": 16}}
    path = tmp_path / "active.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["active", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "out" / "active.json").read_text())
    assert sorted({(c["strategy"], c["queried"]) for c in result["cells"]}) == [
        ("pcoreset", 30), ("pcoreset", 50), ("random", 30), ("random", 50)
    ]
    assert (tmp_path / "out" / "active.md").is_file() and (tmp_path / "out" / "active.png").is_file()
    (tmp_path / "out" / "active.md").unlink()
    assert main(["report", str(tmp_path / "out")]) == 0  # `distill report` rebuilds it
    assert "pcoreset" in (tmp_path / "out" / "active.md").read_text()
    raw["active"]["stage"] = "nope"
    path.write_text(yaml.safe_dump(raw))
    assert main(["active", str(path), "--out", str(tmp_path / "bad"), "--no-progress"]) != 0
    assert not (tmp_path / "bad").exists()

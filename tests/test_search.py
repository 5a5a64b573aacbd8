"""Training-free student search (DisWOT): the score's properties, ranking, evolution, config, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import ConfigError, DataSpec, ModelSpec
from distill.config.schema import SearchSpec
from distill.data import load_data
from distill.models.build import build_model
from distill.search import (
    Candidate,
    evolve,
    load_search_experiment,
    network_signals,
    row_cosine,
    score_student,
    score_students,
    search_students,
    write_outputs,
)
from tests.conftest import tiny_experiment, write_yaml


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(dataset="digits", val_fraction=0.1, test_fraction=0.2))


def _model(data, arch: str, seed: int = 0, **params):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch=arch, params=params), num_classes=data.num_classes, input_shape=data.input_shape)


def _batch(data, n: int = 48):
    return data.train.inputs[:n], data.train.labels[:n]


def test_a_student_identical_to_the_teacher_scores_the_maximum(digits) -> None:
    teacher = _model(digits, "mlp", hidden=[32, 16])  # no BatchNorm: train and eval mode agree
    batch = _batch(digits)
    signals = [network_signals(teacher, *batch, random_init=False)]
    same = score_student(signals, copy.deepcopy(teacher), [batch])
    assert same.relation == pytest.approx(1.0, abs=1e-5) and same.semantic == pytest.approx(1.0, abs=1e-5)
    assert same.total == pytest.approx(2.0, abs=1e-5)
    other = score_student(signals, _model(digits, "mlp", seed=1, hidden=[32, 16]), [batch])
    assert other.relation < same.relation and other.semantic < same.semantic
    assert -1.0 <= other.semantic <= 1.0 and -1.0 <= other.relation <= 1.0


def test_scores_do_not_depend_on_the_order_of_the_batch(digits) -> None:
    teacher = _model(digits, "resnet_cifar", depth=8, width=0.25)
    student = _model(digits, "resnet_cifar", seed=3, depth=14, width=0.25)
    inputs, labels = _batch(digits)
    permutation = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    scores = []
    for x, y in ((inputs, labels), (inputs[permutation], labels[permutation])):
        signals = [network_signals(teacher, x, y, random_init=False)]
        scores.append(score_student(signals, copy.deepcopy(student), [(x, y)]))
    assert scores[0].semantic == pytest.approx(scores[1].semantic, abs=1e-5)
    assert scores[0].relation == pytest.approx(scores[1].relation, abs=1e-5)


def test_row_cosine_is_one_for_equal_and_lower_for_different_matrices() -> None:
    a = torch.nn.functional.normalize(torch.rand(5, 5), dim=1)
    assert row_cosine(a, a) == pytest.approx(1.0)
    assert row_cosine(a, a.flip(0)) < 1.0


CANDIDATES = {
    "mlp-8": ModelSpec(arch="mlp", params={"hidden": [8]}),
    "mlp-64": ModelSpec(arch="mlp", params={"hidden": [64]}),
    "r8": ModelSpec(arch="resnet_cifar", params={"depth": 8, "width": 0.25}),
    "r14": ModelSpec(arch="resnet_cifar", params={"depth": 14, "width": 0.25}),
}


def test_scores_are_deterministic_for_a_seed_and_ranked_best_first(digits) -> None:
    teacher = _model(digits, "resnet_cifar", depth=8, width=0.25)
    candidates = {name: CANDIDATES[name] for name in ("mlp-8", "mlp-64", "r8")}
    spec = SearchSpec(teacher="t", candidates=candidates, num_batches=2, batch_size=16, seed=0)
    first = score_students(teacher, candidates, digits, spec)
    second = score_students(teacher, dict(reversed(list(candidates.items()))), digits, spec)  # order does not matter
    assert [(r.name, r.total) for r in first] == [(r.name, r.total) for r in second]
    assert [r.rank for r in first] == [1, 2, 3]
    assert [r.total for r in first] == sorted((r.total for r in first), reverse=True)
    assert all(r.total == pytest.approx(r.semantic + r.relation) for r in first)
    other_seed = score_students(teacher, candidates, digits, spec.model_copy(update={"seed": 1}))
    assert {r.name: r.total for r in other_seed} != {r.name: r.total for r in first}


def test_search_skips_large_candidates_and_writes_json_and_markdown(digits, tmp_path: Path) -> None:
    teacher = _model(digits, "mlp", hidden=[64])
    spec = SearchSpec(teacher="t", candidates=CANDIDATES, max_params=4900, batch_size=32)
    result = search_students(teacher, digits, spec)
    assert result.mode == "candidates"
    skipped = {r.name for r in result.rows if r.skipped}
    assert skipped == {"r8", "r14"}  # 4,934 and 11,094 parameters; mlp-64 has 4,810
    assert [r.rank for r in result.rows] == [1, 2, None, None]
    folder = write_outputs(result, tmp_path / "out")
    saved = json.loads((folder / "search.json").read_text())
    assert [row["name"] for row in saved["rows"]] == [r.name for r in result.rows]
    markdown = (folder / "search.md").read_text()
    assert "| rank | candidate | params | semantic | relation | total |" in markdown
    assert "skipped: " in markdown and f"| 1 | {result.rows[0].name} |" in markdown
    assert not list(folder.glob(".*tmp*"))  # written atomically: no temporaries left behind


def test_evolution_finds_the_optimum_of_a_space_it_does_not_enumerate() -> None:
    sizes = [6, 6, 6, 6]  # 1,296 members
    target = (4, 1, 5, 2)
    calls = []

    def evaluate(genome):
        calls.append(genome)
        return -float(sum((g - t) ** 2 for g, t in zip(genome, target)))

    seen = evolve(sizes, evaluate, population=6, generations=25, tournament=3, seed=0)
    assert max(seen, key=lambda g: seen[g]) == target
    assert len(calls) == len(set(calls)) == len(seen) < 200  # never evaluated twice, far fewer than 1,296
    again = evolve(sizes, evaluate, population=6, generations=25, tournament=3, seed=0)
    assert list(again) == list(seen)  # deterministic for a seed


def test_evolution_on_a_real_space_finds_the_best_of_its_full_enumeration(digits) -> None:
    teacher = _model(digits, "resnet_cifar", depth=8, width=0.25)
    space = {"arch": "mlp", "params": {"hidden": [[8], [16], [32], [8, 8], [16, 16]], "activation": ["relu", "tanh", "gelu"]}}
    enumerated = search_students(teacher, digits, SearchSpec(teacher="t", space=space, batch_size=32, budget=100))
    assert enumerated.mode == "enumeration" and enumerated.evaluated == 15
    evolved = search_students(
        teacher, digits,
        SearchSpec(teacher="t", space=space, batch_size=32, budget=4, evolution={"population": 3, "generations": 4}),
    )
    assert evolved.mode == "evolution" and evolved.evaluated < 15
    assert evolved.rows[0].name == enumerated.rows[0].name
    assert evolved.rows[0].total == enumerated.rows[0].total


def test_candidates_with_identical_specs_get_identical_initializations(digits) -> None:
    from distill.search import build_candidate

    a = build_candidate(Candidate("a", CANDIDATES["r8"]), digits, seed=0)
    b = build_candidate(Candidate("b", CANDIDATES["r8"]), digits, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------------------------------- config


def _search_experiment(tmp_path: Path, search: dict) -> Path:
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 1})
    experiment["search"] = search
    return write_yaml(tmp_path / "exp.yaml", experiment)


def _errors(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_search_experiment(path)
    return str(caught.value)


def test_config_errors_name_the_key_and_suggest(tmp_path: Path) -> None:
    good = {"teacher": "teacher", "candidates": {"small": {"arch": "mlp", "params": {"hidden": [8]}}}}
    assert load_search_experiment(_search_experiment(tmp_path, good)).search.teacher == "teacher"

    text = _errors(_search_experiment(tmp_path, {**good, "batch_sise": 32}))
    assert "search.batch_sise: unknown key (did you mean 'batch_size'?)" in text and "line " in text
    text = _errors(_search_experiment(tmp_path, {**good, "space": {"arch": "mlp", "params": {"hidden": [[8]]}}}))
    assert "give exactly one of `candidates`" in text
    text = _errors(_search_experiment(tmp_path, {**good, "teacher": "teachr"}))
    assert "search.teacher: 'teachr' is neither a stage nor a key in `models` (did you mean 'teacher'?)" in text
    text = _errors(_search_experiment(tmp_path, {**good, "teacher": "student"}))
    assert "search.teacher: model 'student' has no `weights:`" in text
    text = _errors(_search_experiment(tmp_path, {**good, "candidates": {"x": {"arch": "resnet_cifr"}}}))
    assert "search.candidates.x.arch" in text and "resnet_cifar" in text
    text = _errors(_search_experiment(tmp_path, {"teacher": "teacher", "space": {"arch": "mlp", "params": {"hiden": [[8]]}}}))
    assert "search.space.params.hiden" in text and "did you mean 'hidden'" in text
    text = _errors(_search_experiment(tmp_path, {"teacher": "teacher", "space": {"arch": "mlp", "params": {"hidden": []}}}))
    assert "give at least one choice" in text
    no_search = write_yaml(tmp_path / "plain.yaml", tiny_experiment(tmp_path / "runs"))
    assert "has no `search:` section" in _errors(no_search)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_trains_the_teacher_then_reuses_a_run_and_reads_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    search = {
        "teacher": "teacher",
        "space": {"arch": "mlp", "params": {"hidden": [[8], [16], [32]]}},
        "candidates": {},
        "batch_size": 32,
    }
    path = _search_experiment(tmp_path, search)
    assert main(["search-student", str(path), "--no-progress", "--out", str(tmp_path / "s1")]) == 0
    captured = capsys.readouterr()
    assert "ranked by DisWOT score" in captured.out and "mlp(hidden=[32])" in captured.out
    assert "enumeration: 3 of 3 candidates scored (0 skipped)" in captured.out
    first = json.loads((tmp_path / "s1" / "search.json").read_text())
    assert [row["rank"] for row in first["rows"]] == [1, 2, 3]
    run_dir = next((tmp_path / "runs" / "tiny").glob("2*"))
    weights = run_dir / "stages" / "teacher" / "model.safetensors"
    assert weights.is_file() and not (run_dir / "stages" / "distilled").exists()  # only the stages up to the teacher

    # --run: the teacher's weights come from the finished run, nothing is trained
    assert main(["search-student", str(path), "--no-progress", "--run", str(run_dir), "--out", str(tmp_path / "s2")]) == 0
    assert "stage teacher" not in capsys.readouterr().err
    second = json.loads((tmp_path / "s2" / "search.json").read_text())
    assert [(r["name"], r["total"]) for r in second["rows"]] == [(r["name"], r["total"]) for r in first["rows"]]

    # a `models` teacher with weights gives the same scores
    experiment = tiny_experiment(tmp_path / "runs", training={"epochs": 1})
    experiment["models"]["trained"] = {**experiment["models"]["teacher"], "weights": str(weights)}
    experiment["search"] = {**search, "teacher": "trained"}
    other = write_yaml(tmp_path / "weights.yaml", experiment)
    assert main(["search-student", str(other), "--no-progress", "--out", str(tmp_path / "s3")]) == 0
    third = json.loads((tmp_path / "s3" / "search.json").read_text())
    assert [(r["name"], r["total"]) for r in third["rows"]] == [(r["name"], r["total"]) for r in first["rows"]]


def test_cli_config_error_exits_with_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _search_experiment(tmp_path, {"teacher": "nobody", "candidates": {"a": {"arch": "mlp"}}})
    assert main(["search-student", str(path)]) == 2
    assert "search.teacher: 'nobody' is neither a stage" in capsys.readouterr().err

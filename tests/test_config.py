"""The experiment schema: what loads, what is refused, and how the refusal reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import ConfigError, load_experiment, load_raw
from distill.config.loader import apply_overrides, set_by_path
from tests.conftest import ROOT, write_yaml


def problems_of(source, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_experiment(source, overrides)
    return error.value.problems


def test_the_examples_validate() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        experiment = load_experiment(path)
        assert experiment.stages, path


def test_defaults_are_filled_in(tiny) -> None:
    experiment = load_experiment(tiny)
    assert experiment.data.augment.random_crop == 0
    assert experiment.scheduler.name == "constant"
    assert experiment.training.grad_accum_steps == 1
    assert experiment.stage("distilled").objective.terms[1].label == "kd"


def test_unknown_key_names_path_line_and_near_miss(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "quickstart.yaml").read_text().replace("batch_size: 64", "batch_sise: 64")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "batch_sise" in l)
    [problem] = problems_of(path)
    assert f"line {line}: data.batch_sise: unknown key (did you mean 'batch_size'?)" in problem
    assert "allowed keys here: dataset, params, batch_size" in problem


def test_wrong_type_and_impossible_values_are_all_reported(tiny) -> None:
    tiny["optimizer"]["lr"] = -1
    tiny["training"]["epochs"] = 0
    tiny["stages"][1]["objective"]["terms"][0]["weight"] = "heavy"
    problems = problems_of(tiny)
    assert len(problems) == 3
    assert any(p.startswith("optimizer.lr: Input should be greater than 0 (got -1)") for p in problems)
    assert any(p.startswith("training.epochs: Input should be greater than or equal to 1 (got 0)") for p in problems)
    assert any("stages[1].objective.terms[0].weight" in p and "'heavy'" in p for p in problems)


def test_literal_values_list_the_allowed_ones(tiny) -> None:
    tiny["training"]["mixed_precision"] = "bf61"
    [problem] = problems_of(tiny)
    assert "training.mixed_precision: 'bf61' is not allowed (did you mean 'bf16'?)" in problem
    assert "'no', 'bf16' or 'fp16'" in problem


def test_unknown_registered_names_get_did_you_mean(tiny) -> None:
    tiny["stages"][1]["objective"]["terms"][1]["loss"] = "hinton_kdd"
    tiny["models"]["student"]["arch"] = "resnet21"
    tiny["data"]["dataset"] = "digit"
    problems = problems_of(tiny)
    text = "\n".join(problems)
    assert "stages[1].objective.terms[1].loss: unknown loss 'hinton_kdd' (did you mean 'hinton_kd'?)" in text
    assert "models.student.arch: unknown model 'resnet21' (did you mean" in text
    assert "data.dataset: unknown dataset 'digit' (did you mean 'digits'?)" in text


def test_component_parameters_are_checked(tiny) -> None:
    tiny["stages"][1]["objective"]["terms"][1]["params"] = {"temprature": 3}
    tiny["models"]["teacher"]["params"]["hiden"] = [3]
    tiny["models"]["student"]["params"]["num_classes"] = 3
    tiny["scheduler"] = {"name": "cosine", "params": {"min_lr": 0.1}}
    text = "\n".join(problems_of(tiny))
    assert "stages[1].objective.terms[1].params.temprature: loss 'hinton_kd' has no parameter 'temprature' (did you mean 'temperature'?)" in text
    assert "models.teacher.params.hiden: model 'mlp' has no parameter 'hiden' (did you mean 'hidden'?)" in text
    assert "models.student.params.num_classes: model 'mlp': 'num_classes' is set by distill itself" in text
    assert "scheduler.params.min_lr: scheduler 'cosine' has no parameter 'min_lr' (did you mean 'min_lr_ratio'?)" in text


def test_stage_references_are_checked(tiny) -> None:
    tiny["stages"][1]["teacher"] = "teachr"
    tiny["stages"][0]["teacher"] = "distilled"
    text = "\n".join(problems_of(tiny))
    assert "stages[1].teacher: 'teachr' is neither an earlier stage nor a key in `models` (did you mean 'teacher'?)" in text
    assert "stages[0].teacher: 'distilled' is neither an earlier stage nor a key in `models` (that stage runs later" in text


def test_a_teacher_loss_needs_a_teacher(tiny) -> None:
    del tiny["stages"][1]["teacher"]
    [problem] = problems_of(tiny)
    assert "loss 'hinton_kd' reads teacher.logits, but stage 'distilled' has no teacher" in problem


def test_term_inputs_are_checked(tiny) -> None:
    tiny["stages"][1]["objective"]["terms"][1]["inputs"] = {"teacher_logits": "teacher.logit"}
    [problem] = problems_of(tiny)
    assert "inputs.teacher_logits: unknown source 'teacher.logit' (did you mean 'teacher.logits'?)" in problem
    tiny["stages"][1]["objective"]["terms"][1]["inputs"] = {"teacher_logit": "teacher.logits"}
    [problem] = problems_of(tiny)
    assert "the loss has no tensor argument 'teacher_logit'" in problem


def test_init_from_must_match_the_architecture(tiny) -> None:
    tiny["stages"][1]["init_from"] = "teacher"
    [problem] = problems_of(tiny)
    assert "stages[1].init_from: stage 'teacher' trained model 'teacher', which is not the same architecture" in problem


def test_duplicate_names_are_refused(tiny) -> None:
    duplicate_terms = {**tiny, "stages": [tiny["stages"][0], {**tiny["stages"][1]}]}
    duplicate_terms["stages"][1]["objective"] = {"terms": [{"loss": "cross_entropy"}, {"loss": "cross_entropy"}]}
    [problem] = problems_of(duplicate_terms)
    assert problem == "stages[1].objective: two objective terms are named 'cross_entropy'; give one a distinct `name`"
    tiny["stages"][1]["name"] = "teacher"
    assert "stages[1].name: two stages are named 'teacher'; stage names must be unique" in problems_of(tiny)


def test_overrides_set_nested_values_and_address_stages_by_name(tiny) -> None:
    experiment = load_experiment(
        tiny,
        ["optimizer.lr=0.01", "seed=3", "stages.distilled.epochs=5", "stages.0.grad_clip=1.5",
         "stages.distilled.objective.terms.kd.params.temperature=8", "data.augment.hflip=true"],
    )
    assert experiment.optimizer.lr == 0.01 and experiment.seed == 3
    assert experiment.stage("distilled").epochs == 5
    assert experiment.stage("teacher").grad_clip == 1.5
    assert experiment.stage("distilled").objective.terms[1].params == {"temperature": 8}
    assert experiment.data.augment.hflip is True


def test_override_errors_say_what_is_wrong(tiny) -> None:
    text = "\n".join(problems_of(tiny, ["stages.distiled.epochs=2", "optimizer.lr", "seed.x=1"]))
    assert "--set stages.distiled.epochs=2: stages has no item named 'distiled' (did you mean 'distilled'?)" in text
    assert "--set optimizer.lr: expected key.path=value" in text
    assert "seed holds a value (0), not a mapping" in text
    # an override of a key that does not exist is caught by the schema, with a near miss
    [problem] = problems_of(tiny, ["optimizer.lrr=0.1"])
    assert "optimizer.lrr: unknown key (did you mean 'lr'?)" in problem


def test_set_by_path_on_lists() -> None:
    data = {"a": [{"name": "x", "v": 1}, {"name": "y", "v": 2}]}
    set_by_path(data, "a.y.v", 5)
    set_by_path(data, "a.-2.v", 7)
    assert data == {"a": [{"name": "x", "v": 7}, {"name": "y", "v": 5}]}
    assert apply_overrides({"a": 1}, ["b=[1, 2]"]) == {"a": 1, "b": [1, 2]}


def test_yaml_errors_and_unsafe_tags(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodels: {a: [1,\n")
    [problem] = problems_of(broken)
    assert "invalid YAML" in problem and "line" in problem
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    [problem] = problems_of(unsafe)
    assert "invalid YAML" in problem
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert problems_of(empty) == ["the file is empty"]
    assert "no such file" in problems_of(tmp_path / "absent.yaml")[0]


def test_line_numbers_point_into_lists(tmp_path: Path, tiny) -> None:
    tiny["stages"][1]["epochs"] = -2
    path = write_yaml(tmp_path / "exp.yaml", tiny)
    raw, lines = load_raw(path)
    [problem] = problems_of(path)
    assert problem == f"line {lines[('stages', 1, 'epochs')]}: stages[1].epochs: Input should be greater than or equal to 1 (got -2)"


def test_errors_from_overrides_name_the_override(tmp_path: Path, tiny) -> None:
    path = write_yaml(tmp_path / "exp.yaml", tiny)
    [problem] = problems_of(path, ["trainin.epochs=3"])
    assert problem.startswith("--set trainin.epochs=3: trainin: unknown key (did you mean 'training'?)")
    [problem] = problems_of(path, ["stages.distilled.epochs=0"])
    assert problem.startswith("--set stages.distilled.epochs=0: stages[1].epochs: Input should be greater than or equal to 1")


def test_missing_weights_file_and_cpu_sync_batchnorm(tiny) -> None:
    tiny["models"]["teacher"]["weights"] = "/nonexistent/teacher.safetensors"
    tiny["device"] = "cpu"
    tiny["training"]["sync_batchnorm"] = True
    text = "\n".join(problems_of(tiny))
    assert "models.teacher.weights: no such file: /nonexistent/teacher.safetensors" in text
    assert "training.sync_batchnorm: SyncBatchNorm needs CUDA devices" in text


def test_an_experiment_can_extend_a_base_file(tmp_path: Path, tiny) -> None:
    write_yaml(tmp_path / "base.yaml", tiny)
    child = tmp_path / "child.yaml"
    child.write_text(
        "base: base.yaml\n"
        "name: child\n"
        "optimizer: {lr: 0.01}\n"          # merged into the base's optimizer
        "compare: {seeds: [4]}\n"
    )
    experiment = load_experiment(child)
    assert experiment.name == "child" and experiment.optimizer.lr == 0.01
    assert experiment.optimizer.name == "adamw"  # kept from the base
    assert [s.name for s in experiment.stages] == ["teacher", "distilled"] and experiment.compare.seeds == [4]
    # a problem in a key that comes from the base names the base file and its line
    tiny["training"]["epochs"] = 0
    write_yaml(tmp_path / "base.yaml", tiny)
    [problem] = problems_of(child)
    assert problem.startswith("base.yaml, line ") and "training.epochs: Input should be greater than or equal to 1" in problem
    # cycles and missing bases are clear errors
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\nname: x\n")
    assert "includes itself" in problems_of(tmp_path / "loop.yaml")[0]
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\nname: x\n")
    assert "base: no such file" in problems_of(tmp_path / "orphan.yaml")[0]


def test_the_written_config_loads_back_to_the_same_experiment(tmp_path: Path, tiny) -> None:
    from distill.config.loader import dump_experiment
    from distill.config.schema import stage_setting

    tiny["training"].update({"grad_accum_steps": 2, "grad_clip": 1.0})
    tiny["stages"][1].update({"epochs": 3, "grad_clip": None, "optimizer": {"lr": 0.01}})
    original = load_experiment(write_yaml(tmp_path / "exp.yaml", tiny))
    written = tmp_path / "config.yaml"
    written.write_text(dump_experiment(original))
    loaded = load_experiment(written)
    assert loaded.model_dump() == original.model_dump()
    for name in ("epochs", "grad_accum_steps", "grad_clip", "max_steps", "mixed_precision"):
        for before, after in zip(original.stages, loaded.stages):
            assert stage_setting(after, loaded.training, name) == stage_setting(before, original.training, name), name
    # a stage's null that disables clipping survives; an absent key still inherits
    assert stage_setting(loaded.stages[1], loaded.training, "grad_clip") is None
    assert stage_setting(loaded.stages[0], loaded.training, "grad_clip") == 1.0
    assert loaded.stages[1].optimizer.model_fields_set == {"lr"}


def test_an_untrained_teacher_must_be_asked_for(tiny) -> None:
    tiny["stages"] = [tiny["stages"][1]]  # the teacher is now the bare `models` entry
    [problem] = problems_of(tiny)
    assert "stages[0].teacher: the teacher 'teacher' is a `models` entry with no `weights`" in problem
    assert "models.teacher.random_init: true" in problem
    tiny["models"]["teacher"]["random_init"] = True
    assert load_experiment(tiny).models["teacher"].random_init


def test_a_stage_optimizer_of_another_kind_drops_the_top_level_params(tiny) -> None:
    from distill.config.schema import merged_section

    tiny["optimizer"] = {"name": "sgd", "lr": 0.1, "params": {"momentum": 0.9}}
    tiny["stages"][1]["optimizer"] = {"name": "adamw", "lr": 0.002}
    experiment = load_experiment(tiny)
    merged = merged_section(experiment.optimizer, experiment.stages[1].optimizer)
    assert (merged.name, merged.lr, merged.params) == ("adamw", 0.002, {})
    same_kind = merged_section(experiment.optimizer, experiment.optimizer.model_copy(update={"lr": 0.5}))
    assert same_kind.params == {"momentum": 0.9}
    # a parameter the merged optimizer does not take is reported at the stage's key
    tiny["stages"][1]["optimizer"] = {"lr": 0.002, "params": {"betas": [0.9, 0.99]}}
    [problem] = problems_of(tiny)
    assert "stages[1].optimizer.params.betas" in problem and "sgd" in problem

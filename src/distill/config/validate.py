"""Checks of an experiment against the registries and across sections, before anything runs.

The schema checks each value on its own; this module checks what needs more context: that named
components exist and accept the given parameters, that stages reference models and earlier
stages that exist, and that every objective term can read what it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from distill.config.schema import Experiment, ModelSpec, StageSpec
from distill.cache.teacher import CACHE_SOURCES

LM_DATASETS = frozenset({"text", "chat_jsonl", "hf_dataset", "shakespeare", "wordnet_definitions", "preference_jsonl", "domain_text"})
"""The built-in language-model data sets (the engine checks the task again once the data is built)."""
from distill.registry import (
    DATASETS,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    REWARDS,
    SCHEDULERS,
    Registry,
    RegistryError,
    parameter_problems,
    did_you_mean,
    load_builtins,
)

Problem = tuple[tuple[Union[str, int], ...], str]

# Arguments the engine passes itself; users must not set them in `params`.
INJECTED = {
    "models": ("num_classes", "input_shape"),
    "optimizers": ("params", "lr", "weight_decay"),
    "schedulers": ("total_steps", "warmup_steps"),
    "datasets": (),
    "rewards": (),
}


def _check_component(
    registry: Registry, name: str, params: dict[str, Any], path: tuple[Union[str, int], ...], name_key: str
) -> list[Problem]:
    try:
        entry = registry.get(name)
    except RegistryError as error:
        return [(path + (name_key,), str(error))]
    problems = parameter_problems(entry.builder, params, what=f"{registry.singular} '{name}'", injected=INJECTED[registry.kind])
    return [(path + ("params", key), message) for key, message in problems]


def _teacher_model(experiment: Experiment, reference: str, earlier: dict[str, StageSpec]) -> ModelSpec | None:
    if reference in earlier:
        return experiment.models[earlier[reference].model] if earlier[reference].model in experiment.models else None
    return experiment.models.get(reference)


def _check_stage(experiment: Experiment, index: int, stage: StageSpec, earlier: dict[str, StageSpec]) -> list[Problem]:
    from distill.adapters import ADAPTER_PARAMS, split_source
    from distill.objective import KNOWN_SOURCES, hyperparameters, is_known_source, resolve_inputs

    path: tuple[Union[str, int], ...] = ("stages", index)
    problems: list[Problem] = []
    if stage.name in earlier:
        problems.append((path + ("name",), f"two stages are named '{stage.name}'; stage names must be unique"))
    if stage.model not in experiment.models:
        problems.append(
            (
                path + ("model",),
                f"no model '{stage.model}' in `models`{did_you_mean(stage.model, list(experiment.models))}; "
                f"defined: {', '.join(experiment.models)}",
            )
        )
    if stage.reference is not None and stage.reference not in earlier and stage.reference not in experiment.models:
        problems.append(
            (
                path + ("reference",),
                f"'{stage.reference}' is neither an earlier stage nor a key in `models`"
                f"{did_you_mean(stage.reference, list(earlier) + list(experiment.models))}",
            )
        )
    if stage.teacher is not None and stage.teacher not in earlier and stage.teacher not in experiment.models:
        later = [s.name for s in experiment.stages[index:]]
        hint = " (that stage runs later: move it before this one)" if stage.teacher in later else ""
        candidates = list(earlier) + list(experiment.models)
        problems.append(
            (
                path + ("teacher",),
                f"'{stage.teacher}' is neither an earlier stage nor a key in `models`{hint}"
                f"{did_you_mean(stage.teacher, candidates)}; earlier stages: {', '.join(earlier) or '(none)'}; "
                f"models: {', '.join(experiment.models)}",
            )
        )
    if stage.init_from is not None:
        if stage.init_from not in earlier:
            problems.append(
                (
                    path + ("init_from",),
                    f"'{stage.init_from}' is not an earlier stage{did_you_mean(stage.init_from, list(earlier))}; "
                    f"earlier stages: {', '.join(earlier) or '(none)'}",
                )
            )
        elif earlier[stage.init_from].model != stage.model:
            source_model = experiment.models.get(earlier[stage.init_from].model)
            target_model = experiment.models.get(stage.model)
            if source_model is None or target_model is None or source_model.model_dump() != target_model.model_dump():
                problems.append(
                    (
                        path + ("init_from",),
                        f"stage '{stage.init_from}' trained model '{earlier[stage.init_from].model}', which is not "
                        f"the same architecture as this stage's model '{stage.model}'",
                    )
                )
    precision = stage.mixed_precision or experiment.training.mixed_precision
    if precision == "fp16" and experiment.device == "cpu":
        problems.append((path + ("mixed_precision",), "fp16 needs a CUDA device; use bf16 on the CPU"))

    if stage.teacher not in earlier and stage.teacher in experiment.models and _untrained(experiment.models[stage.teacher]):
        problems.append(
            (
                path + ("teacher",),
                f"the teacher '{stage.teacher}' is a `models` entry with no `weights` (nor a pretrained `params.source`) and no "
                f"earlier stage trains it; set models.{stage.teacher}.weights, train it in an earlier stage, or set "
                f"models.{stage.teacher}.random_init: true to distill from an untrained (random) teacher",
            )
        )

    problems += _check_several(experiment, index, stage, earlier)
    cached = stage.teacher_cache
    if cached is not None:
        if stage.teacher is not None:
            problems.append((path + ("teacher",), "a stage has one teacher: a model (`teacher: KEY`) or a cache (`teacher: {cache: PATH}`), not both"))
        if cached.model is not None and cached.model not in experiment.models:
            problems.append(
                (
                    path + ("teacher_cache", "model"),
                    f"no model '{cached.model}' in `models`{did_you_mean(cached.model, list(experiment.models))}; "
                    f"defined: {', '.join(experiment.models)}",
                )
            )
        if stage.generate is not None:
            problems.append(
                (path + ("generate",), "generated completions need a live teacher; a cached teacher only covers the training split's own tokens")
            )
    if stage.mixture is not None:
        if stage.mixture.method == "ddk" and stage.teacher is None and (cached is None or cached.model is None):
            problems.append(
                (
                    path + ("mixture",),
                    "mixture.method ddk compares the student with the teacher on validation rows; set `teacher:` (a model or "
                    "an earlier stage), or name the model of a cached teacher: `teacher: {cache: PATH, model: KEY}`",
                )
            )
        if stage.generate is not None:
            problems.append((path + ("mixture",), "a domain mixture draws training rows; it cannot be combined with `generate`"))
    has_teacher = stage.teacher is not None or bool(stage.teachers)
    adapters = stage.objective.adapters
    used_adapters: set[str] = set()
    for name, adapter in adapters.items():
        if adapter.to is not None and adapter.to != "logits":
            if not is_known_source(adapter.to) or "->" in adapter.to:
                problems.append(
                    (
                        path + ("objective", "adapters", name, "to"),
                        f"unknown source '{adapter.to}'; use 'logits' or a source such as teacher.layer3.output",
                    )
                )
            elif adapter.to.startswith("teacher.") and not has_teacher:
                problems.append((path + ("objective", "adapters", name, "to"), f"reads {adapter.to}, but the stage has no teacher"))
        elif adapter.to is None and adapter.out_features is None:
            problems.append((path + ("objective", "adapters", name), "set `to` (a source or 'logits') or `out_features`"))
        unknown_params = sorted(set(adapter.params) - set(ADAPTER_PARAMS.get(adapter.kind, ())))
        if unknown_params:
            allowed = ", ".join(ADAPTER_PARAMS.get(adapter.kind, ())) or "(none)"
            problems.append(
                (path + ("objective", "adapters", name, "params"), f"unknown key(s) {', '.join(unknown_params)} for kind {adapter.kind}; accepted: {allowed}")
            )
    for term_index, term in enumerate(stage.objective.terms):
        term_path = path + ("objective", "terms", term_index)
        try:
            entry = LOSSES.get(term.loss)
        except RegistryError as error:
            problems.append((term_path + ("loss",), str(error)))
            continue
        allowed = hyperparameters(entry.builder)
        for key in term.params:
            if key not in allowed:
                problems.append(
                    (
                        term_path + ("params", key),
                        f"loss '{term.loss}' has no parameter '{key}'{did_you_mean(key, list(allowed))}; "
                        f"accepted: {', '.join(allowed) or '(none)'}",
                    )
                )
        try:
            sources = resolve_inputs(entry.builder, term.inputs)
        except ValueError as error:
            problems.append((term_path + ("inputs",), f"loss '{term.loss}': {error}"))
            continue
        for argument, written in sources.items():
            try:
                source, adapter_name = split_source(written)
            except ValueError as error:
                problems.append((term_path + ("inputs", argument), str(error)))
                continue
            if adapter_name is not None:
                used_adapters.add(adapter_name)
                if adapter_name not in adapters:
                    problems.append(
                        (
                            term_path + ("inputs", argument),
                            f"no adapter '{adapter_name}' in this stage's objective.adapters"
                            f"{did_you_mean(adapter_name, list(adapters))}; declared: {', '.join(adapters) or '(none)'}",
                        )
                    )
            if not is_known_source(source):
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"unknown source '{source}'{did_you_mean(source, list(KNOWN_SOURCES))}; "
                        f"known sources: {', '.join(KNOWN_SOURCES)}, student.features, "
                        "or a module path: student.<path>.output / teacher.<path>.input",
                    )
                )
            elif source == "batch.patch_mask" and stage.input_mask is None:
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"loss '{term.loss}' reads batch.patch_mask, but stage '{stage.name}' masks no inputs; "
                        "set `input_mask: {patch_size: ..., ratio: ...}` on the stage",
                    )
                )
            elif source.startswith("reference.") and stage.reference is None:
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"loss '{term.loss}' reads {source}, but stage '{stage.name}' has no reference model; "
                        "set `reference:` on the stage (an earlier stage or a key in `models`)",
                    )
                )
            elif source in CACHE_SOURCES and cached is None:
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"loss '{term.loss}' reads {source}, which only a cached teacher provides; "
                        "build one with `distill cache-teacher` and set `teacher: {cache: PATH}` on the stage",
                    )
                )
            elif source.startswith("teacher.") and source not in CACHE_SOURCES and cached is not None:
                problems.append(
                    (
                        term_path + ("loss",),
                        f"loss '{term.loss}' reads {source}, but stage '{stage.name}' reads its teacher from a cache, which "
                        f"provides {', '.join(CACHE_SOURCES)} only; use the sparse_kd loss, or a live teacher (`teacher: KEY`)",
                    )
                )
            elif source.startswith("teachers.") and not stage.teachers:
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"loss '{term.loss}' reads {source}, but stage '{stage.name}' has one teacher or none; "
                        "list several under `teachers:`",
                    )
                )
            elif source == "cohort.logits" and not stage.cohort:
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"loss '{term.loss}' reads cohort.logits, but stage '{stage.name}' trains no cohort; "
                        "list the networks trained with `model` under `cohort:`",
                    )
                )
            elif source in ("batch.labels_b", "batch.mix_lam") and stage.mix is None:
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"loss '{term.loss}' reads {source}, but stage '{stage.name}' mixes no inputs; set `mix: {{method: mixup}}`",
                    )
                )
            elif source in ("batch.advantages", "batch.rewards") and stage.rollout is None:
                problems.append(
                    (
                        term_path + ("inputs", argument),
                        f"loss '{term.loss}' reads {source}, but stage '{stage.name}' samples no rollouts; "
                        "set `rollout: {group_size: 4, reward: {name: answer_match}}`",
                    )
                )
            elif source.startswith("teacher.") and not has_teacher and source not in CACHE_SOURCES:
                problems.append(
                    (
                        term_path + ("loss",),
                        f"loss '{term.loss}' reads {source}, but stage '{stage.name}' has no teacher; "
                        "set `teacher:` on the stage or use a label loss such as cross_entropy",
                    )
                )
    for name in adapters:
        if name not in used_adapters:
            problems.append(
                (path + ("objective", "adapters", name), f"adapter '{name}' is used by no term; feed it with 'source -> {name}' in a term's inputs")
            )
    return problems


def check_experiment(experiment: Experiment) -> list[Problem]:
    """Every problem of ``experiment`` that the schema alone cannot see, as (key path, message)."""
    load_builtins()
    problems: list[Problem] = []
    problems += _check_component(DATASETS, experiment.data.dataset, experiment.data.params, ("data",), "dataset")
    for key, model in experiment.models.items():
        problems += _check_component(MODELS, model.arch, model.params, ("models", key), "arch")
        if model.weights is not None and not Path(model.weights).is_file():
            problems.append((("models", key, "weights"), f"no such file: {model.weights}"))
    if experiment.training.sync_batchnorm and experiment.device == "cpu":
        problems.append((("training", "sync_batchnorm"), "SyncBatchNorm needs CUDA devices; set it to false on the CPU"))
    problems += _check_component(OPTIMIZERS, experiment.optimizer.name, experiment.optimizer.params, ("optimizer",), "name")
    problems += _check_component(SCHEDULERS, experiment.scheduler.name, experiment.scheduler.params, ("scheduler",), "name")

    earlier: dict[str, StageSpec] = {}
    for index, stage in enumerate(experiment.stages):
        problems += _check_stage(experiment, index, stage, earlier)
        # what the stage runs: its keys merged into the top-level section
        from distill.config.schema import merged_section

        if stage.optimizer is not None:
            optimizer = merged_section(experiment.optimizer, stage.optimizer)
            problems += _check_component(OPTIMIZERS, optimizer.name, optimizer.params, ("stages", index, "optimizer"), "name")
        if stage.scheduler is not None:
            scheduler = merged_section(experiment.scheduler, stage.scheduler)
            problems += _check_component(SCHEDULERS, scheduler.name, scheduler.params, ("stages", index, "scheduler"), "name")
        if stage.rollout is not None:
            reward = stage.rollout.reward
            problems += _check_component(REWARDS, reward.name, reward.params, ("stages", index, "rollout", "reward"), "name")
        if stage.data is not None:
            problems += _check_component(DATASETS, stage.data.dataset, stage.data.params, ("stages", index, "data"), "dataset")
        earlier.setdefault(stage.name, stage)

    if experiment.search is not None:
        from distill.search import search_problems

        problems += search_problems(experiment)

    if experiment.pgkd is not None:
        from distill.pgkd import pgkd_problems

        problems += pgkd_problems(experiment, experiment.pgkd)

    if experiment.active is not None:
        from distill.active import check_active

        try:
            check_active(experiment)
        except ValueError as error:
            key, _, message = str(error).partition(": ")
            if key.startswith("active") and " " not in key and message:
                problems.append((tuple(key.split(".")), message))  # the message names its key
            else:
                problems.append((("active",), str(error)))
    if experiment.cache is not None and experiment.cache.teacher is not None and experiment.cache.teacher not in experiment.models:
        problems.append(
            (
                ("cache", "teacher"),
                f"no model '{experiment.cache.teacher}' in `models`{did_you_mean(experiment.cache.teacher, list(experiment.models))}; "
                f"defined: {', '.join(experiment.models)}",
            )
        )
    if experiment.select is not None:
        for field in ("teacher", "reference"):
            key = getattr(experiment.select, field)
            if key not in experiment.models:
                problems.append(
                    (("select", field), f"no model '{key}' in `models`{did_you_mean(key, list(experiment.models))}; defined: {', '.join(experiment.models)}")
                )
    if experiment.data.select is not None and not (Path(experiment.data.select) / "selection.json").is_file():
        problems.append((("data", "select"), f"no selection.json in {experiment.data.select}; run `distill select-data` first"))
    stage_names = [s.name for s in experiment.stages]
    if experiment.evaluation.reference is not None and experiment.evaluation.reference not in stage_names:
        problems.append(
            (
                ("evaluation", "reference"),
                f"no stage '{experiment.evaluation.reference}'"
                f"{did_you_mean(experiment.evaluation.reference, stage_names)}; stages: {', '.join(stage_names)}",
            )
        )
    for index, name in enumerate(experiment.compare.stages or []):
        if name not in stage_names:
            problems.append(
                (("compare", "stages", index), f"no stage '{name}'{did_you_mean(name, stage_names)}; stages: {', '.join(stage_names)}")
            )
    return problems


def teacher_model_spec(experiment: Experiment, stage: StageSpec) -> ModelSpec | None:
    """The architecture of a stage's teacher (an earlier stage's model, or a `models` entry)."""
    if stage.teacher is None:
        return None
    earlier = {s.name: s for s in experiment.stages[: experiment.stages.index(stage)]}
    return _teacher_model(experiment, stage.teacher, earlier)


def _check_several(experiment: Experiment, index: int, stage: StageSpec, earlier: dict[str, StageSpec]) -> list[Problem]:
    """`teachers`, `cohort`, `train_rows`, `mix` and `hard` of one stage."""
    path: tuple[Union[str, int], ...] = ("stages", index)
    problems: list[Problem] = []
    known = list(earlier) + list(experiment.models)
    if stage.teachers:
        if stage.teacher is not None or stage.teacher_cache is not None:
            problems.append((path + ("teachers",), "give the teachers once: `teacher:` for one, `teachers:` for several, not both"))
        for position, entry in enumerate(stage.teachers):
            if entry.model not in earlier and entry.model not in experiment.models:
                problems.append(
                    (
                        path + ("teachers", position, "model"),
                        f"'{entry.model}' is neither an earlier stage nor a key in `models`{did_you_mean(entry.model, known)}",
                    )
                )
            elif entry.model not in earlier and _untrained(experiment.models[entry.model]):
                problems.append(
                    (
                        path + ("teachers", position, "model"),
                        f"the teacher '{entry.model}' is a `models` entry with no `weights` and no earlier stage trains it",
                    )
                )
        names = [entry.model for entry in stage.teachers]
        if len(set(names)) != len(names):
            problems.append((path + ("teachers",), f"a teacher is listed twice: {', '.join(names)}"))
        if experiment.data.dataset in LM_DATASETS:
            problems.append((path + ("teachers",), "several teachers are supported for classifiers; for language models use one teacher"))
    for position, key in enumerate(stage.cohort or []):
        if key not in experiment.models:
            problems.append(
                (
                    path + ("cohort", position),
                    f"no model '{key}' in `models`{did_you_mean(key, list(experiment.models))}; defined: {', '.join(experiment.models)}",
                )
            )
    if stage.cohort and experiment.data.dataset in LM_DATASETS:
        problems.append((path + ("cohort",), "online distillation (`cohort`) is supported for classifiers"))
    if stage.train_rows is not None:
        for field in ("model", "better_than"):
            name = getattr(stage.train_rows, field)
            if name not in earlier and (field == "model" or name not in experiment.models):
                problems.append((path + ("train_rows", field), f"'{name}' is not an earlier stage{did_you_mean(name, known)}"))
    for field in ("mix", "hard"):
        if getattr(stage, field) is not None and experiment.data.dataset in LM_DATASETS:
            problems.append((path + (field,), f"`{field}` augments images; it does not apply to language-model data"))
    if stage.hard is not None and stage.teacher is None and not stage.teachers:
        problems.append((path + ("hard",), "HARD looks for inputs where teacher and student disagree; set `teacher:`"))
    return problems


def _untrained(spec: ModelSpec) -> bool:
    """A `models` entry with no weights to load: no `weights`, no pretrained `params.source`, not `random_init`."""
    pretrained = spec.params.get("source") is not None  # hf_classifier / hf_causal_lm checkpoints
    return spec.weights is None and not spec.random_init and not pretrained

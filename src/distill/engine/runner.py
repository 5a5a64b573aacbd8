"""Running a whole experiment: the run folder, the stages in order, the final evaluation.

A run folder ``<output_dir>/<name>/<timestamp>/`` holds::

    config.yaml        the experiment as resolved (every default written out)
    run.json           status, times, machine, number of processes
    metrics.jsonl      one JSON record per training log line, evaluation and final result
    checkpoints/<stage>/step-XXXXXXXX/   resumable checkpoints (see distill.engine.checkpoint)
    stages/<stage>/    each finished stage's weights (safetensors) and summary.json
    final.json         the final table: every stage's model on the test split
    report.md, plots/  written at the end; `distill report RUN_DIR` rebuilds them

Running the same folder again (``resume=True``) skips finished stages and resumes the
interrupted one from its newest valid checkpoint.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import torch

from distill.config.loader import dump_experiment
from distill.config.schema import Experiment, StageSpec
from distill.engine.callbacks import Callback, CallbackList
from distill.engine.checkpoint import verify_folder, write_folder_atomically
from distill.io import atomic_write_json, atomic_write_text, read_jsonl
from distill.engine.context import (
    STAGE_SUMMARY,
    STAGE_WEIGHTS,
    MetricsLog,
    RunContext,
    environment_summary,
    predict,
)
from distill.engine.lm import answer_accuracy, check_language_models, lm_metrics
from distill.engine.metrics import classification_metrics, count_parameters, cpu_latency_ms
from distill.engine.probe import linear_probe_accuracy
from distill.engine.stage import check_feature_paths, train_stage
from distill.registry import load_builtins

CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def make_accelerator(device: str) -> Any:
    """An ``accelerate.Accelerator`` for this process (DDP when launched with several processes)."""
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but no CUDA device is available; use device: auto or cpu")
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=use_cpu)


def new_run_dir(experiment: Experiment) -> Path:
    base = Path(experiment.output_dir) / experiment.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = base / stamp
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = base / f"{stamp}-{suffix}"
    return candidate


def latest_run_dir(experiment: Experiment) -> Path | None:
    """The newest run folder of this experiment (the one ``--resume`` continues)."""
    base = Path(experiment.output_dir) / experiment.name
    if not base.is_dir():
        return None
    runs = sorted((p for p in base.iterdir() if (p / CONFIG_FILE).is_file()), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def stage_fingerprint(experiment: Experiment, stage: StageSpec, data_fingerprint: str, upstream: dict[str, str]) -> str:
    """A hash of everything that determines a stage's result, used to reuse it across runs.

    Sections are hashed without the keys left at their defaults, so a later version that adds an
    option (with a default that keeps the old behaviour) still recognizes earlier results. The
    stage's training settings enter as resolved (stage value over the experiment's default).
    """
    from distill.config.schema import merged_section, stage_setting

    def dump(section: Any, **kwargs: Any) -> Any:
        return section.model_dump(mode="json", exclude_defaults=True, **kwargs) if section is not None else None

    inherited = ("epochs", "max_steps", "grad_accum_steps", "grad_clip", "mixed_precision", "optimizer", "scheduler")
    payload = {
        "stage": dump(stage, exclude=set(inherited)),  # the name too: it seeds the stage's random draws
        "settings": {name: stage_setting(stage, experiment.training, name) for name in inherited[:5]},
        "model": dump(experiment.models[stage.model]),
        "teacher": upstream.get(stage.teacher) if stage.teacher in upstream else dump(
            experiment.models[stage.teacher] if stage.teacher else None
        ),
        "init_from": upstream.get(stage.init_from) if stage.init_from else None,
        **(
            {"teachers": [upstream.get(t.model) or dump(experiment.models.get(t.model)) for t in stage.teachers]}
            if stage.teachers else {}
        ),
        **({"cohort": [dump(experiment.models[key]) for key in stage.cohort]} if stage.cohort else {}),
        **(
            {"train_rows": [upstream.get(stage.train_rows.model), upstream.get(stage.train_rows.better_than)]}
            if stage.train_rows is not None else {}
        ),
        "data": dump(experiment.data),
        "data_fingerprint": data_fingerprint,
        "sync_batchnorm": experiment.training.sync_batchnorm,
        "optimizer": dump(merged_section(experiment.optimizer, stage.optimizer)),
        "scheduler": dump(merged_section(experiment.scheduler, stage.scheduler)),
        # per-epoch evaluation picks the best epoch; the final-table options do not change a stage
        "evaluation": dump(experiment.evaluation, exclude={"latency", "reference", "linear_probe"}),
        "seed": experiment.seed,
        "metric": experiment.compare.metric,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _try_reuse(context: RunContext, stage: StageSpec, fingerprint: str) -> bool:
    """Copy a finished stage with the same fingerprint from another run folder, if there is one."""
    for other in context.reuse_dirs:
        for candidate in sorted((Path(other) / "stages").glob("*")):
            summary_path = candidate / STAGE_SUMMARY
            if not summary_path.is_file():
                continue
            try:
                summary = json.loads(summary_path.read_text())
                if summary.get("fingerprint") != fingerprint:
                    continue
                verify_folder(candidate)
            except Exception:
                continue
            if context.is_main:
                summary["stage"] = stage.name
                summary["reused_from"] = str(candidate)
                # the weights, and any other weights the stage kept (an online stage's cohort)
                files = {
                    path.name: path.read_bytes()
                    for path in candidate.iterdir()
                    if path.is_file() and path.suffix == ".safetensors"
                }
                write_folder_atomically(
                    context.stage_dir(stage.name),
                    {**files, STAGE_SUMMARY: (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()},
                )
                for record in read_jsonl(Path(other) / "metrics.jsonl"):
                    if record.get("stage") == candidate.name and record.get("kind") in ("train", "eval"):
                        context.log.write({**record, "stage": stage.name})
            context.accelerator.wait_for_everyone()
            context.callbacks.on_message(f"stage '{stage.name}': identical to {candidate}, reused")
            return True
    return False


def cohort_members(context: RunContext, stage: StageSpec) -> list[tuple[str, torch.nn.Module]]:
    """The networks an online stage trained beside its model, loaded from its result folder."""
    from distill.engine.teachers import cohort_names
    from distill.models.build import load_weights

    if not stage.cohort:
        return []
    keys = [stage.model, *stage.cohort]
    names = cohort_names(keys)
    out = []
    for name, key in zip(names[1:], keys[1:]):
        model = context.build_network(key)
        load_weights(model, context.stage_dir(stage.name) / f"cohort-{name}.safetensors")
        out.append((name, model.eval().to(context.device)))
    return out


def reference_of(experiment: Experiment) -> tuple[str, int | None] | None:
    """What the agreement column compares to, as (name, ``before`` for :meth:`RunContext.frozen`).

    ``evaluation.reference`` (a stage) when set, else the teacher of the last stage that has one.
    """
    if experiment.evaluation.reference is not None:
        return experiment.evaluation.reference, None
    for index in range(len(experiment.stages) - 1, -1, -1):
        if experiment.stages[index].teacher is not None:
            return experiment.stages[index].teacher, index
    return None


def final_evaluation(context: RunContext) -> list[dict[str, Any]]:
    """Every stage's model (and every teacher taken from `models`) on the test split."""
    experiment = context.experiment
    test = context.data.test
    reference = reference_of(experiment)
    reference_predictions = None
    reference_model = None
    is_lm = context.data.is_lm
    if reference is not None:
        reference_model = context.frozen(*reference)
        if not is_lm:
            reference_predictions = predict(reference_model, test, experiment.data.eval_batch_size, context).argmax(-1)
    # (row name, stage or None for a `models` teacher, model, stage summary)
    entries: list[tuple[str, str | None, torch.nn.Module, dict[str, Any] | None]] = []
    for index, stage in enumerate(experiment.stages):
        if stage.teacher is not None and not context.is_stage_teacher(stage.teacher, before=index):
            if all(entry[0] != stage.teacher for entry in entries):
                entries.append((stage.teacher, None, context.frozen(stage.teacher, before=index), None))
        cached = stage.teacher_cache.model if stage.teacher_cache is not None else None
        if cached is not None and all(entry[0] != cached for entry in entries):
            entries.append((cached, None, context.frozen(cached, before=0), None))  # the model a cache was made from
        for entry in stage.teachers or []:
            if not context.is_stage_teacher(entry.model, before=index) and all(e[0] != entry.model for e in entries):
                entries.append((entry.model, None, context.frozen(entry.model, before=index), None))
        if stage.teachers:
            # the ensemble the stage distilled (fixed weights at evaluation: there are no labels)
            entries.append((f"{stage.name}:ensemble", None, context.ensemble_of(stage, index), None))
        entries.append((stage.name, stage.name, context.stage_model(stage.name).to(context.device), context.stage_summary(stage.name)))
        for key, member in cohort_members(context, stage):
            entries.append((f"{stage.name}:{key}", None, member, None))

    rows: list[dict[str, Any]] = []
    example = test.inputs[:1]
    answers = experiment.evaluation.answer if is_lm else None
    answer_tokenizer = None
    if answers is not None:
        from distill.models.causal_lm import load_tokenizer

        answer_tokenizer = load_tokenizer(str(context.data.meta["tokenizer"]))  # once for every model
    for name, stage_name, model, summary in entries:
        is_reference = reference is not None and name == reference[0] and (
            (stage_name is None) != context.is_stage_teacher(name, reference[1])
        )
        if is_lm:
            if reference_model is not None and not is_reference:
                check_language_models(context.data, {"model": model, "reference": reference_model})
            metrics = lm_metrics(model, test, context, reference=None if is_reference else reference_model)
            if answers is not None:
                metrics.update(answer_accuracy(model, test, context, answers, tokenizer=answer_tokenizer))
        else:
            logits = predict(model, test, experiment.data.eval_batch_size, context)
            metrics = classification_metrics(
                logits,
                test.labels,
                reference_predictions=None if is_reference else reference_predictions,
                ece_bins=experiment.evaluation.ece_bins,
            )
        row: dict[str, Any] = {
            "name": name,
            "model": experiment.stage(stage_name).model if stage_name else name.split(":")[-1],
            "teacher": experiment.stage(stage_name).teacher if stage_name else None,
            "is_reference": is_reference,
            "test": metrics,
            "params": count_parameters(model),
        }
        if is_lm and test.groups is not None and context.data.meta.get("domains"):
            from distill.engine.ddk import domain_losses

            names = context.data.meta["domains"]
            nll = domain_losses(model, test, len(names), batch_size=experiment.data.eval_batch_size, device=context.device)
            row["domain_perplexity"] = {name: float(torch.exp(value)) for name, value in zip(names, nll.double())}
        if summary is not None:
            row["best"] = summary.get("best")
            row["train_time_s"] = summary.get("train_time_s")
        probe = experiment.evaluation.linear_probe
        if probe is not None:
            metrics["probe_accuracy"] = linear_probe_accuracy(
                model, context.data.train, test, context.data.num_classes, probe, experiment.data.eval_batch_size
            )
        if experiment.evaluation.latency and context.is_main:
            row["latency_ms"] = cpu_latency_ms(model, example)
        rows.append(row)
        context.log.write({"kind": "final", "stage": name, **{k: v for k, v in row.items() if k != "name"}})
    return rows


def run_experiment(
    experiment: Experiment,
    *,
    run_dir: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    reuse_dirs: Iterable[str | Path] = (),
    write_report: bool = True,
) -> RunResult:
    """Run every stage of ``experiment`` and return the run folder and the final table.

    With ``run_dir`` pointing at an existing run folder, finished stages are skipped and an
    interrupted stage resumes from its newest valid checkpoint (``distill run --resume``).
    ``reuse_dirs`` are other run folders whose finished, identical stages are copied instead of
    retrained (``distill compare`` uses this to train a shared teacher once per seed).
    """
    load_builtins()
    from distill.data import load_data

    accelerator = make_accelerator(experiment.device)
    callback_list = CallbackList(list(callbacks), enabled=accelerator.is_main_process)
    if run_dir is None:
        run_dir = new_run_dir(experiment) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            run_dir = broadcast_object_list([str(run_dir) if run_dir else None])[0]
    run_dir = Path(str(run_dir))
    started = time.time()
    if accelerator.is_main_process:
        if run_dir.exists():
            clean_stale_temporaries(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / CONFIG_FILE).exists():
            atomic_write_text(run_dir / CONFIG_FILE, dump_experiment(experiment))
        atomic_write_json(
            run_dir / "run.json",
            {
                "status": "running",
                "started": datetime.now().isoformat(timespec="seconds"),
                "processes": accelerator.num_processes,
                "environment": environment_summary(),
            },
        )
    accelerator.wait_for_everyone()

    data = load_data(experiment.data)
    context = RunContext(
        experiment=experiment,
        run_dir=run_dir,
        data=data,
        accelerator=accelerator,
        callbacks=callback_list,
        log=MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process),
        reuse_dirs=[Path(p) for p in reuse_dirs],
    )
    callback_list.on_run_start(str(run_dir), experiment)

    for stage in experiment.stages:
        if not context.stage_done(stage.name):
            check_feature_paths(context_for_stage(context, stage), stage)
    fingerprints = context.fingerprints
    for stage in experiment.stages:
        stage_context = context_for_stage(context, stage)
        fingerprints[stage.name] = stage_fingerprint(
            stage_context.experiment, stage, stage_context.data.fingerprint, fingerprints
        )
        if context.stage_done(stage.name):
            callback_list.on_message(f"stage '{stage.name}': already finished in this run folder, skipped")
            continue
        if _try_reuse(stage_context, stage, fingerprints[stage.name]):
            continue
        train_stage(stage_context, stage)

    rows = final_evaluation(context)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "final.json", {"rows": rows})
        atomic_write_json(
            run_dir / "run.json",
            {
                "status": "finished",
                "started": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                "finished": datetime.now().isoformat(timespec="seconds"),
                "wall_time_s": time.time() - started,
                "processes": accelerator.num_processes,
                "environment": environment_summary(),
            },
        )
        if write_report:
            from distill.report import build_report

            build_report(run_dir)
    accelerator.wait_for_everyone()
    callback_list.on_run_end(str(run_dir), rows)
    return RunResult(run_dir=run_dir, rows=rows)


def context_for_stage(context: RunContext, stage: StageSpec) -> RunContext:
    """The run's context as a stage with its own ``data`` sees it (the same context otherwise).

    The stage's data replaces the top-level ``data`` section for that stage only (batch sizes,
    splits, per-epoch evaluation); its models must read it the same way: the same tokenizer for
    language models, the same classes for classifiers.
    """
    if stage.data is None:
        return context
    from distill.data import load_data

    if stage.name not in context.stage_data:
        context.stage_data[stage.name] = load_data(stage.data)
    data = context.stage_data[stage.name]
    base = context.data
    where = f"stages.{stage.name}.data"
    if data.is_lm != base.is_lm:
        raise ValueError(f"{where}: '{data.name}' and the top-level data '{base.name}' are not the same kind of data")
    if data.is_lm and data.meta.get("tokenizer_hash") != base.meta.get("tokenizer_hash"):
        raise ValueError(
            f"{where}: '{data.name}' is tokenized with '{data.meta.get('tokenizer')}', the top-level data with "
            f"'{base.meta.get('tokenizer')}'; a stage's data must use the run's tokenizer"
        )
    if not data.is_lm and int(data.num_classes) != int(base.num_classes):
        raise ValueError(f"{where}: '{data.name}' has {data.num_classes} classes, the top-level data {base.num_classes}")
    experiment = context.experiment.model_copy(update={"data": stage.data})
    return dataclasses.replace(context, experiment=experiment, data=data)


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove temporary folders a killed process left behind (never finished data)."""
    stale_paths = [*Path(run_dir).rglob(".*.tmp-*"), *Path(run_dir).rglob(".*.old-*")]
    for stale in stale_paths:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)

"""One stage of an experiment: the training loop, readable top to bottom.

For each optimizer step the loop takes ``grad_accum_steps`` micro-batches, runs the teacher
(eval mode, no gradient) and the student, evaluates the objective, and scales each micro-batch's
loss by its share of the samples in the *whole* optimizer step (across micro-batches and
processes), so a step's gradient is the mean over all its samples however they were split.
It then clips, steps, logs, evaluates at epoch ends and checkpoints atomically; a stopped stage
resumes from its newest valid checkpoint and continues exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from distill.cache.teacher import CACHE_SOURCES
from distill.config.schema import StageSpec, merged_section, stage_setting
from distill.data.transforms import augment_batch
from distill.engine.batches import derive_seed, global_batches, local_slice, steps_per_epoch
from distill.engine.checkpoint import (
    checkpoint_name,
    latest_valid_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    state_dict_for_saving,
    write_folder_atomically,
)
from distill.engine.context import STAGE_SUMMARY, STAGE_WEIGHTS, RunContext, predict
from distill.engine.forward import ForwardPass
from distill.engine.lm import (
    check_language_models,
    generate_completions,
    generation_draw,
    answer_accuracy,
    lm_metrics,
    trim_padding,
    sequence_count,
    valid_token_count,
)
from distill.hooks import FeatureCapture, parse_feature_source
from distill.engine.metrics import classification_metrics, count_parameters
from distill.engine.optim import build_optimizer, build_scheduler
from distill.objective import Objective, required_sources, tensor_arguments


class StagePlan:
    """Resolved settings of a stage: stage values over the experiment's `training` defaults."""

    def __init__(self, context: RunContext, stage: StageSpec) -> None:
        experiment = context.experiment
        training = experiment.training
        self.epochs: int = stage_setting(stage, training, "epochs")
        self.grad_accum_steps: int = stage_setting(stage, training, "grad_accum_steps")
        self.grad_clip: float | None = stage_setting(stage, training, "grad_clip")
        self.mixed_precision: str = stage_setting(stage, training, "mixed_precision")
        self.optimizer = merged_section(experiment.optimizer, stage.optimizer)
        self.scheduler = merged_section(experiment.scheduler, stage.scheduler)
        self.batch_size = experiment.data.batch_size
        self.stage_name = stage.name
        self.num_samples = len(context.data.train)
        self.batches_per_epoch = len(
            global_batches(self.num_samples, self.batch_size, experiment.seed, 0, context.world_size)
        )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"stage '{stage.name}': {self.num_samples} training samples give no batch of data.batch_size="
                f"{self.batch_size} on {context.world_size} process(es)"
            )
        self.steps_per_epoch = steps_per_epoch(self.batches_per_epoch, self.grad_accum_steps)
        max_steps = stage_setting(stage, training, "max_steps")
        self.total_steps = self.epochs * self.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)


def _evaluate(
    context: RunContext,
    model: torch.nn.Module,
    teacher_predictions: dict[str, torch.Tensor],
    plan: StagePlan,
    teacher: torch.nn.Module | None = None,
) -> dict[str, dict[str, float]]:
    data = context.data
    results: dict[str, dict[str, float]] = {}
    for split_name, split in (("val", data.val), ("test", data.test)):
        if split is None or len(split) == 0:
            continue
        if data.is_lm:
            results[split_name] = lm_metrics(model, split, context, reference=teacher, autocast_dtype=plan.autocast_dtype)
            answer = context.experiment.evaluation.answer
            if answer is not None and answer.every_epoch and split_name == "val":
                results[split_name].update(answer_accuracy(model, split, context, answer))
            continue
        logits = predict(model, split, context.experiment.data.eval_batch_size, context, plan.autocast_dtype)
        results[split_name] = classification_metrics(
            logits,
            split.labels,
            reference_predictions=teacher_predictions.get(split_name),
            ece_bins=context.experiment.evaluation.ece_bins,
        )
    return results


LOWER_IS_BETTER = ("nll", "ece", "perplexity", "kl_to_teacher")
"""Metrics where a smaller value is better (the others: accuracy, agreement, ...)."""


def best_epoch(history: list[dict[str, Any]], metric: str = "accuracy") -> dict[str, Any] | None:
    """The evaluation record with the best validation ``metric`` (test split if there is no val)."""
    lower_is_better = metric in LOWER_IS_BETTER
    candidates = [h for h in history if metric in h.get("val", h.get("test", {}))]
    if not candidates:
        return None

    def score(record: dict[str, Any]) -> float:
        value = record.get("val", record.get("test"))[metric]
        return -value if lower_is_better else value

    return max(candidates, key=score)


def check_feature_paths(context: RunContext, stage: StageSpec) -> None:
    """Resolve every module path the stage's objective reads, on freshly built models.

    Run for all stages before any trains, so a wrong path fails in seconds, naming the nearest
    existing paths, rather than after the earlier stages have trained.
    """
    experiment = context.experiment
    terms = Objective.terms_from_spec(stage.objective)
    sources = required_sources(terms) | {a.to for a in stage.objective.adapters.values() if a.to not in (None, "logits")}
    features = [f for f in (parse_feature_source(s) for s in sources) if f is not None]
    if not features:
        return
    models = {"student": stage.model}
    if stage.teacher is not None:
        earlier = {s.name: s for s in experiment.stages[: experiment.stages.index(stage)]}
        models["teacher"] = earlier[stage.teacher].model if stage.teacher in earlier else stage.teacher
    for role, key in models.items():
        wanted = [f for f in features if f.model == role]
        if wanted:
            FeatureCapture(context.build_network(key), wanted, role)


@torch.no_grad()
def collect_sources(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    sources: list[str],
    context: RunContext,
    autocast: Any = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """``sources`` over the whole training split (no augmentation, models in eval mode), in float32."""
    train = context.data.train
    batch_size = context.experiment.data.eval_batch_size
    was_training = student.training
    student.eval()
    chunks: dict[str, list[torch.Tensor]] = {source: [] for source in sources}
    try:
        with ForwardPass(student, teacher, set(sources), autocast) as forward:
            for start in range(0, len(train), batch_size):
                inputs = train.inputs[start : start + batch_size].to(context.device)
                labels = train.labels[start : start + batch_size].to(context.device)
                values = forward(inputs, labels)
                for source in sources:
                    value = values[source]
                    chunks[source].append(value.float() if value.is_floating_point() else value)
    finally:
        student.train(was_training)
    return {source: torch.cat(parts) for source, parts in chunks.items()}


def train_stage(context: RunContext, stage: StageSpec) -> dict[str, Any]:
    """Train ``stage`` (resuming from its checkpoint if there is one) and write its result folder."""
    original = context.data
    kept = _restrict_rows(context, stage)
    try:
        return _train_stage(context, stage, kept)
    finally:
        context.data = original


def _train_stage(context: RunContext, stage: StageSpec, kept_rows: dict[str, Any] | None) -> dict[str, Any]:
    experiment = context.experiment
    accelerator = context.accelerator
    plan = StagePlan(context, stage)
    device = context.device

    # -- models and objective ---------------------------------------------------------------
    student = context.build_network(stage.model)
    if stage.init_from is not None:
        student.load_state_dict(context.stage_model(stage.init_from).state_dict())
    if stage.cohort:
        student = _build_cohort(context, stage, student)
    if experiment.training.sync_batchnorm and context.world_size > 1:
        if device.type == "cpu":
            raise ValueError("training.sync_batchnorm needs CUDA devices (SyncBatchNorm does not run on the CPU)")
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    precomputed = None
    if stage.teachers and stage.combine.precompute:
        augment = context.experiment.data.augment
        if augment.random_crop or augment.hflip or stage.mix is not None or stage.hard is not None:
            raise ValueError(
                f"stages.{stage.name}.combine.precompute: the teachers' outputs are computed once, so the training inputs "
                "must not change between epochs; turn off data.augment, mix and hard, or precompute: false"
            )
        from distill.engine.teachers import PrecomputedTeachers

        precomputed = PrecomputedTeachers.compute(context, stage, context.experiment.stages.index(stage))
        teacher = None
    else:
        teacher = context.teacher_of(stage)
    train = context.data.train
    is_lm = context.data.is_lm
    if is_lm:
        check_language_models(
            context.data,
            {"student": student, **({"teacher": teacher} if teacher is not None else {})},
            log=lambda message: context.callbacks.on_message(f"stage '{stage.name}': {message}"),
        )
    if is_lm and (stage.teachers or stage.cohort or stage.mix or stage.hard):
        raise ValueError(f"stages.{stage.name}: `teachers`, `cohort`, `mix` and `hard` are supported for classifiers, not language models")
    generate = stage.generate
    if generate is not None and (not is_lm or train.inputs.dim() != 2):
        raise ValueError(f"stages.{stage.name}.generate needs language-model data of single sequences [N, T]")
    if generate is not None and generate.model == "teacher" and teacher is None:
        raise ValueError(f"stages.{stage.name}.generate.model is 'teacher', but the stage has no teacher")
    rollout = _StageRollout(context, stage) if stage.rollout is not None else None
    negatives = _StageNegatives(context, stage) if stage.negatives is not None else None
    for name, spec in (("rollout", stage.rollout), ("negatives", stage.negatives)):
        if spec is not None and (not is_lm or train.inputs.dim() != 2):
            raise ValueError(f"stages.{stage.name}.{name} needs language-model data of single sequences [N, T]")
    if sum(x is not None for x in (generate, stage.rollout, stage.negatives)) > 1:
        raise ValueError(f"stages.{stage.name}: use one of `generate`, `rollout` and `negatives`")

    def autocast() -> Any:
        dtype = plan.autocast_dtype
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    terms = Objective.terms_from_spec(stage.objective)
    if stage.rollout is not None:
        # losses that take advantages / rewards (KDRL) read the rollout's without being told
        for term in terms:
            _, optional = tensor_arguments(term.fn)
            for argument in ROLLOUT_SOURCES:
                if argument in optional and argument not in term.sources:
                    term.sources[argument] = ROLLOUT_SOURCES[argument]
    adapters = Objective.adapters_from_spec(stage.objective)
    sequence_terms = {t.name for t in terms if getattr(t.fn, "unit", "token") == "sequence"} if is_lm else set()
    reference = context.frozen(stage.reference, before=experiment.stages.index(stage)) if stage.reference else None
    if reference is not None and is_lm:
        check_language_models(context.data, {"student": student, "reference": reference})
    cache = _open_cache(context, stage) if precomputed is None else precomputed
    live_sources = required_sources(terms) - set(CACHE_SOURCES) - set(ROLLOUT_SOURCES.values())
    if precomputed is not None:
        live_sources -= {"teacher.logits", "teachers.logits", "teachers.weights"}
    forward = ForwardPass(
        student.to(device), teacher, live_sources, autocast, stage.input_mask, lm=is_lm, reference=reference, mix=stage.mix
    )
    source_shapes = None
    if adapters or any("input_shapes" in term.injected_arguments() for term in terms):
        # Adapters and some losses are sized from one probing pass (adapter targets included).
        targets = {a.to for a in adapters.values() if a.to not in (None, "logits")}
        probe = ForwardPass(
            student, teacher, live_sources | targets, autocast, stage.input_mask, lm=is_lm, reference=reference
        )
        probe_inputs, probe_labels = train.inputs[:2], train.labels[:2]
        if stage.negatives is not None:  # the steps train on pairs [B, 2, T]
            probe_inputs, probe_labels = (t.unsqueeze(1).expand(-1, 2, -1).contiguous() for t in (probe_inputs, probe_labels))
        source_shapes = probe.probe_shapes(probe_inputs.to(device), probe_labels.to(device))
        if precomputed is not None:
            stacked = precomputed.stacked["train"]
            source_shapes.update(
                {"teachers.logits": tuple(stacked.shape[1:]), "teachers.weights": (stacked.shape[1],), "teacher.logits": (stacked.shape[2],)}
            )
    with torch.random.fork_rng(devices=[]):
        # Terms that own parameters start from weights fixed by (seed, stage).
        torch.manual_seed(derive_seed(experiment.seed, "objective", stage.name))
        objective = Objective(
            terms, adapters=adapters, num_classes=context.data.num_classes, source_shapes=source_shapes
        ).to(device)
    objective_parameters = list(objective.parameters())
    trainable = list(student.parameters()) + objective_parameters
    hard = _StageHard(context, stage) if stage.hard is not None else None
    optimizer = build_optimizer(plan.optimizer, trainable)
    scheduler = build_scheduler(plan.scheduler, optimizer, plan.total_steps)
    model = accelerator.prepare_model(student)
    forward.model = model
    scaler = torch.amp.GradScaler("cuda") if plan.mixed_precision == "fp16" else None

    # -- resume -----------------------------------------------------------------------------
    step, epoch, batch_position = 0, 0, 0
    history: list[dict[str, Any]] = []
    # Sums since the last log line (a resumed run continues the same window).
    window = {"loss": 0.0, "correct": 0.0, "samples": 0.0, "scored": 0.0, "terms": {t.name: 0.0 for t in objective.terms}}
    elapsed_before = 0.0
    checkpoint_dir = context.checkpoint_dir(stage.name)
    latest, warnings = latest_valid_checkpoint(checkpoint_dir)
    for warning in warnings:
        context.callbacks.on_message(warning)
    # Without a resume point the stage starts from a seeded global RNG (dropout, etc.).
    torch.manual_seed(derive_seed(experiment.seed, "train", stage.name))
    if latest is not None:
        state = load_checkpoint(
            latest,
            modules={"student": accelerator.unwrap_model(model), "objective": objective, **_hard_modules(hard)},
            optimizer=optimizer,
            scheduler=scheduler,
            extra_optimizers=_hard_optimizers(hard),
        )
        if hard is not None:
            hard.augmentation.updates = int(state.get("hard_updates", 0))
        step, epoch, batch_position = state["step"], state["epoch"], state["batch_position"]
        history, elapsed_before, window = state["history"], state["elapsed_s"], state["window"]
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        evaluated = {record["epoch"] for record in history}
        # Drop what the stopped run logged after this checkpoint; it will be logged again.
        context.log.keep(
            lambda r: r.get("stage") != stage.name
            or (r.get("kind") == "train" and r.get("step", 0) <= step)
            or (r.get("kind") == "eval" and r.get("epoch") in evaluated)
        )
        context.callbacks.on_message(f"stage '{stage.name}': resumed from {latest.name} (step {step})")

    if objective.setup_sources:
        # Losses that need training-set statistics (ND's class means) get them once; a resumed
        # run restores them from the checkpoint instead.
        names = objective.setup(lambda sources: collect_sources(student, teacher, sources, context, autocast))
        context.callbacks.on_message(f"stage '{stage.name}': prepared {', '.join(names)} from the training set")

    order_seed = derive_seed(experiment.seed, "data")
    mixture = _build_mixture(context, stage, teacher, plan)
    if mixture is not None and latest is not None and state.get("mixture"):
        mixture.mixture.load_state_dict(state["mixture"])
    load_batch = _batch_loader(context, device)
    teacher_predictions: dict[str, torch.Tensor] = {}
    if precomputed is not None:
        for split_name in ("val", "test"):
            predictions = precomputed.predictions(split_name)
            if predictions is not None:
                teacher_predictions[split_name] = predictions
    if teacher is not None and not is_lm:
        for split_name, split in (("val", context.data.val), ("test", context.data.test)):
            if split is not None and len(split):
                teacher_predictions[split_name] = predict(
                    teacher, split, experiment.data.eval_batch_size, context, plan.autocast_dtype
                ).argmax(-1)

    def save(epoch_to_save: int, position: int) -> None:
        if context.is_main:
            save_checkpoint(
                checkpoint_dir / checkpoint_name(step),
                modules={"student": accelerator.unwrap_model(model), "objective": objective, **_hard_modules(hard)},
                optimizer=optimizer,
                scheduler=scheduler,
                extra_optimizers=_hard_optimizers(hard),
                state={
                    "step": step,
                    "epoch": epoch_to_save,
                    "batch_position": position,
                    "history": history,
                    "elapsed_s": elapsed_before + time.perf_counter() - started,
                    "window": window,
                    "grad_scaler": scaler.state_dict() if scaler is not None else None,
                    "mixture": mixture.mixture.state_dict() if mixture is not None else None,
                    "hard_updates": hard.augmentation.updates if hard is not None else None,
                },
            )
            prune_checkpoints(checkpoint_dir, experiment.checkpoint.keep_last)
        accelerator.wait_for_everyone()

    context.callbacks.on_stage_start(stage.name, plan.total_steps, step, plan.epochs)
    started = time.perf_counter()
    model.train()

    with forward:
        while epoch < plan.epochs and step < plan.total_steps:
            batches = global_batches(len(train), plan.batch_size, order_seed, epoch, context.world_size)
            while batch_position < len(batches) and step < plan.total_steps:
                group = batches[batch_position : batch_position + plan.grad_accum_steps]
                if mixture is not None:
                    # DDK: the same number of micro-batches, their rows drawn by domain weights
                    mixture.maybe_update(step, accelerator.unwrap_model(model))
                    group = mixture.mixture.draw(step, plan.batch_size, order_seed, len(group))
                local_groups = [local_slice(b, context.world_size, context.rank) for b in group]
                micro_batches = [load_batch(indices, epoch) for indices in local_groups]
                if is_lm:
                    # Language models: each term is summed over valid tokens and divided by the
                    # number of valid tokens of the whole step (all micro-batches and processes).
                    if generate is not None and generation_draw(experiment.seed, stage.name, step) < generate.probability:
                        writer = accelerator.unwrap_model(model) if generate.model == "student" else teacher
                        micro_batches = [_generate(writer, ids, labels, generate, context) for ids, labels in micro_batches]
                    if rollout is not None:
                        micro_batches, extra_sources = rollout.sample(accelerator.unwrap_model(model), micro_batches, step)
                    if negatives is not None:
                        micro_batches = negatives.pairs(accelerator.unwrap_model(model), micro_batches, epoch, step)
                    micro_batches = [trim_padding(ids, labels) for ids, labels in micro_batches]
                    counts = [valid_token_count(labels) for _, labels in micro_batches]
                    step_count = _global_sum(context, float(sum(counts)))
                    if sequence_terms:
                        # sequence-level terms (REDI, QCRD) are means over the step's sequences
                        sequence_counts = [sequence_count(labels) for _, labels in micro_batches]
                        step_sequences = _global_sum(context, float(sum(sequence_counts)))
                else:
                    # Every micro-batch's loss is weighted by its share of the whole step's samples.
                    counts = [len(indices) for indices in local_groups]
                    step_count = float(sum(len(b) for b in group))
                step_sums = {term.name: 0.0 for term in terms}
                if hard is not None:
                    # HARD: the augmenter learns where teacher and student disagree, then augments the step
                    micro_batches = hard.step(step, micro_batches, teacher, accelerator.unwrap_model(model), context)
                for micro_index, (inputs, labels) in enumerate(micro_batches):
                    last = micro_index == len(micro_batches) - 1
                    sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                    count = float(counts[micro_index])
                    with sync:
                        sources = forward(inputs, labels)
                        if cache is not None:
                            sources.update(cache.sources(local_groups[micro_index], labels, device))
                        if rollout is not None:
                            sources.update({k: v.to(device) for k, v in extra_sources[micro_index].items()})
                        if is_lm:
                            output = objective(sources, mask=sources["batch.mask"], reduction="sum")
                            if sequence_terms:
                                # scaled so that the division by the step's tokens below leaves them
                                # divided by its sequences (and logged as means per sequence)
                                ratio = max(step_count, 1.0) / max(step_sequences, 1.0)
                                for name in sequence_terms:
                                    output.terms[name] = output.terms[name] * ratio
                                output.total = sum(t.weight * output.terms[t.name] for t in terms)
                            loss = output.total * (context.world_size / max(step_count, 1.0))
                        else:
                            output = objective(sources)
                            loss = output.total * (count / step_count * context.world_size)
                        if scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            accelerator.backward(loss)
                    with torch.no_grad():
                        # Sums over samples (classifiers: means times count) or tokens (LMs: sums).
                        per = 1.0 if is_lm else count
                        window["loss"] += float(output.total.detach()) * per
                        window["samples"] += count
                        if "student.logits" in sources:
                            window["scored"] = window.get("scored", 0.0) + count
                            predictions = sources["student.logits"].argmax(-1)
                            hits = predictions == labels
                            window["correct"] += float(hits[sources["batch.mask"]].sum() if is_lm else hits.sum())
                        for name, value in output.terms.items():
                            window["terms"][name] += float(value.detach()) * per
                            step_sums[name] += float(value.detach()) * per
                    del sources, output, loss
                if context.world_size > 1 and objective_parameters:
                    _average_gradients(objective_parameters, context.world_size)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = None
                if plan.grad_clip is not None:
                    grad_norm = float(accelerator.clip_grad_norm_(trainable, plan.grad_clip))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_position += len(group)
                local_samples = int(sum(counts))
                if objective.updatable:
                    step_means = _step_means(context, step_sums, local_samples)
                    objective.update(step=step, total_steps=plan.total_steps, values=step_means)

                if context.is_main:
                    step_loss = sum(step_sums[t.name] * t.weight for t in terms) / max(1, local_samples)
                    context.callbacks.on_step(stage.name, step, plan.total_steps, {"loss": step_loss, "epoch": epoch + 1})
                if step % experiment.logging.every_steps == 0 or step == plan.total_steps:
                    _log_window(context, stage, window, step, epoch, scheduler, grad_norm)
                if experiment.checkpoint.every_steps and step % experiment.checkpoint.every_steps == 0:
                    save(epoch, batch_position)

            epoch_finished = batch_position >= len(batches)
            if epoch_finished or step >= plan.total_steps:
                completed_epochs = epoch + 1
                is_eval_epoch = completed_epochs % experiment.evaluation.every_epochs == 0
                if is_eval_epoch or step >= plan.total_steps or completed_epochs == plan.epochs:
                    results = _evaluate(context, _evaluated(model, accelerator), teacher_predictions, plan, teacher)
                    record = {"epoch": completed_epochs, "step": step, **results}
                    history.append(record)
                    context.log.write({"kind": "eval", "stage": stage.name, **record})
                    context.callbacks.on_eval(stage.name, record)
                if epoch_finished:
                    epoch, batch_position = epoch + 1, 0
                if epoch_finished and epoch % experiment.checkpoint.every_epochs == 0 and step < plan.total_steps:
                    save(epoch, batch_position)

    extra = {"mixture": {"domains": mixture.mixture.domains, "history": mixture.mixture.history}} if mixture is not None else {}
    if kept_rows is not None:
        extra["train_rows"] = kept_rows
    trained = accelerator.unwrap_model(model)
    if stage.cohort:
        extra["cohort"] = _cohort_results(context, trained, plan)
    summary = _finish(context, stage, plan, trained, history, elapsed_before + time.perf_counter() - started, extra)
    context.callbacks.on_stage_end(stage.name, summary)
    return summary


class _StageMixture:
    """A stage's DDK mixture: the weights, the teacher's fixed per-domain losses, the update schedule."""

    def __init__(self, context: RunContext, stage: StageSpec, teacher: torch.nn.Module | None, plan: StagePlan) -> None:
        from distill.engine.ddk import DomainMixture

        spec = stage.mixture
        data = context.data
        domains = data.meta.get("domains")
        if not data.is_lm or data.train.groups is None or not domains:
            raise ValueError(
                f"stages.{stage.name}.mixture needs language-model data whose rows carry domains (e.g. dataset: domain_text)"
            )
        if data.val is None or len(data.val) == 0 or data.val.groups is None:
            raise ValueError(f"stages.{stage.name}.mixture scores every domain on validation rows; set data.val_fraction > 0")
        self.context, self.spec, self.plan, self.stage = context, spec, plan, stage.name
        self.mixture = DomainMixture.from_split(
            data.train, domains, mode=spec.method, gap=spec.gap, normalize=spec.normalize, rule=spec.rule,
            smoothing=spec.smoothing, min_weight=spec.min_weight, initial=spec.initial,
        )
        if teacher is None and stage.teacher_cache is not None and stage.teacher_cache.model is not None:
            # a cached teacher: its model scores the validation rows once, then leaves memory
            teacher = context.frozen(stage.teacher_cache.model, before=0)
        self.teacher_losses = self._losses(teacher) if teacher is not None else None

    def _losses(self, model: torch.nn.Module) -> torch.Tensor:
        from distill.engine.ddk import domain_losses

        data = self.context.data
        return domain_losses(
            model, data.val, len(self.mixture.domains), batch_size=self.context.experiment.data.eval_batch_size,
            device=self.context.device, max_rows_per_domain=self.spec.eval_rows, autocast_dtype=self.plan.autocast_dtype,
        )

    def maybe_update(self, step: int, student: torch.nn.Module) -> None:
        """Update the weights before ``step`` when it is a multiple of ``every_steps`` (once per step)."""
        if step % self.spec.every_steps or self.teacher_losses is None:
            return
        if self.mixture.history and self.mixture.history[-1]["step"] == step:
            return
        student_losses = self._losses(student)
        self.mixture.update(student_losses, self.teacher_losses, step)
        names = self.mixture.domains
        record = {
            "kind": "mixture",
            "stage": self.stage,
            "step": step,
            "weights": self.mixture.as_dict(),
            "student_nll": dict(zip(names, map(float, student_losses))),
            "teacher_nll": dict(zip(names, map(float, self.teacher_losses))),
        }
        self.context.log.write(record)
        listing = ", ".join(f"{name} {weight:.3f}" for name, weight in record["weights"].items())
        self.context.callbacks.on_message(f"stage '{self.stage}': domain weights at step {step}: {listing}")


def _build_mixture(context: RunContext, stage: StageSpec, teacher: torch.nn.Module | None, plan: StagePlan) -> _StageMixture | None:
    return _StageMixture(context, stage, teacher, plan) if stage.mixture is not None else None


def _build_cohort(context: RunContext, stage: StageSpec, first: torch.nn.Module) -> torch.nn.Module:
    """Online distillation: the stage's model and its `cohort`, as one :class:`Cohort` module.

    Each network starts from its own seeded initialization; a model key listed more than once
    gets a distinct one per position (DML's peers must not start identical).
    """
    from distill.engine.teachers import Cohort, cohort_names

    keys = [stage.model, *(stage.cohort or [])]
    # a key seen before gets its own initialization, seeded by its position
    members = [first] + [
        context.build_network(key, copy=position if key in keys[:position] else 0) for position, key in enumerate(keys[1:], start=1)
    ]
    names = cohort_names(keys)
    return Cohort(members, names)


def _evaluated(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """What evaluation measures: the trained model, or the first network of a cohort."""
    from distill.engine.teachers import Cohort

    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.primary if isinstance(unwrapped, Cohort) else model


def _cohort_results(context: RunContext, cohort: Any, plan: StagePlan) -> dict[str, Any]:
    """Every cohort network's metrics on the test split (the summary's `cohort` entry)."""
    results: dict[str, Any] = {}
    for name, member in zip(cohort.names, cohort.members):
        logits = predict(member, context.data.test, context.experiment.data.eval_batch_size, context, plan.autocast_dtype)
        metrics = classification_metrics(logits, context.data.test.labels, ece_bins=context.experiment.evaluation.ece_bins)
        results[name] = {"test": metrics, "params": count_parameters(member)}
    listing = ", ".join(f"{name} {r['test']['accuracy']:.4f}" for name, r in results.items())
    context.callbacks.on_message(f"stage '{plan.stage_name}': cohort test accuracy: {listing}")
    return results


def _restrict_rows(context: RunContext, stage: StageSpec) -> Any:
    """`train_rows`: train on the rows where one model beats another (CoMD's teacher updates).

    Replaces ``context.data`` by a copy whose training split holds those rows (the caller
    restores it after the stage) and returns what was kept (None without `train_rows`).
    """
    spec = stage.train_rows
    if spec is None:
        return None
    import dataclasses

    from distill.engine.teachers import rows_where_better

    before = context.experiment.stages.index(stage)
    train = context.data.train
    better = context.frozen(spec.model, before=before)
    worse = context.frozen(spec.better_than, before=before)
    # too few rows for one batch: the batch with the largest margins instead
    rows = rows_where_better(
        better, worse, train.inputs, train.labels, context.experiment.data.eval_batch_size, context.device,
        minimum=context.experiment.data.batch_size,
    )
    context.data = dataclasses.replace(context.data, train=train.subset(rows))
    context.callbacks.on_message(
        f"stage '{stage.name}': training on the {len(rows):,} of {len(train):,} rows where '{spec.model}' beats '{spec.better_than}'"
    )
    return {"rows": len(rows), "of": len(train), "model": spec.model, "better_than": spec.better_than}


class _StageHard:
    """A stage's HARD augmentation: updated every `every_steps` steps, applied to every micro-batch."""

    def __init__(self, context: RunContext, stage: StageSpec) -> None:
        from distill.augment.hard import HardAugmentation

        if len(context.data.input_shape) != 3:  # (language-model stages were refused before)
            raise ValueError(f"stages.{stage.name}.hard: HARD's spatial augmentation needs image data [C, H, W]")
        if stage.teacher is None and not stage.teachers:
            raise ValueError(f"stages.{stage.name}.hard: HARD looks for inputs where teacher and student disagree; set `teacher:`")
        spec = stage.hard
        self.stage, self.world_size = stage.name, context.world_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(context.experiment.seed, "hard", stage.name))
            self.augmentation = HardAugmentation(
                in_channels=context.data.input_shape[0], every_steps=spec.every_steps, steps=spec.steps, **spec.params
            ).to(context.device)
        self.last: dict[str, float] = {}

    def _all_reduce(self, grads: list[torch.Tensor]) -> None:
        for grad in grads:
            torch.distributed.all_reduce(grad)
            grad /= self.world_size

    def step(self, step: int, micro_batches: list, teacher: Any, student: torch.nn.Module, context: RunContext) -> list:
        if self.augmentation.should_update(step):
            inputs = torch.cat([inputs for inputs, _ in micro_batches])
            reduce = self._all_reduce if self.world_size > 1 else None
            self.last = self.augmentation.update(teacher, student, inputs, average_gradients=reduce)
            if context.is_main and step % context.experiment.logging.every_steps == 0:
                context.log.write({"kind": "hard", "stage": self.stage, "step": step, **self.last})
        return [(self.augmentation.augment(inputs), labels) for inputs, labels in micro_batches]



def _hard_modules(hard: _StageHard | None) -> dict[str, torch.nn.Module]:
    return {"hard": hard.augmentation.augmenter} if hard is not None else {}


def _hard_optimizers(hard: _StageHard | None) -> dict[str, torch.optim.Optimizer]:
    return {"hard": hard.augmentation.optimizer} if hard is not None else {}


def _open_cache(context: RunContext, stage: StageSpec) -> Any:
    """The stage's cached teacher, checked against this run's data (and teacher model, when named)."""
    spec = stage.teacher_cache
    if spec is None:
        return None
    from distill.cache.teacher import open_for_stage

    if not context.data.is_lm or context.data.train.inputs.dim() != 2:
        raise ValueError(f"stages.{stage.name}.teacher: a cached teacher needs language-model data of single sequences [N, T]")
    cache = open_for_stage(spec.cache, context.data, context.experiment, spec.model, verify=spec.verify)
    context.callbacks.on_message(
        f"stage '{stage.name}': teacher read from the cache {spec.cache} (k={cache.k}, {cache.reader.total_records:,} tokens)"
    )
    return cache


def _batch_loader(context: RunContext, device: torch.device) -> Any:
    """``load(indices, epoch) -> (inputs, labels)`` of training samples, augmented, on ``device``.

    Augmentation is a function of (seed, epoch, sample index) only; crops pad with a black pixel
    as the model sees it after normalization.
    """
    train, spec = context.data.train, context.experiment.data.augment
    seed = derive_seed(context.experiment.seed, "augment")
    fill = None if context.data.mean is None else -context.data.mean / context.data.std

    def load(indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = train.inputs[indices]
        if spec.random_crop or spec.hflip:
            inputs = augment_batch(inputs, indices, epoch=epoch, seed=seed, spec=spec, fill=fill)
        return inputs.to(device), train.labels[indices].to(device)

    return load


def _generate(writer: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, spec: Any, context: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    meta = context.data.meta
    return generate_completions(
        writer, input_ids, labels, spec, pad_token_id=int(meta.get("pad_token_id", 0)), eos_token_id=meta.get("eos_token_id")
    )


def _global_sum(context: RunContext, value: float) -> float:
    if context.world_size == 1:
        return value
    total = context.accelerator.reduce(torch.tensor([value], dtype=torch.float64, device=context.device), reduction="sum")
    return float(total.cpu()[0])


def _average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce the gradients of parameters DDP does not manage (those of objective terms)."""
    for parameter in parameters:
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= world_size


def _step_means(context: RunContext, sums: dict[str, float], local_samples: int) -> dict[str, float]:
    """Each term's mean over the whole optimizer step, over every process."""
    names = list(sums)
    totals = torch.tensor([*(sums[n] for n in names), float(local_samples)], dtype=torch.float64)
    if context.world_size > 1:
        totals = context.accelerator.reduce(totals.to(context.device), reduction="sum").cpu()
    return {name: float(totals[i]) / max(float(totals[-1]), 1.0) for i, name in enumerate(names)}


def _log_window(
    context: RunContext, stage: StageSpec, window: dict[str, Any], step: int, epoch: int, scheduler: Any, grad_norm: float | None
) -> None:
    """Write the mean training metrics since the last log line, summed over processes."""
    names = list(window["terms"])
    totals = torch.tensor(
        [window["loss"], window["correct"], window["samples"], window.get("scored", 0.0), *[window["terms"][n] for n in names]],
        dtype=torch.float64,
    )
    if context.world_size > 1:
        totals = context.accelerator.reduce(totals.to(context.device), reduction="sum").cpu()
    samples = max(float(totals[2]), 1.0)
    record = {
        "kind": "train",
        "stage": stage.name,
        "step": step,
        "epoch": epoch + 1,
        "loss": float(totals[0]) / samples,
        "terms": {name: float(totals[4 + i]) / samples for i, name in enumerate(names)},
        "lr": float(scheduler.get_last_lr()[0]),
        "samples": int(samples),
    }
    if float(totals[3]) > 0:  # steps that computed the student's logits (a fused loss does not)
        record["accuracy"] = float(totals[1]) / float(totals[3])
    if grad_norm is not None and math.isfinite(grad_norm):
        record["grad_norm"] = grad_norm
    context.log.write(record)
    window.update(loss=0.0, correct=0.0, samples=0.0, scored=0.0)
    for name in names:
        window["terms"][name] = 0.0


def _finish(
    context: RunContext,
    stage: StageSpec,
    plan: StagePlan,
    student: torch.nn.Module,
    history: list[dict[str, Any]],
    elapsed: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the stage's result folder: final weights and a summary with the evaluation history."""
    import json

    best = best_epoch(history, context.experiment.compare.metric)
    summary = {
        "stage": stage.name,
        "model": stage.model,
        "teacher": stage.teacher,
        "steps": plan.total_steps,
        "epochs": plan.epochs,
        "history": history,
        "final": history[-1] if history else None,
        "best": best,
        "train_time_s": elapsed,
        "world_size": context.world_size,
        "fingerprint": context.fingerprints.get(stage.name),
        **(extra or {}),
    }
    if context.is_main:
        from safetensors.torch import save_file

        from distill.engine.teachers import Cohort

        files: dict[str, Any] = {}
        if isinstance(student, Cohort):
            # the stage's model is the cohort's first network; the others are kept beside it
            for name, member in zip(student.names[1:], list(student.members)[1:]):
                member_weights = state_dict_for_saving(member)
                files[f"cohort-{name}.safetensors"] = lambda p, w=member_weights: save_file(w, str(p))
            student = student.primary
        weights = state_dict_for_saving(student)
        write_folder_atomically(
            context.stage_dir(stage.name),
            {
                STAGE_WEIGHTS: lambda p: save_file(weights, str(p)),
                STAGE_SUMMARY: (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode(),
                **files,
            },
        )
    context.accelerator.wait_for_everyone()
    return summary


@contextlib.contextmanager
def _seeded_draws(context: RunContext, *keys: Any) -> Any:
    """Random draws that are a function of (seed, ``keys``, process) alone, so a resumed run repeats
    them; the global generators are restored afterwards."""
    devices = [context.device] if context.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(context.experiment.seed, *keys, context.rank))
        yield


ROLLOUT_SOURCES = {"advantages": "batch.advantages", "rewards": "batch.rewards"}
"""Loss argument -> source that a stage with ``rollout`` provides (passed to losses that take them)."""


class _StageRollout:
    """A stage's group rollouts (GRPO / KDRL): each step's prompts completed ``group_size`` times by
    the student, scored by the reward rule against the rows' reference completions.

    The sampling of step ``s`` is seeded by (seed, stage, s), so a resumed run draws the same
    completions. Mean rewards are written to ``metrics.jsonl`` as ``kind: rollout`` records.
    """

    def __init__(self, context: RunContext, stage: StageSpec) -> None:
        from distill.models.causal_lm import load_tokenizer
        from distill.rewards import build_reward

        assert stage.rollout is not None
        self.spec, self.context, self.stage = stage.rollout, context, stage
        meta = context.data.meta
        self.tokenizer = load_tokenizer(str(meta["tokenizer"]))
        try:
            self.reward = build_reward({"name": self.spec.reward.name, "params": self.spec.reward.params})
        except (ValueError, TypeError) as error:
            raise ValueError(f"stages.{stage.name}.rollout.reward: {error}") from None
        self.pad_token_id, self.eos_token_id = int(meta.get("pad_token_id", 0)), meta.get("eos_token_id")

    def sample(
        self, model: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        from distill.engine.rollout import group_rollout

        spec, context = self.spec, self.context
        batches, sources, rewards = [], [], []
        with _seeded_draws(context, "rollout", self.stage.name, step):
            for input_ids, labels in micro_batches:
                rolled = group_rollout(
                    model, input_ids, labels, group_size=spec.group_size, temperature=spec.temperature, top_p=spec.top_p,
                    max_new_tokens=spec.max_new_tokens, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                    tokenizer=self.tokenizer, reward_fn=self.reward, scale_advantages=spec.scale_advantages,
                    prompt_tokens=spec.prompt_tokens,
                )
                batches.append((rolled.input_ids, rolled.labels))
                sources.append(rolled.sources())
                rewards.append(rolled.rewards.detach().cpu())
        if context.is_main:
            values = torch.cat(rewards).double()
            groups = values.view(-1, spec.group_size)
            context.log.write({
                "kind": "rollout", "stage": self.stage.name, "step": step + 1,
                "reward": float(values.mean()), "reward_std": float(values.std()) if values.numel() > 1 else 0.0,
                "groups_with_signal": float((groups.std(dim=1) > 0).double().mean()),
                "samples": int(values.numel()),
            })
        return batches, sources


class _StageNegatives:
    """QCRD's negatives: each row's completion paired with one an earlier student samples.

    ``from: epoch_start`` keeps a frozen copy of the student taken when each epoch starts (the
    previous iteration; on resume, the weights it resumed from); ``from: STAGE`` uses that earlier
    stage's model for the whole stage.
    """

    def __init__(self, context: RunContext, stage: StageSpec) -> None:
        assert stage.negatives is not None
        self.spec, self.context, self.stage = stage.negatives, context, stage
        meta = context.data.meta
        self.pad_token_id, self.eos_token_id = int(meta.get("pad_token_id", 0)), meta.get("eos_token_id")
        self.snapshot: torch.nn.Module | None = None
        self.epoch: int | None = None
        if self.spec.source != "epoch_start":
            index = context.experiment.stages.index(stage)
            earlier = [s.name for s in context.experiment.stages[:index]]
            if self.spec.source not in earlier:
                raise ValueError(
                    f"stages.{stage.name}.negatives.from: '{self.spec.source}' is not an earlier stage "
                    f"(earlier: {', '.join(earlier) or 'none'}); use epoch_start or one of them"
                )
            self.snapshot = context.frozen(self.spec.source, before=index)

    def pairs(
        self, model: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], epoch: int, step: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import copy

        from distill.engine.rollout import sample_negatives

        if self.spec.source == "epoch_start" and self.epoch != epoch:
            self.snapshot = copy.deepcopy(model).eval().requires_grad_(False)
            self.epoch = epoch
        assert self.snapshot is not None
        # the negatives of step s are a function of (seed, stage, s) and the sampling model
        with _seeded_draws(self.context, "negatives", self.stage.name, step):
            return [
                sample_negatives(
                    self.snapshot, input_ids, labels, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                    temperature=self.spec.temperature, top_p=self.spec.top_p, max_new_tokens=self.spec.max_new_tokens,
                )
                for input_ids, labels in micro_batches
            ]

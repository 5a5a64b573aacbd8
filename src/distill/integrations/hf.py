"""Knowledge distillation inside a Hugging Face ``transformers.Trainer``.

:class:`DistillationTrainer` is a drop-in replacement for ``transformers.Trainer`` for causal
language models: an existing training script switches from fine-tuning to distillation by changing
the class and passing a teacher (and, optionally, an objective)::

    from distill.integrations.hf import DistillationTrainer

    trainer = DistillationTrainer(
        model=student,                      # trained
        teacher=teacher,                    # frozen: eval mode, no gradient, never saved
        objective=[{"loss": "forward_kl", "weight": 0.5},
                   {"loss": "cross_entropy", "weight": 0.5}],
        args=TrainingArguments(...),
        train_dataset=train, data_collator=collator,
    )
    trainer.train()
    trainer.save_model("student")           # the student only

What a step computes (see ``docs/hf_trainer.md``):

* Both models read the same batch; position ``t`` predicts token ``t + 1``, so the logits are
  ``[:, :-1]`` and the targets ``labels[:, 1:]``; a target of ``-100`` marks a position that is not
  trained (padding, prompt). The teacher runs under ``torch.no_grad``.
* The objective (:class:`distill.objective.Objective`) reads the sources ``student.logits``,
  ``teacher.logits``, ``batch.labels`` (the shifted targets, ``-100`` where masked) and
  ``batch.mask`` (``[B, T-1]`` bool, True at trained positions) and returns each term **summed** over
  the valid positions.
* The sum is divided by the number of valid target tokens of the **whole optimizer step**: every
  micro-batch of a gradient-accumulation group (and, with ``average_tokens_across_devices``, every
  process) shares one denominator. Gradient accumulation ``k x b`` then gives exactly the
  gradient of one batch of ``k * b`` sequences, however unevenly they are padded. A per-micro-batch
  mean would weight the tokens of short micro-batches more.
* When teacher and student share a tokenizer but pad their embedding matrices to different sizes
  (e.g. 151936 vs 152064 rows), both logits are cut to the shared range ``[:min]``; a target id
  outside it raises ``ValueError``.

Trainable parts of the objective (adapters, learned heads) are moved to the student's device and
optimized with the student; module losses with ``update(step=, total_steps=, value=)`` (TAID's
adaptive ``t``) are stepped after every optimizer step with the term's value averaged over the
tokens of that step. Each term's unweighted per-token value is logged as ``terms/<name>`` (and
``eval_terms/<name>`` by ``evaluate``). The objective's state is written to every checkpoint
(``distill_objective.safetensors``) and read back by ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import distill.losses  # noqa: F401  (registers the losses that terms name)
from distill.objective import Objective, Term, base_source

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target id of a position that is not trained (the ``transformers`` convention)."""

SOURCES: tuple[str, ...] = ("student.logits", "teacher.logits", "batch.labels", "batch.mask")
"""Sources a :class:`DistillationTrainer` step provides to the objective."""

OBJECTIVE_STATE_NAME = "distill_objective.safetensors"
"""File, inside each checkpoint folder, holding the objective's ``state_dict``."""

TERM_LOG_PREFIX = "terms/"
"""Training logs name each term ``terms/<name>``; ``evaluate`` returns ``eval_terms/<name>``."""

TERM_KEYS: tuple[str, ...] = ("name", "loss", "weight", "params", "inputs")


def default_objective() -> Objective:
    """Forward KL(teacher || student) at temperature 1 with weight 1: the objective used when none is given."""
    return Objective([Term("forward_kl", "forward_kl", weight=1.0)])


def term_from_dict(spec: Mapping[str, Any]) -> Term:
    """A :class:`Term` from a dict written as in YAML: ``{"loss": "forward_kl", "weight": 0.5, "params": {...}}``.

    ``name`` defaults to the loss name; ``weight`` to 1; ``params`` and ``inputs`` to empty.
    """
    unknown = sorted(set(spec) - set(TERM_KEYS))
    if unknown:
        raise ValueError(f"objective term {dict(spec)!r}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TERM_KEYS)}")
    if "loss" not in spec:
        raise ValueError(f"objective term {dict(spec)!r} has no 'loss' (a registered loss name, e.g. 'forward_kl')")
    loss = spec["loss"]
    name = spec.get("name") or (loss if isinstance(loss, str) else getattr(loss, "__name__", None))
    if not name:
        raise ValueError(f"objective term {dict(spec)!r}: give it a 'name'")
    return Term(
        str(name),
        loss,
        weight=float(spec.get("weight", 1.0)),
        params=dict(spec.get("params") or {}),
        inputs=dict(spec.get("inputs") or {}),
    )


def build_objective(objective: Any = None, *, num_classes: int | None = None) -> Objective:
    """An :class:`Objective` from what :class:`DistillationTrainer` accepts.

    ``None`` -> :func:`default_objective`; an :class:`Objective` as is; a :class:`Term` or a term
    dict, or a list of them (terms and dicts may be mixed); a dict ``{"terms": [...]}`` as the
    ``objective`` section of an experiment file. ``num_classes`` (the shared vocabulary size) is
    handed to module losses that ask for it.
    """
    if objective is None:
        return default_objective()
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, Mapping):
        if "terms" in objective:
            extra = sorted(set(objective) - {"terms"})
            if extra:
                raise ValueError(
                    f"objective: only 'terms' is read here, got also {', '.join(extra)} "
                    "(build an Objective with adapters yourself and pass it)"
                )
            objective = objective["terms"]
        else:
            objective = [objective]
    if isinstance(objective, Term):
        objective = [objective]
    if not isinstance(objective, Sequence) or isinstance(objective, (str, bytes)):
        raise TypeError(
            "objective must be an Objective, a list of Term, or a list of term dicts "
            f"({{'loss': 'forward_kl', 'weight': 1.0}}), got {type(objective).__name__}"
        )
    terms = []
    for item in objective:
        if isinstance(item, Term):
            terms.append(item)
        elif isinstance(item, Mapping):
            terms.append(term_from_dict(item))
        else:
            raise TypeError(f"an objective term must be a Term or a dict, got {type(item).__name__}")
    if num_classes is None:
        return Objective(terms)
    shapes = {"student.logits": (num_classes,), "teacher.logits": (num_classes,)}
    return Objective(terms, num_classes=num_classes, source_shapes=shapes)


def output_vocab_size(model: nn.Module | None) -> int | None:
    """Rows of the model's output projection (its logits' last dim), else ``config.vocab_size``."""
    if model is None:
        return None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            weight = getattr(get(), "weight", None)
        except (AttributeError, NotImplementedError, TypeError):
            weight = None
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 0:
            return int(weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(vocab) if vocab else None


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's output: ``.logits`` / ``["logits"]``, a tensor, or the first element."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in the model output ({type(outputs).__name__})")
    return logits


def _takes_use_cache(model: nn.Module | None) -> bool:
    if model is None:
        return False
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "use_cache" in parameters:
        return True
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return var_keyword and hasattr(getattr(model, "config", None), "use_cache")


def _input_device(model: nn.Module) -> torch.device | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            weight = getattr(get(), "weight", None)
        except (AttributeError, NotImplementedError, TypeError):
            weight = None
        if isinstance(weight, torch.Tensor):
            return weight.device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else None


def shifted_targets(batch: Mapping[str, Any]) -> tuple[torch.Tensor | None, bool]:
    """The next-token targets of a batch and whether the logits still need the shift.

    ``shift_labels`` (already aligned with the logits, as padding-free collators give) is used as
    is; otherwise ``labels[..., 1:]``. ``(None, False)`` when the batch has neither.
    """
    shift = batch.get("shift_labels")
    if isinstance(shift, torch.Tensor):
        return shift, False
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        return labels[..., 1:], True
    return None, False


class _Totals:
    """Running sums of one phase, kept on the device (no synchronisation per micro-batch):
    each term's summed value, the weighted total, and the number of valid tokens."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.vector: torch.Tensor | None = None

    def add(self, terms: Mapping[str, torch.Tensor], total: torch.Tensor, count: torch.Tensor) -> None:
        row = torch.stack([terms[n].detach().float() for n in self.names] + [total.detach().float(), count.detach().float()])
        self.vector = row if self.vector is None else self.vector + row.to(self.vector.device)

    def reset(self) -> None:
        self.vector = None


class _ObjectiveCallback(TrainerCallback):
    """Steps the objective with the Trainer's loop: gradient sync, ``update`` after each optimizer
    step, gradient reset, checkpointing of its state."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._start_training()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._sync_objective_gradients()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._end_step(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._save_objective_to_checkpoint(args, state)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distills ``teacher`` into ``model`` with a :mod:`distill` objective.

    Arguments are those of ``transformers.Trainer`` plus:

    * ``teacher``: the teacher model (a causal LM with the student's tokenizer). It is moved to the
      student's device (unless it was dispatched with a ``device_map``), put in eval mode and
      frozen (``requires_grad_(False)``); it is never optimized and never saved. It may be left out
      only if no term reads ``teacher.*``.
    * ``objective``: an :class:`~distill.objective.Objective`, a list of
      :class:`~distill.objective.Term`, or a list of term dicts as in YAML
      (``{"loss": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}}``; ``name`` defaults
      to the loss name). Default: :func:`default_objective`, forward KL with weight 1.

    The batches need ``labels`` (``-100`` where not trained), as
    ``DataCollatorForLanguageModeling(tokenizer, mlm=False)`` makes them. The loss of a step is the
    objective's weighted sum over the step's valid target tokens divided by their number (see the
    module docstring); ``evaluate`` reports ``eval_loss`` the same way, over the whole evaluation set.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *trainer_args: Any,
        teacher: nn.Module | None = None,
        objective: Any = None,
        **trainer_kwargs: Any,
    ) -> None:
        if teacher is not None and teacher is model:
            raise ValueError("the teacher and the student are the same module; pass a separate (frozen) teacher")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes the loss from its objective; do not pass compute_loss_func")
        vocab_sizes = [v for v in (output_vocab_size(model), output_vocab_size(teacher)) if v is not None]
        self.objective: Objective = build_objective(objective, num_classes=min(vocab_sizes) if vocab_sizes else None)
        unsupported = sorted({base_source(s) for t in self.objective.terms for s in t.sources.values()} - set(SOURCES))
        if unsupported:
            raise ValueError(
                f"the objective reads {', '.join(unsupported)}, which DistillationTrainer does not provide; "
                f"it provides {', '.join(SOURCES)}"
            )
        if teacher is None and self.objective.needs_teacher:
            raise ValueError("the objective reads teacher.logits but no teacher was given (teacher=...)")
        self.teacher = teacher
        self._phase: str | None = None
        self._train_totals = _Totals([t.name for t in self.objective.terms])
        self._eval_totals: _Totals | None = None
        self._log_sums: dict[str, float] = {t.name: 0.0 for t in self.objective.terms}
        self._log_steps = 0
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor is not used by DistillationTrainer; add a cross_entropy term with "
                "params: {label_smoothing: ...} to the objective instead"
            )
        # The loss is normalized by the step's token count (`num_items_in_batch`), so the Trainer must
        # not divide it again by the number of accumulation steps. `loss_is_scaled_for_ga` is set per
        # call in compute_loss; `model_accepts_loss_kwargs` says the same to older transformers.
        self.model_accepts_loss_kwargs = True
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self._student_use_cache = _takes_use_cache(self.model)
        self._teacher_use_cache = _takes_use_cache(teacher)
        device = _input_device(self.model) if self.model is not None else self.args.device
        device = device if device is not None else self.args.device
        if teacher is not None:
            if getattr(teacher, "hf_device_map", None) is None:
                teacher.to(device)
            teacher.eval()
            teacher.requires_grad_(False)
        self._teacher_device = _input_device(teacher) if teacher is not None else None
        self.objective.to(device)
        self.add_callback(_ObjectiveCallback(self))

    # ---- the loss -------------------------------------------------------------------------------

    def _forward(self, model: nn.Module, inputs: Mapping[str, Any], use_cache: bool) -> Any:
        return model(**inputs, **({"use_cache": False} if use_cache else {}))

    def _teacher_logits(self, inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        assert self.teacher is not None
        if self._teacher_device is not None:
            inputs = {k: v.to(self._teacher_device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        autocast = getattr(self.accelerator, "autocast", None)
        with torch.no_grad(), (autocast() if callable(autocast) else nullcontext()):
            outputs = self._forward(self.teacher, inputs, self._teacher_use_cache)
        return logits_of(outputs).detach().to(device)

    def _counts_all_processes(self) -> bool:
        """Whether ``num_items_in_batch`` counts the tokens of every process (so each process's loss
        is multiplied by the number of processes, which data parallelism's mean undoes)."""
        return bool(getattr(self.args, "average_tokens_across_devices", False)) and self.args.world_size > 1

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The distillation loss of one micro-batch (see the module docstring).

        With ``num_items_in_batch`` (the Trainer passes the number of valid target tokens of the
        whole optimizer step) the summed objective is divided by it; without, by this call's own
        count. In evaluation the batch's own count is used.
        """
        inputs = dict(inputs)
        targets, shift = shifted_targets(inputs)
        for key in ("labels", "shift_labels", "skip_logits", "return_loss", "num_items_in_batch"):
            inputs.pop(key, None)
        if targets is None:
            raise ValueError(
                "DistillationTrainer needs `labels` in every batch (-100 where not trained), e.g. from "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False)"
            )
        student_outputs = self._forward(model, inputs, self._student_use_cache)
        student_logits = logits_of(student_outputs)
        teacher_logits = self._teacher_logits(inputs, student_logits.device) if self.objective.needs_teacher else None
        if shift:
            student_logits = student_logits[..., :-1, :]
            teacher_logits = teacher_logits[..., :-1, :] if teacher_logits is not None else None
        targets = targets.to(student_logits.device)
        if targets.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels {tuple(targets.shape)} do not match the logits {tuple(student_logits.shape[:-1])} after the shift"
            )
        mask = targets != IGNORE_INDEX
        if teacher_logits is not None and teacher_logits.shape[-1] != student_logits.shape[-1]:
            student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
            shared = min(student_vocab, teacher_vocab)
            outside = mask & (targets >= shared)
            if bool(outside.any()):
                raise ValueError(
                    f"label id {int(targets[outside].max())} lies outside the vocabulary shared by the student "
                    f"({student_vocab} logits) and the teacher ({teacher_vocab} logits): ids must be < {shared}. "
                    "Teacher and student must use the same tokenizer; only padding rows of the embedding may differ"
                )
            student_logits = student_logits[..., :shared]
            teacher_logits = teacher_logits[..., :shared]
        sources = {"student.logits": student_logits, "batch.labels": targets, "batch.mask": mask}
        if teacher_logits is not None:
            sources["teacher.logits"] = teacher_logits
        self._place_objective(student_logits.device)
        output = self.objective(sources, mask=mask, reduction="sum")
        count = mask.sum()
        per_step = num_items_in_batch is not None and self._phase != "eval"
        if per_step:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=output.total.device)
            if denominator.numel() > 1:  # DataParallel expands it to one value per GPU
                denominator = denominator.reshape(-1)[0]
        else:
            denominator = count.to(torch.float32)
        loss = output.total / denominator.clamp_min(1.0)
        if per_step and self._phase == "train" and self._counts_all_processes():
            loss = loss * (self.accelerator.num_processes // _parallel_size(self, "get_tp_size"))
        # Read by Trainer.training_step: a loss divided by the step's token count is already scaled
        # for gradient accumulation; one divided by its own count is divided by the steps there.
        self.loss_is_scaled_for_ga = per_step
        totals = self._train_totals if self._phase == "train" else self._eval_totals if self._phase == "eval" else None
        if totals is not None:
            totals.add(output.terms, output.total, count)
        return (loss, student_outputs) if return_outputs else loss

    def _place_objective(self, device: torch.device) -> None:
        tensor = next(iter(self.objective.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.objective.buffers()), None)
        if tensor is not None and tensor.device != device:
            self.objective.to(device)

    # ---- the token count of a step --------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Valid target tokens (``labels[..., 1:] != -100``) of the micro-batches of one optimizer
        step, summed over processes when ``average_tokens_across_devices`` (as ``transformers`` does),
        and divided by the number of processes that see the same batch (tensor/context parallel).
        None in evaluation, where each batch is divided by its own count."""
        if self._phase == "eval":
            return None
        counts = []
        for batch in batch_samples:
            targets, _ = shifted_targets(batch) if isinstance(batch, Mapping) else (None, False)
            if targets is None:
                return None
            counts.append(targets.ne(IGNORE_INDEX).sum().to(device))
        if not counts:
            return None
        total = torch.stack(counts).sum()
        if self._counts_all_processes():
            total = self.accelerator.gather(total.reshape(1)).sum()
        replicas = _parallel_size(self, "get_tp_size") * _parallel_size(self, "get_cp_size") * _parallel_size(self, "get_sp_size")
        return total / replicas if replicas > 1 else total

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any = None) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and their token count (:meth:`_get_num_items_in_batch`),
        whatever the model's forward signature (``transformers`` counts only for some models)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        return batch_samples, self._get_num_items_in_batch(batch_samples, device if device is not None else self.args.device)

    # ---- phases ---------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        self._phase = "train"
        self.objective.train()
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._phase = None

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        self._phase = "eval"
        self.objective.eval()
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._phase = None

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """The Trainer's loop; ``<prefix>_loss`` is then replaced by the objective summed over every
        valid target token of the set divided by their number (not a mean of batch means), and each
        term's per-token value is added as ``<prefix>_terms/<name>``."""
        self._eval_totals = _Totals([t.name for t in self.objective.terms])
        try:
            output = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            totals, self._eval_totals = self._eval_totals, None
        values = self._reduce(totals)
        count = values[-1]
        if count > 0 and output.metrics is not None:
            output.metrics[f"{metric_key_prefix}_loss"] = values[-2] / count
            for i, name in enumerate(totals.names):
                output.metrics[f"{metric_key_prefix}_{TERM_LOG_PREFIX}{name}"] = values[i] / count
        return output

    def _reduce(self, totals: _Totals) -> list[float]:
        """The sums of ``totals`` over every process: ``[term sums..., weighted total, token count]``."""
        vector = totals.vector
        if vector is None:
            vector = torch.zeros(len(totals.names) + 2)
        if self.args.world_size > 1:
            vector = self.accelerator.reduce(vector.to(self.args.device), reduction="sum")
        return [float(v) for v in vector.cpu().tolist()]

    # ---- the objective along the training loop --------------------------------------------------

    def _start_training(self) -> None:
        self._train_totals.reset()
        self._log_sums = {name: 0.0 for name in self._log_sums}
        self._log_steps = 0
        self.objective.zero_grad(set_to_none=True)

    def _sync_objective_gradients(self) -> None:
        """Average the objective's gradients over processes (it is not wrapped for data parallelism)."""
        if self.args.world_size <= 1:
            return
        for parameter in self.objective.parameters():
            if not parameter.requires_grad:
                continue
            if parameter.grad is None:  # every process must join the reduction
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.copy_(self.accelerator.reduce(parameter.grad, reduction="mean"))

    def _end_step(self, state: Any) -> None:
        """After an optimizer step: per-token term values of the step -> ``update`` and the log window."""
        values = self._reduce(self._train_totals)
        self._train_totals.reset()
        # Trainer.zero_grad covers the student only.
        self.objective.zero_grad(set_to_none=True)
        count = values[-1]
        if count <= 0:
            return
        means = {name: values[i] / count for i, name in enumerate(self._train_totals.names)}
        if self.objective.updatable:
            self.objective.update(step=int(state.global_step), total_steps=int(state.max_steps), values=means)
        for name, value in means.items():
            self._log_sums[name] += value
        self._log_steps += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs gain ``terms/<name>``: each term's unweighted per-token value, averaged over
        the optimizer steps since the last log (as ``loss`` is)."""
        if "loss" in logs and self._log_steps > 0:
            logs = dict(logs)
            for name, total in self._log_sums.items():
                logs[f"{TERM_LOG_PREFIX}{name}"] = total / self._log_steps
            self._log_sums = {name: 0.0 for name in self._log_sums}
            self._log_steps = 0
        super().log(logs, *args, **kwargs)

    # ---- optimizer ------------------------------------------------------------------------------

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus parameter groups for the objective's trainable parameters
        (adapters, learned heads; weight decay on matrices only). A user-supplied optimizer must hold them."""
        supplied = self.optimizer is not None
        optimizer = super().create_optimizer(*args, **kwargs)
        wanted = [p for p in self.objective.parameters() if p.requires_grad]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in wanted if id(p) not in held]
        if not missing:
            return optimizer
        if supplied:
            raise ValueError(
                f"the optimizer given to DistillationTrainer does not hold {len(missing)} trainable parameter(s) of the "
                "objective; build the Objective first and include objective.parameters() in the optimizer"
            )
        decay = [p for p in missing if p.dim() >= 2]
        no_decay = [p for p in missing if p.dim() < 2]
        if decay:
            optimizer.add_param_group({"params": decay, "weight_decay": self.args.weight_decay})
        if no_decay:
            optimizer.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return optimizer

    # ---- checkpoints ----------------------------------------------------------------------------

    def _save_objective_to_checkpoint(self, args: Any, state: Any) -> None:
        state_dict = self.objective.state_dict()
        if not state_dict or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            from safetensors.torch import save_file

            # written beside the step's files, atomically: a temporary name, then a rename
            path = os.path.join(folder, OBJECTIVE_STATE_NAME)
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path + ".tmp")
            os.replace(path + ".tmp", path)

    def load_objective_state(self, checkpoint: str | os.PathLike) -> bool:
        """Load the objective's state from a checkpoint folder; False if it holds none."""
        path = os.path.join(checkpoint, OBJECTIVE_STATE_NAME)
        if not os.path.isfile(path):
            if self.objective.state_dict():
                logger.warning("checkpoint %s holds no objective state (%s); the objective starts fresh", checkpoint, OBJECTIVE_STATE_NAME)
            return False
        from safetensors.torch import load_file

        self.objective.load_state_dict(load_file(path, device="cpu"))
        return True

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; when resuming, the objective's state (TAID's ``t``, adapters) is restored too."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            self.load_objective_state(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _parallel_size(trainer: Trainer, method: str) -> int:
    get = getattr(trainer, method, None)
    try:
        return max(int(get()), 1) if callable(get) else 1
    except (AttributeError, TypeError, ValueError):
        return 1

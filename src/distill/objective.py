"""The objective: a weighted sum of named loss terms, each reading named inputs.

A term names a registered loss and, for each tensor argument of that loss, the *source* it reads::

    student.logits            the trained model's output
    teacher.logits            the teacher's output (no gradient)
    batch.labels              the integer labels of the batch
    batch.inputs              the (augmented) inputs, as the teacher sees them
    batch.patch_mask          [B, patches] bool, True where the trained model's input patch was hidden
    batch.mask                [B, T] bool, True at the token positions that are targets (language models)
    student.last_hidden       a language model's final hidden states [B, T, H] (before lm_head)
    student.lm_head           its output projection weight [V, H] (trained; tied to the embedding if the model ties)
    teacher.last_hidden / teacher.lm_head   the same on the teacher
    reference.logits          the output of the stage's `reference` model (no gradient; e.g. ADPA's reference policy)
    teacher.topk_logprobs     a cached teacher's top-k log-probabilities [B, T, k] (`teacher: {cache: PATH}`)
    teacher.topk_ids / teacher.tail_logmass   their token ids [B, T, k] and the log mass outside them [B, T]
    student.<path>.output     any submodule's output (or ``.input``), by dotted path (distill.hooks)
    teacher.<path>.output     the same on the teacher
    student.features          the input of the model's last nn.Linear (penultimate features)
    <source> -> <adapter>     a source passed through an adapter of the objective (distill.adapters)

A loss is either a function or an ``nn.Module`` class (for losses that own parameters or state:
a learned head, an adaptive schedule). For a function, the tensor arguments are its positional
parameters and its keyword-only parameters are hyper-parameters set from ``params`` in YAML. For
a class, the tensor arguments are the positional parameters of ``forward`` and the
hyper-parameters are the keyword-only parameters of ``__init__``; ``__init__`` may also ask for
``num_classes`` and ``input_shapes`` (tensor argument -> shape of one sample, e.g.
``{"student_features": (64,)}``, whatever source the argument reads), which the objective
supplies. A module loss may define ``update(step=..., total_steps=..., value=...)``: the engine
calls it after every optimizer step with the term's value averaged over that step (and over
processes), which is how schedules that adapt to training progress (TAID) move. A module loss
that needs statistics of the whole training set before training (ND's teacher class means)
defines ``setup(collect)`` and a boolean buffer ``ready``: while ``ready`` is false the engine
calls ``setup`` once before the first step, with ``collect(["teacher_features", "labels"])``
returning those arguments' tensors over the training set (their sources follow the term's
``inputs``, else :data:`DEFAULT_SOURCES`).

Adapters (``Objective(..., adapters={"proj": Adapter("linear", to="teacher.features")})``) are
trained with the student and checkpointed with the objective; see :mod:`distill.adapters`.

Arguments named ``student_logits``, ``teacher_logits``, ``labels`` (and the others in
:data:`DEFAULT_SOURCES`) read their usual source unless ``inputs`` says otherwise.

Python use::

    from distill.objective import Objective, Term
    objective = Objective([
        Term("ce", "cross_entropy", weight=0.1),
        Term("kd", "hinton_kd", weight=0.9, params={"temperature": 4.0}),
    ])
    out = objective({"student.logits": s, "teacher.logits": t, "batch.labels": y})
    out.total.backward(); print(out.terms)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from distill.adapters import Adapter, build_adapter, split_source
from distill.hooks import parse_feature_source
from distill.registry import LOSSES, accepted_parameters

DEFAULT_SOURCES: dict[str, str] = {
    "student_logits": "student.logits",
    "teacher_logits": "teacher.logits",
    "labels": "batch.labels",
    "inputs": "batch.inputs",
    "patch_mask": "batch.patch_mask",
    "student_scores": "student.logits",
    "teacher_scores": "teacher.logits",
    "student_features": "student.features",
    "teacher_features": "teacher.features",
    "student_hidden": "student.last_hidden",
    "teacher_hidden": "teacher.last_hidden",
    "student_weight": "student.lm_head",
    "teacher_weight": "teacher.lm_head",
    "teacher_logprobs": "teacher.topk_logprobs",
    "teacher_ids": "teacher.topk_ids",
    "teacher_tail": "teacher.tail_logmass",
    "teachers_logits": "teachers.logits",
    "teachers_weights": "teachers.weights",
    "cohort_logits": "cohort.logits",
    "labels_b": "batch.labels_b",
    "mix_lam": "batch.mix_lam",
    "advantages": "batch.advantages",
    "rewards": "batch.rewards",
}
"""Source read by a loss argument of this name when the term's ``inputs`` does not say."""

KNOWN_SOURCES: tuple[str, ...] = (
    "student.logits",
    "teacher.logits",
    "batch.labels",
    "batch.inputs",
    "batch.patch_mask",
    "batch.mask",
    "student.last_hidden",
    "student.lm_head",
    "teacher.last_hidden",
    "teacher.lm_head",
    "reference.logits",
    "teacher.topk_logprobs",
    "teacher.topk_ids",
    "teacher.tail_logmass",
    "teachers.logits",
    "teachers.weights",
    "cohort.logits",
    "batch.labels_b",
    "batch.mix_lam",
    "batch.advantages",
    "batch.rewards",
)
"""Sources a stage provides (teacher ones when it has a teacher, ``teachers.*`` when it has several,
``cohort.logits`` when it trains a cohort, ``batch.patch_mask`` when it masks inputs: ``input_mask``,
``batch.labels_b`` / ``batch.mix_lam`` when it mixes inputs: ``mix``, ``batch.advantages`` /
``batch.rewards`` when it samples group rollouts: ``rollout``); feature sources come on top."""

INJECTED_ARGUMENTS: tuple[str, ...] = ("num_classes", "input_shapes")
"""Constructor arguments of module losses that the objective supplies itself."""


def is_module_loss(loss: Any) -> bool:
    return inspect.isclass(loss) and issubclass(loss, torch.nn.Module)


def required_sources(terms: list["Term"]) -> set[str]:
    """Every source the terms read, adapters stripped (what a forward pass must provide)."""
    return {base_source(source) for term in terms for source in term.sources.values()}


def _call_signature(loss: Any) -> inspect.Signature:
    return inspect.signature(loss.forward if is_module_loss(loss) else loss)


def tensor_arguments(loss: Any) -> tuple[list[str], list[str]]:
    """(required, optional) names of the tensor (positional) arguments of a loss."""
    required: list[str] = []
    optional: list[str] = []
    for parameter in _call_signature(loss).parameters.values():
        if parameter.name == "self":
            continue
        if parameter.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            continue
        (required if parameter.default is inspect.Parameter.empty else optional).append(parameter.name)
    return required, optional


def hyperparameters(loss: Any) -> dict[str, Any]:
    """Hyper-parameters of a loss (set from YAML ``params``) and their defaults.

    Keyword-only parameters of a function, or of a module loss's ``__init__``. ``mask``,
    ``reduction`` and the injected ``num_classes`` / ``input_shapes`` are left out.
    """
    signature = inspect.signature(loss.__init__ if is_module_loss(loss) else loss)
    excluded = {"mask", "reduction", *INJECTED_ARGUMENTS}
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in excluded
    }


def is_known_source(source: str) -> bool:
    """Whether ``source`` (without any ``-> adapter``) names something a stage can provide."""
    return source in KNOWN_SOURCES or parse_feature_source(source) is not None


def base_source(source: str) -> str:
    """The source without its adapter: ``"student.layer2.output -> proj"`` -> ``"student.layer2.output"``."""
    return split_source(source)[0]


def resolve_inputs(loss: Any, inputs: Mapping[str, str]) -> dict[str, str]:
    """Argument -> source for every tensor argument a term will pass.

    Required arguments come from ``inputs`` or :data:`DEFAULT_SOURCES`; an optional one is passed
    only when ``inputs`` names it. Raises ``ValueError`` for arguments the loss does not have, or
    required ones with no source.
    """
    required, optional = tensor_arguments(loss)
    unknown = sorted(set(inputs) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"the loss has no tensor argument {', '.join(repr(u) for u in unknown)}; "
            f"its tensor arguments are {', '.join(required + optional)}"
        )
    resolved: dict[str, str] = {}
    for name in required:
        source = inputs.get(name, DEFAULT_SOURCES.get(name))
        if source is None:
            raise ValueError(f"the loss argument '{name}' has no default source; set inputs.{name}")
        resolved[name] = source
    for name in optional:
        if name in inputs:
            resolved[name] = inputs[name]
    return resolved


@dataclass
class Term:
    """One weighted term: ``weight * loss(**{arg: sources[source]}, **params)``.

    ``loss`` is a registered name, a function, or an ``nn.Module`` class (built by
    :class:`Objective`, which supplies ``num_classes`` / ``input_shapes`` if asked for).
    """

    name: str
    loss: str | Callable[..., torch.Tensor] | type
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fn: Any = LOSSES.get(self.loss).builder if isinstance(self.loss, str) else self.loss
        allowed = hyperparameters(self.fn)
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise ValueError(
                f"term '{self.name}': unknown parameter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
        self.sources: dict[str, str] = resolve_inputs(self.fn, self.inputs)
        accepted, var_keyword = accepted_parameters(self.fn.forward if self.is_module else self.fn)
        # A user's own loss may take neither: it then gets the batch unmasked and returns a mean.
        self.takes_mask = var_keyword or "mask" in accepted
        self.takes_reduction = var_keyword or "reduction" in accepted

    @property
    def is_module(self) -> bool:
        return is_module_loss(self.fn)

    def injected_arguments(self) -> set[str]:
        """Which of ``num_classes`` / ``input_shapes`` the module loss's constructor asks for."""
        if not self.is_module:
            return set()
        accepted, _ = accepted_parameters(self.fn.__init__)
        return accepted & set(INJECTED_ARGUMENTS)


@dataclass
class ObjectiveOutput:
    """The weighted total (for backward) and each term's unweighted value (for logs)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Objective(torch.nn.Module):
    """A weighted sum of named terms.

    It is an ``nn.Module``: the module losses among its terms (learned heads, adaptive
    schedules) live in ``self.losses`` and are trained, moved and checkpointed with the student.
    Module losses whose constructor asks get ``num_classes`` and ``input_shapes`` (the shape of
    one sample of each tensor argument, looked up in ``source_shapes`` through the term's
    sources).
    """

    def __init__(
        self,
        terms: list[Term],
        *,
        adapters: Mapping[str, Adapter | torch.nn.Module] | None = None,
        num_classes: int | None = None,
        source_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one term")
        names = [term.name for term in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"objective term names must be unique; repeated: {', '.join(duplicates)}")
        self.terms = terms
        shapes: dict[str, tuple[int, ...]] = dict(source_shapes or {})
        self.adapters = torch.nn.ModuleDict()
        self._build_adapters(dict(adapters or {}), num_classes, shapes)
        self.losses = torch.nn.ModuleDict()
        for term in terms:
            if not term.is_module:
                continue
            injected: dict[str, Any] = {}
            wanted = term.injected_arguments()
            if "num_classes" in wanted:
                if num_classes is None:
                    raise ValueError(f"term '{term.name}': the loss needs `num_classes` to be built; pass it to Objective")
                injected["num_classes"] = num_classes
            if "input_shapes" in wanted:
                if source_shapes is None:
                    raise ValueError(f"term '{term.name}': the loss needs the shapes of its inputs; pass source_shapes to Objective")
                injected["input_shapes"] = {arg: tuple(shapes[src]) for arg, src in term.sources.items() if src in shapes}
            self.losses[term.name] = term.fn(**term.params, **injected)

    def _build_adapters(
        self,
        adapters: dict[str, Adapter | torch.nn.Module],
        num_classes: int | None,
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        """Build the adapters the terms use; record each adapted source's shape in ``shapes``."""
        fed: dict[str, set[str]] = {}
        for term in self.terms:
            for argument, source in term.sources.items():
                base, adapter = split_source(source)
                if adapter is None:
                    continue
                if adapter not in adapters:
                    known = ", ".join(adapters) or "(none declared)"
                    raise ValueError(f"term '{term.name}': inputs.{argument} uses adapter '{adapter}', which is not declared; adapters: {known}")
                fed.setdefault(adapter, set()).add(base)
        unused = sorted(set(adapters) - set(fed))
        if unused:
            raise ValueError(f"adapter(s) {', '.join(unused)} declared but used by no term (write 'source -> name' in a term's inputs)")
        for name, bases in fed.items():
            if len(bases) > 1:
                raise ValueError(f"adapter '{name}' is fed by several sources ({', '.join(sorted(bases))}); declare one adapter per source")
            base = next(iter(bases))
            declared = adapters[name]
            if isinstance(declared, torch.nn.Module):
                self.adapters[name] = declared
            else:
                if base not in shapes:
                    raise ValueError(f"adapter '{name}': the shape of its input {base} is unknown; pass source_shapes to Objective")
                if declared.to is None:
                    target = None
                elif declared.to == "logits":
                    if num_classes is None:
                        raise ValueError(f"adapter '{name}' maps to logits; pass num_classes to Objective")
                    target = (num_classes,)
                else:
                    if declared.to not in shapes:
                        raise ValueError(
                            f"adapter '{name}': the shape of its target {declared.to} is unknown "
                            "(a source that no term reads needs to be probed: pass its shape in source_shapes)"
                        )
                    target = tuple(shapes[declared.to])
                self.adapters[name] = build_adapter(name, declared, tuple(shapes[base]), target)
            if base in shapes:
                module = self.adapters[name]
                was_training = module.training
                module.eval()
                with torch.no_grad():
                    probe = module(torch.zeros(2, *shapes[base]))
                module.train(was_training)
                shapes[f"{base} -> {name}"] = tuple(probe.shape[1:])
        # the same adapted source may be written with or without spaces around the arrow
        for term in self.terms:
            for argument, source in term.sources.items():
                base, adapter = split_source(source)
                if adapter is not None:
                    term.sources[argument] = f"{base} -> {adapter}"

    @staticmethod
    def terms_from_spec(spec: Any) -> list[Term]:
        """The terms of an :class:`distill.config.schema.ObjectiveSpec` (nothing built yet)."""
        return [Term(t.label, t.loss, weight=t.weight, params=dict(t.params), inputs=dict(t.inputs)) for t in spec.terms]

    @staticmethod
    def adapters_from_spec(spec: Any) -> dict[str, Adapter]:
        """The adapters of an :class:`distill.config.schema.ObjectiveSpec`."""
        return {
            name: Adapter(a.kind, to=a.to, out_features=a.out_features, hidden=a.hidden, params=dict(a.params))
            for name, a in spec.adapters.items()
        }

    @classmethod
    def from_spec(
        cls, spec: Any, *, num_classes: int | None = None, source_shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> "Objective":
        """Build from an :class:`distill.config.schema.ObjectiveSpec`."""
        return cls(
            cls.terms_from_spec(spec),
            adapters=cls.adapters_from_spec(spec),
            num_classes=num_classes,
            source_shapes=source_shapes,
        )

    @property
    def required_sources(self) -> set[str]:
        """Every source some term reads (adapters stripped), e.g. ``{"student.logits", "teacher.logits"}``."""
        return required_sources(self.terms)

    @property
    def setup_sources(self) -> set[str]:
        """Sources that module losses still waiting for :meth:`setup` will collect."""
        return {source for _, _, wanted in self._pending_setups() for source in wanted.values()}

    def _pending_setups(self) -> list[tuple[Term, torch.nn.Module, dict[str, str]]]:
        pending = []
        for term in self.terms:
            module = self.losses[term.name] if term.name in self.losses else None
            if module is None or not callable(getattr(module, "setup", None)) or bool(getattr(module, "ready", True)):
                continue
            names = list(getattr(module, "setup_arguments", ()))
            wanted = {}
            for name in names:
                source = term.inputs.get(name, DEFAULT_SOURCES.get(name))
                if source is None:
                    raise ValueError(f"term '{term.name}': setup needs '{name}', which has no default source; set inputs.{name}")
                wanted[name] = source
            pending.append((term, module, wanted))
        return pending

    def setup(self, collect: Callable[[list[str]], Mapping[str, torch.Tensor]]) -> list[str]:
        """Run ``setup`` of every module loss not ready yet; returns their term names.

        ``collect(sources)`` returns each source's tensor over the training set; each loss gets a
        ``collect`` of its own that maps its argument names to the term's sources.
        """
        done = []
        for term, module, wanted in self._pending_setups():

            def collect_arguments(names: list[str], wanted: dict[str, str] = wanted, term: Term = term) -> dict[str, torch.Tensor]:
                missing = [n for n in names if n not in wanted]
                if missing:
                    raise ValueError(f"term '{term.name}': setup asked for {missing}, not in its setup_arguments")
                values = collect([wanted[n] for n in names])
                return {n: values[wanted[n]] for n in names}

            module.setup(collect_arguments)
            done.append(term.name)
        return done

    @property
    def needs_teacher(self) -> bool:
        return any(source.startswith("teacher.") for source in self.required_sources)

    @property
    def updatable(self) -> list[str]:
        """Names of the terms whose module has an ``update`` method (stepped by the engine)."""
        return [name for name, module in self.losses.items() if callable(getattr(module, "update", None))]

    def update(self, *, step: int, total_steps: int, values: Mapping[str, float]) -> None:
        """After an optimizer step: let adaptive terms move (``values``: term -> value of the step)."""
        for name in self.updatable:
            self.losses[name].update(step=step, total_steps=total_steps, value=float(values[name]))

    def forward(
        self, sources: Mapping[str, torch.Tensor], *, mask: torch.Tensor | None = None, reduction: str = "batchmean"
    ) -> ObjectiveOutput:
        """Evaluate every term on ``sources`` (source name -> tensor).

        ``mask`` (True = valid position) goes to every term. ``reduction`` is ``"batchmean"`` (each
        term averaged over the valid positions of this call) or ``"sum"`` (summed over them: what
        language-model training uses, dividing by the number of valid tokens of the whole optimizer
        step). A term whose loss takes no ``reduction`` returns a mean; under ``"sum"`` it is
        multiplied by this call's number of valid positions.
        """
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"Objective reduction must be 'batchmean' or 'sum', got '{reduction}'")
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        adapted: dict[str, torch.Tensor] = {}  # each adapted source is computed once per call
        for term in self.terms:
            missing = [base_source(s) for s in term.sources.values() if base_source(s) not in sources]
            if missing:
                raise KeyError(
                    f"term '{term.name}' reads {', '.join(missing)}, which this step does not provide "
                    f"(available: {', '.join(sorted(sources))})"
                )
            arguments = {}
            for arg, source in term.sources.items():
                base, adapter = split_source(source)
                if adapter is None:
                    arguments[arg] = sources[source]
                    continue
                if source not in adapted:
                    adapted[source] = self.adapters[adapter](sources[base])
                arguments[arg] = adapted[source]
            extra: dict[str, Any] = {}
            if term.takes_mask:
                extra["mask"] = mask
            elif mask is not None:
                raise ValueError(f"term '{term.name}': the loss takes no `mask`, but this batch has padding")
            if term.takes_reduction:
                extra["reduction"] = reduction
            if term.is_module:
                value = self.losses[term.name](**arguments, **extra)
            else:
                value = term.fn(**arguments, **term.params, **extra)
            if reduction == "sum" and not term.takes_reduction:
                value = value * (float(mask.sum()) if mask is not None else float(next(iter(arguments.values())).shape[0]))
            values[term.name] = value
            weighted = value * term.weight
            total = weighted if total is None else total + weighted
        assert total is not None
        return ObjectiveOutput(total=total, terms=values)

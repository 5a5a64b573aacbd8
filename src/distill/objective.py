"""The objective: a weighted sum of named loss terms, each reading named inputs.

A term names a registered loss and, for each tensor argument of that loss, the *source* it reads::

    student.logits    the trained model's output
    teacher.logits    the teacher's output (no gradient)
    batch.labels      the integer labels of the batch
    batch.inputs      the (augmented) inputs

A loss's tensor arguments are its positional parameters; its keyword-only parameters are
hyper-parameters set from ``params`` in YAML. Arguments named ``student_logits``,
``teacher_logits`` and ``labels`` read the sources above unless ``inputs`` says otherwise.

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

from distill.registry import LOSSES, accepted_parameters

DEFAULT_SOURCES: dict[str, str] = {
    "student_logits": "student.logits",
    "teacher_logits": "teacher.logits",
    "labels": "batch.labels",
    "inputs": "batch.inputs",
}
"""Source read by a loss argument of this name when the term's ``inputs`` does not say."""

KNOWN_SOURCES: tuple[str, ...] = ("student.logits", "teacher.logits", "batch.labels", "batch.inputs")


def tensor_arguments(fn: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """(required, optional) names of the tensor (positional) arguments of a loss function."""
    required: list[str] = []
    optional: list[str] = []
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            continue
        (required if parameter.default is inspect.Parameter.empty else optional).append(parameter.name)
    return required, optional


def hyperparameters(fn: Callable[..., Any]) -> dict[str, Any]:
    """Keyword-only parameters of a loss (its hyper-parameters) and their defaults.

    ``mask`` and ``reduction`` are set by the objective, not by the user, and are left out.
    """
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("mask", "reduction")
    }


def resolve_inputs(fn: Callable[..., Any], inputs: Mapping[str, str]) -> dict[str, str]:
    """Argument -> source for every tensor argument a term will pass.

    Required arguments come from ``inputs`` or :data:`DEFAULT_SOURCES`; an optional one is passed
    only when ``inputs`` names it. Raises ``ValueError`` for arguments the loss does not have or
    required ones with no source.
    """
    required, optional = tensor_arguments(fn)
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
    """One weighted term: ``weight * loss(**{arg: sources[source]}, **params)``."""

    name: str
    loss: str | Callable[..., torch.Tensor]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fn: Callable[..., torch.Tensor] = LOSSES.get(self.loss).builder if isinstance(self.loss, str) else self.loss
        allowed = hyperparameters(self.fn)
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise ValueError(
                f"term '{self.name}': unknown parameter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )
        self.sources: dict[str, str] = resolve_inputs(self.fn, self.inputs)
        accepted, var_keyword = accepted_parameters(self.fn)
        # A user's own loss may take neither: it then gets the batch unmasked and returns a mean.
        self.takes_mask = var_keyword or "mask" in accepted
        self.takes_reduction = var_keyword or "reduction" in accepted


@dataclass
class ObjectiveOutput:
    """The weighted total (for backward) and each term's unweighted value (for logs)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Objective(torch.nn.Module):
    """A weighted sum of named terms.

    It is an ``nn.Module`` so that terms which own parameters (projections, learned weights) are
    trained, moved and checkpointed with the student; the built-in classification losses own none.
    """

    def __init__(self, terms: list[Term]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one term")
        names = [term.name for term in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"objective term names must be unique; repeated: {', '.join(duplicates)}")
        self.terms = terms

    @classmethod
    def from_spec(cls, spec: Any) -> "Objective":
        """Build from an :class:`distill.config.schema.ObjectiveSpec`."""
        return cls(
            [Term(t.label, t.loss, weight=t.weight, params=dict(t.params), inputs=dict(t.inputs)) for t in spec.terms]
        )

    @property
    def required_sources(self) -> set[str]:
        """Every source some term reads, e.g. ``{"student.logits", "teacher.logits"}``."""
        return {source for term in self.terms for source in term.sources.values()}

    @property
    def needs_teacher(self) -> bool:
        return any(source.startswith("teacher.") for source in self.required_sources)

    def forward(self, sources: Mapping[str, torch.Tensor], *, mask: torch.Tensor | None = None) -> ObjectiveOutput:
        """Evaluate every term on ``sources`` (source name -> tensor) with batchmean reduction."""
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for term in self.terms:
            missing = [s for s in term.sources.values() if s not in sources]
            if missing:
                raise KeyError(
                    f"term '{term.name}' reads {', '.join(missing)}, which this step does not provide "
                    f"(available: {', '.join(sorted(sources))})"
                )
            arguments = {arg: sources[source] for arg, source in term.sources.items()}
            extra: dict[str, Any] = {}
            if term.takes_mask:
                extra["mask"] = mask
            elif mask is not None:
                raise ValueError(f"term '{term.name}': the loss takes no `mask`, but this batch has padding")
            if term.takes_reduction:
                extra["reduction"] = "batchmean"
            value = term.fn(**arguments, **term.params, **extra)
            values[term.name] = value
            weighted = value * term.weight
            total = weighted if total is None else total + weighted
        assert total is not None
        return ObjectiveOutput(total=total, terms=values)

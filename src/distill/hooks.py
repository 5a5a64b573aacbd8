"""Capture inputs and outputs of any submodule by its dotted path.

A feature source in an objective names the model, the module path and what to take::

    student.layer2.output        the output of module ``layer2`` of the trained model
    teacher.blocks.3.output      the output of the teacher's fourth transformer block
    student.head.input           the (first) input of module ``head``
    student.features             the input of the model's last ``nn.Linear``: its penultimate features

Paths are those of ``model.named_modules()`` on the unwrapped model (a DDP wrapper's
``module.`` prefix is not part of them). A wrong path fails before training with the nearest
existing paths listed. Hooks hold only the tensors of the current forward pass; the capture
is cleared after each step, and the hooks are removed when the run ends.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

class ModulePathError(KeyError):
    """A dotted module path that does not exist in the model."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


FEATURES = "features"
"""Shorthand path: the input of the model's last ``nn.Linear`` (the classifier head)."""


@dataclass(frozen=True)
class FeatureSource:
    """A parsed feature source: which model, which module path, input or output."""

    model: str  # "student" or "teacher"
    path: str
    kind: str  # "input" or "output"

    @property
    def name(self) -> str:
        if self.path == FEATURES and self.kind == "input":
            return f"{self.model}.{FEATURES}"
        return f"{self.model}.{self.path}.{self.kind}"


def parse_feature_source(source: str) -> FeatureSource | None:
    """``student.layer2.output`` -> FeatureSource; None for a source that is not a feature."""
    model, _, rest = source.partition(".")
    if model not in ("student", "teacher") or not rest or rest == "logits":
        return None
    if rest == FEATURES:
        return FeatureSource(model, FEATURES, "input")
    path, _, kind = rest.rpartition(".")
    if kind not in ("input", "output") or not path:
        return None
    return FeatureSource(model, path, kind)


def classifier_path(model: nn.Module) -> str:
    """Dotted path of the last ``nn.Linear`` registered in ``model`` (its classifier head)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer, so '<model>.features' is undefined; "
            "name the module instead, e.g. student.<path>.input"
        )
    return linear[-1]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (paths never carry ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """The submodule at ``path``; a :class:`ModulePathError` listing the nearest existing paths otherwise."""
    model = unwrap(model)
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
    prefix = path.rsplit(".", 1)[0] if "." in path else ""
    siblings = [n for n in names if prefix and n.startswith(prefix + ".") and n.count(".") == path.count(".")]
    suggestions = list(dict.fromkeys(close + siblings))[:8] or names[:8]
    raise ModulePathError(
        f"the {role} ({type(model).__name__}) has no module '{path}'; nearest existing paths: {', '.join(suggestions)}"
    )


class FeatureCapture:
    """Forward hooks that record named features of one model during each forward pass.

    Use as a context manager (hooks are removed on exit)::

        with FeatureCapture(model, [parse_feature_source("student.layer2.output")]) as capture:
            logits = model(x)
            features = capture.values   # {"student.layer2.output": tensor}
            capture.clear()
    """

    def __init__(self, model: nn.Module, sources: Iterable[FeatureSource], role: str = "model") -> None:
        model = unwrap(model)
        self.model = model
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._targets: list[tuple[FeatureSource, nn.Module]] = []
        for source in sources:
            path = classifier_path(model) if source.path == FEATURES else source.path
            self._targets.append((source, resolve_module(model, path, role)))

    def __enter__(self) -> "FeatureCapture":
        for source, module in self._targets:
            self._handles.append(module.register_forward_hook(self._hook(source)))
        return self

    def _hook(self, source: FeatureSource):
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            value = inputs[0] if source.kind == "input" else output
            if isinstance(value, (tuple, list)):
                value = value[0]
            if hasattr(value, "last_hidden_state"):  # Hugging Face model outputs
                value = value.last_hidden_state
            self.values[source.name] = value

        return record

    def clear(self) -> None:
        self.values.clear()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


@torch.no_grad()
def capture_features(
    model: nn.Module, sources: list[FeatureSource], inputs: torch.Tensor, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Each source's tensor over ``inputs`` (eval mode, in batches), flattened to ``[N, D]`` float32 on the CPU.

    The model's training mode is restored afterwards; keys are the sources' names.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {source.name: [] for source in sources}
    device = next(model.parameters()).device
    try:
        with FeatureCapture(model, sources, "model") as capture:
            for start in range(0, len(inputs), batch_size):
                model(inputs[start : start + batch_size].to(device))
                for source in sources:
                    parts[source.name].append(capture.values[source.name].float().flatten(1).cpu())
                capture.clear()
    finally:
        model.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}

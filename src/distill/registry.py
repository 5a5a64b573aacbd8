"""Name -> builder registries for models, data sets, losses, optimizers and schedulers.

A registry maps the short names used in YAML experiments (``arch: resnet_cifar``,
``loss: hinton_kd``) to Python callables. Components register themselves with a decorator::

    from distill.registry import MODELS

    @MODELS.register("mlp", summary="Multi-layer perceptron on flattened inputs.")
    def mlp(*, num_classes: int, input_shape: tuple[int, ...], hidden: list[int] = [256]) -> nn.Module:
        ...

Anything not registered can be named by import path, ``"my_pkg.nets:WideNet"``: the module is
imported and the attribute after the colon is used as the builder.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


class RegistryError(LookupError):
    """A name that no registry entry or import path resolves to."""


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    builder: Callable[..., Any]
    summary: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.builder)


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for a close match among ``candidates``, else an empty string."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def import_from_path(path: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted: ``mod:Outer.inner``)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise RegistryError(f"'{path}' is not an import path of the form 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise RegistryError(f"cannot import module '{module_name}' named in '{path}': {error}") from error
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise RegistryError(
                f"module '{module_name}' has no attribute '{attribute}'{did_you_mean(part, public)}"
            ) from None
    return obj


class Registry:
    """A named collection of builders of one kind (``models``, ``losses``, ...)."""

    def __init__(self, kind: str, singular: str) -> None:
        self.kind = kind
        self.singular = singular
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str | None = None, *, summary: str | None = None, **meta: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``builder`` under ``name`` (default: its ``__name__``).

        ``summary`` defaults to the first line of the builder's docstring; ``meta`` holds free-form
        metadata a layer above may read (losses record which inputs they need).
        """

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            key = name or builder.__name__
            if key in self._entries and self._entries[key].builder is not builder:
                raise ValueError(f"{self.kind} registry already has an entry named '{key}'")
            self._entries[key] = Entry(key, builder, summary or _first_doc_line(builder), dict(meta))
            return builder

        return decorator

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        """The entry for ``name``, or for an import path ``pkg.mod:Name``; a clear error otherwise."""
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            builder = import_from_path(name)
            if not callable(builder):
                raise RegistryError(f"'{name}' is not callable, so it cannot build a {self.singular}")
            return Entry(name, builder, _first_doc_line(builder))
        raise RegistryError(
            f"unknown {self.singular} '{name}'{did_you_mean(name, self.names())}; "
            f"registered: {', '.join(self.names()) or '(none)'}; "
            "or give an import path 'package.module:Name'"
        )

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name).builder(**kwargs)


def accepted_parameters(builder: Callable[..., Any]) -> tuple[set[str], bool]:
    """Names a builder accepts as keywords, and whether it also takes ``**kwargs``."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return set(), True
    names: set[str] = set()
    var_keyword = False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(parameter.name)
    return names, var_keyword


def parameter_problems(
    builder: Callable[..., Any], params: dict[str, Any], *, what: str, injected: tuple[str, ...] | set[str] = ()
) -> list[tuple[str, str]]:
    """(parameter, message) for each parameter ``params`` cannot pass to ``builder``.

    Checks names the builder does not accept (with a did-you-mean), names distill sets itself
    (``injected``: e.g. ``num_classes`` of a model, which comes from the data), and required
    parameters that ``params`` lacks. ``what`` names the component in messages (``model 'mlp'``).
    """
    accepted, var_keyword = accepted_parameters(builder)
    user_facing = sorted(accepted - set(injected))
    problems: list[tuple[str, str]] = []
    for key in params:
        if key in injected:
            problems.append((key, f"{what}: '{key}' is set by distill itself and cannot be given in params"))
        elif not var_keyword and key not in accepted:
            problems.append(
                (
                    key,
                    f"{what} has no parameter '{key}'{did_you_mean(key, user_facing)}; "
                    f"accepted: {', '.join(user_facing) or '(none)'}",
                )
            )
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return problems
    for parameter in signature.parameters.values():
        if (
            parameter.default is inspect.Parameter.empty
            and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and parameter.name not in params
            and parameter.name not in injected
        ):
            problems.append((parameter.name, f"{what} needs the parameter '{parameter.name}'; add it under params"))
    return problems


MODELS = Registry("models", "model")
DATASETS = Registry("datasets", "dataset")
LOSSES = Registry("losses", "loss")
OPTIMIZERS = Registry("optimizers", "optimizer")
SCHEDULERS = Registry("schedulers", "scheduler")

REWARDS = Registry("rewards", "reward")
"""Rule-based rewards of group rollouts (``distill.rewards``): ``builder(**params) -> reward(completion, reference)``."""

REGISTRIES: dict[str, Registry] = {
    "models": MODELS,
    "datasets": DATASETS,
    "losses": LOSSES,
    "optimizers": OPTIMIZERS,
    "schedulers": SCHEDULERS,
    "rewards": REWARDS,
}


def load_builtins() -> None:
    """Import the modules whose import registers the built-in components."""
    import distill.augment  # noqa: F401  (mixed_cross_entropy)
    import distill.data  # noqa: F401
    import distill.losses  # noqa: F401
    import distill.models  # noqa: F401
    import distill.engine.optim  # noqa: F401
    import distill.rewards  # noqa: F401

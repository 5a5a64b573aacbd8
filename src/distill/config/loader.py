"""Reading an experiment: YAML with line numbers, command-line overrides, readable errors.

``load_experiment(path, overrides)`` is the one entry point: it parses the file with
``yaml.safe_load`` semantics, applies ``key.path=value`` overrides, validates the result against
:class:`distill.config.schema.Experiment` and then against the registries, and raises a single
:class:`ConfigError` that lists every problem with its key path, the value given, the file line
where the key is written, the allowed values and a "did you mean" for near misses.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Union

import yaml
from pydantic import BaseModel, ValidationError

from distill.config.schema import Experiment
from distill.registry import did_you_mean

KeyPath = tuple[Union[str, int], ...]


class ConfigError(ValueError):
    """An experiment that cannot run; ``problems`` holds one line per problem.

    ``subject`` names what was checked in the message (subclasses for other files change it).
    """

    subject = "the experiment"

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        plural = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{where}{len(problems)} {plural} in {self.subject}:\n" + "\n".join(f"  {p}" for p in problems))


def format_path(path: Iterable[str | int]) -> str:
    """``('stages', 1, 'epochs')`` -> ``stages[1].epochs``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(root)"


# ---------------------------------------------------------------------------- YAML with line numbers


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that also records the line of every mapping key and sequence item."""


def _node_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _node_lines(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _node_lines(item, path + (index,), lines)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: mappings merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[KeyPath, int | str]]:
    """Parse an experiment file safely; return the data and where each key is written.

    A top-level ``base: other.yaml`` (relative to this file) starts from that experiment and
    merges this file's keys over it: mappings key by key, lists and values replaced whole. Keys
    written in this file map to their line; keys that come from a base map to ``"<file>:<line>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"no such file: {path}"])
    data, lines = _read_one(path)
    if "base" not in data:
        return data, dict(lines)
    base_name = data.pop("base")
    if not isinstance(base_name, str):
        raise ConfigError([f"line {lines.get(('base',), '?')}: base: expected a file name, got {base_name!r}"], str(path))
    base_path = (path.parent / base_name).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError([f"base: {base_name} includes itself (a cycle of base files)"], str(path))
    if not base_path.is_file():
        raise ConfigError([f"line {lines.get(('base',), '?')}: base: no such file: {base_path}"], str(path))
    base_data, base_lines = read_yaml(base_path, _seen + (path.resolve(),))
    located: dict[KeyPath, int | str] = {
        key: (f"{base_path.name}:{line}" if isinstance(line, int) else line) for key, line in base_lines.items()
    }
    for key in [k for k in located if k and k[0] in data]:
        # a top-level section this file writes: its own lines win where it writes them
        if key in lines or not isinstance(data.get(key[0]), dict):
            del located[key]
    located.update({key: line for key, line in lines.items() if key != ("base",)})
    return deep_merge(base_data, data), located


def _read_one(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(error, 'problem', None) or error}"], str(path)) from None
    if data is None:
        raise ConfigError(["the file is empty"], str(path))
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of keys, got {type(data).__name__}"], str(path))
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    return data, lines


# ---------------------------------------------------------------------------- overrides


def _parse_path(dotted: str) -> list[str]:
    parts = [p for p in dotted.strip().split(".")]
    if not dotted.strip() or any(not p for p in parts):
        raise ValueError(f"'{dotted}' is not a key path like optimizer.lr or stages.distill.epochs")
    return parts


def _child_key(container: Any, part: str, traversed: str) -> str | int:
    """Key of ``part`` inside ``container``: a dict key, a list index, or a list item's ``name``."""
    if isinstance(container, list):
        if part.lstrip("-").isdigit():
            index = int(part)
            if not -len(container) <= index < len(container):
                raise ValueError(f"{traversed or '(root)'} has {len(container)} items; index {index} is out of range")
            return index % len(container)
        names = [item.get("name") for item in container if isinstance(item, dict)]
        if part in names:
            return names.index(part)
        raise ValueError(
            f"{traversed or '(root)'} has no item named '{part}'{did_you_mean(part, [n for n in names if n])}; "
            f"use an index or one of: {', '.join(str(n) for n in names if n)}"
        )
    return part


def set_by_path(data: dict[str, Any], dotted: str, value: Any) -> KeyPath:
    """Set ``value`` at ``dotted`` in nested dicts/lists; list items may be addressed by ``name``.

    ``stages.distill.epochs`` addresses the stage whose ``name`` is ``distill``; ``stages.2.epochs``
    the third stage. Missing dict levels are created (the schema rejects keys that do not exist).
    Returns the key path that was set, with list items as indices.
    """
    parts = _parse_path(dotted)
    container: Any = data
    traversed = ""
    resolved: list[str | int] = []
    for depth, part in enumerate(parts):
        key = _child_key(container, part, traversed)
        resolved.append(key)
        last = depth == len(parts) - 1
        if last:
            container[key] = value
            return tuple(resolved)
        if isinstance(container, dict) and key not in container:
            container[key] = {}
        child = container[key]
        if not isinstance(child, (dict, list)):
            here = f"{traversed}.{part}" if traversed else part
            raise ValueError(f"cannot set '{dotted}': {here} holds a value ({child!r}), not a mapping")
        container = child
        traversed = f"{traversed}.{part}" if traversed else part


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], lines: dict[KeyPath, int | str] | None = None
) -> dict[str, Any]:
    """A copy of ``data`` with ``key.path=value`` overrides applied; values are parsed as YAML.

    With ``lines`` (the file's key-path -> line map), each overridden path is attributed to its
    ``--set`` instead of a file line, so errors point at what the user actually typed.
    """
    data = copy.deepcopy(data)
    problems: list[str] = []
    for override in overrides:
        if "=" not in override:
            problems.append(f"--set {override}: expected key.path=value, e.g. --set optimizer.lr=0.01")
            continue
        dotted, _, raw = override.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            problems.append(f"--set {override}: the value is not valid YAML ({error})")
            continue
        try:
            path = set_by_path(data, dotted, value)
        except ValueError as error:
            problems.append(f"--set {override}: {error}")
            continue
        if lines is not None:
            for known in [k for k in lines if k[: len(path)] == path]:
                del lines[known]
            for cut in range(1, len(path) + 1):  # levels the override created are its own too
                if path[:cut] not in lines:
                    lines[path[:cut]] = f"--set {override}"
    if problems:
        raise ConfigError(problems, "command line")
    return data


def apply_mapping_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Like :func:`apply_overrides` but with already-parsed values (compare variants)."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        set_by_path(data, dotted, copy.deepcopy(value))
    return data


# ---------------------------------------------------------------------------- pydantic errors


def _unwrap(annotation: Any) -> Any:
    """The model class inside ``X | None``, ``list[X]`` or ``dict[str, X]``; else the annotation."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return arg
    return annotation


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The schema class that describes the mapping found at ``path``, if the schema knows it."""
    current: Any = Experiment
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if not isinstance(part, str) or part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
            continue
        origin = typing.get_origin(current)
        args = typing.get_args(current)
        if origin is list and isinstance(part, int):
            current = args[0]
        elif origin is dict and isinstance(part, str):
            current = args[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def line_of(path: KeyPath, lines: dict[KeyPath, int | str]) -> int | str | None:
    """Where ``path`` was written: a file line (int) or the ``--set`` that set it (str).

    Falls back to the nearest written ancestor, but never to the file as a whole.
    """
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def describe(path: KeyPath, message: str, lines: dict[KeyPath, int | str]) -> str:
    where = line_of(path, lines) if lines else None
    prefix = f"line {where}: " if isinstance(where, int) else (f"{where}: " if where else "")
    if isinstance(where, str) and ":" in where and not where.startswith("--set"):
        prefix = f"{where.replace(':', ', line ', 1)}: "  # a key from a base file
    return f"{prefix}{format_path(path)}: {message}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def unknown_key_message(key: str, allowed: list[str]) -> str:
    """The message of a key the schema does not know, with a close match and the keys ``allowed`` there."""
    message = f"unknown key{did_you_mean(key, allowed)}"
    if allowed:
        message += f"; allowed keys here: {', '.join(allowed)}"
    return message


def error_message(item: dict[str, Any]) -> str:
    """The readable message of one pydantic error other than an unknown key (``extra_forbidden``,
    whose message needs the keys allowed where it stands: :func:`unknown_key_message`)."""
    kind = item["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return str(item.get("ctx", {}).get("error", item["msg"]))
    if kind == "literal_error":
        expected = item.get("ctx", {}).get("expected", "")
        given = item.get("input")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        hint = did_you_mean(str(given), choices) if isinstance(given, str) else ""
        return f"{_short(given)} is not allowed{hint}; allowed values: {expected}"
    return f"{item['msg']} (got {_short(item.get('input'))})"


def pydantic_problems(error: ValidationError, lines: dict[KeyPath, int | str]) -> list[str]:
    """One readable line per pydantic error."""
    problems: list[str] = []
    for item in error.errors(include_url=False):
        path: KeyPath = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if item["type"] == "extra_forbidden":
            parent = _model_at(path[:-1])
            message = unknown_key_message(str(path[-1]), list(parent.model_fields) if parent else [])
        else:
            message = error_message(item)
        problems.append(describe(path, message, lines))
    return problems


# ---------------------------------------------------------------------------- entry point


def experiment_from_dict(
    data: dict[str, Any], lines: dict[KeyPath, int | str] | None = None, source: str | None = None, check: bool = True
) -> Experiment:
    """Validate a dict against the schema and (if ``check``) the registries."""
    lines = lines or {}
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as error:
        raise ConfigError(pydantic_problems(error, lines), source) from None
    if check:
        from distill.config.validate import check_experiment

        problems = [describe(path, message, lines) for path, message in check_experiment(experiment)]
        if problems:
            raise ConfigError(problems, source)
    return experiment


def load_raw(path: str | Path, overrides: Iterable[str] = ()) -> tuple[dict[str, Any], dict[KeyPath, int | str]]:
    """The experiment file as a dict with overrides applied, plus where each key was written."""
    data, located = read_yaml(path)
    return apply_overrides(data, list(overrides), located), located


def load_experiment(
    source: str | Path | dict[str, Any], overrides: Iterable[str] = (), check: bool = True
) -> Experiment:
    """Load, override and validate an experiment from a YAML path or a dict.

    Raises :class:`ConfigError` listing every problem (key path, value, line, allowed values).
    """
    if isinstance(source, dict):
        located: dict[KeyPath, int | str] = {}
        data = apply_overrides(source, list(overrides), located)
        return experiment_from_dict(data, located, source="experiment", check=check)
    data, lines = load_raw(source, overrides)
    return experiment_from_dict(data, lines, str(source), check=check)


def dump_experiment(experiment: Experiment) -> str:
    """The resolved experiment as YAML (every default written out).

    A stage's training settings and optimizer/scheduler overrides are written only where the
    stage sets them: an absent key means "inherit the experiment's value", which a written-out
    ``null`` would not, so loading the file back gives the same experiment.
    """
    data = experiment.model_dump(mode="json")
    data["stages"] = [
        {**stage.model_dump(mode="json", exclude_unset=True), "objective": stage.objective.model_dump(mode="json")}
        for stage in experiment.stages
    ]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

"""Experiment configuration: the typed schema, YAML loading, overrides and validation."""

from distill.config.loader import (
    ConfigError,
    apply_mapping_overrides,
    apply_overrides,
    dump_experiment,
    experiment_from_dict,
    load_experiment,
    load_raw,
    read_yaml,
    set_by_path,
)
from distill.config.schema import (
    DataSpec,
    Experiment,
    ModelSpec,
    ObjectiveSpec,
    StageSpec,
    TermSpec,
)

__all__ = [
    "ConfigError",
    "DataSpec",
    "Experiment",
    "ModelSpec",
    "ObjectiveSpec",
    "StageSpec",
    "TermSpec",
    "apply_mapping_overrides",
    "apply_overrides",
    "dump_experiment",
    "experiment_from_dict",
    "load_experiment",
    "load_raw",
    "read_yaml",
    "set_by_path",
]

"""distill: knowledge distillation for classifiers and language models.

Describe an experiment in YAML and run it with ``distill run exp.yaml``, or use the pieces from
Python::

    from distill import load_experiment, run_experiment
    experiment = load_experiment("examples/quickstart.yaml", overrides=["seed=1"])
    result = run_experiment(experiment)
    print(result.run_dir)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_experiment", "run_experiment", "Objective", "ConfigError"]


def __getattr__(name: str) -> Any:
    # Lazy: `import distill` stays cheap (no torch import) until a component is used.
    if name in ("load_experiment", "ConfigError"):
        from distill import config

        return getattr(config, name)
    if name == "run_experiment":
        from distill.engine.runner import run_experiment

        return run_experiment
    if name == "Objective":
        from distill.objective import Objective

        return Objective
    raise AttributeError(f"module 'distill' has no attribute '{name}'")

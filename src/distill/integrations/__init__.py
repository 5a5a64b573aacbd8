"""Bridges from other training frameworks to :mod:`distill`'s objectives.

* :mod:`distill.integrations.hf`: :class:`~distill.integrations.hf.DistillationTrainer`, a
  ``transformers.Trainer`` that trains a causal language model against a teacher with any
  :class:`distill.objective.Objective` (imported lazily: ``transformers`` loads only when used).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DistillationTrainer"]


def __getattr__(name: str) -> Any:
    if name == "DistillationTrainer":
        from distill.integrations.hf import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'distill.integrations' has no attribute '{name}'")

"""Data: built-in data sets, fixed splits, and deterministic augmentation.

``load_data(spec)`` builds the data set named by ``spec.dataset`` (a name registered in
:data:`distill.registry.DATASETS`, or an import path) with ``spec.params`` and returns its fixed,
normalized splits as a :class:`DataBundle`.
"""

from __future__ import annotations

from distill.config.schema import DataSpec
from distill.data import domains, local, preference, text, text_classification, vision  # noqa: F401  (registers the built-in data sets)
from distill.data.base import ArraySplit, DataBundle, RawDataset
from distill.data.splits import prepare
from distill.data.transforms import augment_batch
from distill.registry import DATASETS, parameter_problems

__all__ = ["ArraySplit", "RawDataset", "DataBundle", "prepare", "augment_batch", "load_data", "check_data_params"]


def check_data_params(spec: DataSpec) -> None:
    """Check ``spec.params`` against the builder of ``spec.dataset``: unknown or missing names are errors."""
    builder = DATASETS.get(spec.dataset).builder
    problems = parameter_problems(builder, spec.params, what=f"data set '{spec.dataset}'")
    if problems:
        raise ValueError("; ".join(f"data.params.{key}: {message}" for key, message in problems))


def load_data(spec: DataSpec) -> DataBundle:
    """Build ``spec.dataset`` with ``spec.params`` and split it per ``spec`` (see :func:`prepare`)."""
    check_data_params(spec)
    raw = DATASETS.get(spec.dataset).builder(**spec.params)
    if not isinstance(raw, RawDataset):
        raise TypeError(
            f"data set builder '{spec.dataset}' returned {type(raw).__name__}; it must return a "
            "distill.data.RawDataset"
        )
    bundle = prepare(raw, spec)
    if spec.select is not None:
        bundle = _apply_selection(bundle, spec.select)
    return bundle


def _apply_selection(bundle: DataBundle, folder: str) -> DataBundle:
    """Keep the training rows a ``distill select-data`` run chose (MiniPLM's refined corpus)."""
    import hashlib

    from distill.selection import load_selection

    rows = load_selection(folder, bundle.train)
    bundle.train = bundle.train.subset(rows)
    digest = hashlib.sha256(bundle.fingerprint.encode())
    digest.update(rows.numpy().tobytes())
    bundle.fingerprint = digest.hexdigest()
    return bundle

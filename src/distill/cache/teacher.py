"""Offline teacher caches: run a language-model teacher over the training split once, keep its top-k.

``distill cache-teacher exp.yaml`` (or :func:`build_teacher_cache`) stores, for every target
token of the training split (``labels != -100``), the teacher's k most likely next tokens with
their log-probabilities (temperature 1, normalized over the tokenizer's vocabulary) and the log of
the mass outside them, in the compact fixed-size records of :mod:`distill.cache.topk`, in a
sharded store (:mod:`distill.cache.store`): resumable, atomic per shard, checksummed. Row ``i`` of
the store is row ``i`` of the training split.

A stage trains from it with ``teacher: {cache: PATH}``: the engine reads each micro-batch's rows
(memory-mapped), decodes them and provides the sources ``teacher.topk_logprobs`` ``[B, T, k]``,
``teacher.topk_ids`` ``[B, T, k]`` and ``teacher.tail_logmass`` ``[B, T]`` that the ``sparse_kd``
loss reads. Before training, the manifest is checked against the run: the tokenizer hash and the
training split's fingerprint must match, and when the stage also names the teacher model
(``teacher: {cache: PATH, model: KEY}``) its spec and weight hash must match too; the error names
the field that differs. A cache can also come from a black-box endpoint
(:func:`distill.cache.endpoint.build_endpoint_cache`); its manifest names the endpoint instead of a
model, and a stage reading it cannot name ``model`` (no weight hash can be checked over HTTP).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.cache import topk
from distill.cache.store import ShardedReader, ShardedWriter, StoreError
from distill.data.base import IGNORE_INDEX, ArraySplit

KIND = "teacher-topk"
ENCODING = "elias-fano-ids/sqrt-quantized-logprobs/v1"
CACHE_SOURCES = ("teacher.topk_logprobs", "teacher.topk_ids", "teacher.tail_logmass")
"""The sources a cached teacher provides (read by ``sparse_kd``)."""


def split_fingerprint(split: ArraySplit) -> str:
    """sha256 of a split's token ids and labels: which rows a cache's rows are."""
    digest = hashlib.sha256()
    for tensor in (split.inputs, split.labels):
        array = tensor.detach().contiguous().cpu().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def teacher_identity(key: str, spec: Any) -> dict[str, Any]:
    """What names a teacher in a manifest: its `models` key and its spec (architecture, params, weights file)."""
    return {"key": key, "spec": spec.model_dump(mode="json", exclude_defaults=True)}


def cache_meta(data: Any, teacher: dict[str, Any], weights_sha256: str, k: int, value_bits: int) -> dict[str, Any]:
    return {
        "teacher": teacher,
        "teacher_weights_sha256": weights_sha256,
        "tokenizer": data.meta.get("tokenizer"),
        "tokenizer_hash": data.meta.get("tokenizer_hash"),
        "data": split_fingerprint(data.train),
        "dataset": data.name,
        "split": "train",
        "k": int(k),
        "vocab": int(data.num_classes),
        "value_bits": int(value_bits),
        "encoding": ENCODING,
    }


def build_teacher_cache(
    experiment: Any,
    path: str | Path,
    *,
    teacher: str,
    k: int = 64,
    value_bits: int = 8,
    batch_size: int = 8,
    shard_rows: int = 256,
    data: Any = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write (or finish) the top-k cache of ``experiment.models[teacher]`` over the training split.

    Returns the manifest. Killed and started again with the same arguments, it computes only the
    shards that are missing; started with other arguments on the same folder, it refuses.
    """
    return build_teacher_caches(
        experiment, {path: (k, value_bits)}, teacher=teacher, batch_size=batch_size, shard_rows=shard_rows,
        data=data, progress=progress, log=log,
    )[str(path)]


@torch.no_grad()
def build_teacher_caches(
    experiment: Any,
    targets: dict[str | Path, tuple[int, int]],
    *,
    teacher: str,
    batch_size: int = 8,
    shard_rows: int = 256,
    data: Any = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Several caches (``{path: (k, value_bits)}``) from one teacher pass; ``{path: manifest}``."""
    from distill.data import load_data
    from distill.engine.batches import derive_seed
    from distill.engine.lm import check_language_models, trim_padding
    from distill.models.build import build_model

    if teacher not in experiment.models:
        raise ValueError(f"no model '{teacher}' in `models`; defined: {', '.join(experiment.models)}")
    data = data if data is not None else load_data(experiment.data)
    if not data.is_lm or data.train.inputs.dim() != 2:
        raise ValueError(f"a teacher cache needs language-model data of single sequences [N, T]; '{data.name}' is not")
    spec = experiment.models[teacher]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(experiment.seed, "init", teacher))
        model = build_model(spec, num_classes=data.num_classes, input_shape=data.input_shape)
    model.eval().requires_grad_(False)
    check_language_models(data, {"teacher": model})
    vocab = int(data.num_classes)
    identity, weights = teacher_identity(teacher, spec), weights_hash(model)
    writers: dict[str, tuple[ShardedWriter, int, int]] = {}
    for path, (k, value_bits) in targets.items():
        if not 1 <= k <= vocab:
            raise ValueError(f"k must lie in 1..{vocab} (the vocabulary), got {k}")
        meta = cache_meta(data, identity, weights, k, value_bits)
        width = topk.record_bytes(k, vocab, value_bits)
        writers[str(path)] = (ShardedWriter(path, KIND, meta, num_rows=len(data.train), shard_rows=shard_rows, record_bytes=width), k, value_bits)
    pending: dict[int, tuple[int, int]] = {}
    for writer, _, _ in writers.values():
        pending.update({index: (start, end) for index, start, end in writer.pending()})
    total = len(data.train)
    done = total - sum(end - start for start, end in pending.values())
    if log is not None and done:
        log(f"{done} of {total} rows already cached; computing the other {total - done}")
    started = time.perf_counter()
    if progress is not None:
        progress(done, total)
    largest = max(k for _, k, _ in writers.values())
    for index in sorted(pending):
        start, end = pending[index]
        rows: dict[str, list[np.ndarray]] = {path: [] for path in writers}
        for first in range(start, end, batch_size):
            last = min(end, first + batch_size)
            ids, labels = trim_padding(data.train.inputs[first:last], data.train.labels[first:last])
            mask = labels != IGNORE_INDEX
            values, top_ids, tails = topk.top_k(model(ids)[..., :vocab][mask], largest)
            offsets = np.cumsum([0, *mask.sum(dim=1).tolist()])
            for path, (writer, k, value_bits) in writers.items():
                if k < largest:  # the top k of the top `largest` (sorted), the rest joins the tail
                    tail = torch.logaddexp(tails, torch.logsumexp(values[:, k:], dim=-1))
                    records = topk.encode(values[:, :k], top_ids[:, :k], tail, vocab, value_bits)
                else:
                    records = topk.encode(values, top_ids, tails, vocab, value_bits)
                rows[path].extend(records[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1))
            done += last - first
            if progress is not None:
                progress(done, total)
        for path, (writer, _, _) in writers.items():
            if any(i == index for i, _, _ in writer.pending()):  # a writer may hold this shard already
                writer.write_shard(index, rows[path])
    elapsed = round(time.perf_counter() - started, 3)
    return {
        path: writer.finish(stats={**cache_stats(writer, topk.record_bytes(k, vocab, value_bits)), "last_run_s": elapsed})
        for path, (writer, k, value_bits) in writers.items()
    }


def cache_stats(writer: ShardedWriter, width: int) -> dict[str, Any]:
    """The ``stats`` of a cache's manifest: tokens, record and total bytes, bytes per token."""
    totals = writer.stats
    tokens = totals["records"]
    return {
        "tokens": tokens,
        "record_bytes": width,
        "bytes": totals["bytes"],
        "bytes_per_token": round(totals["bytes"] / tokens, 3) if tokens else None,
    }


class TeacherCache:
    """A finished teacher cache, opened for training (memory-mapped).

    ``check(...)`` refuses a cache made from another teacher, tokenizer or data. ``sources(rows,
    labels)`` decodes the micro-batch of training rows ``rows`` whose (trimmed) labels are ``labels``
    into the tensors ``sparse_kd`` reads; a row whose number of targets differs from what the cache
    holds is an error (the data changed).
    """

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.reader = ShardedReader(path, kind=KIND, verify=verify)
        meta = self.reader.meta
        self.path = Path(path)
        self.k, self.vocab, self.value_bits = int(meta["k"]), int(meta["vocab"]), int(meta["value_bits"])
        if meta.get("encoding") != ENCODING:
            raise StoreError(f"{path}: encoding '{meta.get('encoding')}' is not one this version reads ({ENCODING})")

    @property
    def meta(self) -> dict[str, Any]:
        return self.reader.meta

    def check(self, data: Any, teacher: dict[str, Any] | None = None, weights_sha256: str | None = None) -> None:
        expected: dict[str, Any] = {"tokenizer_hash": data.meta.get("tokenizer_hash"), "data": split_fingerprint(data.train)}
        if teacher is not None:
            expected["teacher"] = teacher
        if weights_sha256 is not None:
            expected["teacher_weights_sha256"] = weights_sha256
        try:
            self.reader.check_meta(expected, "in this run")
        except StoreError as error:
            hint = ""
            if "data" in str(error).split("(", 1)[-1]:
                hint = " (the training split differs: other data params, split settings or subset)"
            raise StoreError(f"teacher cache {error}{hint}") from None
        if self.reader.rows != len(data.train):
            raise StoreError(f"teacher cache {self.path}: {self.reader.rows} rows, the training split has {len(data.train)}")

    def sources(self, rows: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        rows_np = rows.detach().cpu().numpy()
        records, counts = self.reader.read(rows_np)
        mask = (labels != IGNORE_INDEX).cpu()
        expected = mask.sum(dim=1).numpy()
        if not np.array_equal(counts, expected):
            bad = int(np.nonzero(counts != expected)[0][0])
            raise StoreError(
                f"teacher cache {self.path}: training row {int(rows_np[bad])} has {int(expected[bad])} target tokens, "
                f"the cache holds {int(counts[bad])}: the data is not the data the cache was made from"
            )
        values, ids, tails = topk.decode(records, self.k, self.vocab, self.value_bits)
        batch, length = labels.shape
        logprobs = torch.zeros(batch, length, self.k)
        top_ids = torch.zeros(batch, length, self.k, dtype=torch.int64)
        tail = torch.zeros(batch, length)
        logprobs[mask], top_ids[mask], tail[mask] = values, ids, tails
        return {
            "teacher.topk_logprobs": logprobs.to(device),
            "teacher.topk_ids": top_ids.to(device),
            "teacher.tail_logmass": tail.to(device),
        }

    def verify(self) -> list[str]:
        return self.reader.verify()

    def summary(self) -> dict[str, Any]:
        meta = self.meta
        tokens = self.reader.total_records
        return {
            "path": str(self.path),
            "teacher": describe_teacher(meta["teacher"]),
            "dataset": meta.get("dataset"),
            "rows": self.reader.rows,
            "tokens": tokens,
            "k": self.k,
            "value_bits": self.value_bits,
            "vocab": self.vocab,
            "shards": len(self.reader.entries),
            "bytes": self.reader.total_bytes,
            "bytes_per_token": self.reader.total_bytes / tokens if tokens else float("nan"),
            "record_bytes": self.reader.record_bytes,
        }


def describe_teacher(teacher: dict[str, Any]) -> str:
    """A manifest's teacher in words: its `models` key, or the endpoint's model name and URL."""
    if teacher.get("endpoint") is not None:
        return f"endpoint '{teacher['endpoint']}' at {teacher.get('base_url')}"
    return str(teacher.get("key"))


def open_for_stage(path: str | Path, data: Any, experiment: Any, model_key: str | None, verify: bool = False) -> TeacherCache:
    """Open a stage's cache and check it against the run's data (and teacher model, when named)."""
    cache = TeacherCache(path, verify=verify)
    identity = weights = None
    made_by = cache.meta.get("teacher")
    if model_key is not None and isinstance(made_by, dict) and made_by.get("endpoint") is not None:
        raise StoreError(
            f"teacher cache {path} was made from the {describe_teacher(made_by)}, not from a model of `models`: "
            f"the weights behind an endpoint cannot be hashed, so they cannot be checked against models.{model_key}; "
            "remove `model` from the stage's `teacher: {cache: ...}` (the tokenizer and the training split are "
            "still checked)"
        )
    if model_key is not None:
        from distill.engine.batches import derive_seed
        from distill.models.build import build_model

        spec = experiment.models[model_key]
        identity = teacher_identity(model_key, spec)
        if cache.meta.get("teacher") != identity:
            cache.check(data, identity)  # raises, naming the field
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(experiment.seed, "init", model_key))
            model = build_model(spec, num_classes=data.num_classes, input_shape=data.input_shape)
        weights = weights_hash(model)
        del model
    cache.check(data, identity, weights)
    return cache

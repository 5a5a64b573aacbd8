"""MiniPLM's Difference Sampling: refine a corpus with a teacher and a small reference model.

Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training Language Models" (ICLR 2025). Each
document ``x`` of the training split is scored by how much more likely the teacher finds it than a
small reference model does::

    r(x) = 1/|x| * sum_t [ log p_teacher(x_t | x_<t) - log p_ref(x_t | x_<t) ]

and the top ``fraction`` (the paper's alpha, 0.5 by default) of the documents by ``r`` is kept. Easy,
common text (both models find it likely) and noisy text (both find it unlikely) score low;
text the large model knows and the small one does not scores high, which is where a small student
has the most to learn. The student is then trained on the refined corpus with plain language
modelling, with no teacher at training time. The paper normalizes by the document's length (the
per-token mean above); ``normalize: sum`` uses the total log-likelihood ratio instead. Its
reference model is a small LM trained on a slice of the same corpus; ``reference_training`` does
that here when the reference model has no weights of its own.

``distill select-data exp.yaml`` (or :func:`select_data`) writes into ``select.out``::

    teacher_scores/, reference_scores/   per-document log-likelihoods (sharded stores, resumable)
    reference.safetensors                the reference model, when it was trained here
    scores.jsonl                         every document: row, score, both NLLs, kept or not
    selected.jsonl                       the kept documents, best first, with their text and scores
    selection.json                       the kept training rows and the fingerprint of the split

and a training run reads the refined corpus with ``data.select: <out>``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.cache.store import ShardedReader, ShardedWriter, StoreError
from distill.cache.teacher import split_fingerprint, teacher_identity, weights_hash
from distill.data.base import IGNORE_INDEX, ArraySplit
from distill.io import atomic_write_json, atomic_write_text

SCORES_KIND = "document-loglik"
SELECTION_FILE = "selection.json"
_RECORD = np.dtype([("logprob", "<f8"), ("tokens", "<i4")])


@torch.no_grad()
def document_logliks(model: torch.nn.Module, split: ArraySplit, rows: range, batch_size: int) -> list[tuple[float, int]]:
    """``(sum of log p(target), number of targets)`` of each row of ``split`` in ``rows`` (float64 sums)."""
    from distill.engine.lm import trim_padding

    out: list[tuple[float, int]] = []
    for first in range(rows.start, rows.stop, batch_size):
        last = min(rows.stop, first + batch_size)
        ids, labels = trim_padding(split.inputs[first:last], split.labels[first:last])
        logits = model(ids).float()
        mask = labels != IGNORE_INDEX
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        sums = (logprobs.double() * mask).sum(dim=1)
        out.extend((float(s), int(n)) for s, n in zip(sums, mask.sum(dim=1)))
    return out


def score_split(
    model: torch.nn.Module,
    split: ArraySplit,
    path: str | Path,
    meta: dict[str, Any],
    *,
    batch_size: int = 8,
    shard_rows: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Score every row of ``split`` into the resumable store at ``path``; returns the records."""
    writer = ShardedWriter(path, SCORES_KIND, meta, num_rows=len(split), shard_rows=shard_rows, record_bytes=_RECORD.itemsize)
    done = writer.done_rows
    if progress is not None:
        progress(done, len(split))
    for index, start, end in writer.pending():
        scores = document_logliks(model, split, range(start, end), batch_size)
        rows = []
        for logprob, tokens in scores:
            record = np.array([(logprob, tokens)], dtype=_RECORD)
            rows.append(record.view(np.uint8).reshape(1, _RECORD.itemsize))
        writer.write_shard(index, rows)
        done += end - start
        if progress is not None:
            progress(done, len(split))
    writer.finish()
    return read_scores(path)


def read_scores(path: str | Path) -> np.ndarray:
    """The ``(logprob, tokens)`` records of a score store, one per row (verified)."""
    reader = ShardedReader(path, kind=SCORES_KIND, verify=True)
    records, counts = reader.read(np.arange(reader.rows))
    if not np.all(counts == 1):
        raise StoreError(f"{path}: every row must hold one score record")
    return np.ascontiguousarray(records).view(_RECORD).reshape(-1)


def difference_scores(teacher: np.ndarray, reference: np.ndarray, normalize: str = "per_token") -> np.ndarray:
    """MiniPLM's ``r(x)``: the teacher's minus the reference's log-likelihood, per token or summed."""
    if normalize not in ("per_token", "sum"):
        raise ValueError(f"normalize must be 'per_token' or 'sum', got '{normalize}'")
    if not np.array_equal(teacher["tokens"], reference["tokens"]):
        raise ValueError("the two score stores count different target tokens: they were not made from the same data")
    ratio = teacher["logprob"] - reference["logprob"]
    if normalize == "sum":
        return ratio
    return ratio / np.maximum(teacher["tokens"], 1)


def top_fraction(scores: np.ndarray, fraction: float, valid: np.ndarray | None = None) -> np.ndarray:
    """Rows of the ``round(fraction * n)`` highest scores (ties broken by row), sorted by row."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    candidates = np.arange(len(scores)) if valid is None else np.nonzero(valid)[0]
    keep = max(1, round(fraction * len(candidates)))
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    return np.sort(order[:keep])


def _train_reference(model: torch.nn.Module, split: ArraySplit, spec: Any, seed: int, log: Callable[[str], None]) -> None:
    """MiniPLM's reference LM: a small model trained by plain language modelling on a slice of the corpus."""
    from distill.engine.batches import derive_seed
    from distill.engine.lm import trim_padding

    generator = torch.Generator().manual_seed(derive_seed(seed, "select", "reference"))
    slice_rows = torch.randperm(len(split), generator=generator)[: max(1, round(spec.fraction * len(split)))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    model.train()
    started = time.perf_counter()
    for step in range(spec.steps):
        batch = slice_rows[torch.randint(len(slice_rows), (spec.batch_size,), generator=generator)]
        ids, labels = trim_padding(split.inputs[batch], split.labels[batch])
        logits = model(ids).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % max(1, spec.steps // 5) == 0 or step + 1 == spec.steps:
            log(f"reference model: step {step + 1}/{spec.steps}, loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()


def select_data(
    experiment: Any,
    *,
    out: str | Path | None = None,
    fraction: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run Difference Sampling as ``experiment.select`` says; returns the summary (also in ``selection.json``)."""
    from safetensors.torch import load_file, save_file

    from distill.data import load_data
    from distill.engine.batches import derive_seed
    from distill.engine.lm import check_language_models
    from distill.models.build import build_model

    spec = experiment.select
    if spec is None:
        raise ValueError("the experiment has no `select:` section (teacher, reference, fraction, out)")
    out = Path(out or spec.out)
    fraction = spec.fraction if fraction is None else fraction
    data = load_data(experiment.data.model_copy(update={"select": None}))
    if not data.is_lm or data.train.inputs.dim() != 2:
        raise ValueError(f"select-data needs language-model data of single sequences [N, T]; '{data.name}' is not")
    train = data.train
    fingerprint = split_fingerprint(train)

    def build(key: str) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(experiment.seed, "init", key))
            model = build_model(experiment.models[key], num_classes=data.num_classes, input_shape=data.input_shape)
        check_language_models(data, {key: model})
        return model.eval()

    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for role, key in (("teacher", spec.teacher), ("reference", spec.reference)):
        model = build(key)
        model_spec = experiment.models[key]
        trained_here = role == "reference" and model_spec.weights is None and model_spec.params.get("source") is None
        if trained_here:
            if spec.reference_training is None:
                raise ValueError(
                    f"select.reference '{key}' has no weights (nor a pretrained source); give it `weights:` or set "
                    "select.reference_training: {steps: ..., fraction: ...} to train it on a slice of the corpus first"
                )
            weights_file = out / "reference.safetensors"
            training = spec.reference_training.model_dump(mode="json")
            marker = out / "reference.json"
            expected = {"data": fingerprint, "model": teacher_identity(key, model_spec), "training": training, "seed": experiment.seed}
            if weights_file.exists() and marker.exists() and json.loads(marker.read_text()) == expected:
                model.load_state_dict(load_file(str(weights_file)))
                log(f"reference model: reusing {weights_file}")
            else:
                _train_reference(model, train, spec.reference_training, experiment.seed, log)
                weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
                temporary = out / ".reference.safetensors.tmp"
                save_file(weights, str(temporary))
                temporary.replace(weights_file)
                atomic_write_json(marker, expected)
        model.requires_grad_(False)
        meta = {
            "model": teacher_identity(key, model_spec),
            "weights_sha256": weights_hash(model),
            "data": fingerprint,
            "tokenizer_hash": data.meta.get("tokenizer_hash"),
        }
        callback = (lambda done, total, role=role: progress(role, done, total)) if progress is not None else None
        records[role] = score_split(
            model, train, out / f"{role}_scores", meta, batch_size=spec.batch_size, shard_rows=spec.shard_rows, progress=callback
        )
        del model

    scores = difference_scores(records["teacher"], records["reference"], spec.normalize)
    valid = records["teacher"]["tokens"] > 0
    kept = top_fraction(scores, fraction, valid)
    kept_set = set(kept.tolist())
    teacher_nll = -records["teacher"]["logprob"] / np.maximum(records["teacher"]["tokens"], 1)
    reference_nll = -records["reference"]["logprob"] / np.maximum(records["reference"]["tokens"], 1)
    lines = [
        json.dumps(
            {"row": i, "score": float(scores[i]), "teacher_nll": float(teacher_nll[i]), "reference_nll": float(reference_nll[i]),
             "tokens": int(records["teacher"]["tokens"][i]), "kept": i in kept_set}
        )
        for i in range(len(scores))
    ]
    atomic_write_text(out / "scores.jsonl", "\n".join(lines) + "\n")
    tokenizer = _tokenizer(data)
    ranked = sorted(kept.tolist(), key=lambda i: (-scores[i], i))
    selected = []
    for i in ranked:
        record = {"row": i, "score": float(scores[i]), "teacher_nll": float(teacher_nll[i]), "reference_nll": float(reference_nll[i])}
        if tokenizer is not None:
            record["text"] = tokenizer.decode(_document_ids(train, i), skip_special_tokens=False)
        selected.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(out / "selected.jsonl", "\n".join(selected) + "\n")
    summary = {
        "method": "MiniPLM difference sampling",
        "teacher": spec.teacher,
        "reference": spec.reference,
        "normalize": spec.normalize,
        "fraction": fraction,
        "documents": len(scores),
        "kept": len(kept),
        "tokens_kept": int(records["teacher"]["tokens"][kept].sum()),
        "tokens_total": int(records["teacher"]["tokens"].sum()),
        "score_kept_mean": float(scores[kept].mean()),
        "score_all_mean": float(scores[valid].mean()) if valid.any() else float("nan"),
        "train_fingerprint": fingerprint,
        "rows": kept.tolist(),
    }
    groups = getattr(train, "groups", None)
    names = data.meta.get("domains")
    if groups is not None and names:
        groups_np = groups.cpu().numpy()
        summary["kept_share_by_domain"] = {
            name: float(np.isin(np.nonzero(groups_np == g)[0], kept).mean()) if (groups_np == g).any() else None
            for g, name in enumerate(names)
        }
    atomic_write_json(out / SELECTION_FILE, summary)
    return summary


def _tokenizer(data: Any) -> Any:
    source = data.meta.get("tokenizer")
    if source is None:
        return None
    from distill.data.text import get_tokenizer

    return get_tokenizer(source)[0]


def _document_ids(split: ArraySplit, row: int) -> list[int]:
    """The tokens of row ``row``: the inputs up to the last target, plus the token it predicts."""
    labels = split.labels[row]
    valid = (labels != IGNORE_INDEX).nonzero()
    if len(valid) == 0:
        return []
    last = int(valid.max())
    return split.inputs[row, : last + 1].tolist() + [int(labels[last])]


def load_selection(folder: str | Path, train: ArraySplit) -> torch.Tensor:
    """The kept training rows of a ``select-data`` output, checked against this training split."""
    path = Path(folder) / SELECTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"data.select: no {SELECTION_FILE} in {folder} (run `distill select-data` first)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        rows = summary["rows"]
        fingerprint = summary["train_fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a selection written by `distill select-data` ({error})") from None
    if fingerprint != split_fingerprint(train):
        raise ValueError(
            f"data.select: {path} was computed on another training split (fingerprint {fingerprint[:12]}... vs "
            f"{split_fingerprint(train)[:12]}...): the data params or split settings differ"
        )
    rows = torch.tensor(rows, dtype=torch.long)
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(train)):
        raise ValueError(f"{path}: rows out of range for a training split of {len(train)} rows")
    return rows

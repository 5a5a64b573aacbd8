"""Performance-guided knowledge distillation (PGKD): an LLM teacher writes training data for a student's weak classes.

Di Palo, Singhi and Fadlallah, "Performance-Guided LLM Knowledge Distillation for Efficient Text
Classification at Scale", EMNLP 2024 (Industry Track). A small text classifier (the student) starts
from a sparsely annotated training set; an LLM (the teacher, a black box reached over an
OpenAI-compatible chat endpoint) writes new labelled training examples in rounds, guided by how the
student performs:

1. the experiment's stage ``pgkd.stage`` trains the student on the labelled examples plus every
   example generated so far (through :func:`distill.engine.runner.run_experiment`, the generated
   examples entering through the data set's ``extra_train`` parameter);
2. the student is scored per class on a fixed validation set (precision, recall, F1, support:
   the paper's "gradual evaluation checks") and on the test split;
3. for each of the ``classes_per_round`` weakest classes (lowest validation F1), the teacher is
   shown the class taxonomy, the per-class validation report, labelled training examples of the
   class and its *hard negatives* -- validation texts of the class the student put elsewhere,
   and texts of other classes it put in the class, each with the class it confused them with,
   the most confident mistakes first -- and asked for new examples of the class;
4. the replies are parsed (one example per line, or a JSON list), cleaned, deduplicated and,
   with ``relabel``, kept only where the teacher, asked to classify the example, names the class
   it was written for; the kept examples, with their provenance, join the training set;
5. rounds stop when the validation ``metric`` has not improved by more than ``min_delta`` for
   ``patience`` rounds (early stopping), or after ``rounds`` rounds of generation (the budget).
   The best round by that metric is the result, as the paper returns its best model.

Choices where the paper leaves details open or where this implementation differs:

* Round 0 trains on the labelled examples alone; round ``r`` trains on them and the examples
  generated after rounds ``0 .. r-1``; each round trains the student from the same seeded
  initialization (the paper does not say whether its BERT student restarts or continues), so
  that rounds differ by their data only.
* The paper's prompt holds the taxonomy, 16 correctly classified examples, 16 misclassified
  ones, 16 hard negatives (misclassified with high confidence) and the full validation report,
  and asks for 32 samples per iteration; its defaults are 10 iterations and a patience of 5. Here
  one request is made per targeted class (``per_round`` examples split over
  ``classes_per_round`` classes, the weakest first getting the remainder), showing
  ``examples_per_class`` labelled training examples of the class and up to ``hard_negatives``
  misclassified validation texts in each direction, ranked by the student's confidence in its
  wrong answer (the paper's hard negatives are its confidently misclassified samples; here they
  come from the validation set, like the report); the full per-class report is always included. The defaults follow the paper
  where it gives a number (``rounds`` 10, ``per_round`` 32, ``patience`` 5).
* The paper stops on validation loss; ``metric`` chooses ``macro_f1`` (default: the loop targets
  per-class weaknesses), ``accuracy`` or ``nll`` (the paper's choice).
* Validation texts are shown to the teacher, as in the paper, so the validation score may
  flatter later rounds; the test split is never shown, and a generated text equal (ignoring case,
  spacing and end punctuation) to a validation or test text is dropped.
* ``relabel`` is an addition (a filter against off-class generations, in the spirit of
  self-consistency filtering of synthetic data); the paper keeps every generated sample.

``run_pgkd`` writes into its folder (default ``<output_dir>/<name>/pgkd/``)::

    pgkd.json, pgkd.md         every round's metrics and counts; the per-round table
    pgkd_plan.json             the configuration's fingerprint: a rerun with another one is refused
    generated.jsonl            every kept example with its provenance, in round order (append-only)
    round-<r>/run/             the round's run folder (config.yaml, stages/<stage>/, final.json, ...)
    round-<r>/evaluation.json  the student's validation report (per class, confusion matrix) and test metrics
    round-<r>/prompts.json     the requests sent to the teacher after round r
    round-<r>/generated.jsonl  the examples kept after round r (what round r+1 adds to training)
    round-<r>/rejected.jsonl   the candidates dropped after round r, each with its reason
    round-<r>/generation.json  written last: the generation of round r is finished
    teacher-cache/             the teacher's responses (the client's response cache, unless
                               pgkd.teacher.cache_dir names another folder)

A rerun with the same folder continues: finished evaluations and generations are read back (an
interrupted generation is asked again, and answered from the response cache), and ``rounds``,
``patience``, ``min_delta`` and ``metric`` may change between runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:  # torch is imported where it is used: the config schema may import this module
    import argparse

    import torch
    from rich.console import Console

PGKD_JSON = "pgkd.json"
PGKD_MD = "pgkd.md"
PLAN_FILE = "pgkd_plan.json"
GENERATED = "generated.jsonl"
REJECTED = "rejected.jsonl"
EVALUATION = "evaluation.json"
GENERATION = "generation.json"
PROMPTS = "prompts.json"
TEACHER_CACHE = "teacher-cache"

DEFAULT_TASK = "Each text belongs to exactly one category."
METRICS = ("macro_f1", "accuracy", "nll")


# ---------------------------------------------------------------------------------- the config section


class _Section(BaseModel):
    # the style of distill.config.schema.Section, without importing it (schema.py may import this module)
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServeSpec(_Section):
    """A teacher served in-process by ``distill serve``'s server for the duration of the loop."""

    model: str = Field(description="what to serve: a model alias, a .gguf file, a model folder or a run folder")
    stage: str | None = Field(default=None, description="the stage of a run folder to serve (default: its last)")


class TeacherSpec(BaseModel):
    """The black-box teacher: the fields of the endpoint (``EndpointSpec``), or ``serve`` to start one locally.

    Keys other than ``serve`` are passed to ``distill.blackbox.client.EndpointSpec`` when the loop
    starts (and checked there); with ``serve``, the endpoint's address and model name come from the
    started server.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    serve: ServeSpec | None = Field(default=None, description="serve a local model with `distill serve`'s server")

    def endpoint_fields(self) -> dict[str, Any]:
        """The keys meant for ``EndpointSpec`` (every key but ``serve``)."""
        return dict(self.model_extra or {})


class PGKDSpec(_Section):
    """`distill pgkd`: rounds of train -> evaluate per class -> the teacher writes examples for the weak classes."""

    teacher: TeacherSpec = Field(description="the black-box teacher: endpoint fields, or serve: {model: ...}")
    stage: str = Field(description="the stage that trains the student, on the labelled and generated examples")
    rounds: int = Field(default=10, ge=0, description="rounds of generation at most (the budget); round 0 uses the labels only")
    per_round: int = Field(default=32, ge=1, description="new examples asked of the teacher per round")
    classes_per_round: int = Field(default=4, ge=1, description="the weakest classes (validation F1) targeted per round")
    hard_negatives: int = Field(
        default=8, ge=0, description="misclassified validation texts shown per targeted class, in each direction"
    )
    examples_per_class: int = Field(default=4, ge=0, description="labelled training examples of the targeted class shown")
    patience: int = Field(default=5, ge=1, description="stop after this many rounds without improvement of `metric`")
    min_delta: float = Field(default=0.0, ge=0.0, description="an improvement must exceed this")
    metric: Literal["macro_f1", "accuracy", "nll"] = Field(
        default="macro_f1", description="validation metric for early stopping and the best round (nll: lower is better)"
    )
    relabel: bool = Field(default=False, description="keep an example only if the teacher classifies it as its intended class")
    temperature: float = Field(default=0.8, ge=0.0, description="sampling temperature of the generation requests")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling of the generation requests")
    max_tokens: int = Field(default=512, ge=1, description="tokens per generation reply")
    samples: int = Field(default=1, ge=1, description="replies (n) per generation request")
    max_chars: int = Field(default=400, ge=1, description="longer generated texts are dropped")
    min_words: int = Field(default=2, ge=1, description="generated texts with fewer words are dropped")
    reject_class_names: bool = Field(
        default=True,
        description="drop generated texts that hold a class name as a whole word (commentary, echoed headings); "
        "turn off when class names are ordinary words that texts use",
    )
    task: str = Field(default=DEFAULT_TASK, description="what the texts and categories are, told to the teacher")
    seed: int = Field(default=0, description="seeds the teacher's sampling and the examples shown")


# ---------------------------------------------------------------------------------- metrics (pure)


def per_class_report(probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, NLL, the confusion matrix and per-class precision/recall/F1/support.

    ``probs`` ``[N, C]`` are class probabilities, ``labels`` ``[N]`` the true classes. A class that
    nothing was predicted as has precision 0; one absent from ``labels`` (support 0) has recall and
    F1 ``None`` and is left out of the macro-F1 (the mean F1 over classes with support).
    """
    import torch

    probs = torch.as_tensor(probs).double()
    labels = torch.as_tensor(labels).long()
    count = len(class_names)
    predicted = probs.argmax(dim=1)
    confusion = torch.bincount(labels * count + predicted, minlength=count * count).reshape(count, count)
    hits = confusion.diagonal()
    support = confusion.sum(dim=1)
    chosen = confusion.sum(dim=0)
    classes = []
    f1s = []
    for index, name in enumerate(class_names):
        tp, n, m = int(hits[index]), int(support[index]), int(chosen[index])
        precision = tp / m if m else 0.0
        recall = tp / n if n else None
        f1 = None
        if recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
            f1s.append(f1)
        classes.append({"name": name, "precision": precision, "recall": recall, "f1": f1, "support": n, "predicted": m})
    rows = torch.arange(len(labels))
    nll = float(-probs[rows, labels].clamp_min(1e-12).log().mean()) if len(labels) else float("nan")
    return {
        "accuracy": float((predicted == labels).double().mean()) if len(labels) else float("nan"),
        "macro_f1": sum(f1s) / len(f1s) if f1s else float("nan"),
        "nll": nll,
        "size": len(labels),
        "classes": classes,
        "confusion": confusion.tolist(),
    }


def weakest_classes(report: dict[str, Any], count: int) -> list[int]:
    """Indices of the ``count`` classes with the lowest F1 (then recall, then index); classes without support are skipped."""
    scored = [
        (entry["f1"], entry["recall"], index)
        for index, entry in enumerate(report["classes"])
        if entry["f1"] is not None
    ]
    return [index for _, _, index in sorted(scored)[:count]]


def split_budget(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as possible, the first parts getting the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def hard_negatives(
    probs: torch.Tensor, labels: torch.Tensor, target: int, count: int, texts: Sequence[str], class_names: Sequence[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The student's most confident mistakes about class ``target`` on a labelled split.

    Returns ``(missed, intruders)``: up to ``count`` texts of class ``target`` predicted as another
    class, and up to ``count`` texts of other classes predicted as ``target``; each a dict with
    ``text``, ``label`` (the true class), ``predicted`` and ``confidence`` (the student's
    probability of its prediction), the most confident first (ties: row order).
    """
    import torch

    probs = torch.as_tensor(probs).double()
    labels = torch.as_tensor(labels).long()
    confidence, predicted = probs.max(dim=1)

    def pick(mask: torch.Tensor) -> list[dict[str, Any]]:
        rows = mask.nonzero().squeeze(1)
        order = torch.sort(-confidence[rows], stable=True).indices
        out = []
        for row in rows[order][:count].tolist():
            out.append(
                {
                    "text": texts[row],
                    "label": class_names[int(labels[row])],
                    "predicted": class_names[int(predicted[row])],
                    "confidence": round(float(confidence[row]), 4),
                }
            )
        return out

    missed = pick((labels == target) & (predicted != target))
    intruders = pick((labels != target) & (predicted == target))
    return missed, intruders


# ---------------------------------------------------------------------------------- prompts and parsing (pure)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report_lines(report: dict[str, Any]) -> list[str]:
    """The per-class validation report as text lines (one per class, then the overall scores)."""
    lines = [
        f"- {entry['name']}: precision {_fmt(entry['precision'])}, recall {_fmt(entry['recall'])}, "
        f"F1 {_fmt(entry['f1'])}, {entry['support']} validation texts"
        for entry in report["classes"]
    ]
    lines.append(f"Overall: accuracy {report['accuracy']:.2f}, macro-F1 {report['macro_f1']:.2f}.")
    return lines


def generation_messages(
    *,
    task: str,
    class_names: Sequence[str],
    report: dict[str, Any],
    targets: Sequence[int],
    target: int,
    count: int,
    examples: Sequence[str],
    missed: Sequence[dict[str, Any]],
    intruders: Sequence[dict[str, Any]],
) -> list[dict[str, str]]:
    """The chat messages asking the teacher for ``count`` new texts of class ``target``.

    They hold the task, the taxonomy, the full per-class validation report, the round's weakest
    classes, labelled training ``examples`` of the class and its hard negatives (``missed``: texts
    of the class the student put elsewhere; ``intruders``: texts of other classes it put in the
    class), each with the class it was confused with.
    """
    name = class_names[target]
    entry = report["classes"][target]
    parts = [
        f"You are writing training data for a small text classifier. {task.strip()}",
        "",
        "The categories are: " + ", ".join(class_names) + ".",
        "",
        "After training on the data it has so far, the classifier scored as follows on a validation set:",
        *report_lines(report),
        "",
        "Its weakest categories now are: "
        + ", ".join(f"{class_names[i]} (F1 {_fmt(report['classes'][i]['f1'])})" for i in targets)
        + ".",
        "",
        (f'Your task: write {count} new texts of the category "{name}" (precision {_fmt(entry["precision"])}, '
         f'recall {_fmt(entry["recall"])}, F1 {_fmt(entry["f1"])}).'),
    ]
    if examples:
        parts += ["", f'Texts of the category "{name}" from the training data:']
        parts += [f"- {text}" for text in examples]
    if missed:
        parts += ["", f'Texts of the category "{name}" that the classifier put in another category:']
        parts += [f'- "{item["text"]}" (classified as {item["predicted"]})' for item in missed]
    if intruders:
        parts += ["", f'Texts of other categories that the classifier wrongly put in "{name}":']
        parts += [f'- "{item["text"]}" (really {item["label"]})' for item in intruders]
    parts += [
        "",
        (f'Write {count} new, varied texts that clearly belong to the category "{name}", in the style of its '
         f'training texts, that teach the classifier how "{name}" differs from the categories it confuses with it. '
         "Do not repeat any text shown above. Reply with the texts only, one per line, without numbering."),
    ]
    return [{"role": "user", "content": "\n".join(parts)}]


def relabel_messages(*, task: str, class_names: Sequence[str], text: str) -> list[dict[str, str]]:
    """The chat messages asking the teacher which class ``text`` belongs to."""
    content = "\n".join(
        [
            task.strip(),
            "The categories are: " + ", ".join(class_names) + ".",
            "",
            "Which category does this text belong to?",
            f"Text: {text}",
            "Reply with the category name only.",
        ]
    )
    return [{"role": "user", "content": content}]


_FENCE = re.compile(r"^```[A-Za-z]*\s*$")
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2013]+\s*|\(?\d{1,3}\s*[.):\]]\s*|\d{1,3}\s+-\s+)")
_LABEL_PREFIX = re.compile(r"^(?:example|text|sample)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


def _clean(item: str) -> str:
    text = " ".join(item.split())
    for _ in range(2):
        text = _BULLET.sub("", text, count=1)
        text = _LABEL_PREFIX.sub("", text, count=1)
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
    if text.endswith(",") and text.count('"') >= 2:  # an item of a list written without brackets
        text = text[:-1].rstrip().strip(_QUOTES)
    return text.strip()


def _json_items(text: str) -> list[str] | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list):
        return None
    items = []
    for item in value:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            items.append(item["text"])
    return items


def parse_examples(reply: str) -> list[str]:
    """Candidate texts in a teacher's reply: the strings of a JSON list (or its objects' ``text``)
    when the reply holds one, else one per line.

    Code fences, blank lines and lines that introduce a list (ending with ``:``) are skipped;
    bullets, numbering (``1.``, ``(2)``), ``Example 3:`` prefixes and enclosing quotes are removed.
    Nothing is deduplicated or length-checked here (see :func:`filter_examples`).
    """
    items = _json_items(reply)
    if items is None:
        items = [line for line in reply.splitlines() if not _FENCE.match(line.strip())]
        items = [line for line in items if line.strip() and not line.rstrip().endswith(":")]
    return [text for text in (_clean(item) for item in items) if text]


def normalized(text: str) -> str:
    """The key under which two texts count as the same: lower case, single spaces, no end punctuation or quotes."""
    return " ".join(text.lower().split()).strip(" .!?;," + _QUOTES)


def filter_examples(
    candidates: Iterable[str],
    *,
    seen: set[str],
    heldout: set[str],
    max_chars: int,
    min_words: int,
    class_names: Sequence[str] = (),
) -> tuple[list[str], list[tuple[str, str]]]:
    """Keep the usable candidates: returns ``(kept, [(text, reason), ...])``.

    Reasons, checked in this order: ``too_long`` (over ``max_chars`` characters), ``too_short``
    (fewer than ``min_words`` words), ``names_a_class`` (holds one of ``class_names`` as a whole
    word, ignoring case: commentary about the task or an echo of the prompt's headings rather than
    an example), ``copies_heldout`` (a validation or test text, by :func:`normalized` key in
    ``heldout``), ``duplicate`` (already in ``seen``: the training texts, earlier generations and
    the texts kept so far). Kept texts are added to ``seen``.
    """
    names = [re.compile(rf"(?<![\w.]){re.escape(name.lower())}(?![\w])") for name in class_names]
    kept: list[str] = []
    dropped: list[tuple[str, str]] = []
    for text in candidates:
        key = normalized(text)
        if len(text) > max_chars:
            dropped.append((text, "too_long"))
        elif len(text.split()) < min_words or not key:
            dropped.append((text, "too_short"))
        elif any(pattern.search(text.lower()) for pattern in names):
            dropped.append((text, "names_a_class"))
        elif key in heldout:
            dropped.append((text, "copies_heldout"))
        elif key in seen:
            dropped.append((text, "duplicate"))
        else:
            seen.add(key)
            kept.append(text)
    return kept, dropped


def parse_label(answer: str, class_names: Sequence[str]) -> str | None:
    """The class a teacher's answer names: an exact name (case and surrounding punctuation ignored),
    else the name found earliest in the answer (the longest at that place); None if none is found."""
    text = answer.strip().strip(_QUOTES + " .!*").lower()
    lowered = {name.lower(): name for name in class_names}
    if text in lowered:
        return lowered[text]
    best: tuple[int, int, str] | None = None
    for key, name in lowered.items():
        match = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text)
        if match is not None:
            candidate = (match.start(), -len(key), name)
            best = candidate if best is None or candidate < best else best
    return best[2] if best is not None else None


# ---------------------------------------------------------------------------------- checks and loading


def pgkd_problems(experiment: Any, spec: PGKDSpec) -> list[tuple[tuple[str, ...], str]]:
    """``(key path, message)`` for each way the `pgkd:` section does not fit the experiment."""
    from distill.registry import DATASETS, accepted_parameters, did_you_mean, load_builtins

    load_builtins()
    names = [stage.name for stage in experiment.stages]
    if spec.stage not in names:
        return [(("pgkd", "stage"), f"no stage '{spec.stage}'{did_you_mean(spec.stage, names)}; stages: {', '.join(names)}")]
    stage = experiment.stage(spec.stage)
    problems: list[tuple[tuple[str, ...], str]] = []
    if stage.teacher is not None or stage.teachers or stage.teacher_cache is not None:
        problems.append((
            ("pgkd", "stage"),
            (f"stage '{stage.name}' reads a teacher model, but PGKD's teacher is the black box of pgkd.teacher, which "
             "teaches through generated training examples: the stage must train on labels, without a teacher"),
        ))
    if stage.init_from is not None:
        problems.append((
            ("pgkd", "stage"),
            (f"stage '{stage.name}' starts from `init_from: {stage.init_from}`, but every round trains the student from "
             "its seeded initial weights: remove init_from"),
        ))
    builder = DATASETS.get(experiment.data.dataset).builder
    accepted, _ = accepted_parameters(builder)
    lacking = [name for name in ("extra_train", "heldout") if name not in accepted]
    if lacking:
        problems.append((
            ("data", "dataset"),
            (f"'{experiment.data.dataset}' has no parameter {' or '.join(lacking)}, through which PGKD adds the generated "
             "examples and reads a fixed validation set: use wordnet_lexnames or text_classification_jsonl"),
        ))
    if "heldout" in experiment.data.params:
        problems.append((("data", "params", "heldout"), "PGKD sets it itself (test to train, val to score): remove it"))
    if experiment.data.dataset == "text_classification_jsonl":
        for key, what in (("val_files", "validation"), ("test_files", "test")):
            if experiment.data.params.get(key) is None:
                problems.append((
                    ("data", "params", key),
                    f"PGKD needs a fixed {what} set, which text_classification_jsonl reads from {key}: set it",
                ))
    if experiment.data.train_subset is not None:
        problems.append((
            ("data", "train_subset"),
            ("PGKD's training split grows every round, so a subsample of it would change: limit the labelled examples "
             "with the data set's own parameter (per_class_train for wordnet_lexnames)"),
        ))
    problems += teacher_problems(spec.teacher)
    return problems


def teacher_problems(teacher: TeacherSpec) -> list[tuple[tuple[str, ...], str]]:
    """``(key path, message)`` for each endpoint field of ``pgkd.teacher`` that ``EndpointSpec`` rejects."""
    from distill.blackbox.client import EndpointSpec
    from distill.registry import did_you_mean

    fields = teacher.endpoint_fields()
    if teacher.serve is not None:
        if "base_url" in fields:
            return [(("pgkd", "teacher", "base_url"), "give either serve (a local server) or base_url (an endpoint), not both")]
        fields = {**fields, "base_url": "http://127.0.0.1:1/v1"}  # the server's address, known once it runs
    elif "base_url" not in fields:
        return [(("pgkd", "teacher"), "give the endpoint's base_url (and model), or serve: {model: ...} to start a local server")]
    try:
        EndpointSpec.model_validate(fields)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            path = ("pgkd", "teacher", *map(str, item["loc"]))
            if item["type"] == "extra_forbidden":
                allowed = ["serve", *EndpointSpec.model_fields]
                message = f"unknown key{did_you_mean(str(item['loc'][-1]), allowed)}; allowed keys here: {', '.join(allowed)}"
            else:
                message = str(item.get("ctx", {}).get("error", item["msg"]))
            problems.append((path, message))
        return problems
    return []


def check_pgkd(experiment: Any, spec: PGKDSpec | None = None) -> None:
    """Cross-check the `pgkd:` section against the experiment; raises ValueError naming each key at fault."""
    spec = spec if spec is not None else getattr(experiment, "pgkd", None)
    if spec is None:
        raise ValueError("pgkd: the experiment has no `pgkd:` section (teacher, stage, rounds, per_round, ...)")
    problems = pgkd_problems(experiment, spec)
    if problems:
        raise ValueError("; ".join(f"{'.'.join(path)}: {message}" for path, message in problems))


def load_pgkd_experiment(path: str | Path, overrides: Iterable[str] = ()) -> tuple[Any, PGKDSpec]:
    """Load an experiment with a `pgkd:` section (``--set pgkd.rounds=3`` works too) and check both.

    The schema validates the section and the experiment checks run :func:`pgkd_problems`, so one
    :class:`~distill.config.ConfigError` lists every problem, with file lines.
    """
    from distill.config.loader import ConfigError, experiment_from_dict, load_raw

    data, lines = load_raw(path, list(overrides))
    if data.get("pgkd") is None:
        raise ConfigError(["pgkd: the experiment has no `pgkd:` section (teacher, stage, rounds, per_round, ...)"], str(path))
    experiment = experiment_from_dict(data, lines, str(path))
    return experiment, experiment.pgkd


# ---------------------------------------------------------------------------------- the teacher


class _Teacher:
    """The teacher client, started on first use (a served model is loaded only when a round generates)."""

    def __init__(self, spec: TeacherSpec, client: Any, say: Callable[[str], None], cache_dir: Path) -> None:
        self.spec = spec
        self._client = client
        self._cache_dir = cache_dir
        self._server: Any = None
        self._say = say
        self.name = str(spec.endpoint_fields().get("model") or (spec.serve.model if spec.serve else "teacher"))
        self.description = f"{self.name} (a client passed to run_pgkd)" if client is not None else self._describe()

    def _describe(self) -> str:
        if self.spec.serve is not None:
            stage = f", stage {self.spec.serve.stage}" if self.spec.serve.stage else ""
            return f"{self.spec.serve.model}{stage}, served locally"
        fields = self.spec.endpoint_fields()
        return f"{fields.get('model', '?')} at {fields.get('base_url', '?')}"

    def client(self) -> Any:
        if self._client is not None:
            return self._client
        from distill.blackbox.client import EndpointSpec, TeacherClient
        from distill.synth.pipeline import SERVE_TIMEOUT_S

        fields = {"cache_dir": str(self._cache_dir), **self.spec.endpoint_fields()}
        if self.spec.serve is not None:
            from distill.serve import TeacherServer, load_served_model

            self._say(f"teacher: loading {self.spec.serve.model} to serve it locally")
            model, tokenizer, name = load_served_model(self.spec.serve.model, stage=self.spec.serve.stage)
            self._server = TeacherServer(model, tokenizer, name=name, host="127.0.0.1", port=0)
            url = self._server.start()
            # a request waits while those ahead of it decode, minutes on a CPU: the remote default is too short
            fields = {"timeout_s": SERVE_TIMEOUT_S, **fields, "base_url": url, "model": fields.get("model", name)}
            self.name = str(fields["model"])
            self.description = f"{name}, served at {url}"
            self._say(f"teacher: {self.description}")
        try:
            endpoint = EndpointSpec.model_validate(fields)
        except ValidationError as error:
            details = "; ".join(f"pgkd.teacher.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_url=False))
            raise ValueError(details) from None
        self.name = str(endpoint.model or self.name)
        self._client = TeacherClient(endpoint, log=self._say)
        return self._client

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


# ---------------------------------------------------------------------------------- the round loop


@dataclass
class PGKDResult:
    """Where a PGKD run was written and the content of its ``pgkd.json``."""

    folder: Path
    result: dict[str, Any]


def _plan_fingerprint(experiment: Any, spec: PGKDSpec) -> str:
    """What must not change between a run and its continuation (rounds, patience, min_delta and metric may)."""
    payload = {
        "experiment": experiment.model_dump(mode="json", exclude={"pgkd", "active", "compare", "output_dir", "device"}),
        "pgkd": spec.model_dump(mode="json", exclude={"rounds", "patience", "min_delta", "metric"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_plan(folder: Path, experiment: Any, spec: PGKDSpec) -> None:
    from distill.io import atomic_write_json

    path = folder / PLAN_FILE
    fingerprint = _plan_fingerprint(experiment, spec)
    if path.is_file():
        if json.loads(path.read_text()).get("fingerprint") != fingerprint:
            raise ValueError(
                f"{folder} holds a PGKD run of another configuration (the data, models, stages, teacher or pgkd settings "
                "differ; only pgkd.rounds, patience, min_delta and metric may change); choose another output folder"
            )
        return
    atomic_write_json(path, {"experiment": experiment.name, "fingerprint": fingerprint})


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    from distill.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records))


def _user_extra(params: dict[str, Any]) -> list[str]:
    extra = params.get("extra_train")
    if extra is None:
        return []
    return [extra] if isinstance(extra, str) else list(extra)


def _round_experiment(experiment: Any, spec: PGKDSpec, extra_files: Sequence[Path]) -> Any:
    """The experiment of one round: the PGKD stage alone, trained on the labelled and generated examples.

    The data set gets ``extra_train`` (the user's files, then the generated files of the earlier
    rounds) and ``heldout: test``, with ``data.val_fraction: 0`` (the fixed validation set is scored
    by the loop, not carved from the growing training split). A round evaluates once, after its last
    epoch, without the latency measurement, and writes no intermediate checkpoint.
    """
    from distill.config.schema import stage_setting

    stage = experiment.stage(spec.stage)
    params = dict(experiment.data.params)
    extra = _user_extra(params) + [str(path.resolve()) for path in extra_files]
    params["extra_train"] = extra or None
    params["heldout"] = "test"
    epochs = stage_setting(stage, experiment.training, "epochs")
    evaluation = experiment.evaluation.model_copy(update={"every_epochs": epochs, "latency": False, "reference": None})
    checkpoint = experiment.checkpoint.model_copy(update={"every_epochs": epochs, "every_steps": None})
    return experiment.model_copy(
        update={
            "stages": [stage],
            "data": experiment.data.model_copy(update={"params": params, "val_fraction": 0.0}),
            "evaluation": evaluation,
            "checkpoint": checkpoint,
            "compare": experiment.compare.model_copy(update={"stages": None}),
            "pgkd": None,
        }
    )


def _better(value: float, best: float | None, metric: str, min_delta: float) -> bool:
    if best is None:
        return not math.isnan(value)
    return value < best - min_delta if metric == "nll" else value > best + min_delta


def run_pgkd(
    experiment: Any,
    *,
    spec: PGKDSpec | None = None,
    output_dir: str | Path | None = None,
    client: Any = None,
    callbacks: Iterable[Any] = (),
    progress: Callable[..., None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> PGKDResult:
    """Run (or continue) performance-guided distillation as ``experiment.pgkd`` (or ``spec``) says.

    ``client`` replaces the teacher of ``pgkd.teacher`` (any object with the ``map`` method of
    ``distill.blackbox.client.TeacherClient``); ``progress`` is passed to ``client.map`` (teacher
    requests done so far); ``callbacks`` receive the round runs' progress and the loop's messages
    (``on_message``); ``on_round(round, train_size)`` is called before each round trains. Returns the
    folder and the content of ``pgkd.json``.
    """
    import torch

    from distill.active import _device, _probabilities
    from distill.blackbox.client import choice_texts
    from distill.data import load_data
    from distill.engine.batches import derive_seed
    from distill.engine.callbacks import CallbackList
    from distill.engine.context import STAGE_WEIGHTS, environment_summary
    from distill.engine.runner import run_experiment
    from distill.io import atomic_write_json, read_jsonl
    from distill.models.build import build_model, load_weights
    from distill.registry import DATASETS, load_builtins

    load_builtins()
    spec = spec if spec is not None else getattr(experiment, "pgkd", None)
    if spec is None:
        raise ValueError("pgkd: the experiment has no `pgkd:` section (teacher, stage, rounds, per_round, ...)")
    check_pgkd(experiment, spec)
    callbacks = list(callbacks)
    say = CallbackList(callbacks).on_message
    folder = Path(output_dir) if output_dir is not None else Path(experiment.output_dir) / experiment.name / "pgkd"
    folder.mkdir(parents=True, exist_ok=True)
    _check_plan(folder, experiment, spec)
    started = time.time()
    stage = experiment.stage(spec.stage)

    # The labelled data (with the user's own extra examples), the test split, and the fixed validation set.
    base_params = {**experiment.data.params, "heldout": "test"}
    base = load_data(experiment.data.model_copy(update={"params": base_params, "val_fraction": 0.0, "select": None}))
    if base.is_lm or "texts" not in base.meta:
        raise ValueError(f"pgkd: data set '{base.name}' is not a text classification data set (no meta texts)")
    if not base.meta["texts"].get("test"):
        raise ValueError(f"pgkd: data set '{base.name}' has no test split of its own; PGKD needs a fixed one")
    class_names = list(base.class_names)
    try:
        val_raw = DATASETS.get(experiment.data.dataset).builder(**{**experiment.data.params, "extra_train": None, "heldout": "val"})
    except ValueError as error:
        raise ValueError(f"pgkd needs the data set's fixed validation set (heldout: val): {error}") from error
    val_split, val_texts = val_raw.test, list(val_raw.meta["texts"]["test"])
    if val_split is None or len(val_split) == 0:
        raise ValueError(f"pgkd: data set '{base.name}' returned no validation set (heldout: val)")
    train_texts = list(base.meta["texts"]["train"])
    labelled = len(train_texts)
    train_labels = base.train.labels
    heldout_keys = {normalized(text) for text in val_texts} | {normalized(text) for text in base.meta["texts"]["test"]}
    device = _device(experiment.device)
    batch = experiment.data.eval_batch_size
    teacher = _Teacher(spec.teacher, client, say, folder / TEACHER_CACHE)
    say(
        f"PGKD: {labelled} labelled training examples, {len(val_split)} validation and {len(base.test)} test texts, "
        f"{len(class_names)} classes; up to {spec.rounds} rounds of {spec.per_round} examples for the "
        f"{spec.classes_per_round} weakest classes; teacher {teacher.description}"
    )

    def round_dir(index: int) -> Path:
        return folder / f"round-{index}"

    def student(index: int) -> torch.nn.Module:
        model = build_model(experiment.models[stage.model], num_classes=base.num_classes, input_shape=base.input_shape)
        load_weights(model, round_dir(index) / "run" / "stages" / stage.name / STAGE_WEIGHTS)
        return model.eval()

    def evaluate(index: int, extra_files: list[Path]) -> dict[str, Any]:
        path = round_dir(index) / EVALUATION
        if path.is_file():
            return json.loads(path.read_text())
        generated_rows = sum(len(read_jsonl(file)) for file in extra_files)
        if on_round is not None:
            on_round(index, labelled + generated_rows)
        say(f"round {index}: training on {labelled} labelled + {generated_rows} generated examples")
        run = run_experiment(
            _round_experiment(experiment, spec, extra_files), run_dir=round_dir(index) / "run", callbacks=callbacks,
            write_report=False,
        )
        row = next(r for r in run.rows if r["name"] == stage.name)
        model = student(index)
        val = per_class_report(_probabilities(model, val_split, batch, device), val_split.labels, class_names)
        test = per_class_report(_probabilities(model, base.test, batch, device), base.test.labels, class_names)
        evaluation = {
            "round": index,
            "train_size": labelled + generated_rows,
            "labelled": labelled,
            "generated_in_train": generated_rows,
            "val": val,
            "test": test,
            "train_time_s": row.get("train_time_s"),
            "run_dir": str(round_dir(index) / "run"),
        }
        atomic_write_json(path, evaluation)
        return evaluation

    def generate(index: int, val_report: dict[str, Any], seen: set[str]) -> dict[str, Any]:
        directory = round_dir(index)
        model = student(index)
        val_probs = _probabilities(model, val_split, batch, device)
        targets = weakest_classes(val_report, min(spec.classes_per_round, len(class_names)))
        budgets = split_budget(spec.per_round, len(targets))
        requests: list[dict[str, Any]] = []
        plans: list[dict[str, Any]] = []
        for target, count in zip(targets, budgets):
            if count == 0:
                continue
            name = class_names[target]
            rows = (train_labels[:labelled] == target).nonzero().squeeze(1)
            generator = torch.Generator().manual_seed(derive_seed(spec.seed, "pgkd", "examples", index, name))
            shown = rows[torch.randperm(len(rows), generator=generator)[: spec.examples_per_class]].tolist()
            missed, intruders = hard_negatives(val_probs, val_split.labels, target, spec.hard_negatives, val_texts, class_names)
            messages = generation_messages(
                task=spec.task, class_names=class_names, report=val_report, targets=targets, target=target, count=count,
                examples=[train_texts[row] for row in shown], missed=missed, intruders=intruders,
            )
            sampling = {
                "n": spec.samples, "temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens,
                "seed": derive_seed(spec.seed, "pgkd", "generate", index, name),
            }
            requests.append({"messages": messages, **sampling})
            plans.append({"target": name, "count": count, "missed": missed, "intruders": intruders, "sampling": sampling})
        atomic_write_json(directory / PROMPTS, [{"target": plan["target"], **request} for plan, request in zip(plans, requests)])
        say(f"round {index}: asking the teacher for {spec.per_round} examples of {', '.join(p['target'] for p in plans)}")
        responses = teacher.client().map("chat", requests, progress=progress)
        if len(responses) != len(requests):
            raise ValueError(f"pgkd: the teacher client returned {len(responses)} responses to {len(requests)} requests")
        kept_rows: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for request_index, (plan, response) in enumerate(zip(plans, responses)):
            for sample, reply in enumerate(choice_texts(response)):
                candidates = parse_examples(reply or "")
                if not candidates:
                    rejected.append({"round": index, "target": plan["target"], "request": request_index, "sample": sample,
                                     "text": reply or "", "reason": "unparsed"})
                kept, dropped = filter_examples(
                    candidates, seen=seen, heldout=heldout_keys, max_chars=spec.max_chars, min_words=spec.min_words,
                    class_names=class_names if spec.reject_class_names else (),
                )
                provenance = {
                    "round": index, "target": plan["target"], "request": request_index, "sample": sample,
                    "teacher": teacher.name, "sampling": plan["sampling"],
                    "hard_negatives": {"missed": plan["missed"], "intruders": plan["intruders"]},
                }
                kept_rows += [{"text": text, "label": plan["target"], **provenance} for text in kept]
                rejected += [{"round": index, "target": plan["target"], "request": request_index, "sample": sample,
                              "text": text, "reason": reason} for text, reason in dropped]
        if spec.relabel and kept_rows:
            relabel_requests = [
                {"messages": relabel_messages(task=spec.task, class_names=class_names, text=row["text"]), "n": 1,
                 "temperature": 0.0, "top_p": 1.0, "max_tokens": 32,
                 "seed": derive_seed(spec.seed, "pgkd", "relabel", index, number)}
                for number, row in enumerate(kept_rows)
            ]
            say(f"round {index}: asking the teacher to classify the {len(kept_rows)} new examples")
            answers = teacher.client().map("chat", relabel_requests, progress=progress)
            if len(answers) != len(relabel_requests):
                raise ValueError(f"pgkd: the teacher client returned {len(answers)} responses to {len(relabel_requests)} requests")
            agreed = []
            for row, answer in zip(kept_rows, answers):
                reply = next(iter(choice_texts(answer)), "") or ""
                label = parse_label(reply, class_names)
                row["relabel"] = {"answer": reply, "label": label}
                if label == row["label"]:
                    agreed.append(row)
                else:
                    seen.discard(normalized(row["text"]))
                    rejected.append({"round": index, "target": row["label"], "request": row["request"], "sample": row["sample"],
                                     "text": row["text"], "reason": "teacher_disagrees" if label else "unparsed_label",
                                     "relabel": row["relabel"]})
            kept_rows = agreed
        _write_jsonl(directory / GENERATED, kept_rows)
        _write_jsonl(directory / REJECTED, rejected)
        reasons: dict[str, int] = {}
        for item in rejected:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        per_class = {plan["target"]: 0 for plan in plans}
        for row in kept_rows:
            per_class[row["label"]] += 1
        generation = {
            "round": index,
            "targets": [plan["target"] for plan in plans],
            "requests": len(requests),
            "candidates": len(kept_rows) + sum(count for reason, count in reasons.items() if reason != "unparsed"),
            "kept": len(kept_rows),
            "dropped": reasons,
            "kept_per_class": per_class,
            "teacher": teacher.name,
        }
        atomic_write_json(directory / GENERATION, generation)
        say(f"round {index}: kept {len(kept_rows)} of {generation['candidates']} generated examples")
        return generation

    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"stopped": None, "best_round": None}

    def write_json() -> dict[str, Any]:
        best = records[summary["best_round"]] if summary["best_round"] is not None else None
        result = {
            "experiment": experiment.name,
            "stage": spec.stage,
            "teacher": teacher.description,
            "metric": spec.metric,
            "classes": class_names,
            "labelled_train": labelled,
            "val_size": len(val_split),
            "test_size": len(base.test),
            "pgkd": spec.model_dump(mode="json"),
            "rounds": records,
            "best_round": summary["best_round"],
            "best": None if best is None else {"round": best["round"], "val": best["val"], "test": best["test"]},
            "stopped": summary["stopped"],
            "generated_total": sum((r["generation"] or {}).get("kept", 0) for r in records),
            "wall_time_s": time.time() - started,
            "environment": environment_summary(),
        }
        atomic_write_json(folder / PGKD_JSON, result)
        return result

    seen = {normalized(text) for text in train_texts}
    best_value: float | None = None
    stale = 0
    try:
        for index in range(spec.rounds + 1):
            extra_files = [round_dir(i) / GENERATED for i in range(index)]
            evaluation = evaluate(index, extra_files)
            value = float(evaluation["val"][spec.metric])
            improved = _better(value, best_value, spec.metric, spec.min_delta)
            if improved:
                best_value, stale, summary["best_round"] = value, 0, index
            else:
                stale += 1
            stop = "budget" if index == spec.rounds else ("patience" if stale >= spec.patience else None)
            generation = None
            if stop is None:
                done = round_dir(index) / GENERATION
                if done.is_file():
                    generation = json.loads(done.read_text())
                    seen |= {normalized(row["text"]) for row in read_jsonl(round_dir(index) / GENERATED)}
                else:
                    generation = generate(index, evaluation["val"], seen)
                _write_jsonl(folder / GENERATED, (row for i in range(index + 1) for row in read_jsonl(round_dir(i) / GENERATED)))
            keys = ("accuracy", "macro_f1", "nll")
            records.append(
                {
                    "round": index,
                    "train_size": evaluation["train_size"],
                    "generated_in_train": evaluation["generated_in_train"],
                    "val": {key: evaluation["val"][key] for key in keys},
                    "test": {key: evaluation["test"][key] for key in keys},
                    "value": value,
                    "improved": improved,
                    "stale": stale,
                    "generation": generation,
                    "train_time_s": evaluation.get("train_time_s"),
                    "run_dir": evaluation["run_dir"],
                }
            )
            say(
                f"round {index}: validation {spec.metric} {value:.4f}{' (best so far)' if improved else ''}, "
                f"test accuracy {100 * evaluation['test']['accuracy']:.2f}%"
            )
            summary["stopped"] = stop
            write_json()
            if stop is not None:
                say(
                    f"stopped after round {index}: "
                    + ("the budget of pgkd.rounds is spent" if stop == "budget" else f"no improvement for {spec.patience} round(s)")
                )
                break
    finally:
        teacher.close()
    result = write_json()
    build_pgkd_report(folder)
    return PGKDResult(folder=folder, result=result)


# ---------------------------------------------------------------------------------- report


METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "nll": "NLL"}


def _score(value: float, metric: str) -> str:
    return f"{value:.4f}" if metric == "nll" else f"{100 * value:.2f}"


def pgkd_table(result: dict[str, Any]) -> str:
    """Markdown table, one row per round: training size, validation metric, test accuracy and macro-F1, generation."""
    from distill.report.run_report import markdown_table

    metric = result["metric"]
    header = [
        "round", "train size", f"val {METRIC_NAMES[metric]}", "test accuracy", "test macro-F1",
        "generated", "kept", "targeted classes",
    ]
    body = []
    for record in result["rounds"]:
        generation = record.get("generation")
        best = " (best)" if record["round"] == result.get("best_round") else ""
        body.append(
            [
                f"{record['round']}{best}",
                str(record["train_size"]),
                _score(record["val"][metric], metric),
                f"{100 * record['test']['accuracy']:.2f}",
                f"{100 * record['test']['macro_f1']:.2f}",
                str(generation["candidates"]) if generation else "-",
                str(generation["kept"]) if generation else "-",
                ", ".join(generation["targets"]) if generation else "-",
            ]
        )
    return markdown_table(header, body)


def build_pgkd_report(folder: str | Path) -> Path:
    """Write ``pgkd.md`` from ``pgkd.json``; return its path."""
    from distill.io import atomic_write_text

    folder = Path(folder)
    result = json.loads((folder / PGKD_JSON).read_text())
    spec = result["pgkd"]
    metric = METRIC_NAMES[result["metric"]]
    best = result.get("best")
    stopped = {
        "budget": f"the budget of {spec['rounds']} round(s) of generation was spent",
        "patience": f"{spec['patience']} round(s) passed without a validation {metric} gain above {spec['min_delta']}",
    }.get(result.get("stopped") or "", "it has not finished")
    lines = [
        f"# PGKD: {result['experiment']}",
        "",
        (
            f"Performance-guided distillation (Di Palo et al., EMNLP 2024) of stage `{result['stage']}` from teacher "
            f"{result['teacher']}: {result['labelled_train']} labelled training examples, {len(result['classes'])} classes, "
            f"{result['val_size']} validation and {result['test_size']} test texts. Each round the teacher was asked for "
            f"{spec['per_round']} examples of the {spec['classes_per_round']} weakest classes"
            + (", each kept only if the teacher classified it as its class" if spec["relabel"] else "")
            + f". The loop stopped because {stopped}."
        ),
        "",
        (f"Scores in %, validation {metric} {'(lower is better) ' if result['metric'] == 'nll' else ''}for early stopping; "
         "`generated`/`kept` count the examples written after a round, which the next round trains on:"),
        "",
        pgkd_table(result),
        "",
    ]
    if best is not None:
        lines += [
            (f"Best round: {best['round']} (validation {metric} {_score(best['val'][result['metric']], result['metric'])}, "
             f"test accuracy {100 * best['test']['accuracy']:.2f}%, test macro-F1 {100 * best['test']['macro_f1']:.2f}%); "
             f"{result['generated_total']} generated examples in `generated.jsonl`."),
            "",
        ]
    path = folder / PGKD_MD
    atomic_write_text(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------------------------- command line


def add_pgkd_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``distill pgkd EXPERIMENT.yaml [--set key=value ...] [--out DIR] [--no-progress]``."""
    parser = subparsers.add_parser(
        "pgkd", help="performance-guided distillation: an LLM teacher writes training examples for the student's weak classes"
    )
    parser.add_argument("config", help="experiment YAML file with a `pgkd:` section")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set pgkd.rounds=3 --set pgkd.teacher.serve.model=...",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <output_dir>/<name>/pgkd/); a rerun continues it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def command_pgkd(args: argparse.Namespace, console: Console) -> int:
    """``distill pgkd``: run the loop, print the per-round table and where it is written."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from distill.cli_progress import RichProgress

    experiment, spec = load_pgkd_experiment(args.config, args.overrides)
    show_bar = not args.no_progress and console.is_terminal
    bar = Progress(
        TextColumn("[bold blue]teacher requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not show_bar, transient=True,
    )
    task = bar.add_task("teacher", total=None)

    def advance(done: int, total: int | None = None, *rest: Any) -> None:
        bar.update(task, completed=done, total=total)

    def announce(index: int, size: int) -> None:
        console.rule(f"PGKD round {index}: {size} training examples")

    with bar:
        result = run_pgkd(
            experiment, spec=spec, output_dir=args.out, callbacks=[RichProgress(console, show_bar=show_bar)],
            progress=advance, on_round=announce,
        )
    out = Console(width=max(Console().width, 140))
    out.print(pgkd_table(result.result), markup=False, highlight=False)
    out.print(f"table: [bold]{result.folder / PGKD_MD}[/bold]")
    return 0

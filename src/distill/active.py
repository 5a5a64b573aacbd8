"""Active distillation: rounds of select -> distill -> evaluate under a budget of teacher queries.

A pool of training rows starts unlabelled. Round 0 queries ``active.initial`` rows chosen at
random; every further round queries ``active.per_round`` more rows chosen by a *strategy*. After
each round the experiment's stage ``active.stage`` trains the student from its seeded initial
weights by distillation on the queried rows only (through ``data.select``, the same mechanism as
``distill select-data``) and is evaluated on the test split. The result is test accuracy against
the number of queried rows, per strategy, as mean +- std over seeds.

Strategies (pure functions on probability tensors, below):

* ``random``: uniformly among the rows not queried yet.
* ``pcoreset``: ActiveKD's Probabilistic CoreSet (Kang et al. 2025). Greedy k-center in the
  *probability space*: each pick is the unqueried row whose softmax vector is farthest (Euclidean
  distance) from every row queried so far and every row picked before it in this round. As in the
  paper's code, the vectors are the predictions of the student trained in the previous round, on
  the queried rows (the centres) and on the pool (the candidates).
* ``rad``: Robust Active Distillation (Baykal et al., ICLR 2023): informative rows that the
  teacher likely labels correctly. A row's gain is the student's margin uncertainty. The teacher's
  mistakes, which concentrate on the hardest rows, are modelled as an adversary that spoils
  ``k`` rows where the learner's expected gain ``p_i * g_i`` is largest; the learner's optimal
  mixed strategy equalizes ``p_i * g_i`` over a top set of gains (``p_i ~ 1 / g_i`` there)
  instead of taking the top gains, see :func:`rad_probabilities`. No true label is used, and the
  teacher is never run on an unqueried row for selection: ``k`` is the teacher's expected error
  rate on the rows queried so far, ``mean(1 - max teacher probability)``, times the candidates.

``run_active`` writes into its folder (default ``<output_dir>/<name>/active/``)::

    active.json, active.md, active.png   every cell, the strategy x budget table, the curves
    teacher/                             a run folder training the teacher stage (when the teacher is a stage)
    teacher_pool.safetensors             the teacher's probabilities over the pool, computed once (selection reads
                                         only the queried rows; the rest serve the report)
    seed-<s>/initial/                    round 0, shared by every strategy of seed s
    seed-<s>/<strategy>/round-<r>/       selection.json (read by data.select), run/ (a run folder), result.json

A rerun with the same folder skips every (strategy, seed, round) whose ``result.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # torch is imported where it is used: the config schema imports this module
    import torch

STRATEGIES = ("random", "pcoreset", "rad")
ACTIVE_JSON = "active.json"
ACTIVE_MD = "active.md"
ACTIVE_PNG = "active.png"
RESULT_FILE = "result.json"
PLAN_FILE = "active_plan.json"
TEACHER_POOL = "teacher_pool.safetensors"


# ---------------------------------------------------------------------------------- the config section


class _Section(BaseModel):
    # the style of distill.config.schema.Section, without importing it (schema.py imports this module)
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RadSpec(_Section):
    """Parameters of Robust Active Distillation (``rad``)."""

    informativeness: Literal["margin", "entropy", "least_confidence"] = Field(
        default="margin", description="the student's uncertainty used as a row's gain (the paper: margin)"
    )
    mistake_rate: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description=(
            "share of the candidates the teacher mislabels (the adversary's k = rate x candidates); null: estimated "
            "without labels as mean(1 - teacher max probability) over the rows queried so far"
        ),
    )


class RoundDataSpec(_Section):
    """Data settings of the round runs that differ from `data` (they leave the training split as it is)."""

    batch_size: int | None = Field(default=None, ge=1, description="batch size of the round runs (few queried rows: smaller)")
    eval_batch_size: int | None = Field(default=None, ge=1, description="batch size of their evaluation passes")
    test_subset: int | None = Field(
        default=None, ge=1, description="evaluate every round on this many test samples (stratified), to save time"
    )


class ActiveSpec(_Section):
    """`distill active`: rounds of select -> distill -> evaluate for several strategies and seeds."""

    stage: str = Field(description="the stage run in every round (a student with a `teacher`), on the queried rows only")
    strategies: list[Literal["random", "pcoreset", "rad"]] = Field(
        default_factory=lambda: list(STRATEGIES), min_length=1, description="selection strategies compared"
    )
    initial: int = Field(default=100, ge=1, description="rows queried in round 0, chosen at random (shared by the strategies)")
    per_round: int = Field(default=100, ge=1, description="rows queried in each later round")
    rounds: int = Field(default=4, ge=0, description="rounds after round 0")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="run seeds (student init, batch order, selection)")
    pool: int | None = Field(default=None, ge=1, description="cap on the pool: this many training rows, fixed by data.split_seed")
    data: RoundDataSpec = Field(default_factory=RoundDataSpec, description="data settings of the round runs")
    rad: RadSpec = Field(default_factory=RadSpec, description="parameters of the `rad` strategy")

    @field_validator("strategies", "seeds")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError(f"must be distinct, got {values}")
        return values

    def budgets(self) -> list[int]:
        """Queried rows after each round: ``initial + r * per_round`` for r = 0 .. rounds."""
        return [self.initial + r * self.per_round for r in range(self.rounds + 1)]


# ---------------------------------------------------------------------------------- selection (pure)


def _free_mask(size: int, queried: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    import torch

    free = torch.ones(size, dtype=torch.bool)
    if queried is not None and len(queried):
        free[torch.as_tensor(queried, dtype=torch.long)] = False
    return free


def _check_count(count: int, available: int) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count > available:
        raise ValueError(f"cannot select {count} rows: only {available} are not queried yet")


def select_random(
    size: int,
    count: int,
    *,
    queried: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``count`` distinct rows of ``range(size)`` outside ``queried``, uniformly at random."""
    import torch

    candidates = _free_mask(size, queried).nonzero().squeeze(1)
    _check_count(count, len(candidates))
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]]


def _min_distances(points: torch.Tensor, centers: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    import torch

    out = torch.empty(len(points), dtype=points.dtype)
    for start in range(0, len(points), chunk):
        out[start : start + chunk] = torch.cdist(points[start : start + chunk], centers).min(dim=1).values
    return out


def select_pcoreset(
    probs: torch.Tensor, count: int, *, queried: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """PCoreSet: greedy k-center in the probability space; the new rows in the order they are picked.

    ``probs`` ``[N, C]`` are the (student's) class probabilities of every pool row. Each pick is
    the row, among those neither queried nor picked, with the largest Euclidean distance to its
    nearest centre, the centres being the queried rows and the rows picked so far (ties: the
    lowest row). With nothing queried the first pick is the row farthest from the mean
    probability vector of the pool (the least typical prediction).
    """
    import torch

    points = torch.as_tensor(probs).detach().double().cpu()
    free = _free_mask(len(points), queried)
    _check_count(count, int(free.sum()))
    if bool((~free).any()):
        nearest = _min_distances(points, points[~free])
    else:
        nearest = torch.linalg.vector_norm(points - points.mean(dim=0, keepdim=True), dim=1)
    nearest[~free] = -math.inf
    picks = []
    for _ in range(count):
        pick = int(torch.argmax(nearest))
        picks.append(pick)
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(points - points[pick], dim=1))
        nearest[pick] = -math.inf
    return torch.tensor(picks, dtype=torch.long)


def informativeness(probs: torch.Tensor, kind: str = "margin") -> torch.Tensor:
    """A row's uncertainty in [0, 1] from its class probabilities ``[N, C]`` (higher: more informative).

    ``margin``: 1 - (p_top1 - p_top2), the gain of Robust Active Distillation; ``entropy``: the
    entropy divided by log C; ``least_confidence``: (1 - p_top1) / (1 - 1/C).
    """
    import torch

    p = torch.as_tensor(probs).double()
    classes = p.shape[1]
    if kind == "margin":
        top = p.topk(min(2, classes), dim=1).values
        second = top[:, 1] if classes > 1 else torch.zeros(len(p), dtype=p.dtype)
        return (1.0 - (top[:, 0] - second)).clamp(0.0, 1.0)
    if kind == "entropy":
        entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
        return (entropy / math.log(classes)).clamp(0.0, 1.0) if classes > 1 else torch.zeros(len(p), dtype=p.dtype)
    if kind == "least_confidence":
        if classes == 1:
            return torch.zeros(len(p), dtype=p.dtype)
        return ((1.0 - p.max(dim=1).values) / (1.0 - 1.0 / classes)).clamp(0.0, 1.0)
    raise ValueError(f"informativeness must be 'margin', 'entropy' or 'least_confidence', got '{kind}'")


def rad_probabilities(gains: torch.Tensor, count: int, mistakes: float) -> torch.Tensor:
    """RAD's robust selection: inclusion probabilities ``p`` (each in [0, 1], summing to ``count``).

    The game of Baykal et al.: the learner draws ``count`` rows with marginals ``p``; an adversary
    (the teacher's errors) spoils up to ``mistakes`` rows, and does so where ``p_i * g_i`` is
    largest. ``p`` maximizes the learner's worst-case expected gain::

        max_p  sum_i p_i g_i - (sum of the `mistakes` largest p_i g_i)
             = max_{p, t}  sum_i min(p_i g_i, t) - mistakes * t

    For a fixed level ``t`` the best ``p`` fills rows by decreasing gain up to ``min(1, t / g_i)``
    (so ``p_i g_i = t`` on the top gains: the paper's ``p_i ~ 1 / g_i``), and the value is concave
    in ``t``, which is found by golden-section search. With ``mistakes = 0`` this is the top
    ``count`` gains (plain uncertainty sampling); with more mistakes the probability spreads over
    more rows and the highest gains lose weight. Ties in ``gains`` are broken by row.
    """
    import numpy as np
    import torch

    g = torch.as_tensor(gains).detach().double().cpu().numpy().clip(1e-12, None)
    n = len(g)
    _check_count(count, n)
    if count == n or count == 0:
        return torch.full((n,), 1.0 if count else 0.0, dtype=torch.float64)
    order = np.lexsort((np.arange(n), -g))
    sorted_gains = g[order]
    k = float(max(mistakes, 0.0))

    def allocate(t: float) -> np.ndarray:
        caps = np.minimum(1.0, t / sorted_gains)
        before = np.concatenate(([0.0], np.cumsum(caps)[:-1]))
        p = np.clip(count - before, 0.0, caps)
        rest = count - p.sum()
        if rest > 1e-12:  # the capped rows cannot hold the budget: the rest goes to the next gains, at no value
            room = 1.0 - p
            before_room = np.concatenate(([0.0], np.cumsum(room)[:-1]))
            p = p + np.clip(rest - before_room, 0.0, room)
        return p

    def value(t: float) -> float:
        return float(np.minimum(allocate(t) * sorted_gains, t).sum() - k * t)

    low, high = 0.0, float(sorted_gains[0])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    value_a, value_b = value(a), value(b)
    for _ in range(200):
        if value_a < value_b:
            low, a, value_a = a, b, value_b
            b = low + ratio * (high - low)
            value_b = value(b)
        else:
            high, b, value_b = b, a, value_a
            a = high - ratio * (high - low)
            value_a = value(a)
    candidates = [(value(t), t) for t in (a, b, float(sorted_gains[0]))]
    best_value = max(v for v, _ in candidates)
    level = max(t for v, t in candidates if v >= best_value - 1e-12)  # on a tie, the level that rounds p to 0/1
    p_sorted = allocate(level)
    p_sorted[p_sorted < 1e-12] = 0.0
    p_sorted[p_sorted > 1.0 - 1e-12] = 1.0
    p = np.empty(n)
    p[order] = p_sorted
    return torch.from_numpy(p)


def sample_inclusion(p: torch.Tensor, count: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` distinct rows, row ``i`` drawn with probability ``p[i]`` (systematic sampling in a random order)."""
    import torch

    p = torch.as_tensor(p).double().cpu()
    _check_count(count, int((p > 0).sum()))
    order = torch.randperm(len(p), generator=generator)
    cumulative = torch.cumsum(p[order], dim=0)
    start = float(torch.rand(1, generator=generator, dtype=torch.float64))
    thresholds = start + torch.arange(count, dtype=torch.float64)
    positions = torch.searchsorted(cumulative, thresholds, right=True).clamp_max(len(p) - 1)
    chosen = list(dict.fromkeys(order[positions].tolist()))
    if len(chosen) < count:  # rounding at the end of the cumulative sum: top up with the likeliest rows left
        taken = set(chosen)
        for row in torch.argsort(-p, stable=True).tolist():
            if row not in taken and len(chosen) < count:
                chosen.append(row)
                taken.add(row)
    return torch.tensor(chosen[:count], dtype=torch.long)


def teacher_mistake_rate(teacher_probs: torch.Tensor) -> float:
    """The teacher's expected error rate without labels: ``mean(1 - max_c p_teacher(c | x))``."""
    import torch

    probs = torch.as_tensor(teacher_probs).double()
    if len(probs) == 0:
        raise ValueError("the teacher's mistake rate needs its probabilities on at least one queried row")
    return float((1.0 - probs.max(dim=1).values).mean())


def select_rad(
    student_probs: torch.Tensor,
    count: int,
    *,
    queried: torch.Tensor | Sequence[int] | None = None,
    teacher_probs: torch.Tensor | None = None,
    mistake_rate: float | None = None,
    informativeness_kind: str = "margin",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Robust Active Distillation: ``count`` new rows, among those not queried yet.

    ``student_probs`` ``[N, C]``: the student's probabilities over the pool; a row's gain is its
    informativeness (margin uncertainty by default, the paper's choice). The teacher's mistakes
    are the adversary of :func:`rad_probabilities`, with budget ``k = rate * candidates``; the
    rate is ``mistake_rate``, or else it is estimated without labels from ``teacher_probs``, the
    teacher's soft labels on the rows already queried (``[len(queried), C]``, what has been paid
    for; :func:`teacher_mistake_rate`). The teacher is never run on unqueried rows. Rows are drawn
    with the inclusion probabilities of :func:`rad_probabilities`.
    """
    import torch

    student = torch.as_tensor(student_probs).double().cpu()
    candidates = _free_mask(len(student), queried).nonzero().squeeze(1)
    _check_count(count, len(candidates))
    if mistake_rate is None:
        if teacher_probs is None:
            raise ValueError("select_rad needs the teacher's probabilities on the queried rows, or a mistake_rate")
        mistake_rate = teacher_mistake_rate(teacher_probs)
    gains = informativeness(student[candidates], informativeness_kind)
    p = rad_probabilities(gains, count, float(mistake_rate) * len(candidates))
    return candidates[sample_inclusion(p, count, generator=generator)]


# ---------------------------------------------------------------------------------- checks


def check_active(experiment: Any, spec: ActiveSpec | None = None) -> None:
    """Cross-check the `active:` section against the experiment; raises ValueError naming the key."""
    spec = spec if spec is not None else getattr(experiment, "active", None)
    if spec is None:
        raise ValueError("active: the experiment has no `active:` section (stage, strategies, initial, per_round, rounds)")
    names = [stage.name for stage in experiment.stages]
    if spec.stage not in names:
        raise ValueError(f"active.stage: no stage '{spec.stage}'; stages: {', '.join(names)}")
    index = names.index(spec.stage)
    stage = experiment.stages[index]
    problems = []
    earlier = names[:index]
    if stage.teachers or stage.teacher_cache is not None:
        problems.append(
            f"active.stage: stage '{stage.name}' reads several teachers or a cached teacher; active distillation queries "
            "one `teacher:` (a trained stage or a `models` entry with `weights:`)"
        )
    elif stage.teacher is None:
        problems.append(
            f"active.stage: stage '{stage.name}' has no `teacher`; active distillation queries one (an earlier stage or "
            "a `models` entry with `weights:`)"
        )
    elif stage.teacher not in earlier:
        model = experiment.models.get(stage.teacher)
        if model is None or model.weights is None:
            problems.append(
                f"active.stage: the teacher of stage '{stage.name}' is models.{stage.teacher}, which has no `weights:`; "
                "give it trained weights or train it in an earlier stage"
            )
    if stage.init_from is not None:
        problems.append(
            f"active.stage: stage '{stage.name}' starts from `init_from: {stage.init_from}`; every round trains the "
            "student from its seeded initial weights, so remove init_from"
        )
    if stage.reference is not None and stage.reference in earlier:
        problems.append(
            f"active.stage: stage '{stage.name}' reads `reference: {stage.reference}`, an earlier stage; a round runs "
            "this stage alone, so only a `models` entry can be its reference"
        )
    if spec.pool is not None and spec.budgets()[-1] > spec.pool:
        problems.append(
            f"active.pool: {spec.pool} rows cannot hold the last budget, {spec.budgets()[-1]} rows "
            "(initial + rounds x per_round)"
        )
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------------- the round loop


@dataclass
class ActiveResult:
    folder: Path
    result: dict[str, Any]


def _mean_std(values: list[float]) -> dict[str, float | int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _plan_fingerprint(experiment: Any, spec: ActiveSpec) -> str:
    """What must not change between a run and its continuation (strategies, seeds and rounds may grow)."""
    payload = {
        "experiment": experiment.model_dump(mode="json", exclude={"active", "compare", "output_dir", "device"}),
        "active": spec.model_dump(mode="json", exclude={"strategies", "seeds", "rounds"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_plan(folder: Path, experiment: Any, spec: ActiveSpec) -> None:
    from distill.io import atomic_write_json

    path = folder / PLAN_FILE
    fingerprint = _plan_fingerprint(experiment, spec)
    if path.is_file():
        stored = json.loads(path.read_text()).get("fingerprint")
        if stored != fingerprint:
            raise ValueError(
                f"{folder} holds an active run of another configuration (the data, models, stages or active settings "
                "differ; only active.strategies, active.seeds and active.rounds may change); choose another output folder"
            )
        return
    atomic_write_json(path, {"experiment": experiment.name, "fingerprint": fingerprint})


def _device(name: str) -> torch.device:
    import torch

    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _probabilities(model: torch.nn.Module, split: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """Softmax of ``model`` over a whole split (one process), float64 on the CPU."""
    import torch

    from distill.engine.context import predict

    single = SimpleNamespace(world_size=1, rank=0, device=device)
    logits = predict(model.to(device), split, batch_size, single)  # type: ignore[arg-type]
    return torch.softmax(logits.double(), dim=1)


def _pool_rows(size: int, cap: int | None, split_seed: int) -> torch.Tensor:
    import torch

    from distill.engine.batches import derive_seed

    if cap is None or cap >= size:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(derive_seed(split_seed, "active", "pool"))
    return torch.randperm(size, generator=generator)[:cap].sort().values


def _resolve_teacher(
    experiment: Any, spec: ActiveSpec, folder: Path, reuse: Sequence[Path], callbacks: Sequence[Any], say: Callable[[str], None]
) -> tuple[Any, str]:
    """The teacher as a `models` entry with trained ``weights``, and a description of where they are.

    A teacher stage is trained once (with the experiment's own seed) in ``<folder>/teacher/``,
    unless that folder already holds it; like ``distill compare --reuse``, a finished identical
    stage in a run folder of ``reuse`` is copied instead of trained.
    """
    from distill.engine.checkpoint import CheckpointError, verify_folder
    from distill.engine.context import STAGE_WEIGHTS
    from distill.engine.runner import run_experiment

    stage = experiment.stage(spec.stage)
    names = [s.name for s in experiment.stages]
    if stage.teacher not in names[: names.index(stage.name)]:
        model = experiment.models[stage.teacher]
        return model, f"models.{stage.teacher} ({model.weights})"
    teacher_stage = experiment.stage(stage.teacher)
    run_dir = folder / "teacher"
    stage_dir = run_dir / "stages" / teacher_stage.name
    try:
        verify_folder(stage_dir)
        say(f"teacher: stage '{teacher_stage.name}' already trained in {run_dir}")
    except CheckpointError:
        say(f"teacher: running the stages up to '{teacher_stage.name}' in {run_dir}")
        truncated = experiment.model_copy(
            update={
                "stages": experiment.stages[: names.index(teacher_stage.name) + 1],
                "evaluation": experiment.evaluation.model_copy(update={"reference": None}),
                "compare": experiment.compare.model_copy(update={"stages": None}),
            }
        )
        run_experiment(truncated, run_dir=run_dir, callbacks=callbacks, reuse_dirs=list(reuse))
    weights = (stage_dir / STAGE_WEIGHTS).resolve()
    model = experiment.models[teacher_stage.model].model_copy(update={"weights": str(weights)})
    return model, f"stage '{teacher_stage.name}' ({weights})"


def _teacher_pool_probs(folder: Path, teacher: Any, pool: Any, data: Any, batch: int, device: Any) -> torch.Tensor:
    """The teacher's probabilities over the pool, computed once and kept in ``teacher_pool.safetensors``."""
    from safetensors.torch import load_file, save_file

    from distill.cache.teacher import split_fingerprint
    from distill.io import sha256_file
    from distill.models.build import build_model

    identity = {
        "weights_sha256": sha256_file(Path(teacher.weights)),
        "arch": teacher.arch,
        "params": json.dumps(teacher.params, sort_keys=True),
        "pool": split_fingerprint(pool),
    }
    path = folder / TEACHER_POOL
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            stored = handle.metadata() or {}
        if stored == identity:
            return load_file(str(path))["probs"]
    model = build_model(teacher, num_classes=data.num_classes, input_shape=data.input_shape)
    model.eval().requires_grad_(False)
    probs = _probabilities(model, pool, batch, device).contiguous()
    temporary = folder / f".{TEACHER_POOL}.tmp"
    save_file({"probs": probs}, str(temporary), metadata=identity)
    temporary.replace(path)
    return probs


def _round_experiment(experiment: Any, spec: ActiveSpec, teacher: Any, selection_dir: Path) -> Any:
    """The experiment of one round: the active stage alone, its teacher a `models` entry, data.select set.

    A round is short and restarts whole if interrupted: it writes no checkpoint and evaluates
    once, after its last epoch, without the latency measurement; its agreement column refers to
    the student itself (the loop records test accuracy only), which spares one pass of the
    teacher over the test split.
    """
    from distill.config.schema import stage_setting

    stage = experiment.stage(spec.stage)
    key = stage.teacher if stage.teacher != stage.model else f"{stage.teacher}_teacher"
    models = {**experiment.models, key: teacher}
    data_updates = {"select": str(selection_dir.resolve())}
    data_updates.update({k: v for k, v in spec.data.model_dump().items() if v is not None})
    epochs = stage_setting(stage, experiment.training, "epochs")
    evaluation = experiment.evaluation.model_copy(update={"every_epochs": epochs, "latency": False, "reference": stage.name})
    checkpoint = experiment.checkpoint.model_copy(update={"every_epochs": epochs, "every_steps": None})
    return experiment.model_copy(
        update={
            "models": models,
            "stages": [stage.model_copy(update={"teacher": key})],
            "data": experiment.data.model_copy(update=data_updates),
            "evaluation": evaluation,
            "checkpoint": checkpoint,
            "compare": experiment.compare.model_copy(update={"stages": None}),
        }
    )


def _write_selection(
    cell_dir: Path, queried: torch.Tensor, new: torch.Tensor, pool_rows: torch.Tensor, train: Any, info: dict[str, Any]
) -> None:
    """``selection.json`` in the format :func:`distill.selection.load_selection` reads (``data.select``)."""
    from distill.cache.teacher import split_fingerprint
    from distill.io import atomic_write_json
    from distill.selection import SELECTION_FILE

    cell_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        cell_dir / SELECTION_FILE,
        {
            "method": "active distillation",
            **info,
            "queried": len(queried),
            "pool_index": queried.tolist(),  # pool positions, in the order they were queried
            "new_pool_index": new.tolist(),
            "rows": sorted(pool_rows[queried].tolist()),  # training rows, what data.select keeps
            "train_fingerprint": split_fingerprint(train),
        },
    )


def _read_selection(cell_dir: Path, train: Any, pool_rows: torch.Tensor) -> torch.Tensor:
    import torch

    from distill.selection import SELECTION_FILE, load_selection

    rows = load_selection(cell_dir, train)  # checks the training split's fingerprint
    queried = torch.tensor(json.loads((cell_dir / SELECTION_FILE).read_text())["pool_index"], dtype=torch.long)
    if sorted(pool_rows[queried].tolist()) != rows.tolist():
        raise ValueError(f"{cell_dir / SELECTION_FILE}: its pool positions do not match its rows (another pool?)")
    return queried


def _select(
    strategy: str,
    spec: ActiveSpec,
    count: int,
    queried: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    if strategy == "random":
        return select_random(len(teacher), count, queried=queried, generator=generator)
    if strategy == "pcoreset":
        return select_pcoreset(student, count, queried=queried)
    if strategy == "rad":
        return select_rad(
            student, count, queried=queried, teacher_probs=teacher[queried], mistake_rate=spec.rad.mistake_rate,
            informativeness_kind=spec.rad.informativeness, generator=generator,
        )
    raise ValueError(f"active.strategies: unknown strategy '{strategy}'; known: {', '.join(STRATEGIES)}")


DESCRIPTIONS = {
    "random": "uniformly at random",
    "pcoreset": "greedy k-center in the student's probability space",
    "rad": "robust active distillation (student margin uncertainty, hedged against the teacher's expected mistakes)",
}


def run_active(
    experiment: Any,
    *,
    output_dir: str | Path | None = None,
    strategies: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    spec: ActiveSpec | None = None,
    reuse: Iterable[str | Path] = (),
    callbacks: Iterable[Any] = (),
    on_cell: Callable[[str, int, int, int], None] | None = None,
) -> ActiveResult:
    """Run (or continue) active distillation as ``experiment.active`` (or ``spec``) says.

    For each seed, each strategy and each round: select the rows to query (round 0: at random,
    shared by the strategies), write ``selection.json``, run the stage ``active.stage`` on the
    queried rows through :func:`distill.engine.runner.run_experiment` (``data.select``), and record
    its test accuracy. ``strategies`` and ``seeds`` replace those of the section. ``reuse`` are run
    folders (see :func:`distill.engine.compare.run_folders`) whose finished stage identical to the
    teacher stage is copied instead of trained. ``callbacks`` receive the runs' progress and the
    loop's messages (``on_message``); ``on_cell(strategy, seed, round, queried)`` is called before
    each round that trains. Returns the folder and the content of ``active.json``.
    """
    import torch

    from distill.data import load_data
    from distill.engine.batches import derive_seed
    from distill.engine.callbacks import CallbackList
    from distill.engine.context import STAGE_WEIGHTS, environment_summary
    from distill.engine.runner import run_experiment
    from distill.io import atomic_write_json
    from distill.models.build import build_model, load_weights
    from distill.registry import load_builtins

    load_builtins()
    spec = spec if spec is not None else getattr(experiment, "active", None)
    if spec is None:
        raise ValueError("active: the experiment has no `active:` section (stage, strategies, initial, per_round, rounds)")
    changes = {}
    if strategies is not None:
        changes["strategies"] = list(strategies)
    if seeds is not None:
        changes["seeds"] = list(seeds)
    if changes:
        spec = ActiveSpec.model_validate({**spec.model_dump(), **changes})
    check_active(experiment, spec)
    callbacks = list(callbacks)
    events = CallbackList(callbacks)
    say = events.on_message
    folder = Path(output_dir) if output_dir is not None else Path(experiment.output_dir) / experiment.name / "active"
    folder.mkdir(parents=True, exist_ok=True)
    _check_plan(folder, experiment, spec)
    started = time.time()

    data = load_data(experiment.data.model_copy(update={"select": None}))
    if data.is_lm:
        raise ValueError(f"active: needs classification data; '{data.name}' is language-model data")
    train = data.train
    pool_rows = _pool_rows(len(train), spec.pool, experiment.data.split_seed)
    pool = train.subset(pool_rows)
    budgets = spec.budgets()
    if budgets[-1] > len(pool_rows):
        raise ValueError(
            f"active: the last budget, {budgets[-1]} rows, exceeds the pool of {len(pool_rows)} training rows "
            "(lower active.initial, per_round or rounds, or raise active.pool)"
        )
    device = _device(experiment.device)
    batch = spec.data.eval_batch_size or experiment.data.eval_batch_size
    teacher, teacher_source = _resolve_teacher(experiment, spec, folder, [Path(p) for p in reuse], callbacks, say)
    teacher_probs = _teacher_pool_probs(folder, teacher, pool, data, batch, device)
    teacher_right = (teacher_probs.argmax(dim=1) == pool.labels).double()  # reported only; selection never sees labels
    say(
        f"active distillation: pool of {len(pool_rows):,} training rows, budgets {budgets}, strategies "
        f"{', '.join(spec.strategies)}, seeds {spec.seeds}; teacher {teacher_source}"
    )
    stage = experiment.stage(spec.stage)

    def student_probs(run_dir: Path) -> torch.Tensor:
        model = build_model(experiment.models[stage.model], num_classes=data.num_classes, input_shape=data.input_shape)
        load_weights(model, run_dir / "stages" / stage.name / STAGE_WEIGHTS)
        return _probabilities(model.eval(), pool, batch, device)

    cells: list[dict[str, Any]] = []

    def write_json() -> dict[str, Any]:
        result = {
            "experiment": experiment.name,
            "stage": spec.stage,
            "teacher": teacher_source,
            "strategies": list(spec.strategies),
            "seeds": list(spec.seeds),
            "budgets": budgets,
            "pool": len(pool_rows),
            "pool_teacher_accuracy": float(teacher_right.mean()),
            "active": spec.model_dump(mode="json"),
            "cells": cells,
            "summary": summarize(cells, spec.strategies, budgets),
            "wall_time_s": time.time() - started,
            "environment": environment_summary(),
        }
        atomic_write_json(folder / ACTIVE_JSON, result)
        return result

    for seed in spec.seeds:
        seeded = experiment.model_copy(update={"seed": seed})
        for strategy in spec.strategies:
            queried = torch.empty(0, dtype=torch.long)
            previous_run: Path | None = None
            for round_index, budget in enumerate(budgets):
                shared = round_index == 0
                cell_dir = folder / f"seed-{seed}" / ("initial" if shared else f"{strategy}/round-{round_index}")
                label = f"seed {seed}, {strategy}, round {round_index}/{spec.rounds}"
                result_path = cell_dir / RESULT_FILE
                if result_path.is_file():
                    cell = json.loads(result_path.read_text())
                    queried = _read_selection(cell_dir, train, pool_rows)
                    previous_run = cell_dir / "run"
                    cells.append({**cell, "strategy": strategy})
                    say(f"{label}: already done ({budget} rows, test accuracy {100 * cell['accuracy']:.2f}%)")
                    continue
                if (cell_dir / "selection.json").is_file():
                    queried = _read_selection(cell_dir, train, pool_rows)
                else:
                    count = budget - len(queried)
                    if shared:
                        generator = torch.Generator().manual_seed(derive_seed(seed, "active", "initial"))
                        new = select_random(len(pool_rows), count, generator=generator)
                        how = "initial rows, uniformly at random"
                    else:
                        assert previous_run is not None
                        generator = torch.Generator().manual_seed(derive_seed(seed, "active", strategy, round_index))
                        students = student_probs(previous_run) if strategy != "random" else teacher_probs
                        new = _select(strategy, spec, count, queried, students, teacher_probs, generator)
                        how = DESCRIPTIONS[strategy]
                    queried = torch.cat([queried, new])
                    info = {"strategy": "initial" if shared else strategy, "seed": seed, "round": round_index}
                    _write_selection(cell_dir, queried, new, pool_rows, train, info)
                    say(f"{label}: queried {len(new)} new rows ({how}), {len(queried)} in all")
                if len(queried) != budget or len(set(queried.tolist())) != budget:
                    raise ValueError(f"{cell_dir}: the selection holds {len(queried)} rows, expected {budget} distinct ones")
                if on_cell is not None:
                    on_cell(strategy, seed, round_index, budget)
                run_dir = cell_dir / "run"
                run = run_experiment(
                    _round_experiment(seeded, spec, teacher, cell_dir), run_dir=run_dir, callbacks=callbacks, write_report=False
                )
                row = next(r for r in run.rows if r["name"] == spec.stage)
                new_rows = json.loads((cell_dir / "selection.json").read_text())["new_pool_index"]
                cell = {
                    "strategy": "initial" if shared else strategy,
                    "seed": seed,
                    "round": round_index,
                    "queried": budget,
                    "accuracy": row["test"]["accuracy"],
                    "nll": row["test"].get("nll"),
                    "teacher_accuracy_on_queried": float(teacher_right[queried].mean()),
                    "teacher_accuracy_on_new": float(teacher_right[torch.tensor(new_rows, dtype=torch.long)].mean()),
                    "train_time_s": row.get("train_time_s"),
                    "run_dir": str(run_dir),
                }
                atomic_write_json(result_path, cell)
                cells.append({**cell, "strategy": strategy})
                previous_run = run_dir
                say(f"{label}: {budget} queried rows, test accuracy {100 * cell['accuracy']:.2f}%")
                write_json()
    result = write_json()
    build_active_report(folder)
    return ActiveResult(folder=folder, result=result)


# ---------------------------------------------------------------------------------- aggregation and report


def summarize(cells: list[dict[str, Any]], strategies: Sequence[str], budgets: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Per strategy and round: the test accuracy (and the teacher's accuracy on the queried rows) over seeds."""
    out: dict[str, list[dict[str, Any]]] = {}
    for strategy in strategies:
        rows = []
        for round_index, budget in enumerate(budgets):
            found = [c for c in cells if c["strategy"] == strategy and c["round"] == round_index]
            rows.append(
                {
                    "round": round_index,
                    "queried": budget,
                    "accuracy": _mean_std([c["accuracy"] for c in found]),
                    "teacher_accuracy_on_queried": _mean_std([c["teacher_accuracy_on_queried"] for c in found]),
                    "seeds": [c["seed"] for c in found],
                }
            )
        out[strategy] = rows
    return out


def _cell(stat: dict[str, Any]) -> str:
    if not stat.get("n"):
        return "-"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def active_table(result: dict[str, Any], key: str = "accuracy") -> str:
    """Markdown table: one row per strategy, one column per budget (mean ± std over seeds, in %)."""
    from distill.report.run_report import markdown_table

    header = ["strategy", *(f"{b} queried" for b in result["budgets"])]
    summary = result["summary"]
    body = [[strategy, *(_cell(r[key]) for r in summary[strategy])] for strategy in result["strategies"] if strategy in summary]
    return markdown_table(header, body)


def _plot(result: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.report.compare_report import plot_mean_band, save_band_figure

    series = {s: [r for r in result["summary"].get(s, []) if r["accuracy"]["n"]] for s in result["strategies"]}
    if not any(series.values()):
        return False
    figure, axis = plt.subplots(figsize=(7.0, 4.2))
    for strategy, rows in series.items():
        if not rows:
            continue
        x = [r["queried"] for r in rows]
        means = [100 * r["accuracy"]["mean"] for r in rows]
        stds = [100 * r["accuracy"]["std"] for r in rows]
        plot_mean_band(axis, x, means, stds, strategy)
    axis.set_xlabel("queried samples (teacher queries)")
    axis.set_ylabel("test accuracy (%)")
    title = f"{result.get('experiment', '')}: active distillation, mean ± std over seeds {result.get('seeds', '')}"
    save_band_figure(figure, axis, path, title)
    return True


def build_active_report(folder: str | Path) -> Path:
    """Write ``active.md`` and ``active.png`` from ``active.json``; return the markdown path."""
    from distill.io import atomic_write_text

    folder = Path(folder)
    result = json.loads((folder / ACTIVE_JSON).read_text())
    environment = result.get("environment", {})
    lines = [
        f"# Active distillation: {result.get('experiment', folder.name)}",
        "",
        (
            f"Stage `{result['stage']}` trained on the queried rows only, from teacher {result['teacher']}. "
            f"Pool: {result['pool']:,} training rows (teacher accuracy on the pool {100 * result['pool_teacher_accuracy']:.2f}%). "
            f"Seeds {result['seeds']}; mean ± sample standard deviation across seeds. Round 0 queries "
            f"{result['budgets'][0]} rows at random (the same rows for every strategy of a seed)."
        ),
        (
            f"Wall time {result.get('wall_time_s', 0) / 60:.1f} min on {environment.get('cpu', '?')} "
            f"({environment.get('cpu_count', '?')} cores, {environment.get('torch_threads', '?')} torch threads)."
        ),
        "",
        "Test accuracy (%) after each round:",
        "",
        active_table(result),
        "",
        "Teacher accuracy (%) on the queried rows (measured with the true labels, which no strategy sees):",
        "",
        active_table(result, "teacher_accuracy_on_queried"),
        "",
        "Strategies: " + "; ".join(f"`{s}`: {DESCRIPTIONS.get(s, s)}" for s in result["strategies"]) + ".",
        "",
    ]
    if _plot(result, folder / ACTIVE_PNG):
        lines += [f"![test accuracy vs queried samples]({ACTIVE_PNG})", ""]
    path = folder / ACTIVE_MD
    atomic_write_text(path, "\n".join(lines))
    return path

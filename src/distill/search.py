"""Training-free student search: rank candidate students for a trained teacher without training them.

The score follows DisWOT (Dong, Li, Wei, Shao, Fan, "DisWOT: Student Architecture Search for
Distillation WithOut Training", CVPR 2023, arXiv:2303.15678): on one or a few minibatches, a
*randomly initialized* candidate is compared with the trained teacher by two similarity
matrices that do not depend on the networks' widths, so any two architectures can be compared.

**Which features.** For each network, ``f`` is the input of its classifier head (the last
``nn.Linear``, :func:`distill.hooks.classifier_path`), flattened to ``[B, D]``: the globally
pooled last-stage feature map of a ResNet/WRN/MobileNetV2, the class token of a ViT, the last
hidden layer of an MLP. ``D`` may differ between teacher and student.

**Semantic score** (the paper's semantic similarity of class activation maps). For a classifier
that reads pooled features, the Grad-CAM weight of channel ``k`` for class ``c`` is
``∂y_c/∂A_k`` averaged over positions, i.e. the head weight ``W[c, k]`` up to ``1/HW``, and the
batch's gradient-weighted class activations are ``M = ∂CE/∂W = (softmax(z) - onehot(y))ᵀ f / B``,
a ``[K, D]`` matrix with one row per class. (This is the quantity the authors' code compares:
the gradient of the cross-entropy with respect to the classifier's weight.) Its inter-class
correlation ``G_sem = M Mᵀ`` is ``[K, K]`` for every network. Each row of ``G`` is scaled to unit
L2 norm (as in ICKD and the authors' code), and

    semantic = mean over classes c of cos(G_sem^T[c], G_sem^S[c])          in [-1, 1]

**Relation score** (the paper's sample-relation similarity, the Gram matrix of
similarity-preserving KD, Tung & Mori, ICCV 2019): ``G_rel = f fᵀ`` is ``[B, B]``; rows are
scaled to unit L2 norm, and

    relation = mean over samples i of cos(G_rel^T[i], G_rel^S[i])          in [-1, 1]

With unit rows, ``||r_T - r_S||² = 2 - 2 cos(r_T, r_S)``, so each score is an affine, order-
preserving transform of DisWOT's distance ``||Ĝ_T - Ĝ_S||²`` (mean over rows): the paper ranks
by ``-(d_sem + d_rel)``; this module ranks by

    total = semantic_weight * semantic + relation_weight * relation         (both weights 1 by default)

which, with equal weights, orders candidates exactly as ``-(d_sem + d_rel)`` with per-row means.
**Higher is better**; a student identical to the teacher scores 1 on both.

**Choices.** The teacher runs in eval mode (its trained BatchNorm statistics). A candidate is
built with its builder's default initialization under a seed derived from ``(search.seed, its
spec)``, and runs in train mode so that BatchNorm normalizes with the minibatch's statistics
(the authors score networks in train mode too), with dropout switched off. Minibatches are drawn
without replacement from the chosen split (no augmentation) with a seeded generator; scores are
averaged over ``num_batches`` minibatches. Both scores are invariant to a permutation of the
minibatch: ``G_rel`` is permuted on both sides alike and ``M`` sums over samples. Everything is
deterministic for a fixed seed.

Python API: :func:`score_student`, :func:`score_students`, :func:`search_students` (one call with
a teacher, data and a :class:`~distill.config.schema.SearchSpec`), :func:`run_search` (the whole
command: teacher resolution, search, JSON/Markdown output).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.config.schema import Experiment, ModelSpec, SearchSpec
from distill.data.base import ArraySplit, DataBundle
from distill.engine.batches import derive_seed
from distill.hooks import (
    FEATURES,
    FeatureCapture,
    FeatureSource,
    classifier_path,
    resolve_module,
)
from distill.io import atomic_write_json, atomic_write_text
from distill.models.build import build_model, count_parameters, load_weights

Problem = tuple[tuple[str | int, ...], str]
Progress = Callable[[int, int, str], None]

SEARCH_JSON = "search.json"
SEARCH_MD = "search.md"

# ---------------------------------------------------------------------------------- the metric


@dataclass
class Signals:
    """What one network gives the metric on one minibatch."""

    semantic: torch.Tensor  # [K, K] inter-class correlation of the class activation matrix, unit rows
    relation: torch.Tensor  # [B, B] sample Gram matrix of the penultimate features, unit rows


def _set_scoring_mode(model: nn.Module, random_init: bool) -> None:
    """Eval mode for a trained teacher; train mode (batch-statistics BatchNorm) without dropout for a candidate."""
    model.train(random_init)
    if random_init:
        for module in model.modules():
            if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
                module.eval()


def network_signals(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, random_init: bool) -> Signals:
    """The two DisWOT matrices of ``model`` on one minibatch (see the module docstring)."""
    head_path = classifier_path(model)
    head = resolve_module(model, head_path)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"the classifier head '{head_path}' of {type(model).__name__} has no weight tensor")
    _set_scoring_mode(model, random_init)
    source = FeatureSource("model", FEATURES, "input")
    needed = weight.requires_grad
    weight.requires_grad_(True)
    try:
        with torch.enable_grad(), FeatureCapture(model, [source]) as capture:
            logits = model(inputs)
            features = capture.values[source.name].detach().flatten(1).float()
            loss = F.cross_entropy(logits.float(), labels)
            (class_activation,) = torch.autograd.grad(loss, weight)
    finally:
        weight.requires_grad_(needed)
    class_activation = class_activation.detach().float().flatten(1)  # [K, D]
    semantic = F.normalize(class_activation @ class_activation.T, dim=1)
    relation = F.normalize(features @ features.T, dim=1)
    return Signals(semantic=semantic, relation=relation)


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of two matrices whose rows have unit norm (or are zero)."""
    return float((a * b).sum(dim=1).mean())


@dataclass
class Score:
    semantic: float
    relation: float
    total: float


def combine(semantic: float, relation: float, spec: SearchSpec | None = None) -> float:
    w_sem = 1.0 if spec is None else spec.semantic_weight
    w_rel = 1.0 if spec is None else spec.relation_weight
    return w_sem * semantic + w_rel * relation


def score_student(
    teacher_signals: Sequence[Signals],
    student: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    spec: SearchSpec | None = None,
) -> Score:
    """DisWOT scores of a (randomly initialized) ``student`` against precomputed teacher signals."""
    semantic, relation = [], []
    for signals, (inputs, labels) in zip(teacher_signals, batches):
        mine = network_signals(student, inputs, labels, random_init=True)
        semantic.append(row_cosine(signals.semantic, mine.semantic))
        relation.append(row_cosine(signals.relation, mine.relation))
    sem = sum(semantic) / len(semantic)
    rel = sum(relation) / len(relation)
    return Score(semantic=sem, relation=rel, total=combine(sem, rel, spec))


def scoring_batches(split: ArraySplit, batch_size: int, num_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` minibatches drawn without replacement (wrapping around if the split is short), seeded."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "search", "batches"))
    total = batch_size * num_batches
    order = torch.cat([torch.randperm(len(split), generator=generator) for _ in range(math.ceil(total / len(split)))])
    return [
        (split.inputs[order[i * batch_size : (i + 1) * batch_size]], split.labels[order[i * batch_size : (i + 1) * batch_size]])
        for i in range(num_batches)
    ]


# ---------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    name: str
    spec: ModelSpec
    genome: tuple[int, ...] | None = None  # indices of the choices in a search space


@dataclass
class CandidateResult:
    name: str
    arch: str
    params: dict[str, Any]
    num_params: int
    semantic: float | None = None
    relation: float | None = None
    total: float | None = None
    rank: int | None = None
    skipped: str | None = None  # why it was not scored (too many parameters, builder error)


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def space_candidate(space: Any, genome: tuple[int, ...]) -> Candidate:
    keys = list(space.params)
    params = {key: space.params[key][index] for key, index in zip(keys, genome)}
    name = f"{space.arch}(" + ",".join(f"{key}={_format_value(value)}" for key, value in params.items()) + ")"
    return Candidate(name=name, spec=ModelSpec(arch=space.arch, params=params), genome=genome)


def space_size(spec: SearchSpec) -> int:
    if spec.space is None:
        return len(spec.candidates)
    return math.prod(len(choices) for choices in spec.space.params.values())


def build_candidate(candidate: Candidate, data: DataBundle, seed: int) -> nn.Module:
    """The candidate at random initialization; the seed depends on (seed, its spec), not its name or order."""
    key = json.dumps(candidate.spec.model_dump(mode="json"), sort_keys=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "search", "init", key))
        return build_model(candidate.spec, num_classes=data.num_classes, input_shape=data.input_shape)


class Scorer:
    """Scores candidates against one teacher on fixed minibatches, caching by name."""

    def __init__(self, teacher: nn.Module, data: DataBundle, spec: SearchSpec) -> None:
        self.data = data
        self.spec = spec
        split = data.train if spec.split == "train" or data.val is None else data.val
        self.batches = scoring_batches(split, spec.batch_size, spec.num_batches, spec.seed)
        self.teacher_signals = [network_signals(teacher, x, y, random_init=False) for x, y in self.batches]
        self.results: dict[str, CandidateResult] = {}

    def __call__(self, candidate: Candidate) -> CandidateResult:
        if candidate.name in self.results:
            return self.results[candidate.name]
        spec = candidate.spec
        try:
            model = build_candidate(candidate, self.data, self.spec.seed)
        except (ValueError, TypeError, RuntimeError) as error:
            result = CandidateResult(candidate.name, spec.arch, dict(spec.params), 0, skipped=f"cannot be built: {error}")
        else:
            result = CandidateResult(candidate.name, spec.arch, dict(spec.params), count_parameters(model))
            if self.spec.max_params is not None and result.num_params > self.spec.max_params:
                result.skipped = f"{result.num_params:,} parameters > max_params {self.spec.max_params:,}"
            else:
                score = score_student(self.teacher_signals, model, self.batches, self.spec)
                result.semantic, result.relation, result.total = score.semantic, score.relation, score.total
        self.results[candidate.name] = result
        return result


def evolve(
    sizes: Sequence[int],
    evaluate: Callable[[tuple[int, ...]], float | None],
    *,
    population: int,
    generations: int,
    tournament: int,
    seed: int,
) -> dict[tuple[int, ...], float | None]:
    """Evolutionary search over a product space; ``evaluate`` returns a score (higher is better) or None.

    Initial population: ``population`` distinct random members. Each generation makes
    ``population`` children: a parent is the best of ``tournament`` members drawn at random, and
    its child changes exactly one choice (a parameter with several choices, set to another of
    them). The next population is the top ``population`` of parents and children by score (ties
    broken by the genome). Members already evaluated are never evaluated again. Returns every
    evaluated genome and its score. Deterministic for a seed.
    """
    rng = random.Random(derive_seed(seed, "search", "evolution"))
    seen: dict[tuple[int, ...], float | None] = {}

    def visit(genome: tuple[int, ...]) -> None:
        if genome not in seen:
            seen[genome] = evaluate(genome)

    total = math.prod(sizes)
    mutable = [i for i, n in enumerate(sizes) if n > 1]
    tries = 0
    while sum(1 for s in seen.values() if s is not None) < population and len(seen) < total and tries < 50 * population:
        tries += 1
        visit(tuple(rng.randrange(n) for n in sizes))
    members = sorted((g for g, s in seen.items() if s is not None), key=lambda g: (-seen[g], g))[:population]  # type: ignore[operator]
    if not members or not mutable:
        return seen
    for _ in range(generations):
        children: list[tuple[int, ...]] = []
        for _ in range(population):
            contenders = rng.sample(members, min(tournament, len(members)))
            parent = max(contenders, key=lambda g: (seen[g], tuple(-x for x in g)))
            for _ in range(10):  # look for a child not evaluated yet
                child = list(parent)
                position = rng.choice(mutable)
                child[position] = rng.choice([v for v in range(sizes[position]) if v != parent[position]])
                if tuple(child) not in seen:
                    break
            child_genome = tuple(child)
            visit(child_genome)
            if seen[child_genome] is not None:
                children.append(child_genome)
        pool = list(dict.fromkeys(members + children))
        members = sorted(pool, key=lambda g: (-seen[g], g))[:population]  # type: ignore[operator]
        if len(seen) >= total:
            break
    return seen


@dataclass
class SearchResult:
    rows: list[CandidateResult]
    mode: str  # "candidates", "enumeration" or "evolution"
    space_size: int
    evaluated: int
    wall_time_s: float
    teacher: str = ""
    metric: str = "DisWOT (CVPR 2023): semantic = row cosine of inter-class correlation of dCE/dW_head; relation = row cosine of sample Gram of head inputs; total = weighted sum; higher is better"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ranked(self) -> list[CandidateResult]:
        return [row for row in self.rows if row.rank is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "metric": self.metric,
            "mode": self.mode,
            "space_size": self.space_size,
            "evaluated": self.evaluated,
            "wall_time_s": self.wall_time_s,
            **self.extra,
            "rows": [asdict(row) for row in self.rows],
        }


def _rank(results: Iterable[CandidateResult]) -> list[CandidateResult]:
    scored = sorted((r for r in results if r.total is not None), key=lambda r: (-r.total, r.num_params, r.name))  # type: ignore[operator]
    for index, row in enumerate(scored):
        row.rank = index + 1
    skipped = sorted((r for r in results if r.total is None), key=lambda r: r.name)
    return scored + skipped


def score_students(
    teacher: nn.Module,
    candidates: Sequence[Candidate] | dict[str, ModelSpec],
    data: DataBundle,
    spec: SearchSpec | None = None,
    progress: Progress | None = None,
) -> list[CandidateResult]:
    """Score and rank explicit candidates (name -> spec, or :class:`Candidate`); best first, skipped last."""
    if isinstance(candidates, dict):
        candidates = [Candidate(name, model) for name, model in candidates.items()]
    if spec is None:
        spec = SearchSpec(teacher="(given)", candidates={c.name: c.spec for c in candidates})
    scorer = Scorer(teacher, data, spec)
    for index, candidate in enumerate(candidates):
        scorer(candidate)
        if progress is not None:
            progress(index + 1, len(candidates), candidate.name)
    return _rank(scorer.results.values())


def search_students(teacher: nn.Module, data: DataBundle, spec: SearchSpec, progress: Progress | None = None) -> SearchResult:
    """Rank ``spec.candidates``, or search ``spec.space`` (enumerated up to ``spec.budget`` members, else evolved)."""
    started = time.perf_counter()
    size = space_size(spec)
    if spec.space is None:
        rows = score_students(teacher, spec.candidates, data, spec, progress)
        return SearchResult(rows, "candidates", size, len(rows), time.perf_counter() - started)
    space = spec.space
    sizes = [len(choices) for choices in space.params.values()]
    scorer = Scorer(teacher, data, spec)
    if size <= spec.budget:
        for index, genome in enumerate(itertools.product(*(range(n) for n in sizes))):
            candidate = space_candidate(space, genome)
            scorer(candidate)
            if progress is not None:
                progress(index + 1, size, candidate.name)
        mode = "enumeration"
    else:
        evolution = spec.evolution
        limit = min(size, evolution.population * (evolution.generations + 1))
        count = [0]

        def evaluate(genome: tuple[int, ...]) -> float | None:
            candidate = space_candidate(space, genome)
            result = scorer(candidate)
            count[0] += 1
            if progress is not None:
                progress(min(count[0], limit), limit, candidate.name)
            return result.total

        evolve(
            sizes, evaluate, population=evolution.population, generations=evolution.generations,
            tournament=evolution.tournament, seed=spec.seed,
        )
        if progress is not None:
            progress(limit, limit, "done")
        mode = "evolution"
    rows = _rank(scorer.results.values())
    return SearchResult(rows, mode, size, len(rows), time.perf_counter() - started)


# ---------------------------------------------------------------------------------- configuration


def search_problems(experiment: Experiment) -> list[Problem]:
    """Problems of the experiment's ``search`` section that the schema alone cannot see (key path, message)."""
    from distill.config.validate import INJECTED
    from distill.registry import (
        MODELS,
        RegistryError,
        did_you_mean,
        load_builtins,
        parameter_problems,
    )

    load_builtins()
    spec = experiment.search
    if spec is None:
        return [(("search",), "the experiment has no `search:` section; add one with `teacher:` and `candidates:` or `space:` (see docs/search.md)")]
    problems: list[Problem] = []
    stages = [stage.name for stage in experiment.stages]
    if spec.teacher not in stages:
        if spec.teacher not in experiment.models:
            problems.append(
                (
                    ("search", "teacher"),
                    (
                        f"'{spec.teacher}' is neither a stage nor a key in `models`"
                        f"{did_you_mean(spec.teacher, stages + list(experiment.models))}; "
                        f"stages: {', '.join(stages)}; models: {', '.join(experiment.models)}"
                    ),
                )
            )
        elif experiment.models[spec.teacher].weights is None:
            problems.append(
                (
                    ("search", "teacher"),
                    (
                        f"model '{spec.teacher}' has no `weights:`, and a randomly initialized teacher cannot guide "
                        f"the search; set models.{spec.teacher}.weights or name the stage that trains it "
                        f"(stages: {', '.join(stages)})"
                    ),
                )
            )

    def check(arch: str, params: dict[str, Any], path: tuple[str | int, ...]) -> None:
        try:
            entry = MODELS.get(arch)
        except RegistryError as error:
            problems.append((path + ("arch",), str(error)))
            return
        for key, message in parameter_problems(entry.builder, params, what=f"model '{arch}'", injected=INJECTED["models"]):
            problems.append((path + ("params", key), message))

    for name, model in spec.candidates.items():
        check(model.arch, model.params, ("search", "candidates", name))
        if model.weights is not None:
            problems.append(
                (("search", "candidates", name, "weights"), "candidates are scored at random initialization; remove `weights`")
            )
    if spec.space is not None:
        check(spec.space.arch, {key: choices[0] for key, choices in spec.space.params.items()}, ("search", "space"))
    return problems


def load_search_experiment(path: str | Path, overrides: Iterable[str] = ()) -> Experiment:
    """Load an experiment and check its ``search`` section too; one :class:`ConfigError` lists every problem."""
    from distill.config.loader import (
        ConfigError,
        describe,
        experiment_from_dict,
        load_raw,
    )

    data, lines = load_raw(path, list(overrides))
    experiment = experiment_from_dict(data, lines, str(path))
    problems = [describe(key_path, message, lines) for key_path, message in search_problems(experiment)]
    if problems:
        raise ConfigError(problems, str(path))
    return experiment


# ---------------------------------------------------------------------------------- the teacher


def resolve_teacher(
    experiment: Experiment,
    data: DataBundle,
    *,
    run_dir: str | Path | None = None,
    reuse: Iterable[str | Path] = (),
    callbacks: Iterable[Any] = (),
    message: Callable[[str], None] | None = None,
) -> tuple[nn.Module, str]:
    """The trained teacher named by ``search.teacher``, and where its weights came from.

    A stage: its ``stages/<stage>/model.safetensors`` in ``run_dir`` when that run finished it;
    otherwise the experiment's stages up to that one are run in a new run folder, reusing
    identical finished stages of ``run_dir`` and ``reuse``. A ``models`` key: its ``weights:``.
    """
    from distill.config.loader import ConfigError
    from distill.engine.checkpoint import CheckpointError, verify_folder
    from distill.engine.context import STAGE_WEIGHTS

    spec = experiment.search
    if spec is None:
        raise ConfigError(["search: the experiment has no `search:` section"])
    stages = [stage.name for stage in experiment.stages]
    say = message or (lambda text: None)
    if spec.teacher not in stages:
        model_spec = experiment.models[spec.teacher]
        if model_spec.weights is None:
            raise ConfigError([f"search.teacher: model '{spec.teacher}' has no `weights:`"])
        model = build_model(model_spec, num_classes=data.num_classes, input_shape=data.input_shape)
        return model, model_spec.weights
    stage = experiment.stage(spec.teacher)
    model_spec = experiment.models[stage.model].model_copy(update={"weights": None})
    folder: Path | None = None
    if run_dir is not None:
        candidate = Path(run_dir) / "stages" / stage.name
        try:
            verify_folder(candidate)
            folder = candidate
        except CheckpointError:
            say(f"stage '{stage.name}' is not finished in {run_dir}; running the stages up to it")
    if folder is None:
        from distill.engine.compare import run_folders
        from distill.engine.runner import run_experiment

        index = stages.index(stage.name)
        truncated = experiment.model_copy(
            update={
                "stages": experiment.stages[: index + 1],
                "evaluation": experiment.evaluation.model_copy(update={"reference": None}),
                "compare": experiment.compare.model_copy(update={"stages": None}),
            }
        )
        reuse_dirs = list(run_folders([str(run_dir)] if run_dir else [])) + list(run_folders([str(r) for r in reuse]))
        result = run_experiment(truncated, callbacks=callbacks, reuse_dirs=reuse_dirs)
        folder = result.run_dir / "stages" / stage.name
    model = build_model(model_spec, num_classes=data.num_classes, input_shape=data.input_shape)
    load_weights(model, folder / STAGE_WEIGHTS)
    return model, str(folder / STAGE_WEIGHTS)


# ---------------------------------------------------------------------------------- output


def markdown_table(result: SearchResult) -> str:
    lines = [
        "# Student search (DisWOT, training-free)\n",
        f"- teacher: `{result.teacher}`",
        (
            f"- mode: {result.mode}; space size {result.space_size}; {len(result.ranked)} candidates scored, "
            f"{result.evaluated - len(result.ranked)} skipped, in {result.wall_time_s:.2f} s"
        ),
        f"- score: {result.metric}",
        "",
        "| rank | candidate | params | semantic | relation | total |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        if row.total is None:
            lines.append(f"| - | {row.name} | {row.num_params:,} | - | - | skipped: {row.skipped} |")
        else:
            lines.append(
                f"| {row.rank} | {row.name} | {row.num_params:,} | {row.semantic:.4f} | {row.relation:.4f} | {row.total:.4f} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(result: SearchResult, folder: str | Path) -> Path:
    """Write ``search.json`` and ``search.md`` atomically into ``folder``; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SEARCH_JSON, result.to_json())
    atomic_write_text(folder / SEARCH_MD, markdown_table(result))
    return folder


def new_search_dir(experiment: Experiment) -> Path:
    base = Path(experiment.output_dir) / experiment.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = base / f"search-{stamp}"
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = base / f"search-{stamp}-{suffix}"
    return candidate


def run_search(
    experiment: Experiment,
    *,
    run_dir: str | Path | None = None,
    reuse: Iterable[str | Path] = (),
    out: str | Path | None = None,
    progress: Progress | None = None,
    callbacks: Iterable[Any] = (),
    message: Callable[[str], None] | None = None,
) -> tuple[SearchResult, Path]:
    """The whole `distill search-student` command: load the data, resolve the teacher, search, write files."""
    from distill.config.loader import ConfigError
    from distill.data import load_data
    from distill.registry import load_builtins

    load_builtins()
    problems = search_problems(experiment)
    if problems:
        from distill.config.loader import format_path

        raise ConfigError([f"{format_path(path)}: {text}" for path, text in problems])
    assert experiment.search is not None
    data = load_data(experiment.data)
    teacher, source = resolve_teacher(experiment, data, run_dir=run_dir, reuse=reuse, callbacks=callbacks, message=message)
    result = search_students(teacher, data, experiment.search, progress)
    result.teacher = f"{experiment.search.teacher} ({source})"
    result.extra = {
        "experiment": experiment.name,
        "search": experiment.search.model_dump(mode="json"),
        "teacher_params": count_parameters(teacher),
    }
    folder = write_outputs(result, out if out is not None else new_search_dir(experiment))
    return result, folder

"""The typed schema of a YAML experiment (pydantic v2).

Every section rejects unknown keys; values are checked for type and range here, and names of
registered components (architectures, data sets, losses, optimizers, schedulers) and their
parameters are checked against the registries by :func:`distill.config.validate.check_experiment`
before anything runs. docs/config.md documents every key with a full annotated example.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.active import ActiveSpec
from distill.pgkd import PGKDSpec


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    """One network: a registered architecture (or import path) and its parameters."""

    arch: str = Field(description="registered architecture (`distill list models`) or 'package.module:Class'")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the builder")
    weights: str | None = Field(
        default=None, description="safetensors file of weights to load after building (a stage result or your own)"
    )
    random_init: bool = Field(
        default=False,
        description="allow this untrained network as a stage's teacher (random teachers); it keeps its seeded init",
    )


class AugmentSpec(Section):
    """Training-time augmentation, applied identically to teacher and student inputs."""

    random_crop: int = Field(default=0, ge=0, description="pad by this many pixels, then crop back at random")
    hflip: bool = Field(default=False, description="random horizontal flip with probability 1/2")


class DataSpec(Section):
    """The data set and how it is split, batched and augmented."""

    dataset: str = Field(default="digits", description="registered data set (`distill list datasets`)")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the data set builder")
    batch_size: int = Field(default=64, ge=1, description="global batch size of one micro-batch")
    eval_batch_size: int = Field(default=512, ge=1)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="share of the training split held out")
    test_fraction: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="share held out as test when the data set has no test split"
    )
    split_seed: int = Field(default=0, description="seed of the train/val/test split (fixed across run seeds)")
    train_subset: int | None = Field(default=None, ge=1, description="keep only this many training samples")
    test_subset: int | None = Field(default=None, ge=1, description="keep only this many test samples")
    normalize: bool = Field(default=True, description="standardize inputs per channel with training-split statistics")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    select: str | None = Field(
        default=None, description="folder written by `distill select-data`: train on the training rows it kept (MiniPLM)"
    )


class TermSpec(Section):
    """One weighted term of the objective."""

    loss: str = Field(description="registered loss (`distill list losses`)")
    name: str | None = Field(default=None, description="name in logs and reports; defaults to the loss name")
    weight: float = Field(default=1.0, description="multiplier of this term in the total loss")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the loss")
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="loss argument -> source, e.g. {teacher_logits: teacher.logits}; defaults from the loss",
    )

    @property
    def label(self) -> str:
        return self.name or self.loss


class AdapterSpec(Section):
    """A trainable module mapping a student source to a target's shape (see distill.adapters)."""

    kind: Literal["linear", "mlp", "conv1x1", "token_pool", "logit_branch", "decoder"] = Field(
        description="linear | mlp | conv1x1 | token_pool | logit_branch | decoder"
    )
    to: str | None = Field(
        default=None, description="source whose per-sample shape to produce, e.g. teacher.layer3.output, or 'logits'"
    )
    out_features: int | None = Field(default=None, ge=1, description="output width when `to` is not set")
    hidden: int | None = Field(default=None, ge=1, description="hidden width (mlp, logit_branch, decoder)")
    params: dict[str, Any] = Field(default_factory=dict, description="decoder: depth, heads")


class ObjectiveSpec(Section):
    """The training objective: a weighted sum of named terms."""

    terms: list[TermSpec] = Field(min_length=1)
    adapters: dict[str, AdapterSpec] = Field(
        default_factory=dict, description="name -> adapter; a term input 'source -> name' passes through it"
    )

    @model_validator(mode="after")
    def _unique_term_names(self) -> "ObjectiveSpec":
        seen: set[str] = set()
        for term in self.terms:
            if term.label in seen:
                raise ValueError(f"two objective terms are named '{term.label}'; give one a distinct `name`")
            seen.add(term.label)
        return self


class OptimizerSpec(Section):
    name: str = Field(default="adamw", description="registered optimizer (`distill list optimizers`)")
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    params: dict[str, Any] = Field(default_factory=dict, description="further optimizer arguments (momentum, betas)")


class SchedulerSpec(Section):
    name: str = Field(default="constant", description="registered schedule (`distill list schedulers`)")
    warmup_steps: int = Field(default=0, ge=0, description="optimizer steps of linear warm-up from 0")
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="warm-up as a share of the stage's steps")
    params: dict[str, Any] = Field(default_factory=dict)


class TrainingSpec(Section):
    """How an optimizer step is made; defaults for every stage, each stage may override."""

    epochs: int = Field(default=10, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop a stage after this many optimizer steps")
    grad_accum_steps: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float | None = Field(default=None, gt=0.0, description="clip the global gradient norm to this value")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    sync_batchnorm: bool = Field(default=False, description="synchronize BatchNorm statistics across processes")


class InputMaskSpec(Section):
    """Masked inputs for the trained model (G2SD's generic stage): patches hidden, the teacher sees all."""

    patch_size: int = Field(ge=1, description="side of the square patches that are masked (the ViT's patch size)")
    ratio: float = Field(default=0.75, gt=0.0, lt=1.0, description="share of the patches masked in each sample")


class GenerateSpec(Section):
    """Completions sampled during training (language models): on-policy and sequence-level distillation.

    ``model: student`` with ``probability`` lambda is GKD's on-policy distillation (Agarwal et al.
    2024): with probability lambda a step's completions are sampled from the student, then scored
    by the teacher and distilled (lambda = 0 is supervised KD). ``model: teacher`` with probability
    1 is sequence-level KD (Kim & Rush 2016): the student learns completions the teacher writes.
    """

    model: Literal["student", "teacher"] = Field(default="student", description="which model writes the completions")
    probability: float = Field(default=0.5, ge=0.0, le=1.0, description="share of optimizer steps whose completions are generated (GKD's lambda)")
    temperature: float = Field(default=1.0, ge=0.0, description="sampling temperature; 0 decodes greedily")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling threshold")
    max_new_tokens: int = Field(default=64, ge=1, description="longest completion generated")
    prompt_tokens: int | None = Field(
        default=None, ge=1, description="for plain text (every token a target): the first this many tokens are the prompt"
    )


class RewardSpec(Section):
    """A rule-based reward from ``distill.rewards`` (``distill list rewards``)."""

    name: str = Field(default="answer_match", description="registered reward: answer_match, format, ...")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward")


class RolloutSpec(Section):
    """Group rollouts of the student (GRPO, Shao et al. 2024; KDRL, Xu et al. 2025).

    Every optimizer step, each prompt of the batch is completed ``group_size`` times by the student;
    a rule scores each completion against the row's reference completion, and the advantages
    ``(r - mean) / std`` over each prompt's group become the source ``batch.advantages`` (the
    rewards: ``batch.rewards``). The step then trains on the sampled completions.
    """

    group_size: int = Field(default=4, ge=2, description="completions sampled per prompt (GRPO's G)")
    temperature: float = Field(default=1.0, gt=0.0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling threshold")
    max_new_tokens: int = Field(default=64, ge=1, description="longest completion sampled")
    prompt_tokens: int | None = Field(
        default=None, ge=1, description="for plain text (every token a target): the first this many tokens are the prompt"
    )
    reward: RewardSpec = Field(default_factory=RewardSpec, description="how a completion is scored against the reference")
    scale_advantages: Literal["std", "none"] = Field(
        default="std", description="std: GRPO's (r - mean) / std; none: r - mean (Dr. GRPO)"
    )


class NegativesSpec(Section):
    """QCRD's self-adversarial negatives (Wang et al. 2024): rationales sampled from an earlier student.

    Every step, each row's completion (the positive) is paired with one the earlier student writes
    for the same prompt, so the step trains on pairs ``[B, 2, T]`` (index 0 positive, 1 negative).
    ``from: epoch_start`` samples from a copy of the student taken at the start of each epoch (the
    previous iteration); ``from: STAGE`` from that earlier stage's model.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    source: str = Field(default="epoch_start", alias="from", description="epoch_start, or the name of an earlier stage")
    temperature: float = Field(default=1.5, gt=0.0, description="sampling temperature (hot: low-quality rationales)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling threshold")
    max_new_tokens: int | None = Field(default=None, ge=1, description="longest negative (default: the longest positive)")


class CachedTeacherSpec(Section):
    """A teacher read from an offline top-k cache (``distill cache-teacher``) instead of run live."""

    cache: str = Field(description="folder written by `distill cache-teacher` (its rows are the training split's rows)")
    model: str | None = Field(
        default=None, description="the `models` key the cache was made from: its spec and weight hash are checked too"
    )
    verify: bool = Field(
        default=True, description="re-hash every shard before training (reads the cache once; false skips it for huge caches)"
    )


class MixtureSpec(Section):
    """DDK's domain-aware data mixture (language-model data with domains, e.g. `domain_text`).

    Every ``every_steps`` optimizer steps the student's and the teacher's loss on each domain's
    validation rows set the domain sampling weights (see distill.engine.ddk and docs/ddk.md);
    ``method: uniform`` samples the domains equally with the same sampler (the baseline).
    """

    method: Literal["ddk", "uniform"] = Field(default="ddk", description="ddk: weights follow the gaps; uniform: equal weights")
    every_steps: int = Field(default=50, ge=1, description="optimizer steps between weight updates (the paper's K)")
    smoothing: float = Field(default=0.5, ge=0.0, le=1.0, description="the paper's alpha (share moved by each update)")
    gap: Literal["ratio", "difference"] = Field(default="ratio", description="ratio: PPL_S/PPL_T (paper); difference: CE_S - CE_T")
    normalize: Literal["softmax", "sum"] = Field(default="softmax", description="softmax (paper) or proportional to the gap")
    rule: Literal["ddk", "ema"] = Field(default="ddk", description="ddk: the paper's multiplicative update; ema: moving average")
    min_weight: float = Field(default=0.0, ge=0.0, le=1.0, description="floor on every domain's weight")
    initial: Literal["uniform", "proportional"] = Field(default="uniform", description="weights before the first update")
    eval_rows: int | None = Field(default=64, ge=1, description="validation rows per domain scored at each update (null: all)")


class TeacherEntry(Section):
    """One teacher of a multi-teacher stage: a model, its weight and (optionally) its temperature."""

    model: str = Field(description="an earlier stage (its trained model) or a key in `models`")
    weight: float = Field(default=1.0, gt=0.0, description="its share of the ensemble (weights are normalized to sum to 1)")
    temperature: float = Field(default=1.0, gt=0.0, description="its logits are divided by this before they are combined")


class TeacherCombineSpec(Section):
    """How a multi-teacher stage forms ``teacher.logits``, the ensemble any loss can read."""

    method: Literal["mean", "confidence"] = Field(
        default="mean", description="mean: fixed weights; confidence: per-sample weights from each teacher's confidence"
    )
    confidence: Literal["label", "entropy"] = Field(
        default="label", description="confidence from the cross-entropy on the label (CA-MKD) or from the entropy (label-free)"
    )
    confidence_temperature: float = Field(default=1.0, gt=0.0, description="softmax temperature over the teachers' scores")
    offload: bool = Field(
        default=False, description="keep teachers on the CPU and move each to the device only for its own pass (memory)"
    )
    precompute: bool = Field(
        default=False,
        description="run each teacher over the data once, alone, before training; needs inputs that do not change (no augmentation)",
    )


class CompetitiveSpec(Section):
    """CoMD-style competitive rounds: distil, then update the teacher where the student is better."""

    rounds: int = Field(default=2, ge=1, description="student rounds; a teacher update follows every round but the last")
    teacher_epochs: int = Field(default=1, ge=1, description="epochs of each teacher update")
    teacher_objective: ObjectiveSpec | None = Field(
        default=None,
        description="the teacher's objective on the rows where the student wins (default: cross-entropy + hinton_kd from the student)",
    )
    teacher_lr: float | None = Field(default=None, gt=0.0, description="learning rate of the teacher updates (default: the stage's)")


class RowFilterSpec(Section):
    """Train a stage on the training rows where one finished model beats another (set by `competitive`)."""

    model: str = Field(description="an earlier stage whose per-sample loss is compared")
    better_than: str = Field(description="an earlier stage (or `models` key with weights) it must beat")
    metric: Literal["cross_entropy"] = "cross_entropy"


MIX_PRESETS: dict[str, dict[str, Any]] = {
    "kd": {"method": "mixup", "alpha": 1.0, "fraction": 0.1},
    "mixup": {"method": "mixup", "alpha": 1.0, "fraction": 1.0},
    "cutmix": {"method": "cutmix", "alpha": 1.0, "fraction": 1.0},
}
"""`mix.preset` values (see distill.augment.mixing.MIXING_PRESETS); `kd` is MIX-KD's partial mixup."""


class MixSpec(Section):
    """Mixup or CutMix applied to each training batch; teacher and student see the same mixed inputs."""

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        # `preset: kd` fills the keys the mapping leaves out
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = MIX_PRESETS.get(data["preset"])
            if preset is None:
                raise ValueError(f"unknown mix preset {data['preset']!r}; known: {', '.join(MIX_PRESETS)}")
            data = {**preset, **data}
        return data

    preset: Literal["kd", "mixup", "cutmix"] | None = Field(
        default=None, description="named settings: kd = partial mixup of 10% of each batch (MIX-KD), mixup, cutmix"
    )
    method: Literal["mixup", "cutmix"] = "mixup"
    alpha: float = Field(default=1.0, gt=0.0, description="Beta(alpha, alpha) mixing strength")
    fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="share of each batch that is mixed (partial mixup below 1)")


class HardSpec(Section):
    """HARD: a learned spatial augmentation trained to make teacher and student disagree."""

    every_steps: int = Field(default=1, ge=1, description="update the augmenter before every N-th student step")
    steps: int = Field(default=1, ge=1, description="augmenter optimizer steps per update")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of distill.augment.hard.HardAugmentation (lr, teacher_weight, max_rotation, ...)",
    )


class StageSpec(Section):
    """One stage: which model learns, from which teacher, with which objective."""

    @model_validator(mode="before")
    @classmethod
    def _cached_teacher(cls, data: Any) -> Any:
        # `teacher: {cache: PATH}` is a cached teacher; it is kept as `teacher_cache`.
        if isinstance(data, dict) and isinstance(data.get("teacher"), dict):
            data = dict(data)
            if data.get("teacher_cache") is not None:
                raise ValueError("give the cached teacher once: `teacher: {cache: PATH}` or `teacher_cache:`, not both")
            data["teacher_cache"] = data.pop("teacher")
        return data

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="unique name, used for folders and reports")
    model: str = Field(description="key in `models` of the network this stage trains")
    teacher: str | None = Field(
        default=None, description="an earlier stage (its trained model) or a key in `models`; none for label training"
    )
    teacher_cache: CachedTeacherSpec | None = Field(
        default=None, description="set by `teacher: {cache: PATH}`: the teacher's top-k read from an offline cache"
    )
    init_from: str | None = Field(default=None, description="start from the weights an earlier stage produced")
    reference: str | None = Field(
        default=None,
        description="a second frozen model (earlier stage or `models` key) read as reference.logits, e.g. ADPA's reference policy",
    )
    objective: ObjectiveSpec
    optimizer: OptimizerSpec | None = Field(default=None, description="keys merged into the top-level optimizer")
    scheduler: SchedulerSpec | None = Field(default=None, description="keys merged into the top-level scheduler")
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    grad_accum_steps: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    input_mask: InputMaskSpec | None = Field(
        default=None, description="hide random patches of the trained model's inputs; the source batch.patch_mask says which"
    )
    generate: GenerateSpec | None = Field(
        default=None, description="language models: replace completions by student (on-policy) or teacher (sequence-level) samples"
    )
    mixture: MixtureSpec | None = Field(
        default=None, description="sample training rows by domain with weights DDK updates (data with domains, e.g. domain_text)"
    )
    teachers: list[TeacherEntry] | None = Field(
        default=None,
        description="several teachers (instead of `teacher`): sources teachers.logits [B, K, C] and the ensemble teacher.logits",
    )
    combine: TeacherCombineSpec = Field(default_factory=TeacherCombineSpec, description="how several teachers form teacher.logits")
    cohort: list[str] | None = Field(
        default=None,
        description="online distillation: `models` keys trained together with `model` (source cohort.logits [B, N, C], `model` first)",
    )
    generations: int | None = Field(
        default=None, ge=1, description="born-again: repeat this stage N times, each generation teaching the next"
    )
    competitive: CompetitiveSpec | None = Field(
        default=None, description="CoMD: rounds of distillation and teacher updates on the rows where the student is better"
    )
    train_rows: RowFilterSpec | None = Field(
        default=None, description="train only on the rows where one earlier stage's model beats another"
    )
    mix: MixSpec | None = Field(default=None, description="mixup / CutMix, the same mixed inputs for teacher and student")
    rollout: RolloutSpec | None = Field(
        default=None, description="language models: train on group samples of the student with rewards (GRPO, KDRL)"
    )
    negatives: NegativesSpec | None = Field(
        default=None, description="language models: pair each row with a negative sampled from an earlier student (QCRD)"
    )
    data: DataSpec | None = Field(
        default=None,
        description="this stage trains on other data (e.g. preference pairs after SFT); same tokenizer or classes; "
        "the final table still uses the top-level data's test split",
    )
    hard: HardSpec | None = Field(default=None, description="HARD's learned augmentation (spatial transforms)")

    @field_validator("teachers", mode="before")
    @classmethod
    def _teacher_names(cls, value: Any) -> Any:
        # `teachers: [a, b]` is short for `[{model: a}, {model: b}]`
        if isinstance(value, list):
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("teachers")
    @classmethod
    def _two_or_more(cls, value: Any) -> Any:
        if value is not None and len(value) < 2:
            raise ValueError("`teachers` lists two or more teachers; use `teacher:` for one")
        return value


class CacheSpec(Section):
    """`distill cache-teacher`: run a language-model teacher over the training split once, store its top-k."""

    teacher: str | None = Field(
        default=None,
        description="key in `models` of the teacher to cache (pretrained `source` or `weights`); "
        "none with `distill cache-teacher --endpoint URL`",
    )
    path: str = Field(description="output folder (a cache run killed partway continues there)")
    k: int = Field(default=64, ge=1, description="most likely tokens kept per position")
    value_bits: Literal[8, 16] = Field(default=8, description="bits per stored log-probability (8: 300 B/token at k=128)")
    batch_size: int = Field(default=8, ge=1, description="sequences per teacher forward pass")
    shard_rows: int = Field(default=256, ge=1, description="training rows per shard (the unit of resumption)")


class ReferenceTrainingSpec(Section):
    """How `distill select-data` trains MiniPLM's small reference model on a slice of the corpus."""

    steps: int = Field(default=200, ge=1, description="optimizer steps of plain language modelling")
    fraction: float = Field(default=0.1, gt=0.0, le=1.0, description="share of the training documents it sees")
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-3, gt=0.0, description="AdamW learning rate")


class SelectSpec(Section):
    """`distill select-data`: MiniPLM's Difference Sampling of the training split."""

    teacher: str = Field(description="key in `models` of the teacher (pretrained `source` or `weights`)")
    reference: str = Field(description="key in `models` of the small reference LM (its weights, or trained here)")
    fraction: float = Field(default=0.5, gt=0.0, le=1.0, description="share of the documents kept (the paper's alpha)")
    out: str = Field(description="output folder: score stores, selected.jsonl, selection.json (read by data.select)")
    normalize: Literal["per_token", "sum"] = Field(
        default="per_token", description="score = mean (per_token) or total (sum) log-likelihood ratio of a document"
    )
    batch_size: int = Field(default=8, ge=1, description="documents per forward pass")
    shard_rows: int = Field(default=256, ge=1, description="documents per shard of the score stores")
    reference_training: ReferenceTrainingSpec | None = Field(
        default=None, description="train the reference model first (when it has no weights of its own)"
    )


class LinearProbeSpec(Section):
    """A logistic-regression probe on each final model's frozen features (see distill.engine.probe)."""

    source: str = Field(default="student.features", description="the feature probed, e.g. student.layer3.output")
    l2: float = Field(default=1e-4, ge=0.0, description="L2 penalty on the probe's weights")
    steps: int = Field(default=100, ge=1, description="L-BFGS iterations (full batch)")


class AnswerEvalSpec(Section):
    """Task accuracy of language models on a rule-checked task: each test row's prompt is completed
    greedily and the answer read by ``pattern`` must equal the one in the row's reference completion."""

    pattern: str = Field(
        default=r"Answer:\s*(-?[\d,]*\.?\d+)", description="regex with one group: the answer (its last match counts)"
    )
    normalize: Literal["number", "text"] = Field(
        default="number", description="number: '1,200' == '1200.0'; text: case and surrounding space ignored"
    )
    max_new_tokens: int = Field(default=64, ge=1, description="longest completion generated per row")
    limit: int | None = Field(default=None, ge=1, description="score only the first this many rows of a split")
    batch_size: int = Field(default=32, ge=1, description="rows decoded together")
    every_epoch: bool = Field(default=False, description="also score the validation split after every epoch (slower)")

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from error
        if compiled.groups < 1:
            raise ValueError("the pattern needs a capturing group around the answer")
        return pattern


class EvaluationSpec(Section):
    every_epochs: int = Field(default=1, ge=1)
    ece_bins: int = Field(default=15, ge=1)
    latency: bool = Field(default=True, description="measure CPU latency per sample of each model at the end")
    reference: str | None = Field(
        default=None, description="stage whose model the agreement column compares to (default: the last teacher)"
    )
    linear_probe: LinearProbeSpec | None = Field(
        default=None, description="also report the test accuracy of a linear probe on each model's features"
    )
    answer: AnswerEvalSpec | None = Field(
        default=None, description="language models: also report task accuracy (greedy answers checked by a rule)"
    )


class LoggingSpec(Section):
    every_steps: int = Field(default=10, ge=1, description="write training metrics every this many optimizer steps")


class CheckpointSpec(Section):
    every_steps: int | None = Field(default=None, ge=1, description="also checkpoint every this many optimizer steps")
    every_epochs: int = Field(default=1, ge=1)
    keep_last: int = Field(default=2, ge=1)


class CompareSpec(Section):
    """What `distill compare` runs: named variants (override sets) over seeds."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="variant name -> {dotted.key: value} overrides; none: the experiment as is"
    )
    stages: list[str] | None = Field(default=None, description="stages to tabulate (default: all)")
    metric: Literal["accuracy", "nll", "ece", "agreement", "perplexity", "kl_to_teacher", "answer_accuracy"] = "accuracy"

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


class SearchSpaceSpec(Section):
    """A search space of students: one architecture, each parameter a list of choices (their product)."""

    arch: str = Field(description="registered architecture (`distill list models`) or 'package.module:Class'")
    params: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="parameter -> list of choices; a list-valued parameter's choices are lists: hidden: [[16], [32]]",
    )

    @field_validator("params")
    @classmethod
    def _non_empty_choices(cls, params: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, choices in params.items():
            if not choices:
                raise ValueError(f"search.space.params.{key}: give at least one choice")
        return params


class EvolutionSpec(Section):
    """The evolutionary search used when the space has more members than `search.budget`."""

    population: int = Field(default=8, ge=2, description="candidates kept after each generation (top-k by score)")
    generations: int = Field(default=6, ge=1, description="rounds of selection, mutation and evaluation")
    tournament: int = Field(default=3, ge=1, description="a parent is the best of this many population members")


class SearchSpec(Section):
    """`distill search-student`: rank candidate students without training them (DisWOT, CVPR 2023)."""

    teacher: str = Field(description="a stage (its trained model) or a key in `models` with `weights:`")
    candidates: dict[str, ModelSpec] = Field(
        default_factory=dict, description="name -> model spec of each candidate student (or give `space`)"
    )
    space: SearchSpaceSpec | None = Field(default=None, description="a product of parameter choices (or give `candidates`)")
    budget: int = Field(default=64, ge=1, description="enumerate a space of at most this many members, else evolve")
    max_params: int | None = Field(default=None, ge=1, description="skip candidates with more parameters than this")
    batch_size: int = Field(default=64, ge=2, description="samples per scoring minibatch")
    num_batches: int = Field(default=1, ge=1, description="minibatches whose scores are averaged")
    split: Literal["train", "val"] = Field(default="train", description="split the minibatches are drawn from")
    seed: int = Field(default=0, description="seeds candidate initialization, minibatches and evolution")
    semantic_weight: float = Field(default=1.0, ge=0.0, description="weight of the semantic score in the total")
    relation_weight: float = Field(default=1.0, ge=0.0, description="weight of the relation score in the total")
    evolution: EvolutionSpec = Field(default_factory=EvolutionSpec)

    @model_validator(mode="after")
    def _one_kind_of_candidates(self) -> "SearchSpec":
        if bool(self.candidates) == (self.space is not None):
            raise ValueError("give exactly one of `candidates` (a list of students) and `space` (a search space)")
        return self


def stage_setting(stage: StageSpec, defaults: Any, name: str) -> Any:
    """The stage's value where the stage sets the key (even to null), else the experiment's default."""
    return getattr(stage, name) if name in stage.model_fields_set else getattr(defaults, name)


def merged_section(section: Any, override: Any) -> Any:
    """``section`` with the keys ``override`` sets replaced (its ``params`` kept if the name is the same)."""
    if override is None:
        return section
    updates = {key: getattr(override, key) for key in override.model_fields_set}
    if "name" in updates and updates["name"] != section.name:
        updates["params"] = dict(updates.get("params", {}))  # another optimizer: none of the old one's params
    elif "params" in updates:
        updates["params"] = {**section.params, **updates["params"]}
    return section.model_copy(update=updates)


class Experiment(Section):
    """A whole experiment: the root of the YAML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    output_dir: str = Field(default="runs", description="run folders go to <output_dir>/<name>/<timestamp>/")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataSpec = Field(default_factory=DataSpec)
    models: dict[str, ModelSpec] = Field(min_length=1)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    stages: list[StageSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    compare: CompareSpec = Field(default_factory=CompareSpec)
    search: SearchSpec | None = Field(default=None, description="`distill search-student`: training-free student search")
    cache: CacheSpec | None = Field(default=None, description="`distill cache-teacher`: an offline teacher top-k cache")
    select: SelectSpec | None = Field(default=None, description="`distill select-data`: MiniPLM's Difference Sampling")
    active: ActiveSpec | None = Field(default=None, description="`distill active`: rounds of select -> distil -> evaluate")
    pgkd: PGKDSpec | None = Field(
        default=None, description="`distill pgkd`: rounds where an LLM teacher writes examples aimed at the student's errors"
    )

    @model_validator(mode="after")
    def _expand_stages(self) -> "Experiment":
        # `generations` and `competitive` are written once and run as several plain stages.
        if any(s.generations is not None or s.competitive is not None for s in self.stages):
            self.__dict__["stages"] = expand_stages(self.stages)
        return self

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


DEFAULT_TEACHER_UPDATE = {
    "terms": [
        {"name": "labels", "loss": "cross_entropy", "weight": 0.5},
        {"name": "from_student", "loss": "hinton_kd", "weight": 0.5, "params": {"temperature": 4.0}},
    ]
}


def expand_stages(stages: list[StageSpec]) -> list[StageSpec]:
    """The stages with `generations` and `competitive` written out as plain stages.

    * ``generations: N`` (born-again networks, Furlanello et al. 2018): N copies of the stage;
      generation 1 learns from the stage's own ``teacher`` (or from labels when it has none),
      generation i > 1 from generation i - 1. They are named ``NAME-g1`` ... ``NAME-g{N-1}`` and the
      last keeps ``NAME``, so later references to the stage mean its final generation.
    * ``competitive: {rounds: R}`` (CoMD, Li et al. 2023): R student rounds ``NAME-r1`` ...
      ``NAME`` (each continuing from the previous), and after every round but the last a teacher
      update ``NAME-r{r}-teacher``: the teacher's model continues from its previous version and
      trains, with ``teacher_objective`` (cross-entropy + KD from the student by default), on the
      training rows where that round's student has a lower cross-entropy than the teacher. The
      next round distils from the updated teacher. The stage's ``teacher`` must be an earlier stage.
    """
    out: list[StageSpec] = []
    for stage in stages:
        if stage.generations is not None and stage.competitive is not None:
            raise ValueError(f"stage '{stage.name}': use `generations` or `competitive`, not both")
        if stage.generations is not None:
            previous = stage.teacher
            for generation in range(1, stage.generations + 1):
                name = stage.name if generation == stage.generations else f"{stage.name}-g{generation}"
                out.append(stage.model_copy(update={"name": name, "teacher": previous, "generations": None}, deep=True))
                previous = name
        elif stage.competitive is not None:
            spec = stage.competitive
            teacher_stage = next((s for s in out if s.name == stage.teacher), None)
            if teacher_stage is None:
                raise ValueError(
                    f"stage '{stage.name}': `competitive` updates the teacher, so `teacher` must name an earlier stage "
                    f"(got {stage.teacher!r})"
                )
            teacher, student_init = stage.teacher, stage.init_from
            for round_index in range(1, spec.rounds + 1):
                name = stage.name if round_index == spec.rounds else f"{stage.name}-r{round_index}"
                out.append(
                    stage.model_copy(
                        update={"name": name, "teacher": teacher, "init_from": student_init, "competitive": None}, deep=True
                    )
                )
                student_init = name
                if round_index == spec.rounds:
                    break
                update = f"{stage.name}-r{round_index}-teacher"
                objective = spec.teacher_objective or ObjectiveSpec.model_validate(DEFAULT_TEACHER_UPDATE)
                optimizer = stage.optimizer
                if spec.teacher_lr is not None:
                    keys = {k: getattr(optimizer, k) for k in optimizer.model_fields_set} if optimizer is not None else {}
                    optimizer = OptimizerSpec(**{**keys, "lr": spec.teacher_lr})
                out.append(
                    StageSpec(
                        name=update,
                        model=teacher_stage.model,
                        teacher=name,
                        init_from=teacher,
                        objective=objective,
                        optimizer=optimizer,
                        scheduler=stage.scheduler,
                        epochs=spec.teacher_epochs,
                        mixed_precision=stage.mixed_precision,
                        train_rows=RowFilterSpec(model=name, better_than=teacher),
                    )
                )
                teacher = update
        else:
            out.append(stage)
    return out

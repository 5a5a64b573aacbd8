"""The YAML file of ``distill generate``: a typed schema, loading with line numbers, readable errors.

Every section forbids unknown keys. :func:`load_generate_spec` parses the file safely, applies
``key.path=value`` overrides, validates it, cross-checks the sections (a ``correct`` filter needs
reference answers, ``grounded`` needs documents, templates name only their placeholders, regular
expressions compile) and raises one :class:`GenerateSpecError` that lists every problem with the
file, the line and the key path. docs/generate.md documents every key.
"""

from __future__ import annotations

import copy
import re
import string
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distill.config.loader import (
    ConfigError,
    KeyPath,
    apply_mapping_overrides,
    _short,
    apply_overrides,
    describe,
    error_message,
    read_yaml,
    unknown_key_message,
)
from distill.registry import did_you_mean
from distill.answers import DEFAULT_PATTERN, compile_answer_pattern

DEFAULT_QUESTION_TEMPLATE = "{question}"
DEFAULT_DOCUMENT_TEMPLATE = (
    "Read the text below and write {count} question-answer pairs about its content. Each answer must be "
    "supported by the text and make sense without it.\n\nText:\n{document}\n\n"
    "Write each pair on two lines:\nQ: <question>\nA: <answer>"
)
DEFAULT_YES_TEMPLATE = (
    "Question:\n{prompt}\n\nProposed answer:\n{completion}\n\n"
    "Is the proposed answer correct and well reasoned? Reply with Yes or No."
)
DEFAULT_NUMBER_TEMPLATE = (
    "Question:\n{prompt}\n\nProposed answer:\n{completion}\n\n"
    "Rate the proposed answer from 1 (wrong or unhelpful) to 10 (correct and well reasoned). "
    "Reply with the number only."
)
DEFAULT_SCORE_PATTERN = r"(-?\d+(?:\.\d+)?)"

TEMPLATE_FIELDS = {"task": ("question",), "prompts": ("question",), "documents": ("document", "count")}
"""The placeholders a ``prompt.template`` may use, by source kind (the first one is required)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------- teacher


class EndpointFields(_Section):
    """An OpenAI-compatible endpoint: the fields of ``distill.blackbox.client.EndpointSpec``.

    ``None`` values are left to the client's defaults.
    """

    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    max_concurrency: int | None = Field(None, ge=1)
    max_retries: int | None = Field(None, ge=0)
    backoff_initial_s: float | None = Field(None, gt=0)
    backoff_max_s: float | None = Field(None, gt=0)
    timeout_s: float | None = Field(None, gt=0)
    cache_dir: str | None = None
    extra_headers: dict[str, str] | None = None

    def endpoint_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``EndpointSpec`` (fields left at ``None`` take the client's defaults)."""
        return {key: value for key, value in self.model_dump(exclude={"serve"}).items() if value is not None}


class ServeSpec(_Section):
    """Start ``distill serve`` in this process for the run (127.0.0.1, a free port) and stop it after."""

    model: str
    stage: str | None = None
    max_batch_size: int = Field(8, ge=1)
    device: str = "cpu"


class TeacherSpec(EndpointFields):
    """The teacher: an endpoint (``base_url`` ...) or a model served in-process (``serve``)."""

    serve: ServeSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> TeacherSpec:
        if (self.base_url is None) == (self.serve is None):
            raise ValueError("give exactly one of base_url (an OpenAI-compatible endpoint) and serve (a local model)")
        return self


# ----------------------------------------------------------------------------------------- source


class HoldoutSpec(_Section):
    """Held-out problems with gold rationales (a ``chat_jsonl`` test file), none of them a prompt of the run."""

    count: int = Field(ge=1)
    seed: int = 1
    output: str


class TaskSource(_Section):
    """A built-in generator of rule-checkable problems; ``holdout`` also writes a gold test file."""

    name: Literal["arithmetic"]
    count: int = Field(ge=1)
    seed: int = 0
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-", "*"], min_length=1)
    operand_range: tuple[int, int] = (1, 20)
    multiply_range: tuple[int, int] = (2, 12)
    unique: bool = True
    holdout: HoldoutSpec | None = None

    @field_validator("operand_range", "multiply_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] < value[0]:
            raise ValueError(f"must be [low, high] with 0 <= low <= high, got {list(value)}")
        return value


class PromptsSource(_Section):
    """Seed prompts from JSONL files."""

    files: str | list[str]
    field: str = "prompt"
    reference_field: str | None = None
    id_field: str | None = None


class DocumentsSource(_Section):
    """Raw documents, cut into chunks; the teacher writes question-answer pairs about each chunk."""

    files: str | list[str]
    chunk_chars: int = Field(2000, ge=1)
    overlap_chars: int = Field(200, ge=0)
    questions_per_chunk: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _overlap(self) -> DocumentsSource:
        if self.overlap_chars >= self.chunk_chars:
            raise ValueError(f"overlap_chars ({self.overlap_chars}) must be smaller than chunk_chars ({self.chunk_chars})")
        return self


class SourceSpec(_Section):
    task: TaskSource | None = None
    prompts: PromptsSource | None = None
    documents: DocumentsSource | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSpec:
        given = [key for key in ("task", "prompts", "documents") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of task, prompts and documents (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return "task" if self.task is not None else "prompts" if self.prompts is not None else "documents"

    @property
    def has_reference(self) -> bool:
        return self.task is not None or (self.prompts is not None and self.prompts.reference_field is not None)


# ----------------------------------------------------------------------------------------- prompt, sampling


class ShotSpec(_Section):
    """One worked example shown to the teacher before the prompt (few-shot prompting)."""

    user: str
    assistant: str


class PromptSpec(_Section):
    """The user message: ``template`` filled per prompt; ``system`` an optional system message;
    ``shots`` worked examples shown to the teacher before it (earlier chat turns, or text before
    the prompt without chat). The shots steer the teacher only: records keep the prompt itself."""

    template: str | None = None
    system: str | None = None
    shots: list[ShotSpec] = Field(default_factory=list)

    def resolved(self, source_kind: str) -> str:
        if self.template is not None:
            return self.template
        return DEFAULT_DOCUMENT_TEMPLATE if source_kind == "documents" else DEFAULT_QUESTION_TEMPLATE


class GenerationSpec(_Section):
    n: int = Field(4, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    chat: bool = True
    seed: int | None = 0
    stop: str | list[str] | None = None


class AnswerSpec(_Section):
    pattern: str = DEFAULT_PATTERN
    normalize: Literal["number", "text"] = "number"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        compile_answer_pattern(value)
        return value


# ----------------------------------------------------------------------------------------- filters


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
    return value


class _Filter(_Section):
    name: str | None = None

    @property
    def label(self) -> str:
        """The filter's name in records and statistics: ``name``, or its type."""
        return self.name or self.type  # type: ignore[attr-defined]


class LengthFilter(_Filter):
    type: Literal["length"]
    field: Literal["completion", "prompt"] = "completion"
    unit: Literal["chars", "words"] = "chars"
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> LengthFilter:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is smaller than min ({self.min})")
        return self


class FormatFilter(_Filter):
    type: Literal["format"]
    field: Literal["completion", "prompt"] = "completion"
    must_match: str | None = None
    must_not_match: str | None = None

    @field_validator("must_match", "must_not_match")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return _check_regex(value)

    @model_validator(mode="after")
    def _given(self) -> FormatFilter:
        if self.must_match is None and self.must_not_match is None:
            raise ValueError("give must_match, must_not_match or both")
        return self


DedupField = Literal["completion", "prompt", "prompt_completion"]


class ExactDedupFilter(_Filter):
    type: Literal["exact_dedup"]
    field: DedupField = "prompt_completion"


class NearDedupFilter(_Filter):
    type: Literal["near_dedup"]
    field: DedupField = "prompt_completion"
    threshold: float = Field(0.8, gt=0, le=1)
    shingle_words: int = Field(3, ge=1)
    method: Literal["minhash", "exact"] = "minhash"
    num_perm: int = Field(128, ge=8)
    bands: int = Field(32, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _banding(self) -> NearDedupFilter:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class SelfConsistencyFilter(_Filter):
    type: Literal["self_consistency"]
    min_agreement: float = Field(0.5, gt=0, le=1)


class CorrectFilter(_Filter):
    type: Literal["correct"]


class CriticFilter(_Filter):
    type: Literal["critic"]
    mode: Literal["yes_probability", "number"] = "yes_probability"
    template: str | None = None
    system: str | None = None
    threshold: float | None = None
    judge: EndpointFields | None = None
    chat: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    top_logprobs: int = Field(5, ge=1, le=20)
    score_pattern: str = DEFAULT_SCORE_PATTERN

    @field_validator("score_pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        compile_answer_pattern(value)
        return value

    @model_validator(mode="after")
    def _judge_url(self) -> CriticFilter:
        if self.judge is not None and self.judge.base_url is None:
            raise ValueError("judge needs a base_url (leave judge out to use the teacher's endpoint)")
        if self.mode == "yes_probability" and self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold is a probability in mode yes_probability, got {self.threshold}")
        return self

    @property
    def resolved_template(self) -> str:
        if self.template is not None:
            return self.template
        return DEFAULT_YES_TEMPLATE if self.mode == "yes_probability" else DEFAULT_NUMBER_TEMPLATE

    @property
    def resolved_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.5 if self.mode == "yes_probability" else 7.0

    @property
    def resolved_max_tokens(self) -> int:
        return self.max_tokens or (1 if self.mode == "yes_probability" else 8)


class GroundedFilter(_Filter):
    type: Literal["grounded"]
    threshold: float = Field(0.5, ge=0, le=1)


FilterSpec = Annotated[
    LengthFilter | FormatFilter | ExactDedupFilter | NearDedupFilter | SelfConsistencyFilter | CorrectFilter
    | CriticFilter | GroundedFilter,
    Field(discriminator="type"),
]
FILTER_TYPES: dict[str, type[_Filter]] = {
    "length": LengthFilter, "format": FormatFilter, "exact_dedup": ExactDedupFilter, "near_dedup": NearDedupFilter,
    "self_consistency": SelfConsistencyFilter, "correct": CorrectFilter, "critic": CriticFilter,
    "grounded": GroundedFilter,
}


class PairsSpec(_Section):
    """Preference pairs ``{prompt, chosen, rejected}``: kept samples against wrong-answer samples."""

    output: str
    max_per_prompt: int = Field(1, ge=1)
    unanswered_as_rejected: bool = False


# ----------------------------------------------------------------------------------------- the spec


class GenerateSpec(_Section):
    """One overgenerate-and-filter run (see docs/generate.md)."""

    name: str
    output: str
    teacher: TeacherSpec
    source: SourceSpec
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    answer: AnswerSpec = Field(default_factory=AnswerSpec)
    filters: list[FilterSpec] = Field(default_factory=list)
    pairs: PairsSpec | None = None
    rejected_output: str | None = None
    chunk_prompts: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        """``prompt: "text"`` means ``prompt: {template: "text"}``; a filter may be just its type."""
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("prompt"), str):
                data["prompt"] = {"template": data["prompt"]}
            if isinstance(data.get("filters"), list):
                data["filters"] = [{"type": f} if isinstance(f, str) else f for f in data["filters"]]
        return data

    @property
    def template(self) -> str:
        return self.prompt.resolved(self.source.kind)


# ----------------------------------------------------------------------------------------- checks


def _placeholders(template: str) -> list[str]:
    """The ``{field}`` names of a ``str.format`` template; ``ValueError`` when it is malformed."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name.isidentifier():
                raise ValueError(f"'{{{name}}}' is not a placeholder (write '{{{{' and '}}}}' for literal braces)")
            names.append(name)
    return names


def _template_problem(template: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> str | None:
    try:
        names = _placeholders(template)
    except ValueError as error:
        return f"malformed template: {error}"
    unknown = sorted({n for n in names if n not in allowed})
    if unknown:
        hint = did_you_mean(unknown[0], list(allowed))
        names = ", ".join("{" + name + "}" for name in allowed)
        return f"unknown placeholder {{{unknown[0]}}}{hint}; this template may use {names}"
    missing = [name for name in required if name not in names]
    if missing:
        return f"the template must contain {', '.join('{' + m + '}' for m in missing)}"
    return None


def endpoint_problems(fields: EndpointFields, path: KeyPath) -> list[tuple[KeyPath, str]]:
    """What ``distill.blackbox.client.EndpointSpec`` rejects in an endpoint section (a base URL with
    credentials or a query, an API key written where its variable's name belongs, ...)."""
    try:
        from distill.blackbox.client import EndpointSpec
    except ImportError:
        return []
    kwargs = fields.endpoint_kwargs()
    kwargs.setdefault("base_url", "http://127.0.0.1:1/v1")  # served in-process: the URL is made at run time
    known = getattr(EndpointSpec, "model_fields", {})
    try:
        EndpointSpec(**{key: value for key, value in kwargs.items() if key in known})
    except ValidationError as error:
        return [
            (path + tuple(item["loc"]), str(item.get("ctx", {}).get("error", item["msg"])))
            for item in error.errors(include_url=False)
        ]
    return []


def spec_problems(spec: GenerateSpec) -> list[tuple[KeyPath, str]]:
    """Problems across sections, each with the key path it concerns."""
    problems: list[tuple[KeyPath, str]] = endpoint_problems(spec.teacher, ("teacher",))
    kind = spec.source.kind
    allowed = TEMPLATE_FIELDS[kind]
    where: KeyPath = ("prompt", "template") if spec.prompt.template is not None else ("prompt",)
    problem = _template_problem(spec.template, allowed, allowed[:1])
    if problem:
        problems.append((where, problem))
    if spec.prompt.system is not None and not spec.generation.chat:
        problems.append((("prompt", "system"), "a system message needs generation.chat: true"))
    labels: dict[str, int] = {}
    for index, item in enumerate(spec.filters):
        path: KeyPath = ("filters", index)
        if item.label in labels:
            problems.append((path + ("name",), f"two filters are named '{item.label}' (filters[{labels[item.label]}] "
                                                "too); give one a different name"))
        labels.setdefault(item.label, index)
        if isinstance(item, CorrectFilter) and not spec.source.has_reference:
            problems.append((path, "the correct filter needs reference answers: source.task, or source.prompts with "
                                   "reference_field"))
        if isinstance(item, (CorrectFilter, SelfConsistencyFilter)) and kind == "documents":
            problems.append((path, f"{item.type} compares final answers, which question-answer pairs from documents "
                                   "do not have; use grounded or critic"))
        if isinstance(item, GroundedFilter) and kind != "documents":
            problems.append((path, "the grounded filter checks answers against their document chunk; it needs "
                                   "source.documents"))
        if isinstance(item, CriticFilter):
            if item.judge is not None:
                problems.extend(endpoint_problems(item.judge, path + ("judge",)))
            problem = _template_problem(item.resolved_template, ("prompt", "completion"), ("completion",))
            if problem:
                problems.append((path + ("template",), problem))
            if item.system is not None and item.chat is False:
                problems.append((path + ("system",), "a system message needs chat: true"))
    if spec.pairs is not None:
        if kind == "documents":
            problems.append((("pairs",), "preference pairs need final answers to tell right from wrong; documents "
                                         "have none"))
        elif not spec.source.has_reference and not any(isinstance(f, SelfConsistencyFilter) for f in spec.filters):
            problems.append((("pairs",), "preference pairs need reference answers (source.task, or "
                                         "source.prompts.reference_field) or a self_consistency filter"))
    outputs = {"output": spec.output}
    if spec.pairs is not None:
        outputs["pairs.output"] = spec.pairs.output
    if spec.rejected_output is not None:
        outputs["rejected_output"] = spec.rejected_output
    seen: dict[Path, str] = {}
    for key, value in outputs.items():
        resolved = Path(value).expanduser().resolve()
        if resolved in seen:
            problems.append((tuple(key.split(".")), f"the same file as {seen[resolved]} ({value})"))
        seen.setdefault(resolved, key)
    return problems


# ----------------------------------------------------------------------------------------- errors, loading


class GenerateSpecError(ConfigError):
    """A generate spec that cannot run; ``problems`` holds one line per problem."""

    subject = "the generate spec"


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none"}


def _clean_path(loc: tuple[Any, ...]) -> KeyPath:
    """The key path of a pydantic error location, without union member tags (``str``, a filter type)."""
    path: list[str | int] = []
    for position, part in enumerate(loc):
        if isinstance(part, str):
            bare = part.split("[", 1)[0].lower()
            if part.startswith("function-") or bare in _TYPE_TAGS:
                continue
            if position >= 2 and loc[0] == "filters" and isinstance(loc[position - 1], int) and part in FILTER_TYPES:
                continue
        path.append(part)
    return tuple(path)


def _model_for(path: KeyPath, data: Any) -> type[BaseModel] | None:
    """The schema class of the mapping at ``path`` in the raw data (filter items by their ``type``)."""
    current: type[BaseModel] | None = GenerateSpec
    node = data
    for position, part in enumerate(path):
        if current is None:
            return None
        if part == "filters" and position == 0:
            node = node.get("filters") if isinstance(node, dict) else None
            if len(path) == 1:
                return None
            index = path[1]
            item = node[index] if isinstance(node, list) and isinstance(index, int) and index < len(node) else None
            kind = item.get("type") if isinstance(item, dict) else item
            current = FILTER_TYPES.get(kind) if isinstance(kind, str) else None
            node = item
            rest = path[2:]
            for sub in rest:
                current = _field_model(current, sub)
                node = node.get(sub) if isinstance(node, dict) else None
            return current
        current = _field_model(current, part)
        node = node.get(part) if isinstance(node, dict) else None
    return current


def _field_model(model: type[BaseModel] | None, part: Any) -> type[BaseModel] | None:
    if model is None or not isinstance(part, str) or part not in model.model_fields:
        return None
    annotation = model.model_fields[part].annotation
    is_union = typing.get_origin(annotation) in (Union, types.UnionType)
    candidates = typing.get_args(annotation) if is_union else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def validation_problems(error: ValidationError, data: Any, lines: dict[KeyPath, int | str]) -> list[str]:
    """One readable line per problem of a pydantic error (union alternatives merged per key)."""
    grouped: dict[KeyPath, list[dict[str, Any]]] = {}
    for item in error.errors(include_url=False):
        grouped.setdefault(_clean_path(tuple(item["loc"])), []).append(item)
    problems: list[str] = []
    for path, items in grouped.items():
        messages: list[str] = []
        for item in items:
            kind = item["type"]
            if kind == "extra_forbidden":
                parent = _model_for(path[:-1], data)
                message = unknown_key_message(str(path[-1]), [k for k in parent.model_fields if k != "type"] if parent else [])
            elif kind in ("union_tag_invalid", "union_tag_not_found"):
                given = item.get("input", {}).get("type") if isinstance(item.get("input"), dict) else item.get("input")
                choices = list(FILTER_TYPES)
                hint = did_you_mean(str(given), choices) if isinstance(given, str) else ""
                head = "a filter needs a type" if kind == "union_tag_not_found" else f"unknown filter type {_short(given)}{hint}"
                message = f"{head}; filter types: {', '.join(choices)}"
            else:
                message = error_message(item)
            if message not in messages:
                messages.append(message)
        if len(messages) > 1 and all(i["type"] not in ("extra_forbidden", "missing") for i in items):
            text = "expected one of: " + "; ".join(m.split(" (got ")[0] for m in messages)
            messages = [f"{text} (got {_short(items[0].get('input'))})"]
        problems.extend(describe(path, message, lines) for message in messages)
    return problems


def generate_spec_from_dict(
    data: dict[str, Any], lines: dict[KeyPath, int | str] | None = None, source: str | None = None
) -> GenerateSpec:
    """Validate a dict against :class:`GenerateSpec` and the cross-section checks."""
    lines = lines or {}
    try:
        spec = GenerateSpec.model_validate(data)
    except ValidationError as error:
        raise GenerateSpecError(validation_problems(error, data, lines), source) from None
    problems = [describe(path, message, lines) for path, message in spec_problems(spec)]
    if problems:
        raise GenerateSpecError(problems, source)
    return spec


def load_generate_spec(
    path: str | Path | Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] | None = None
) -> GenerateSpec:
    """Load and validate a generate spec from a YAML file (or a mapping).

    ``overrides`` are ``key.path=value`` strings (values parsed as YAML, as ``--set``) or a mapping of
    dotted key paths to values. Raises :class:`GenerateSpecError` listing every problem with the file,
    line and key path.
    """
    if isinstance(path, Mapping):
        data: dict[str, Any] = copy.deepcopy(dict(path))
        lines: dict[KeyPath, int | str] = {}
        source = "generate spec"
    else:
        source = str(path)
        try:
            data, lines = read_yaml(path)
        except ConfigError as error:
            raise GenerateSpecError(error.problems, error.source or source) from None
    if overrides:
        try:
            if isinstance(overrides, Mapping):
                data = apply_mapping_overrides(data, dict(overrides))
            else:
                data = apply_overrides(data, list(overrides), lines)
        except ConfigError as error:
            raise GenerateSpecError(error.problems, error.source) from None
        except ValueError as error:
            raise GenerateSpecError([str(error)], "overrides") from None
    return generate_spec_from_dict(data, lines, source)

"""The filters of ``distill generate``: each gives every sample a score and a pass/fail verdict.

Overgenerating from a teacher and keeping only what survives stringent filtering is the recipe of
Symbolic Knowledge Distillation (West et al., "Symbolic Knowledge Distillation: from General
Language Models to Commonsense Models", NAACL 2022), I2D2 (Bhagavatula et al., "I2D2: Inductive
Knowledge Distillation with NeuroLogic and Self-Imitation", ACL 2023) and NeuroComparatives (Howard
et al., "NeuroComparatives: Neuro-Symbolic Distillation of Comparative Knowledge", 2023). The
filters here, applied in the order the spec lists them:

* :class:`LengthFilter` and :class:`FormatFilter`: cheap shape checks (I2D2 and NeuroComparatives
  start with such rules);
* :class:`ExactDedupFilter` and :class:`NearDedupFilter`: duplicates of what was already kept
  (NeuroComparatives deduplicates its generations; near duplicates by MinHash, Broder, "On the
  resemblance and containment of documents", SEQUENCES 1997);
* :class:`SelfConsistencyFilter`: the majority answer over a prompt's samples (Wang et al.,
  "Self-Consistency Improves Chain of Thought Reasoning in Language Models", ICLR 2023);
* :class:`CorrectFilter`: the final answer equals the reference;
* :class:`CriticFilter`: the teacher (or another model) as judge, the role of West et al.'s
  trained critic, with an LLM judge as in Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and
  Chatbot Arena" (NeurIPS 2023 Datasets and Benchmarks);
* :class:`GroundedFilter`: an answer of a question-answer pair written from a document chunk
  (MechGPT, Buehler 2023) must use the chunk's words.

A filter sees the samples of one chunk of prompts that are still alive, returns one
``(score, passed)`` verdict per sample, and never changes its own state while doing so. The
dedup filters remember what was finally kept only through :meth:`Filter.commit` (after every
filter ran on the chunk) and :meth:`Filter.remember` (rebuilding from the kept records of an
earlier run), so their state is a function of the output file alone and a resumed run decides
exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from distill.answers import compile_answer_pattern

Verdict = tuple["float | None", bool]


class TeacherLike(Protocol):
    """What the pipeline needs of a teacher or judge: ``distill.blackbox.client.TeacherClient.map``."""

    def map(self, method: str, requests: list[dict[str, Any]], *, progress: Any = None) -> list[dict[str, Any]]: ...


@dataclass
class Sample:
    """One generated sample on its way through the filters."""

    id: str
    prompt_id: str
    prompt: str
    completion: str
    answer: str | None = None
    reference: str | None = None
    document: str | None = None
    system: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    rejected_by: str | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def alive(self) -> bool:
        return self.rejected_by is None


def derive_seed(base: int | None, key: str) -> int | None:
    """A 31-bit seed from ``base`` and a string key (stable across processes and platforms)."""
    if base is None:
        return None
    digest = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class Filter:
    """Base class: ``evaluate`` gives verdicts; stateful filters also implement ``commit``/``remember``."""

    type: str = ""

    def __init__(self, label: str | None = None) -> None:
        self.label = label or self.type

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        """One ``(score, passed)`` per sample of ``alive``; ``chunk`` holds every sample of the chunk."""
        raise NotImplementedError

    def commit(self, kept: Iterable[Sample]) -> None:
        """Remember the samples finally kept in this chunk (dedup filters)."""

    def remember(self, record: Mapping[str, Any]) -> None:
        """Remember a record kept by an earlier run (dedup filters)."""


def _field_text(sample: Sample, name: str) -> str:
    return sample.prompt if name == "prompt" else sample.completion


# -------------------------------------------------------------------------------------- shape


class LengthFilter(Filter):
    """``min <= length <= max`` of the completion (or prompt) in characters or whitespace-separated words."""

    type = "length"

    def __init__(self, *, field: str = "completion", unit: str = "chars", min: int | None = None,
                 max: int | None = None, label: str | None = None) -> None:
        super().__init__(label)
        self.field, self.unit, self.min, self.max = field, unit, min, max

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for sample in alive:
            text = _field_text(sample, self.field)
            length = len(text.split()) if self.unit == "words" else len(text)
            passed = (self.min is None or length >= self.min) and (self.max is None or length <= self.max)
            verdicts.append((float(length), passed))
        return verdicts


class FormatFilter(Filter):
    """The text must contain a match of ``must_match`` and no match of ``must_not_match`` (``re.search``)."""

    type = "format"

    def __init__(self, *, field: str = "completion", must_match: str | None = None,
                 must_not_match: str | None = None, label: str | None = None) -> None:
        super().__init__(label)
        self.field = field
        self.must = re.compile(must_match) if must_match is not None else None
        self.must_not = re.compile(must_not_match) if must_not_match is not None else None

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for sample in alive:
            text = _field_text(sample, self.field)
            passed = (self.must is None or self.must.search(text) is not None) and (
                self.must_not is None or self.must_not.search(text) is None
            )
            verdicts.append((1.0 if passed else 0.0, passed))
        return verdicts


# -------------------------------------------------------------------------------------- duplicates


def dedup_text(field: str, prompt: str, completion: str) -> str:
    """The text a dedup filter compares: the completion, the prompt, or both (joined by a newline)."""
    if field == "completion":
        return completion
    if field == "prompt":
        return prompt
    return f"{prompt}\n{completion}"


def normalize_for_dedup(text: str) -> str:
    """Case-folded, whitespace collapsed: what makes two texts exact duplicates."""
    return " ".join(text.casefold().split())


class ExactDedupFilter(Filter):
    """Drops a sample whose normalised text (:func:`normalize_for_dedup`) was already kept.

    Score: 1.0 for a duplicate, 0.0 otherwise. Within a chunk, a sample is also a duplicate of an
    earlier sample of the chunk that passed this filter.
    """

    type = "exact_dedup"

    def __init__(self, *, field: str = "prompt_completion", label: str | None = None) -> None:
        super().__init__(label)
        self.field = field
        self.seen: set[bytes] = set()

    def _key(self, prompt: str, completion: str) -> bytes:
        text = normalize_for_dedup(dedup_text(self.field, prompt, completion))
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        local: set[bytes] = set()
        verdicts: list[Verdict] = []
        for sample in alive:
            key = self._key(sample.prompt, sample.completion)
            duplicate = key in self.seen or key in local
            if not duplicate:
                local.add(key)
            verdicts.append((1.0 if duplicate else 0.0, not duplicate))
        return verdicts

    def commit(self, kept: Iterable[Sample]) -> None:
        for sample in kept:
            self.seen.add(self._key(sample.prompt, sample.completion))

    def remember(self, record: Mapping[str, Any]) -> None:
        self.seen.add(self._key(record["prompt"], record["completion"]))


_WORD = re.compile(r"\w+")


def word_shingles(text: str, size: int = 3) -> frozenset[str]:
    """The set of ``size``-word shingles of case-folded text (words are ``\\w+`` runs).

    A text with fewer than ``size`` words is one shingle of all its words (the empty string for none).
    """
    words = _WORD.findall(text.casefold())
    if len(words) < size:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """``|a & b| / |a | b|`` (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class MinHasher:
    """MinHash signatures (Broder 1997) with ``num_perm`` universal hash functions.

    A shingle is hashed with BLAKE2b to 31 bits, ``x``; hash function ``i`` is
    ``(a_i * x + b_i) mod (2^31 - 1)`` with ``a_i, b_i`` drawn from ``numpy`` seeded with ``seed``.
    The share of equal signature entries of two sets estimates their Jaccard similarity.
    """

    PRIME = (1 << 31) - 1

    def __init__(self, num_perm: int = 128, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, self.PRIME, size=num_perm, dtype=np.int64)
        self.b = rng.integers(0, self.PRIME, size=num_perm, dtype=np.int64)

    def signature(self, shingles: Iterable[str]) -> np.ndarray:
        values = np.fromiter(
            (int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big") % self.PRIME
             for s in sorted(shingles)),
            dtype=np.int64,
        )
        if values.size == 0:
            return np.full(self.num_perm, self.PRIME, dtype=np.int64)
        return ((self.a[:, None] * values[None, :] + self.b[:, None]) % self.PRIME).min(axis=1)


class MinHashIndex:
    """Signatures bucketed by LSH bands; :meth:`max_similarity` estimates the best Jaccard match.

    Candidates share at least one band (``bands`` bands of ``num_perm / bands`` rows); their
    similarity is the share of equal entries over the whole signature.
    """

    def __init__(self, bands: int = 32) -> None:
        self.bands = bands
        self.signatures: list[np.ndarray] = []
        self.buckets: dict[tuple[int, bytes], list[int]] = {}

    def _keys(self, signature: np.ndarray) -> list[tuple[int, bytes]]:
        return [(band, part.tobytes()) for band, part in enumerate(np.split(signature, self.bands))]

    def add(self, signature: np.ndarray) -> None:
        index = len(self.signatures)
        self.signatures.append(signature)
        for key in self._keys(signature):
            self.buckets.setdefault(key, []).append(index)

    def max_similarity(self, signature: np.ndarray) -> float:
        candidates: set[int] = set()
        for key in self._keys(signature):
            candidates.update(self.buckets.get(key, ()))
        best = 0.0
        for index in candidates:
            best = max(best, float(np.mean(self.signatures[index] == signature)))
        return best

    def __len__(self) -> int:
        return len(self.signatures)


class ShingleIndex:
    """Exact Jaccard against every stored shingle set sharing at least one shingle (inverted index)."""

    def __init__(self) -> None:
        self.sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = {}

    def add(self, shingles: frozenset[str]) -> None:
        index = len(self.sets)
        self.sets.append(shingles)
        for shingle in shingles:
            self.postings.setdefault(shingle, []).append(index)

    def max_similarity(self, shingles: frozenset[str]) -> float:
        candidates: set[int] = set()
        for shingle in shingles:
            candidates.update(self.postings.get(shingle, ()))
        return max((jaccard(shingles, self.sets[i]) for i in candidates), default=0.0)

    def __len__(self) -> int:
        return len(self.sets)


class NearDedupFilter(Filter):
    """Drops a sample whose word-shingle Jaccard similarity to a kept text reaches ``threshold``.

    ``method: minhash`` estimates the similarity from MinHash signatures found through LSH bands
    (the usual choice for large outputs; deterministic for a given ``seed``); ``method: exact``
    computes the exact Jaccard similarity with every kept text sharing a shingle. Score: the highest
    similarity found (0.0 when nothing is similar). The comparison covers every record kept so far,
    those of an earlier, interrupted run included, and the earlier samples of the same chunk that
    passed this filter.
    """

    type = "near_dedup"

    def __init__(self, *, field: str = "prompt_completion", threshold: float = 0.8, shingle_words: int = 3,
                 method: str = "minhash", num_perm: int = 128, bands: int = 32, seed: int = 0,
                 label: str | None = None) -> None:
        super().__init__(label)
        if method not in ("minhash", "exact"):
            raise ValueError(f"near_dedup method must be 'minhash' or 'exact', got {method!r}")
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.field, self.threshold, self.shingle_words, self.method = field, threshold, shingle_words, method
        self.bands = bands
        self.hasher = MinHasher(num_perm, seed) if method == "minhash" else None
        self.index: MinHashIndex | ShingleIndex = self._new_index()

    def _new_index(self) -> MinHashIndex | ShingleIndex:
        return MinHashIndex(self.bands) if self.method == "minhash" else ShingleIndex()

    def _key(self, prompt: str, completion: str) -> Any:
        shingles = word_shingles(dedup_text(self.field, prompt, completion), self.shingle_words)
        return self.hasher.signature(shingles) if self.hasher is not None else shingles

    def _sample_key(self, sample: Sample) -> Any:
        slot = f"near_dedup:{self.label}"
        if slot not in sample.cache:
            sample.cache[slot] = self._key(sample.prompt, sample.completion)
        return sample.cache[slot]

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        local = self._new_index()
        verdicts: list[Verdict] = []
        for sample in alive:
            key = self._sample_key(sample)
            similarity = max(self.index.max_similarity(key), local.max_similarity(key))
            passed = similarity < self.threshold
            if passed:
                local.add(key)
            verdicts.append((round(similarity, 6), passed))
        return verdicts

    def commit(self, kept: Iterable[Sample]) -> None:
        for sample in kept:
            self.index.add(self._sample_key(sample))

    def remember(self, record: Mapping[str, Any]) -> None:
        self.index.add(self._key(record["prompt"], record["completion"]))


# -------------------------------------------------------------------------------------- answers


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """The most frequent non-missing answer and its share of *all* answers (missing ones included).

    A tie for the top is no majority: ``(None, share of the tied answers)``. No answer at all:
    ``(None, 0.0)``.
    """
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None, 0.0
    ranked = counts.most_common()
    top = ranked[0][1]
    share = top / len(answers)
    if len(ranked) > 1 and ranked[1][1] == top:
        return None, share
    return ranked[0][0], share


class SelfConsistencyFilter(Filter):
    """Keeps the samples whose final answer is their prompt's majority answer (Wang et al., ICLR 2023).

    The vote counts every sample of the prompt, also those an earlier filter dropped (a dedup
    filter placed before this one would otherwise remove the agreement this filter measures);
    samples without a parseable answer count in the denominator but vote for nothing. A prompt
    passes when its majority share is at least ``min_agreement``; a tie for the top answer is no
    majority. Score: the prompt's majority share. QCRD (Wang et al., "QCRD: Quality-guided
    Contrastive Rationale Distillation for Large Language Models", arXiv 2024) builds its positive
    rationales this way from temperature samples.
    """

    type = "self_consistency"

    def __init__(self, *, min_agreement: float = 0.5, label: str | None = None) -> None:
        super().__init__(label)
        self.min_agreement = min_agreement

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        by_prompt: dict[str, list[str | None]] = {}
        for sample in chunk:
            by_prompt.setdefault(sample.prompt_id, []).append(sample.answer)
        votes = {prompt_id: majority_vote(answers) for prompt_id, answers in by_prompt.items()}
        verdicts: list[Verdict] = []
        for sample in alive:
            majority, share = votes[sample.prompt_id]
            passed = majority is not None and share >= self.min_agreement and sample.answer == majority
            verdicts.append((round(share, 6), passed))
        return verdicts


class CorrectFilter(Filter):
    """Keeps samples whose normalised final answer equals the reference. Score: 1.0 or 0.0."""

    type = "correct"

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for sample in alive:
            correct = sample.answer is not None and sample.reference is not None and sample.answer == sample.reference
            verdicts.append((1.0 if correct else 0.0, correct))
        return verdicts


# -------------------------------------------------------------------------------------- judge


def choice_text(choice: Mapping[str, Any]) -> str:
    """The text of one OpenAI response choice (chat ``message.content`` or completion ``text``)."""
    message = choice.get("message")
    if isinstance(message, Mapping):
        return message.get("content") or ""
    return choice.get("text") or ""


def first_token_top_logprobs(choice: Mapping[str, Any]) -> list[tuple[str, float]] | None:
    """``(token, logprob)`` alternatives of the first generated token of an OpenAI response choice.

    Reads chat logprobs (``logprobs.content[0].top_logprobs``, a list of ``{token, logprob}``) and
    completion logprobs (``logprobs.top_logprobs[0]``, a ``{token: logprob}`` map); without top
    alternatives, the sampled token itself. ``None`` when the choice has no logprobs.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        if not content:
            return None
        first = content[0]
        tops = first.get("top_logprobs")
        if isinstance(tops, Mapping):
            pairs = [(str(t), float(lp)) for t, lp in tops.items()]
        else:
            pairs = [(str(t["token"]), float(t["logprob"])) for t in tops or [] if t.get("logprob") is not None]
        return pairs or [(str(first["token"]), float(first["logprob"]))]
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list) and tops and isinstance(tops[0], Mapping):
        return [(str(t), float(lp)) for t, lp in tops[0].items() if lp is not None]
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if tokens and values and values[0] is not None:
        return [(str(tokens[0]), float(values[0]))]
    return None


_TOKEN_EDGE = " \t\r\n\u0120\u2581\u010a.,;:!?\"'`*()[]"


def yes_probability(alternatives: Iterable[tuple[str, float]] | Mapping[str, float]) -> float | None:
    """P(yes) normalised over the yes and no tokens among a first token's alternatives.

    Tokens are compared case-insensitively after stripping spaces, byte-level markers (``Ġ``,
    ``▁``) and punctuation, so ``Yes``, `` yes`` and ``YES.`` all count as yes; probabilities of
    tokens that read the same are summed. ``None`` when neither yes nor no is among them.
    """
    items = alternatives.items() if isinstance(alternatives, Mapping) else alternatives
    yes = no = 0.0
    for token, logprob in items:
        word = token.strip(_TOKEN_EDGE).casefold()
        if word == "yes":
            yes += math.exp(logprob)
        elif word == "no":
            no += math.exp(logprob)
    if yes + no <= 0.0:
        return None
    return yes / (yes + no)


class CriticFilter(Filter):
    """The teacher as judge: a question about each sample, keeping those scored ``>= threshold``.

    ``mode: yes_probability`` asks a yes/no question for one token with its top log-probabilities
    and scores P(yes) / (P(yes) + P(no)) from the first generated token's alternatives (a continuous
    score like West et al.'s critic, not a sampled word); when neither word is among the
    alternatives the score is 0.0. ``mode: number`` asks for a rating and parses the first number
    of the reply with ``score_pattern`` (no number: score ``None``, dropped). The judge decodes
    greedily (temperature 0) with a seed derived from the sample id.
    """

    type = "critic"

    def __init__(self, judge: TeacherLike, *, template: str, mode: str = "yes_probability", threshold: float = 0.5,
                 chat: bool = True, system: str | None = None, max_tokens: int = 1, top_logprobs: int = 5,
                 score_pattern: str = r"(-?\d+(?:\.\d+)?)", seed: int | None = 0, label: str | None = None) -> None:
        super().__init__(label)
        if mode not in ("yes_probability", "number"):
            raise ValueError(f"critic mode must be 'yes_probability' or 'number', got {mode!r}")
        self.judge, self.template, self.mode, self.threshold = judge, template, mode, threshold
        self.chat, self.system, self.max_tokens, self.top_logprobs = chat, system, max_tokens, top_logprobs
        self.score_pattern = compile_answer_pattern(score_pattern)
        self.seed = seed

    def request(self, sample: Sample) -> dict[str, Any]:
        """The judge request for one sample (keyword arguments of ``chat`` or ``complete``)."""
        text = self.template.format(prompt=sample.prompt, completion=sample.completion)
        request: dict[str, Any] = {"n": 1, "temperature": 0.0, "max_tokens": self.max_tokens}
        seed = derive_seed(self.seed, f"critic:{self.label}:{sample.id}")
        if seed is not None:
            request["seed"] = seed
        if self.chat:
            messages = [{"role": "system", "content": self.system}] if self.system is not None else []
            request["messages"] = messages + [{"role": "user", "content": text}]
            if self.mode == "yes_probability":
                request.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            request["prompt"] = text
            if self.mode == "yes_probability":
                request["logprobs"] = self.top_logprobs
        return request

    def score(self, response: Mapping[str, Any]) -> float | None:
        choices = response.get("choices") or []
        if not choices:
            raise ValueError(f"the judge returned no choices: {str(response)[:200]}")
        choice = choices[0]
        if self.mode == "number":
            match = self.score_pattern.search(choice_text(choice))
            return float(match.group(1)) if match else None
        alternatives = first_token_top_logprobs(choice)
        if alternatives is None:
            raise ValueError(
                "the judge's reply has no logprobs; critic mode yes_probability needs an endpoint that returns "
                "top_logprobs (or use mode: number)"
            )
        probability = yes_probability(alternatives)
        return 0.0 if probability is None else probability

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        if not alive:
            return []
        method = "chat" if self.chat else "complete"
        responses = self.judge.map(method, [self.request(sample) for sample in alive])
        if len(responses) != len(alive):
            raise ValueError(f"the judge returned {len(responses)} responses for {len(alive)} requests")
        verdicts: list[Verdict] = []
        for response in responses:
            value = self.score(response)
            verdicts.append((None if value is None else round(value, 6), value is not None and value >= self.threshold))
        return verdicts


# -------------------------------------------------------------------------------------- grounding

STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for with from as into onto over under about above below
    is are was were be been being am do does did done doing have has had having it its this that these those there
    here which who whom whose what when where why how not no nor so than too very can could should would may might
    must will shall i you he she we they me him her us them my your his our their mine yours ours theirs
    also just only such each any all both some more most other another same own up down out off again""".split()  # noqa: SIM905
)


def _stem(word: str) -> str:
    """A light suffix strip so plurals and simple inflections match (``alloys`` -> ``alloy``)."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix) and not word.endswith("ss"):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """Lower-cased, lightly stemmed ``\\w+`` words of ``text`` that are not stopwords."""
    return {_stem(word) for word in _WORD.findall(text.casefold()) if word not in STOPWORDS}


def grounding_score(answer: str, document: str) -> float:
    """Share of the answer's content words that occur in the document (0.0 for an answer with none)."""
    words = content_words(answer)
    if not words:
        return 0.0
    return len(words & content_words(document)) / len(words)


class GroundedFilter(Filter):
    """Keeps question-answer pairs whose answer's content words occur in their chunk (share >= threshold).

    A lexical guard against answers the teacher did not take from the document (MechGPT's pairs are
    meant to be distilled *from* the text). Content words: ``\\w+`` runs minus English stopwords,
    with a light suffix strip. Score: the share.
    """

    type = "grounded"

    def __init__(self, *, threshold: float = 0.5, label: str | None = None) -> None:
        super().__init__(label)
        self.threshold = threshold

    def evaluate(self, alive: list[Sample], chunk: list[Sample]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for sample in alive:
            if sample.document is None:
                raise ValueError(f"sample {sample.id}: the grounded filter needs the document chunk")
            share = grounding_score(sample.completion, sample.document)
            verdicts.append((round(share, 6), share >= self.threshold))
        return verdicts


# -------------------------------------------------------------------------------------- building


def build_filter(spec: Any, *, judge: TeacherLike | None = None, chat: bool = True, seed: int | None = 0) -> Filter:
    """The filter of one ``filters`` entry of a :class:`~distill.synth.spec.GenerateSpec`."""
    label = spec.label
    if spec.type == "length":
        return LengthFilter(field=spec.field, unit=spec.unit, min=spec.min, max=spec.max, label=label)
    if spec.type == "format":
        return FormatFilter(
            field=spec.field, must_match=spec.must_match, must_not_match=spec.must_not_match, label=label
        )
    if spec.type == "exact_dedup":
        return ExactDedupFilter(field=spec.field, label=label)
    if spec.type == "near_dedup":
        return NearDedupFilter(
            field=spec.field, threshold=spec.threshold, shingle_words=spec.shingle_words, method=spec.method,
            num_perm=spec.num_perm, bands=spec.bands, seed=spec.seed, label=label,
        )
    if spec.type == "self_consistency":
        return SelfConsistencyFilter(min_agreement=spec.min_agreement, label=label)
    if spec.type == "correct":
        return CorrectFilter(label=label)
    if spec.type == "grounded":
        return GroundedFilter(threshold=spec.threshold, label=label)
    if spec.type == "critic":
        if judge is None:
            raise ValueError(f"filter '{label}': the critic needs a judge client")
        return CriticFilter(
            judge, template=spec.resolved_template, mode=spec.mode, threshold=spec.resolved_threshold,
            chat=chat if spec.chat is None else spec.chat, system=spec.system, max_tokens=spec.resolved_max_tokens,
            top_logprobs=spec.top_logprobs, score_pattern=spec.score_pattern, seed=seed, label=label,
        )
    raise ValueError(f"unknown filter type {spec.type!r}")

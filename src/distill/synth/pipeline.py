"""``distill generate``: overgenerate from a teacher, filter, and write a resumable JSONL data set.

The recipe is that of Symbolic Knowledge Distillation (West et al., "Symbolic Knowledge
Distillation: from General Language Models to Commonsense Models", NAACL 2022): sample many
candidates from a general teacher, keep those a critic accepts, and train the student on what is
left; I2D2 (Bhagavatula et al., ACL 2023) and NeuroComparatives (Howard et al., 2023) stress that
the filtering must be stringent. Prompts come from a built-in task, seed prompts, or documents
(MechGPT, Buehler 2023: a general LLM writes question-answer pairs about each chunk of raw text).
Self-consistency (Wang et al., ICLR 2023) and a reference answer select correct rationales;
pairing them with wrong-answer samples of the same prompt gives the positive and negative traces
that REDI (Xu et al., "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data
for LLM Reasoning", 2025) and QCRD (Wang et al., "QCRD: Quality-guided Contrastive Rationale
Distillation for Large Language Models", 2024) train on.

Choices made here:

* Prompts are processed in chunks of ``chunk_prompts``; each chunk is one ``map`` call to the
  teacher (one request per prompt with ``n`` samples), then every filter runs on the chunk in the
  listed order. A filter sees only the samples still alive (self-consistency votes over all of a
  prompt's samples, see :class:`~distill.synth.filters.SelfConsistencyFilter`).
* Per-prompt sampling seeds are derived from ``generation.seed`` and the prompt's id, so a rerun,
  a resumed run, or a run with another ``limit`` asks the teacher the same questions.
* Completions are stripped of leading and trailing whitespace.
* Resuming: after a chunk's records (and pairs, and rejected samples) are appended and fsynced,
  one line per prompt goes to ``<output>.progress.jsonl``. On restart, a chunk counts as done only
  when every one of its prompts is journaled with as many records as the journal says; records of
  other prompts and a torn last line are dropped (the files rewritten atomically), the dedup
  filters are rebuilt from the kept records, and the remaining chunks run. The output of a killed
  and resumed run is byte-identical to that of an uninterrupted one (given a deterministic teacher).
* ``<output>.meta.json`` holds the fingerprint of everything that shapes the output (the spec
  without ``name``, ``limit``, ``output`` and connection settings, and a digest of the prompts); a
  rerun with a different spec is refused, naming the differing keys, unless ``overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from distill.io import atomic_write_bytes, atomic_write_json, read_jsonl
from distill.answers import extract_answer, normalize_answer
from distill.synth.filters import (
    Filter,
    Sample,
    SelfConsistencyFilter,
    TeacherLike,
    build_filter,
    choice_text,
    derive_seed,
    majority_vote,
    normalize_for_dedup,
)
from distill.synth.sources import (
    PromptItem,
    arithmetic_items,
    write_arithmetic_chat_jsonl,
    document_items,
    parse_qa_pairs,
    read_seed_prompts,
)
from distill.synth.spec import (
    EndpointFields,
    GenerateSpec,
    GenerateSpecError,
    ServeSpec,
    load_generate_spec,
)

META_VERSION = 1
CONNECTION_FIELDS = ("api_key_env", "max_concurrency", "max_retries", "backoff_initial_s", "backoff_max_s", "timeout_s",
                     "cache_dir", "extra_headers")
"""Endpoint settings that change how the teacher is reached, not what it answers: not fingerprinted."""
SERVE_RUNTIME_FIELDS = ("max_batch_size", "device")
"""Settings of an in-process server that change how fast it answers: not fingerprinted."""
SERVE_TIMEOUT_S = 600.0
"""Default ``timeout_s`` for a teacher served in-process: a request waits while the requests ahead of
it are decoded, which can take minutes on a CPU."""

Progress = Callable[[int, int, int], None]
"""``progress(prompts_done, prompts_total, records_kept)``."""


@dataclass
class OutputPaths:
    """The files of one output: records, journal, meta, stats, and the optional pairs and rejected files."""

    output: Path
    journal: Path
    meta: Path
    stats: Path
    pairs: Path | None = None
    rejected: Path | None = None

    @classmethod
    def of(cls, spec: GenerateSpec) -> OutputPaths:
        output = Path(spec.output).expanduser()
        return cls(
            output=output,
            journal=output.with_name(output.name + ".progress.jsonl"),
            meta=output.with_name(output.name + ".meta.json"),
            stats=output.with_name(output.name + ".stats.json"),
            pairs=Path(spec.pairs.output).expanduser() if spec.pairs is not None else None,
            rejected=Path(spec.rejected_output).expanduser() if spec.rejected_output is not None else None,
        )

    def record_files(self) -> dict[str, Path]:
        """The JSONL files holding per-prompt lines, by the journal count that must match them."""
        files = {"kept": self.output}
        if self.pairs is not None:
            files["pairs"] = self.pairs
        if self.rejected is not None:
            files["rejected"] = self.rejected
        return files


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did: the statistics (also in ``<output>.stats.json``) and the files."""

    stats: dict[str, Any]
    paths: OutputPaths
    wall_time_s: float
    samples_per_s: float
    generated_prompts: int
    skipped_prompts: int
    log: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ prompts


def load_items(spec: GenerateSpec) -> list[PromptItem]:
    """Every prompt of the spec's source, before ``limit``; references normalised like answers."""
    source = spec.source
    if source.task is not None:
        task = source.task
        items = arithmetic_items(task.count, task.seed, operations=task.operations, operand_range=task.operand_range,
                                 multiply_range=task.multiply_range, unique=task.unique)
    elif source.prompts is not None:
        prompts = source.prompts
        items = read_seed_prompts(prompts.files, field=prompts.field, reference_field=prompts.reference_field,
                                  id_field=prompts.id_field)
    else:
        assert source.documents is not None
        items = document_items(source.documents.files, chunk_chars=source.documents.chunk_chars,
                               overlap_chars=source.documents.overlap_chars)
    seen: dict[str, PromptItem] = {}
    for item in items:
        if item.id in seen:
            raise ValueError(f"source: two prompts have the id '{item.id}' ({seen[item.id].source} and {item.source}); "
                             "is a file listed twice?")
        seen[item.id] = item
    for item in items:
        if item.reference is None:
            continue
        normalized = normalize_answer(item.reference, spec.answer.normalize)
        if normalized is None:
            where = item.source.get("file", "source")
            line = f":{item.source['line']}" if "line" in item.source else ""
            raise ValueError(
                f"{where}{line}: prompt '{item.id}' has the reference {item.reference!r}, which is no "
                f"{'number' if spec.answer.normalize == 'number' else 'text'} (answer.normalize: {spec.answer.normalize})"
            )
        item.reference = normalized
    return items


def render_prompt(spec: GenerateSpec, item: PromptItem) -> str:
    """The user message of one prompt: ``prompt.template`` filled in."""
    if item.document is not None:
        assert spec.source.documents is not None
        return spec.template.format(document=item.document, count=spec.source.documents.questions_per_chunk)
    return spec.template.format(question=item.question)


def build_request(spec: GenerateSpec, item: PromptItem) -> dict[str, Any]:
    """The teacher request for one prompt: keyword arguments of ``TeacherClient.chat`` or ``complete``."""
    generation = spec.generation
    request: dict[str, Any] = {
        "n": generation.n, "temperature": generation.temperature, "top_p": generation.top_p,
        "max_tokens": generation.max_tokens,
    }
    if generation.stop is not None:
        request["stop"] = generation.stop
    seed = derive_seed(generation.seed, item.id)
    if seed is not None:
        request["seed"] = seed
    text = render_prompt(spec, item)
    shots = spec.prompt.shots
    if generation.chat:
        system = [{"role": "system", "content": spec.prompt.system}] if spec.prompt.system is not None else []
        turns = [
            message
            for shot in shots
            for message in ({"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant})
        ]
        request["messages"] = system + turns + [{"role": "user", "content": text}]
    else:
        request["prompt"] = "".join(f"{shot.user}\n{shot.assistant}\n\n" for shot in shots) + text
    return request


def public_url(url: str | None) -> str | None:
    """``url`` without user information, query or fragment (where keys may hide)."""
    if url is None:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# ------------------------------------------------------------------------------------------ fingerprint


def _items_digest(items: Sequence[PromptItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.id, item.question, item.reference, item.document], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def fingerprint_data(spec: GenerateSpec, items: Sequence[PromptItem]) -> dict[str, Any]:
    """What the output depends on: the spec without name, limit, output and connection settings, plus
    a digest of every prompt of the source."""
    data = spec.model_dump(mode="json", exclude={"name", "limit", "output"})
    for key in CONNECTION_FIELDS:
        data["teacher"].pop(key, None)
    if data["teacher"].get("serve"):
        for key in SERVE_RUNTIME_FIELDS:
            data["teacher"]["serve"].pop(key, None)
    for item in data["filters"]:
        if item.get("judge"):
            for key in CONNECTION_FIELDS:
                item["judge"].pop(key, None)
    if data["source"].get("task"):
        data["source"]["task"].pop("holdout", None)  # written apart; the generated records do not depend on it
    data["source_items"] = _items_digest(items)
    return data


def _fingerprint(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: value}


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key path that differs between two fingerprint data."""
    before, after = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<absent>") != after.get(key, "<absent>"):
            if key == "source_items":
                lines.append("source: the prompts read from the source differ (files or task settings changed)")
            else:
                old_value, new_value = before.get(key, "<absent>"), after.get(key, "<absent>")
                lines.append(f"{key}: {old_value!r} in the existing output, {new_value!r} now")
    return lines


# ------------------------------------------------------------------------------------------ files


def _split_lines(path: Path) -> tuple[list[bytes], bool]:
    """Complete lines of a file (with their newline) and whether a torn last line followed them."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    pieces = data.split(b"\n")
    torn = pieces[-1] != b""
    return [piece + b"\n" for piece in pieces[:-1] if piece.strip()], torn


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append lines and make them durable (flush + fsync) before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        if lines:
            handle.write("".join(lines).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _prompt_id_of(line: bytes) -> str | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record.get("prompt_id") if isinstance(record, dict) else None


@dataclass
class _ResumeState:
    entries: list[dict[str, Any]]
    done: set[str]
    dropped: dict[str, int]


def _restore(paths: OutputPaths, items: Sequence[PromptItem], chunk_size: int) -> _ResumeState:
    """Keep the journaled, complete and consistent prompts; rewrite files that hold anything else."""
    journal_lines, journal_torn = _split_lines(paths.journal)
    entries: dict[str, dict[str, Any]] = {}
    for line in journal_lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("prompt_id"), str):
            entries[entry["prompt_id"]] = entry
    contents = {kind: _split_lines(path) for kind, path in paths.record_files().items()}
    counts: dict[str, dict[str, int]] = {}
    for kind, (lines, _) in contents.items():
        for line in lines:
            prompt_id = _prompt_id_of(line)
            if prompt_id is not None:
                counts.setdefault(kind, {}).setdefault(prompt_id, 0)
                counts[kind][prompt_id] += 1
    consistent = {
        prompt_id for prompt_id, entry in entries.items()
        if all(counts.get(kind, {}).get(prompt_id, 0) == entry.get(kind, 0) for kind in contents)
    }
    done = set(consistent)
    for start in range(0, len(items), chunk_size):
        ids = [item.id for item in items[start : start + chunk_size]]
        if not all(prompt_id in consistent for prompt_id in ids):
            done.difference_update(ids)
    dropped: dict[str, int] = {}
    for kind, (lines, torn) in contents.items():
        kept = [line for line in lines if _prompt_id_of(line) in done]
        dropped[kind] = len(lines) - len(kept) + int(torn)
        if len(kept) != len(lines) or torn:
            atomic_write_bytes(paths.record_files()[kind], b"".join(kept))
    kept_journal = [line for line in journal_lines if _prompt_id_of(line) in done]
    if len(kept_journal) != len(journal_lines) or journal_torn:
        atomic_write_bytes(paths.journal, b"".join(kept_journal))
    ordered = [json.loads(line) for line in kept_journal]
    return _ResumeState(entries=ordered, done=done, dropped=dropped)


# ------------------------------------------------------------------------------------------ clients


def make_client(fields: EndpointFields, *, log: Callable[[str], None] | None = None) -> Any:
    """A ``distill.blackbox.client.TeacherClient`` for an endpoint section of the spec."""
    try:
        from distill.blackbox.client import EndpointSpec, TeacherClient
    except ImportError as error:
        raise ImportError(
            f"distill generate talks to teachers through distill.blackbox.client, which failed to import: {error}"
        ) from error
    kwargs = fields.endpoint_kwargs()
    known = getattr(EndpointSpec, "model_fields", None)
    if known is not None:
        kwargs = {key: value for key, value in kwargs.items() if key in known}
    return TeacherClient(EndpointSpec(**kwargs), log=log)


@contextlib.contextmanager
def served_teacher(serve: ServeSpec, log: Callable[[str], None] | None = None) -> Iterator[tuple[str, str]]:
    """Start ``distill serve`` in this process on 127.0.0.1 (a free port); yield its base URL and the
    served model's name; stop it afterwards."""
    try:
        from distill.serve import TeacherServer, load_served_model
    except ImportError as error:
        raise ImportError(f"teacher.serve needs distill.serve, which failed to import: {error}") from error
    model, tokenizer, name = load_served_model(serve.model, stage=serve.stage, device=serve.device)
    server = TeacherServer(model, tokenizer, name=name, host="127.0.0.1", port=0, max_batch_size=serve.max_batch_size)
    base_url = server.start()
    if log is not None:
        log(f"serving {name} at {base_url}")
    try:
        yield base_url, name
    finally:
        server.stop()


def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        close()


# ------------------------------------------------------------------------------------------ one chunk


@dataclass
class _ChunkResult:
    kept: list[str]
    pairs: list[str]
    rejected: list[str]
    journal: list[str]
    samples: int


class _Generator:
    """Runs chunks of prompts through the teacher and the filters and formats their lines."""

    def __init__(
        self, spec: GenerateSpec, client: TeacherLike, filters: list[Filter], teacher_info: dict[str, Any]
    ) -> None:
        self.spec, self.client, self.filters, self.teacher_info = spec, client, filters, teacher_info
        self.method = "chat" if spec.generation.chat else "complete"
        self.uses_vote = any(isinstance(f, SelfConsistencyFilter) for f in filters)

    def _samples(self, item: PromptItem, response: dict[str, Any]) -> list[Sample]:
        choices = response.get("choices")
        if not isinstance(choices, list):
            raise ValueError(f"prompt '{item.id}': the teacher's response has no 'choices': {str(response)[:200]}")
        choices = sorted(choices, key=lambda choice: choice.get("index", 0))
        samples: list[Sample] = []
        answer = self.spec.answer
        if item.document is not None:
            assert self.spec.source.documents is not None
            limit = self.spec.source.documents.questions_per_chunk
            for number, choice in enumerate(choices):
                for pair, (question, reply) in enumerate(parse_qa_pairs(choice_text(choice), limit)):
                    sample = Sample(f"{item.id}/{number}/{pair}", item.id, question, reply, answer=reply,
                                    document=item.document)
                    sample.cache["source"] = {**item.source, "sample": number, "pair": pair}
                    samples.append(sample)
            return samples
        prompt = render_prompt(self.spec, item)
        for number, choice in enumerate(choices):
            completion = choice_text(choice).strip()
            sample = Sample(
                f"{item.id}/{number}", item.id, prompt, completion,
                answer=extract_answer(completion, answer.pattern, answer.normalize), reference=item.reference,
                system=self.spec.prompt.system,
            )
            sample.cache["source"] = {**item.source, "sample": number}
            samples.append(sample)
        return samples

    def _record(self, sample: Sample, seed: int | None, rejected: bool = False) -> dict[str, Any]:
        generation = self.spec.generation
        record: dict[str, Any] = {"id": sample.id, "prompt_id": sample.prompt_id}
        if sample.system is not None:
            record["system"] = sample.system
        record.update({
            "prompt": sample.prompt,
            "completion": sample.completion,
            "answer": sample.answer,
            "reference": sample.reference,
            "correct": None if sample.reference is None else sample.answer == sample.reference,
            "teacher": self.teacher_info,
            "sampling": {"n": generation.n, "temperature": generation.temperature, "top_p": generation.top_p,
                         "max_tokens": generation.max_tokens, "seed": seed},
            "scores": dict(sample.scores),
            "source": sample.cache["source"],
        })
        if rejected:
            record["rejected_by"] = sample.rejected_by
        return record

    def _pairs(self, item: PromptItem, samples: list[Sample]) -> list[dict[str, Any]]:
        """Kept right-answer samples against wrong-answer samples of the same prompt."""
        pairs_spec = self.spec.pairs
        assert pairs_spec is not None
        if item.reference is not None:
            target = item.reference
        elif self.uses_vote:
            target = majority_vote([s.answer for s in samples])[0]
        else:
            return []
        if target is None:
            return []
        chosen = [s for s in samples if s.alive and s.answer == target]
        rejected: list[Sample] = []
        seen: set[str] = set()
        for sample in samples:
            wrong = sample.answer != target if sample.answer is not None else pairs_spec.unanswered_as_rejected
            key = normalize_for_dedup(sample.completion)
            if wrong and sample.completion and key not in seen:
                seen.add(key)
                rejected.append(sample)
        if not chosen or not rejected:
            return []
        count = min(pairs_spec.max_per_prompt, max(len(chosen), len(rejected)))
        pairs = []
        for index in range(count):
            good, bad = chosen[index % len(chosen)], rejected[index % len(rejected)]
            pair: dict[str, Any] = {"prompt_id": item.id}
            if good.system is not None:
                pair["system"] = good.system
            pair.update({"prompt": good.prompt, "chosen": good.completion, "rejected": bad.completion,
                         "chosen_id": good.id, "rejected_id": bad.id, "reference": target})
            pairs.append(pair)
        return pairs

    def run(self, chunk: Sequence[PromptItem]) -> _ChunkResult:
        requests = [build_request(self.spec, item) for item in chunk]
        responses = self.client.map(self.method, requests)
        if len(responses) != len(chunk):
            raise ValueError(f"the teacher returned {len(responses)} responses for {len(chunk)} requests")
        if self.teacher_info.get("model") is None:
            model = next((r.get("model") for r in responses if isinstance(r, dict) and r.get("model")), None)
            self.teacher_info = {**self.teacher_info, "model": model}
        by_prompt = {item.id: self._samples(item, response) for item, response in zip(chunk, responses)}
        samples = [sample for item in chunk for sample in by_prompt[item.id]]
        flow: dict[str, dict[str, list[int]]] = {item.id: {} for item in chunk}
        for filter_ in self.filters:
            alive = [sample for sample in samples if sample.alive]
            verdicts = filter_.evaluate(alive, samples)
            if len(verdicts) != len(alive):
                raise RuntimeError(f"filter '{filter_.label}' gave {len(verdicts)} verdicts for {len(alive)} samples")
            for item in chunk:
                flow[item.id][filter_.label] = [0, 0]
            for sample, (score, passed) in zip(alive, verdicts):
                sample.scores[filter_.label] = score
                counts = flow[sample.prompt_id][filter_.label]
                counts[0] += 1
                if passed:
                    counts[1] += 1
                else:
                    sample.rejected_by = filter_.label
        kept_samples = [sample for sample in samples if sample.alive]
        for filter_ in self.filters:
            filter_.commit(kept_samples)
        result = _ChunkResult([], [], [], [], len(samples))
        for item, request, response in zip(chunk, requests, responses):
            own = by_prompt[item.id]
            seed = request.get("seed")
            kept = [self._record(s, seed) for s in own if s.alive]
            result.kept.extend(_json_line(r) for r in kept)
            entry: dict[str, Any] = {
                "prompt_id": item.id, "responses": len(response.get("choices") or []), "samples": len(own),
                "answered": sum(s.answer is not None for s in own), "kept": len(kept),
            }
            if self.spec.pairs is not None:
                pairs = self._pairs(item, own)
                result.pairs.extend(_json_line(p) for p in pairs)
                entry["pairs"] = len(pairs)
            if self.spec.rejected_output is not None:
                rejected = [self._record(s, seed, rejected=True) for s in own if not s.alive]
                result.rejected.extend(_json_line(r) for r in rejected)
                entry["rejected"] = len(rejected)
            entry["filters"] = flow[item.id]
            result.journal.append(_json_line(entry))
        return result


# ------------------------------------------------------------------------------------------ statistics


def summarize(
    spec: GenerateSpec, entries: Sequence[dict[str, Any]], total_prompts: int, done_prompts: int
) -> dict[str, Any]:
    """Filter yield over journal entries: samples in and out of every filter, and overall.

    ``prompts`` counts the source's prompts (``total``, after ``limit``), those of them finished
    (``done``) and the prompts whose records the output holds (``in_output``: more than ``done``
    after a run with a higher ``limit``).
    """
    samples = sum(e.get("samples", 0) for e in entries)
    kept = sum(e.get("kept", 0) for e in entries)
    rows = []
    for filter_spec in spec.filters:
        label = filter_spec.label
        passed_in = sum(e.get("filters", {}).get(label, [0, 0])[0] for e in entries)
        passed_out = sum(e.get("filters", {}).get(label, [0, 0])[1] for e in entries)
        rows.append({
            "name": label, "type": filter_spec.type, "in": passed_in, "out": passed_out,
            "dropped": passed_in - passed_out, "yield": round(passed_out / passed_in, 6) if passed_in else None,
        })
    stats: dict[str, Any] = {
        "name": spec.name,
        "prompts": {"total": total_prompts, "done": done_prompts, "in_output": len(entries)},
        "responses": sum(e.get("responses", 0) for e in entries),
        "samples": samples,
        "answered": sum(e.get("answered", 0) for e in entries),
        "kept": kept,
        "yield": round(kept / samples, 6) if samples else None,
        "filters": rows,
    }
    if spec.pairs is not None:
        stats["pairs"] = sum(e.get("pairs", 0) for e in entries)
    if spec.rejected_output is not None:
        stats["rejected"] = sum(e.get("rejected", 0) for e in entries)
    return stats


# ------------------------------------------------------------------------------------------ the run


def _teacher_info(spec: GenerateSpec) -> dict[str, Any]:
    """The ``teacher`` field of the records: model and base URL (no secrets), or the served model."""
    teacher = spec.teacher
    info: dict[str, Any] = {"model": teacher.model or (teacher.serve.model if teacher.serve else None),
                            "base_url": public_url(teacher.base_url)}
    if teacher.serve is not None:
        info["serve"] = {"model": teacher.serve.model, "stage": teacher.serve.stage}
    return info


def _prepare_output(paths: OutputPaths, fingerprint: dict[str, Any], overwrite: bool) -> None:
    files = [paths.output, paths.journal, paths.meta, paths.stats, *paths.record_files().values()]
    if overwrite:
        for path in files:
            path.unlink(missing_ok=True)
    elif paths.meta.exists():
        try:
            stored = json.loads(paths.meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise GenerateSpecError([f"{paths.meta} is not valid JSON ({error}); pass overwrite to start over"]) from None
        if stored.get("fingerprint") != _fingerprint(fingerprint):
            differences = fingerprint_differences(stored.get("spec", {}), fingerprint) or ["the fingerprints differ"]
            raise GenerateSpecError(
                [f"{paths.output} was generated with another spec ({paths.meta}): {line}" for line in differences]
                + ["start over with overwrite (distill generate --overwrite), or write to another output"]
            )
    else:
        existing = [str(path) for path in (paths.output, paths.journal, *paths.record_files().values()) if path.exists()]
        if existing:
            raise GenerateSpecError(
                [f"{', '.join(existing)} exist(s) without {paths.meta.name}, so it is not known what made them; "
                 "pass overwrite (distill generate --overwrite) to replace them"]
            )
    if not paths.meta.exists():
        meta = {"version": META_VERSION, "fingerprint": _fingerprint(fingerprint), "spec": fingerprint}
        atomic_write_json(paths.meta, meta)


def run_pipeline(
    spec: GenerateSpec,
    *,
    client: TeacherLike | None = None,
    judge_client: TeacherLike | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> PipelineResult:
    """Generate, filter and write the spec's data set; resume an interrupted run of the same spec.

    ``client`` is any object with ``map(method, requests, progress=None)`` (a
    ``distill.blackbox.client.TeacherClient``, or a fake in tests); without one, a client is built
    from ``spec.teacher`` (starting ``distill serve`` in this process for ``teacher.serve``). A
    critic with its own ``judge`` endpoint uses ``judge_client`` (built from the spec when absent);
    otherwise the critic asks the teacher. ``progress(done, total, kept)`` is called at the start and
    after every chunk; ``log(text)`` receives messages about resuming. Raises
    :class:`~distill.synth.spec.GenerateSpecError` when the output exists from another spec and
    ``overwrite`` is false.
    """
    started = time.perf_counter()
    messages: list[str] = []

    def say(text: str) -> None:
        messages.append(text)
        if log is not None:
            log(text)

    paths = OutputPaths.of(spec)
    all_items = load_items(spec)
    items = all_items[: spec.limit] if spec.limit is not None else all_items
    _prepare_output(paths, fingerprint_data(spec, all_items), overwrite)
    task = spec.source.task
    if task is not None and task.holdout is not None:
        # gold problems no prompt of the run asks (a test split for the student); deterministic
        holdout = write_arithmetic_chat_jsonl(
            task.holdout.output, task.holdout.count, task.holdout.seed, template=spec.prompt.resolved("task"),
            system=spec.prompt.system, exclude=[item.question for item in all_items if item.question],
            operations=task.operations, operand_range=task.operand_range, multiply_range=task.multiply_range,
        )
        say(f"held-out problems: {len(holdout)} written to {task.holdout.output}")
    state = _restore(paths, items, spec.chunk_prompts)
    dropped = {kind: count for kind, count in state.dropped.items() if count}
    if state.entries:
        lost = ", ".join(f"{kind}: {count}" for kind, count in dropped.items())
        say(f"resuming {paths.output}: {len(state.done)} prompts already done"
            + (f"; dropped the lines of unfinished prompts ({lost})" if dropped else ""))
    chunks = [items[start : start + spec.chunk_prompts] for start in range(0, len(items), spec.chunk_prompts)]
    pending = [chunk for chunk in chunks if not all(item.id in state.done for item in chunk)]
    done_now = sum(1 for item in items if item.id in state.done)
    kept_total = sum(e.get("kept", 0) for e in state.entries)
    if progress is not None:
        progress(done_now, len(items), kept_total)
    entries = list(state.entries)
    generated = samples_now = 0
    if pending:
        with contextlib.ExitStack() as stack:
            info = _teacher_info(spec)
            if client is None:
                fields: EndpointFields = spec.teacher
                if spec.teacher.serve is not None:
                    base_url, served_name = stack.enter_context(served_teacher(spec.teacher.serve, say))
                    fields = spec.teacher.model_copy(update={
                        "base_url": base_url, "model": spec.teacher.model or served_name,
                        "timeout_s": spec.teacher.timeout_s or SERVE_TIMEOUT_S,
                    })
                    info["model"] = fields.model
                client = make_client(fields, log=log)
                stack.callback(_close, client)
            filters: list[Filter] = []
            judges: dict[str, Any] = {}
            for filter_spec in spec.filters:
                judge: Any = client
                endpoint = getattr(filter_spec, "judge", None)
                if endpoint is not None:
                    judge = judge_client
                    if judge is None:
                        key = endpoint.model_dump_json()
                        if key not in judges:
                            judges[key] = make_client(endpoint, log=log)
                            stack.callback(_close, judges[key])
                        judge = judges[key]
                filters.append(
                    build_filter(filter_spec, judge=judge, chat=spec.generation.chat, seed=spec.generation.seed)
                )
            for record in read_jsonl(paths.output):
                for filter_ in filters:
                    filter_.remember(record)
            generator = _Generator(spec, client, filters, info)
            for chunk in pending:
                result = generator.run(chunk)
                _append_lines(paths.output, result.kept)
                if paths.pairs is not None:
                    _append_lines(paths.pairs, result.pairs)
                if paths.rejected is not None:
                    _append_lines(paths.rejected, result.rejected)
                _append_lines(paths.journal, result.journal)
                entries.extend(json.loads(line) for line in result.journal)
                generated += len(chunk)
                samples_now += result.samples
                done_now += len(chunk)
                kept_total += len(result.kept)
                if progress is not None:
                    progress(done_now, len(items), kept_total)
    wall = time.perf_counter() - started
    stats = summarize(spec, entries, len(items), done_now)
    stats.update({
        "output": str(paths.output),
        "pairs_output": None if paths.pairs is None else str(paths.pairs),
        "rejected_output": None if paths.rejected is None else str(paths.rejected),
        "generated_prompts": generated,
        "skipped_prompts": len(items) - generated,
        "wall_time_s": round(wall, 3),
        "samples_per_s": round(samples_now / wall, 3) if wall > 0 else None,
    })
    atomic_write_json(paths.stats, stats)
    return PipelineResult(
        stats=stats, paths=paths, wall_time_s=wall, samples_per_s=samples_now / wall if wall > 0 else 0.0,
        generated_prompts=generated, skipped_prompts=len(items) - generated, log=messages,
    )


# ------------------------------------------------------------------------------------------ command line


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``distill generate SPEC.yaml [--set K=V] [--overwrite] [--limit N] [--no-progress]``."""
    parser = subparsers.add_parser(
        "generate", help="overgenerate from a teacher and filter: a synthetic data set as JSONL (resumable)"
    )
    parser.add_argument("spec", help="generate spec YAML file (see docs/generate.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value, e.g. --set generation.n=8 --set source.task.count=50")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over, replacing an output made with another spec (default: refuse; same spec: continue)")
    parser.add_argument(
        "--limit", type=int, metavar="N", help="generate for the first N prompts only (a later run may raise it)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def yield_table(stats: dict[str, Any]) -> Any:
    """A rich table of the filter yield: samples in and out of every filter, and overall."""
    from rich.table import Table

    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    prompts = stats["prompts"]
    table = Table(title=f"Filter yield of {stats['name']} ({prompts['done']} of {prompts['total']} prompts)")
    for column in ("filter", "type", "in", "out", "dropped", "yield"):
        table.add_column(column, justify="left" if column in ("filter", "type") else "right")
    table.add_row("generated", "-", "-", f"{stats['samples']:,}", "-", "-")
    for row in stats["filters"]:
        table.add_row(
            row["name"], row["type"], f"{row['in']:,}", f"{row['out']:,}", f"{row['dropped']:,}", share(row["yield"])
        )
    table.add_row("[bold]overall[/bold]", "", f"{stats['samples']:,}", f"{stats['kept']:,}",
                  f"{stats['samples'] - stats['kept']:,}", share(stats["yield"]))
    return table


def _teacher_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed teacher request (a connection error or the client's API error)."""
    if isinstance(error, OSError):
        return True
    try:
        from distill.blackbox.client import TeacherAPIError
    except ImportError:
        return False
    return isinstance(error, TeacherAPIError)


def command_generate(args: argparse.Namespace, console: Any) -> int:
    """Run ``distill generate``; returns the exit status (1 when the teacher fails, 130 when
    interrupted: in both cases rerunning the same command continues)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    overrides = list(getattr(args, "overrides", []) or [])
    if args.limit is not None:
        overrides.append(f"limit={args.limit}")
    spec = load_generate_spec(args.spec, overrides)
    console.print(f"[bold]{spec.name}[/bold]: writing [cyan]{spec.output}[/cyan]")
    show_bar = not args.no_progress and console.is_terminal
    bar = Progress(
        TextColumn("[bold blue]generate"), BarColumn(), MofNCompleteColumn(),
        TextColumn("prompts, {task.fields[kept]} kept"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not show_bar,
    )
    task = bar.add_task("generate", total=None, kept=0)

    def advance(done: int, total: int, kept: int) -> None:
        bar.update(task, completed=done, total=total, kept=f"{kept:,}")

    try:
        with bar:
            result = run_pipeline(spec, progress=advance, log=console.print, overwrite=args.overwrite)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to continue where it stopped")
        return 130
    except Exception as error:
        if getattr(args, "debug", False) or not _teacher_failure(error):
            raise
        console.print(f"[red]error:[/red] the teacher failed: {escape(str(error))}\n"
                      "the finished prompts are kept; rerun the same command to continue", highlight=False)
        return 1
    out = Console(width=max(Console().width, 120))
    out.print(yield_table(result.stats))
    stats = result.stats
    out.print(f"{stats['kept']:,} records in [bold]{result.paths.output}[/bold] "
              f"({result.samples_per_s:.1f} samples/s over {result.wall_time_s:.1f} s)")
    if result.paths.pairs is not None:
        out.print(f"{stats.get('pairs', 0):,} preference pairs in [bold]{result.paths.pairs}[/bold]")
    if result.paths.rejected is not None:
        out.print(f"{stats.get('rejected', 0):,} rejected samples in [bold]{result.paths.rejected}[/bold]")
    out.print(f"statistics: [bold]{result.paths.stats}[/bold]")
    return 0

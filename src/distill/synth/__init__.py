"""Synthetic data from a teacher: overgenerate, filter, write a resumable JSONL data set (``distill generate``).

* :mod:`distill.synth.spec`: the YAML schema and :func:`load_generate_spec`;
* :mod:`distill.synth.sources`: prompts (the built-in ``arithmetic`` task, seed prompts, documents);
* :mod:`distill.answers` (shared with the rewards): final-answer extraction and normalisation;
* :mod:`distill.synth.filters`: length, format, exact and near dedup, self-consistency, correct,
  critic and grounded filters;
* :mod:`distill.synth.pipeline`: :func:`run_pipeline` and the command line.

See docs/generate.md.
"""

from distill.answers import (
    DEFAULT_PATTERN,
    answers_match,
    extract_answer,
    normalize_answer,
)
from distill.synth.pipeline import PipelineResult, run_pipeline
from distill.synth.sources import (
    arithmetic_problems,
    chunk_document,
    parse_qa_pairs,
    write_arithmetic_chat_jsonl,
)
from distill.synth.spec import GenerateSpec, GenerateSpecError, load_generate_spec

__all__ = [
    "DEFAULT_PATTERN",
    "GenerateSpec",
    "GenerateSpecError",
    "PipelineResult",
    "answers_match",
    "arithmetic_problems",
    "chunk_document",
    "extract_answer",
    "load_generate_spec",
    "normalize_answer",
    "parse_qa_pairs",
    "run_pipeline",
    "write_arithmetic_chat_jsonl",
]

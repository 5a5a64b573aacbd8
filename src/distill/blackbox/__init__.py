"""Black-box teachers: any model behind an OpenAI-compatible HTTP endpoint.

    from distill.blackbox import TeacherClient, choice_texts
    client = TeacherClient.from_url("http://127.0.0.1:8000/v1", cache_dir="teacher-cache")
    responses = client.map("complete", [{"prompt": p, "max_tokens": 32} for p in prompts])
    texts = [choice_texts(response)[0] for response in responses]

docs/blackbox.md describes retries, the response cache and the key handling.
"""

from __future__ import annotations

from distill.blackbox.client import (
    ClientStats,
    EndpointSpec,
    TeacherAPIError,
    TeacherClient,
    choice_logprobs,
    choice_texts,
    finish_reasons,
)
from distill.blackbox.response_cache import ResponseCache, cache_key

__all__ = [
    "ClientStats",
    "EndpointSpec",
    "ResponseCache",
    "TeacherAPIError",
    "TeacherClient",
    "cache_key",
    "choice_logprobs",
    "choice_texts",
    "finish_reasons",
]

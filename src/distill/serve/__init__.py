"""``distill serve``: an OpenAI-compatible HTTP server for any causal language model distill loads.

See :mod:`distill.serve.server` (the server), :mod:`distill.serve.engine` (batched decoding),
:mod:`distill.serve.protocol` (request and response shapes), :mod:`distill.serve.loading` (which
model is served) and :mod:`distill.serve.cli` (the command). Importing this package does not import
torch; the names below load their modules on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TeacherServer",
    "load_served_model",
    "add_serve_parser",
    "command_serve",
    "decode_batch",
    "Row",
    "SamplingParams",
]

_HOMES = {
    "TeacherServer": "distill.serve.server",
    "load_served_model": "distill.serve.loading",
    "add_serve_parser": "distill.serve.cli",
    "command_serve": "distill.serve.cli",
    "decode_batch": "distill.serve.engine",
    "Row": "distill.serve.engine",
    "SamplingParams": "distill.serve.engine",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'distill.serve' has no attribute '{name}'")

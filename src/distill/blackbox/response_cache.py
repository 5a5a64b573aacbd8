"""A content-addressed, on-disk cache of black-box teacher responses.

One file per response, ``<folder>/<first 2 hex digits>/<sha256>.json``, where the sha256 is taken
over the canonical JSON (sorted keys, no whitespace, ASCII) of the request's *key material*:
the endpoint path relative to the base URL (``/completions``, ``/chat/completions``), the full
request body (which holds the model name) and an optional salt. The host, port and base path are
left out on purpose, so a cache survives a server that moves to another port or machine; the
model name is what identifies the teacher. The API key is never part of a request body and so
never reaches the cache.

A file holds the key material and the response. It is written through a uniquely named temporary
file, fsynced and renamed into place, so readers see a whole file or none and concurrent writers
of the same entry do not interleave. When read, the stored key material is re-hashed: it must give
the request's key (so it is the request's own, and not a file copied or written elsewhere); a file that is unreadable, not JSON, of another format or for another request is
a miss: it is reported through ``log`` and overwritten by the next :meth:`ResponseCache.put`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.io import fsync_dir

FORMAT = "distill.blackbox.response/1"


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no whitespace, ASCII only, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def key_material(path: str, body: dict[str, Any], salt: str | None = None) -> dict[str, Any]:
    """What a cache key is computed over: endpoint path, request body and (when given) a salt."""
    material: dict[str, Any] = {"path": path, "request": body}
    if salt is not None:
        material["salt"] = salt
    return material


def cache_key(path: str, body: dict[str, Any], salt: str | None = None) -> str:
    """sha256 (hex) of the canonical JSON of :func:`key_material`."""
    return hashlib.sha256(canonical_json(key_material(path, body, salt)).encode("ascii")).hexdigest()


class ResponseCache:
    """Responses of a black-box teacher stored one file per request under ``folder``.

    ``log`` receives one line for every entry found damaged (and then treated as a miss).
    Safe to share between threads and processes: reads never see partial files and writes of the
    same entry replace each other whole.
    """

    def __init__(self, folder: str | Path, *, log: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self._log = log

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.folder)!r})"

    def file(self, key: str) -> Path:
        """Where the entry of ``key`` lives."""
        return self.folder / key[:2] / f"{key}.json"

    def get(self, path: str, body: dict[str, Any], salt: str | None = None) -> dict[str, Any] | None:
        """The stored response of this request, or ``None`` (absent or damaged: see the class)."""
        key = cache_key(path, body, salt)
        file = self.file(key)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._report(file, f"cannot be read ({error.strerror or error})")
            return None
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._report(file, f"is not valid JSON ({error})")
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            self._report(file, f"is not a {FORMAT} record")
            return None
        stored = record.get("key")
        response = record.get("response")
        if not isinstance(stored, dict) or not isinstance(response, dict):
            self._report(file, "lacks its request or response")
            return None
        try:
            stored_text = canonical_json(stored)
        except (TypeError, ValueError):
            self._report(file, "holds a request that is not canonical JSON")
            return None
        if hashlib.sha256(stored_text.encode("ascii")).hexdigest() != key:  # it is this request's entry iff this holds
            self._report(file, "holds the response of another request")
            return None
        return response

    def put(self, path: str, body: dict[str, Any], response: dict[str, Any], salt: str | None = None) -> Path:
        """Store ``response`` for this request (atomically; replaces a damaged entry) and return its file."""
        key = cache_key(path, body, salt)
        file = self.file(key)
        record = {"format": FORMAT, "sha256": key, "key": key_material(path, body, salt), "response": response}
        data = (json.dumps(record, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=file.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        fsync_dir(file.parent)
        return file

    def _report(self, file: Path, problem: str) -> None:
        if self._log is not None:
            self._log(f"response cache: {file} {problem}; treated as a miss and fetched again")

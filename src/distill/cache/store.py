"""Sharded, resumable, verified row stores: what teacher caches and data-selection scores are made of.

A store is a folder::

    manifest.json        kind, meta (what the rows were computed from), record size, row count,
                         one entry per finished shard (its rows, byte size and sha256), complete flag
    shard-00000.bin      rows [0, shard_rows)
    shard-00001.bin      ...

Every row holds any number (zero included) of fixed-size binary records. A shard file is::

    8 bytes   magic  b"DSTSHRD1"
    3 x u64   rows, records, record_bytes (little endian)
    i64[rows + 1]        record offsets of the rows inside the shard
    u8[records, record_bytes]

Writing is resumable and atomic per shard: a shard is written to a temporary file, fsynced and
renamed, then the manifest (rewritten atomically) lists it with its checksum. A writer killed at
any point leaves only whole shards that the manifest lists (and perhaps one whole shard it does
not list yet, which is checked and adopted, or a temporary file, which is deleted); started again
with the same settings it computes the missing shards only. A store is usable once its manifest
says ``complete``. Reads memory-map the shards; :meth:`ShardedReader.verify` re-hashes them all.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.io import atomic_write_json, fsync_dir, sha256_file

MANIFEST = "manifest.json"
FORMAT = "distill-sharded-store/1"
MAGIC = b"DSTSHRD1"
_HEADER = struct.Struct("<8sQQQ")


class StoreError(ValueError):
    """A store that cannot be used as asked: missing, incomplete, damaged, or made from other inputs."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def _shard_bytes(counts: np.ndarray, records: np.ndarray, record_bytes: int) -> list[bytes]:
    offsets = np.zeros(len(counts) + 1, dtype="<i8")
    np.cumsum(counts, out=offsets[1:])
    header = _HEADER.pack(MAGIC, len(counts), int(offsets[-1]), record_bytes)
    return [header, offsets.tobytes(), np.ascontiguousarray(records, dtype=np.uint8).tobytes()]


@dataclass
class Shard:
    """One shard file, memory-mapped: ``offsets`` and ``records`` are views into the file."""

    path: Path
    offsets: np.ndarray
    records: np.ndarray

    @classmethod
    def open(cls, path: Path, expect_rows: int, record_bytes: int) -> Shard:
        size = path.stat().st_size if path.exists() else -1
        if size < _HEADER.size:
            raise StoreError(f"{path}: {'missing' if size < 0 else 'truncated'} (a shard holds at least {_HEADER.size} bytes)")
        with open(path, "rb") as handle:
            magic, rows, records, width = _HEADER.unpack(handle.read(_HEADER.size))
        if magic != MAGIC:
            raise StoreError(f"{path}: not a shard of a distill store (bad magic {magic!r})")
        if rows != expect_rows or width != record_bytes:
            raise StoreError(
                f"{path}: holds {rows} rows of {width}-byte records, the manifest says {expect_rows} rows of {record_bytes}"
            )
        expected_size = _HEADER.size + 8 * (rows + 1) + records * width
        if size != expected_size:
            raise StoreError(f"{path}: {size} bytes, its header needs {expected_size} (truncated or damaged file)")
        offsets = np.memmap(path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(rows + 1,))
        body = (
            np.memmap(path, dtype=np.uint8, mode="r", offset=_HEADER.size + 8 * (rows + 1), shape=(records, width))
            if records and width
            else np.zeros((records, width), dtype=np.uint8)
        )
        if offsets[0] != 0 or offsets[-1] != records or np.any(np.diff(offsets) < 0):
            raise StoreError(f"{path}: its row offsets are inconsistent (damaged file)")
        return cls(path, offsets, body)


class ShardedWriter:
    """Write (or finish writing) a store of ``num_rows`` rows, ``shard_rows`` rows per shard.

    ``meta`` identifies what the rows are computed from (model, data, settings). An existing
    store at ``path`` is continued only when its kind, meta, row count, shard size and record size
    are all the same; otherwise a :class:`StoreError` names the first field that differs (use a
    new folder, or delete the old one). Typical use::

        writer = ShardedWriter(path, "scores", meta, num_rows=len(data), shard_rows=256, record_bytes=12)
        for index, start, end in writer.pending():
            writer.write_shard(index, [records_of(row) for row in range(start, end)])
        writer.finish()
    """

    def __init__(
        self, path: str | Path, kind: str, meta: dict[str, Any], *, num_rows: int, shard_rows: int, record_bytes: int
    ) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
        self.path = Path(path)
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "kind": kind,
            "meta": json.loads(json.dumps(meta, sort_keys=True)),
            "rows": int(num_rows),
            "shard_rows": int(shard_rows),
            "record_bytes": int(record_bytes),
            "shards": [],
            "complete": False,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        existing = self.path / MANIFEST
        if existing.exists():
            old = _read_manifest(self.path)
            for key in ("format", "kind", "rows", "shard_rows", "record_bytes", "meta"):
                if old.get(key) != self.manifest[key]:
                    field = key
                    if key == "meta":
                        field = "meta." + next(k for k in sorted(set(old["meta"]) | set(self.manifest["meta"]))
                                               if old["meta"].get(k) != self.manifest["meta"].get(k))
                    raise StoreError(
                        f"{self.path} holds a store made with other settings ({field} differs: "
                        f"{_short(_get(old, field))} there, {_short(_get(self.manifest, field))} now); "
                        "write to a new folder or delete the old one"
                    )
            self.manifest["shards"] = [s for s in old["shards"] if self._shard_ok(s)]
            for entry in old["shards"]:
                if entry not in self.manifest["shards"]:  # damaged: computed again
                    (self.path / entry["file"]).unlink(missing_ok=True)
            self.manifest["complete"] = old.get("complete", False) and len(self.manifest["shards"]) == len(old["shards"])
        # A shard renamed into place whose manifest entry was not written yet (killed in between).
        listed = {s["file"] for s in self.manifest["shards"]}
        for index, start, end in self._all_shards():
            name = shard_name(index)
            if name not in listed and (self.path / name).exists():
                try:
                    shard = Shard.open(self.path / name, end - start, record_bytes)
                    self._add_entry(index, start, end, int(shard.offsets[-1]))
                except StoreError:
                    (self.path / name).unlink()
        self._save()

    @property
    def num_shards(self) -> int:
        return -(-self.manifest["rows"] // self.manifest["shard_rows"])

    def _all_shards(self) -> Iterator[tuple[int, int, int]]:
        rows, size = self.manifest["rows"], self.manifest["shard_rows"]
        for index in range(self.num_shards):
            yield index, index * size, min(rows, (index + 1) * size)

    def _shard_ok(self, entry: dict[str, Any]) -> bool:
        path = self.path / entry["file"]
        return path.exists() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]

    def pending(self) -> list[tuple[int, int, int]]:
        """``(shard index, first row, end row)`` of every shard still to write."""
        done = {s["index"] for s in self.manifest["shards"]}
        return [shard for shard in self._all_shards() if shard[0] not in done]

    @property
    def done_rows(self) -> int:
        return sum(s["rows"][1] - s["rows"][0] for s in self.manifest["shards"])

    def write_shard(self, index: int, rows: list[np.ndarray]) -> None:
        """Write shard ``index`` from one ``[n_i, record_bytes]`` uint8 array per row, atomically."""
        _, start, end = list(self._all_shards())[index]
        width = self.manifest["record_bytes"]
        if len(rows) != end - start:
            raise ValueError(f"shard {index} holds rows {start}..{end - 1} ({end - start} rows), got {len(rows)}")
        for i, row in enumerate(rows):
            if row.dtype != np.uint8 or row.ndim != 2 or row.shape[1] != width:
                raise ValueError(f"row {start + i}: records must be uint8 [n, {width}], got {row.dtype} {row.shape}")
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        body = np.concatenate(rows) if rows else np.zeros((0, width), np.uint8)
        target = self.path / shard_name(index)
        temporary = self.path / f".{target.name}.tmp-{os.getpid()}"
        with open(temporary, "wb") as handle:
            handle.writelines(_shard_bytes(counts, body, width))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        fsync_dir(self.path)
        self._add_entry(index, start, end, len(body))
        self._save()

    def _add_entry(self, index: int, start: int, end: int, records: int) -> None:
        path = self.path / shard_name(index)
        entry = {
            "index": index, "file": path.name, "rows": [start, end], "records": records,
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
        }
        self.manifest["shards"] = sorted([s for s in self.manifest["shards"] if s["index"] != index] + [entry], key=lambda s: s["index"])

    @property
    def stats(self) -> dict[str, int]:
        """Records and bytes of the shards written so far (from the manifest, no file read)."""
        shards = self.manifest["shards"]
        return {"records": sum(s["records"] for s in shards), "bytes": sum(s["bytes"] for s in shards)}

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Mark the store complete (every shard written); ``extra`` keys go into the manifest."""
        missing = self.pending()
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} shard(s) not written yet (first: rows {missing[0][1]}..{missing[0][2] - 1})")
        self.manifest.update(extra)
        self.manifest["complete"] = True
        self._save()
        return self.manifest

    def _save(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)


def _get(manifest: dict[str, Any], field: str) -> Any:
    if field.startswith("meta."):
        return manifest["meta"].get(field[5:])
    return manifest.get(field)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.exists():
        raise StoreError(f"{path}: no {MANIFEST} (not a distill store, or its writing never started)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file}: not a manifest of format {FORMAT}")
    for key in ("kind", "meta", "rows", "shard_rows", "record_bytes", "shards"):
        if key not in manifest:
            raise StoreError(f"{file}: the key '{key}' is missing")
    return manifest


class ShardedReader:
    """Read a complete store, memory-mapped.

    Opening checks the manifest, that every shard is present with the size and header the
    manifest and the shard describe (cheap); ``verify()`` also re-hashes every shard (reads all
    bytes). ``check_meta({...})`` refuses a store made from other inputs, naming the field.
    """

    def __init__(self, path: str | Path, kind: str | None = None, verify: bool = False) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if kind is not None and self.manifest["kind"] != kind:
            raise StoreError(f"{self.path}: a store of kind '{self.manifest['kind']}', not '{kind}'")
        if not self.manifest.get("complete"):
            raise StoreError(
                f"{self.path}: incomplete ({len(self.manifest['shards'])} shards written); run the command that writes it again to finish"
            )
        self.rows = int(self.manifest["rows"])
        self.shard_rows = int(self.manifest["shard_rows"])
        self.record_bytes = int(self.manifest["record_bytes"])
        entries = {s["index"]: s for s in self.manifest["shards"]}
        count = -(-self.rows // self.shard_rows)
        if sorted(entries) != list(range(count)):
            raise StoreError(f"{self.path}: the manifest lists shards {sorted(entries)}, expected 0..{count - 1}")
        self.entries = [entries[i] for i in range(count)]
        self.shards: list[Shard] = []
        for entry in self.entries:
            start, end = entry["rows"]
            path = self.path / entry["file"]
            if path.exists() and path.stat().st_size != entry["bytes"]:
                raise StoreError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
            self.shards.append(Shard.open(path, end - start, self.record_bytes))
        if verify:
            problems = self.verify()
            if problems:
                raise StoreError("; ".join(problems))

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    def verify(self) -> list[str]:
        """Re-hash every shard against the manifest; the problems found (empty when all is well)."""
        problems = []
        for entry in self.entries:
            path = self.path / entry["file"]
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                problems.append(f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest {entry['sha256'][:12]}...): the file was changed or damaged")
        return problems

    def check_meta(self, expected: dict[str, Any], what: str = "") -> None:
        """Raise :class:`StoreError` naming every meta field that differs from ``expected``."""
        differing = [key for key in expected if self.meta.get(key) != json.loads(json.dumps(expected[key], sort_keys=True))]
        if differing:
            details = "; ".join(f"{key}: {_short(self.meta.get(key))} in the store, {_short(expected[key])} {what or 'now'}" for key in differing)
            raise StoreError(f"{self.path} was made from other inputs ({details})")

    def counts(self, rows: np.ndarray) -> np.ndarray:
        """How many records each of ``rows`` holds."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.int64)
        for position, row in enumerate(rows):
            shard, local = self._locate(int(row))
            out[position] = shard.offsets[local + 1] - shard.offsets[local]
        return out

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The records of ``rows`` concatenated in that order (``[M, record_bytes]`` uint8) and each row's count."""
        rows = np.asarray(rows, dtype=np.int64)
        parts, counts = [], np.empty(len(rows), dtype=np.int64)
        for position, row in enumerate(rows):
            shard, local = self._locate(int(row))
            start, end = int(shard.offsets[local]), int(shard.offsets[local + 1])
            parts.append(shard.records[start:end])
            counts[position] = end - start
        records = np.concatenate(parts) if parts else np.zeros((0, self.record_bytes), np.uint8)
        return np.asarray(records), counts

    def _locate(self, row: int) -> tuple[Shard, int]:
        if not 0 <= row < self.rows:
            raise IndexError(f"{self.path}: row {row} out of range (the store holds {self.rows} rows)")
        return self.shards[row // self.shard_rows], row % self.shard_rows

    @property
    def total_records(self) -> int:
        return int(sum(int(s.offsets[-1]) for s in self.shards))

    @property
    def total_bytes(self) -> int:
        return int(sum(entry["bytes"] for entry in self.entries))

"""Checkpoints that survive a crash at any instant and never unpickle anything.

A checkpoint is a folder::

    step-00000120/
      model.safetensors        weights of the trained model (and of trainable objective parts)
      optimizer.safetensors    every tensor of the optimizer state
      rng.safetensors          torch (and CUDA) generator states
      state.json               step counters, scheduler, optimizer layout, Python/NumPy RNG, history
      manifest.json            sha256 and size of every file above

It is written into a temporary folder (each file fsynced), renamed into place in one atomic
``rename`` and the parent folder fsynced, so a reader sees either the whole checkpoint or none of
it. Reading verifies the manifest's hashes first; tensors are read with ``safetensors`` and the
rest is JSON, so loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.io import fsync_dir, sha256_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_folder_atomically(target: Path, files: dict[str, Any]) -> None:
    """Create folder ``target`` holding ``files`` (name -> bytes, or a callable writing a path).

    A manifest with each file's sha256 is added. The folder appears whole or not at all.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    manifest: dict[str, dict[str, Any]] = {}
    for name, content in files.items():
        path = staging / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        _fsync_file(path)
        manifest[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (staging / MANIFEST).write_text(json.dumps({"files": manifest}, indent=2, sort_keys=True) + "\n")
    _fsync_file(staging / MANIFEST)
    fsync_dir(staging)
    if target.exists():
        # Replacing a finished folder (e.g. a stage result rewritten): move the old one aside first.
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_dir(target.parent)


def verify_folder(folder: Path) -> None:
    """Raise :class:`CheckpointError` unless every file matches the folder's manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}; the folder is incomplete or not written by distill")
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({error})") from None
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: content does not match its sha256 in the manifest (corrupted)")


# ---------------------------------------------------------------------------- state (de)serialization


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON metadata."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, meta


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator's state: tensors for torch, JSON for Python and NumPy."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(np_keys, dtype=np.int64))
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    keys = tensors["numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state((np_kind, keys, np_pos, np_has_gauss, np_gauss))


def state_dict_for_saving(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous CPU tensors, with tied tensors cloned apart.

    safetensors refuses tensors that share memory (tied embeddings); cloning keeps each name's
    values and loading with ``load_state_dict`` re-ties nothing it should not.
    """
    seen: set[int] = set()
    result: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        result[name] = tensor.contiguous()
    return result


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    folder: Path,
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: dict[str, Any],
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> None:
    """Write a checkpoint folder atomically (see the module docstring for its layout).

    ``extra_optimizers`` are further optimizers (e.g. a learned augmentation's), stored in
    ``optimizer.safetensors`` under ``extra/<name>/`` and restored by :func:`load_checkpoint`.
    """
    weights: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, tensor in state_dict_for_saving(module).items():
            weights[f"{prefix}.{name}"] = tensor
    optimizer_tensors, optimizer_meta = optimizer_to_flat(optimizer)
    extra_meta: dict[str, Any] = {}
    for prefix, extra in (extra_optimizers or {}).items():
        tensors, extra_meta[prefix] = optimizer_to_flat(extra)
        optimizer_tensors.update({f"extra/{prefix}/{name}": tensor for name, tensor in tensors.items()})
    rng_tensors, rng_meta = rng_state()
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = scheduler.state_dict()
        if "lr_lambdas" in scheduler_state:
            # Schedules are rebuilt from the config; only their step counters need saving.
            scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])
    document = {
        "format": 1,
        "state": state,
        "optimizer": optimizer_meta,
        **({"extra_optimizers": extra_meta} if extra_meta else {}),
        "scheduler": scheduler_state,
        "rng": rng_meta,
    }
    write_folder_atomically(
        folder,
        {
            "model.safetensors": lambda p: save_file(weights, str(p)),
            "optimizer.safetensors": lambda p: save_file(optimizer_tensors, str(p)),
            "rng.safetensors": lambda p: save_file(rng_tensors, str(p)),
            "state.json": json.dumps(document, indent=2, sort_keys=True).encode("utf-8"),
        },
    )


def load_checkpoint(
    folder: Path,
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    restore_rng: bool = True,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> dict[str, Any]:
    """Verify and load a checkpoint into ``modules``, ``optimizer`` and ``scheduler``; return its state."""
    folder = Path(folder)
    verify_folder(folder)
    document = json.loads((folder / "state.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    for prefix, module in modules.items():
        own = {name[len(prefix) + 1 :]: t for name, t in weights.items() if name.startswith(prefix + ".")}
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{folder}: weights of '{prefix}' do not match the model (missing: {missing[:5]}, "
                f"unexpected: {unexpected[:5]}); was the experiment changed since this checkpoint?"
            )
    flat = load_file(str(folder / "optimizer.safetensors"))
    main = {name: tensor for name, tensor in flat.items() if not name.startswith("extra/")}
    optimizer.load_state_dict(optimizer_from_flat(main, document["optimizer"]))
    for prefix, extra in (extra_optimizers or {}).items():
        meta = document.get("extra_optimizers", {}).get(prefix)
        if meta is None:
            raise CheckpointError(f"{folder}: no state of the optimizer '{prefix}'; was the experiment changed since this checkpoint?")
        start = f"extra/{prefix}/"
        extra.load_state_dict(optimizer_from_flat({n[len(start) :]: t for n, t in flat.items() if n.startswith(start)}, meta))
    if scheduler is not None and document["scheduler"] is not None:
        scheduler.load_state_dict(document["scheduler"])
    if restore_rng:
        set_rng_state(load_file(str(folder / "rng.safetensors")), document["rng"])
    return document["state"]


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoint folders under ``folder``, oldest first (temporary folders excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_valid_checkpoint(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a warning for each newer one that did not."""
    warnings: list[str] = []
    for candidate in reversed(list_checkpoints(folder)):
        try:
            verify_folder(candidate)
        except CheckpointError as error:
            warnings.append(f"skipping corrupt checkpoint: {error}")
            continue
        return candidate, warnings
    return None, warnings


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for stale in folder.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)

"""Checkpoints: exact round trips, atomic folders, corruption detected, nothing unpickled."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.engine.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_folder,
)
from distill.engine.optim import build_scheduler
from distill.io import atomic_write_text, read_jsonl
from distill.config.schema import SchedulerSpec


def _training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    scheduler = build_scheduler(SchedulerSpec(name="cosine", warmup_steps=2), optimizer, total_steps=20)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    inputs = torch.randn(16, 4)
    loss = model(inputs).pow(2).mean() + torch.nn.functional.dropout(torch.ones(3), 0.5).sum() * 0
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_continues_exactly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_objects()
    for _ in range(3):
        _step(model, optimizer, scheduler)
    random.seed(5)
    np.random.seed(7)
    save_checkpoint(tmp_path / "step-00000003", modules={"student": model}, optimizer=optimizer,
                    scheduler=scheduler, state={"step": 3, "note": "x"})
    # continue the original
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    for _ in range(3):
        _step(model, optimizer, scheduler)
    # a fresh copy loaded from the checkpoint continues identically
    other, other_optimizer, other_scheduler = _training_objects(seed=123)
    state = load_checkpoint(tmp_path / "step-00000003", modules={"student": other}, optimizer=other_optimizer,
                            scheduler=other_scheduler)
    assert state == {"step": 3, "note": "x"}
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    for _ in range(3):
        _step(other, other_optimizer, other_scheduler)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert scheduler.get_last_lr() == other_scheduler.get_last_lr()
    assert other_optimizer.param_groups[0]["betas"] == (0.8, 0.95)


def test_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_objects()
    _step(model, optimizer, scheduler)
    folder = tmp_path / "step-00000001"
    save_checkpoint(folder, modules={"student": model}, optimizer=optimizer, scheduler=scheduler, state={})
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    json.loads((folder / "state.json").read_text())
    for path in folder.glob("*.safetensors"):
        assert b"pickle" not in path.read_bytes()[:64]  # a safetensors header is JSON


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_checkpoints_are_detected(tmp_path: Path, damage: str) -> None:
    model, optimizer, scheduler = _training_objects()
    for step in (1, 2):
        _step(model, optimizer, scheduler)
        save_checkpoint(tmp_path / f"step-{step:08d}", modules={"student": model}, optimizer=optimizer,
                        scheduler=scheduler, state={"step": step})
    newest = tmp_path / "step-00000002"
    target = newest / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        expected = "does not match its sha256"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
        expected = "truncated"
    elif damage == "delete":
        target.unlink()
        expected = "missing"
    else:
        (newest / "manifest.json").unlink()
        expected = "no manifest.json"
    with pytest.raises(CheckpointError, match=expected):
        verify_folder(newest)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(newest, modules={"student": model}, optimizer=optimizer, scheduler=scheduler)
    chosen, warnings = latest_valid_checkpoint(tmp_path)
    assert chosen == tmp_path / "step-00000001"
    assert len(warnings) == 1 and "step-00000002" in warnings[0]


def test_interrupted_writes_leave_no_checkpoint(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_objects()

    class Exploding(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "step-00000001", modules={"student": model, "bad": Exploding()},
                        optimizer=optimizer, scheduler=scheduler, state={})
    assert latest_valid_checkpoint(tmp_path) == (None, [])
    # a staging folder left by a killed writer is invisible and pruned
    (tmp_path / ".step-00000002.tmp-999").mkdir()
    assert latest_valid_checkpoint(tmp_path) == (None, [])
    prune_checkpoints(tmp_path, keep_last=1)
    assert not (tmp_path / ".step-00000002.tmp-999").exists()


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_objects()
    for step in range(1, 5):
        save_checkpoint(tmp_path / f"step-{step:08d}", modules={"m": model}, optimizer=optimizer,
                        scheduler=scheduler, state={})
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_mismatched_model_is_a_clear_error(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_objects()
    save_checkpoint(tmp_path / "step-00000001", modules={"student": model}, optimizer=optimizer,
                    scheduler=scheduler, state={})
    other = torch.nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match="do not match the model"):
        load_checkpoint(tmp_path / "step-00000001", modules={"student": other},
                        optimizer=torch.optim.SGD(other.parameters(), lr=0.1), scheduler=None)


def test_atomic_text_write_replaces_whole(tmp_path: Path) -> None:
    path = tmp_path / "a" / "file.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_jsonl_reader_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []

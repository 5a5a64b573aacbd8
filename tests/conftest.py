"""Shared fixtures: small, fast experiments on the real digits data."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def tiny_experiment(output_dir: Path, **changes: Any) -> dict[str, Any]:
    """A two-stage experiment (teacher on labels, then a distilled MLP) that runs in seconds."""
    experiment: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.1, "test_fraction": 0.2},
        "models": {
            "teacher": {"arch": "mlp", "params": {"hidden": [64]}},
            "student": {"arch": "mlp", "params": {"hidden": [16]}},
        },
        "optimizer": {"name": "adamw", "lr": 0.003},
        "training": {"epochs": 2},
        "evaluation": {"latency": False},
        "stages": [
            {"name": "teacher", "model": "teacher", "objective": {"terms": [{"loss": "cross_entropy"}]}},
            {
                "name": "distilled",
                "model": "student",
                "teacher": "teacher",
                "objective": {
                    "terms": [
                        {"name": "ce", "loss": "cross_entropy", "weight": 0.5},
                        {"name": "kd", "loss": "hinton_kd", "weight": 0.5, "params": {"temperature": 2.0}},
                    ]
                },
            },
        ],
    }
    for key, value in changes.items():
        experiment[key] = value
    return copy.deepcopy(experiment)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    return tiny_experiment(tmp_path / "runs")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local folders: ``tokenizer`` (a tiny BPE with a chat template), ``teacher`` (2-layer Llama,
    hidden 48) and ``student`` (1-layer Llama, hidden 32), both with that tokenizer."""
    from tests.lm_fixtures import build_lm_folder, build_tokenizer

    root = tmp_path_factory.mktemp("tiny_lm")
    build_tokenizer(root / "tokenizer")
    return {
        "tokenizer": root / "tokenizer",
        "teacher": build_lm_folder(root / "teacher", root / "tokenizer", layers=2, hidden=48, seed=1),
        "student": build_lm_folder(root / "student", root / "tokenizer", layers=1, hidden=32, seed=2),
    }


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add contention (up to 10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HTTP proxy from the environment: the tests reach servers on localhost through urllib."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def served_lm(tiny_lm, single_thread):
    """The tiny teacher as ``distill serve`` loads it: ``(model, tokenizer, name)``, once per test module."""
    from distill.serve.loading import load_served_model

    return load_served_model(str(tiny_lm["teacher"]))


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A word-level tokenizer trained on WordNet definitions (needs WordNet), once per test module."""
    from tests.wordnet_fixtures import build_word_tokenizer

    return str(build_word_tokenizer(tmp_path_factory.mktemp("words")))

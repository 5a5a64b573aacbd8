"""Preference pairs end to end: preference_jsonl data, a reference model, DCKD + ADPA from YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.config import load_experiment
from distill.data.base import IGNORE_INDEX
from distill.data.preference import preference_jsonl
from distill.engine.runner import run_experiment
from tests.lm_fixtures import build_lm_folder, tiny_lm_experiment, write_preference_pairs


def test_pairs_are_stacked_with_reply_targets(tiny_lm, tmp_path: Path) -> None:
    raw = preference_jsonl(files=str(write_preference_pairs(tmp_path / "p.jsonl", 4)), tokenizer=str(tiny_lm["tokenizer"]))
    assert raw.train.inputs.shape[:2] == (4, 2) and raw.train.labels.shape == raw.train.inputs.shape
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm["tokenizer"])
    for side, reply in ((0, "the dog is a dog"), (1, "the heir burns with fuel")):
        targets = raw.train.labels[0, side][raw.train.labels[0, side] != IGNORE_INDEX]
        assert tok.decode(targets) == reply + "<|im_end|>"
    # the prompts are the same tokens on both sides
    first = (raw.train.labels[0] != IGNORE_INDEX).int().argmax(-1)
    assert torch.equal(raw.train.inputs[0, 0, : int(first.min())], raw.train.inputs[0, 1, : int(first.min())])


def test_bad_lines_name_file_and_line(tiny_lm, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'rejected' must be a non-empty string"):
        preference_jsonl(files=str(path), tokenizer=str(tiny_lm["tokenizer"]))


def test_dckd_and_adpa_train_from_yaml_with_a_reference_model(tiny_lm, tmp_path: Path) -> None:
    reference = build_lm_folder(tmp_path / "reference", tiny_lm["tokenizer"], layers=2, hidden=48, seed=7)
    experiment = tiny_lm_experiment(
        tiny_lm,
        tmp_path / "runs",
        terms=[
            {"name": "dckd", "loss": "dckd", "params": {"sft_weight": 1.0}},
            {"name": "adpa", "loss": "adpa", "inputs": {"reference_logits": "reference.logits"}},
        ],
        training={"epochs": 1},
    )
    experiment["data"] = {"dataset": "preference_jsonl", "batch_size": 4, "eval_batch_size": 8, "val_fraction": 0.2,
                          "params": {"files": str(write_preference_pairs(tmp_path / "pairs.jsonl", 24)), "tokenizer": str(tiny_lm["tokenizer"])}}
    experiment["models"]["sft"] = {"arch": "hf_causal_lm", "params": {"source": str(reference)}}
    experiment["stages"][0]["reference"] = "sft"
    result = run_experiment(load_experiment(experiment))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    terms = [r["terms"] for r in records if r["kind"] == "train"][-1]
    assert set(terms) == {"dckd", "adpa"} and all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert torch.isfinite(torch.tensor(result.rows[-1]["test"]["perplexity"]))


def test_a_reference_source_without_a_reference_model_is_a_config_error(tiny_lm, tmp_path: Path) -> None:
    experiment = tiny_lm_experiment(tiny_lm, tmp_path, terms=[{"loss": "adpa", "inputs": {"reference_logits": "reference.logits"}}])
    with pytest.raises(Exception, match="has no reference model"):
        load_experiment(experiment)

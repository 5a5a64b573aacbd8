"""Stages that learn from text: a stage's own data, sequence-level normalisation (REDI), group
rollouts with rewards (KDRL / GRPO), QCRD's negatives from an earlier student, and task accuracy
from greedy answers checked by a rule."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill.config import load_experiment
from distill.engine.runner import run_experiment
from tests.lm_fixtures import tiny_lm_experiment, write_preference_pairs


def _pairs_data(tiny_lm, tmp_path: Path, batch_size: int = 4) -> dict:
    return {"dataset": "preference_jsonl", "batch_size": batch_size, "eval_batch_size": 8, "val_fraction": 0.0,
            "test_fraction": 0.25, "params": {"files": str(write_preference_pairs(tmp_path / "pairs.jsonl", 16)),
                                              "tokenizer": str(tiny_lm["tokenizer"])}}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "stages" / stage / "model.safetensors"))


def test_sft_then_redi_on_its_own_pairs_data(tiny_lm, tmp_path: Path, single_thread) -> None:
    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs", training={"epochs": 1})
    experiment["stages"] = [
        {"name": "sft", "model": "student", "objective": {"terms": [{"loss": "cross_entropy"}]}},
        {"name": "redi", "model": "student", "init_from": "sft", "data": _pairs_data(tiny_lm, tmp_path),
         "objective": {"terms": [{"loss": "redi", "params": {"alpha": 0.8}}]}},
    ]
    result = run_experiment(load_experiment(experiment))
    rows = {row["name"]: row for row in result.rows}
    assert {"sft", "redi"} <= set(rows)
    train = [r for r in _records(result.run_dir) if r["kind"] == "train" and r["stage"] == "redi"]
    # the REDI stage saw pairs (its own data), and logged its term as a mean per pair
    assert train and set(train[-1]["terms"]) == {"redi"} and torch.isfinite(torch.tensor(train[-1]["terms"]["redi"]))
    assert _weights(result.run_dir, "redi").keys() == _weights(result.run_dir, "sft").keys()


def test_a_stage_data_with_another_tokenizer_is_refused(tiny_lm, tmp_path: Path) -> None:
    from tests.lm_fixtures import build_tokenizer

    build_tokenizer(tmp_path / "other", vocab_size=280)
    other = tmp_path / "other"
    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs", training={"epochs": 1})
    data = _pairs_data(tiny_lm, tmp_path)
    data["params"]["tokenizer"] = str(other)
    experiment["stages"][0]["data"] = data
    with pytest.raises(ValueError, match=r"stages.kd.data: .* a stage's data must use the run's tokenizer"):
        run_experiment(load_experiment(experiment))


def _redi_run(tiny_lm, folder: Path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    experiment = tiny_lm_experiment(
        tiny_lm, folder, terms=[{"loss": "redi"}], optimizer={"name": "sgd", "lr": 0.5},
        training={"epochs": 1, "max_steps": 1, "grad_accum_steps": accumulation},
    )
    experiment["data"] = _pairs_data(tiny_lm, folder, batch_size=batch)
    experiment["stages"][0].pop("teacher")
    return _weights(run_experiment(load_experiment(experiment)).run_dir, "kd")


def test_sequence_level_terms_are_means_over_the_pairs_of_the_whole_step(tiny_lm, tmp_path: Path, single_thread) -> None:
    """One step of 8 pairs == 2 micro-batches of 4 == 4 of 2 for REDI, a per-pair loss whose
    pairs hold unequal token counts (token normalisation would weight long pairs more)."""
    reference = _redi_run(tiny_lm, tmp_path / "a", 8, 1)
    for batch, accumulation in ((4, 2), (2, 4)):
        other = _redi_run(tiny_lm, tmp_path / f"b{batch}", batch, accumulation)
        for name in reference:
            torch.testing.assert_close(other[name], reference[name], atol=1e-6, rtol=1e-5)


def test_kdrl_trains_on_group_rollouts_with_rewards(tiny_lm, tmp_path: Path, single_thread) -> None:
    experiment = tiny_lm_experiment(
        tiny_lm, tmp_path / "runs", training={"epochs": 1, "max_steps": 3},
        terms=[{"loss": "kdrl", "params": {"kl_coef": 0.01, "kl_coef_end": 0.001, "schedule_steps": 3}}],
    )
    experiment["data"]["batch_size"] = 4
    experiment["stages"][0]["rollout"] = {"group_size": 3, "max_new_tokens": 6, "temperature": 1.0,
                                          "reward": {"name": "format", "params": {"pattern": "e"}}}
    result = run_experiment(load_experiment(experiment))
    rollouts = [r for r in _records(result.run_dir) if r["kind"] == "rollout"]
    assert [r["step"] for r in rollouts] == [1, 2, 3]
    assert all(r["samples"] == 12 and 0.0 <= r["reward"] <= 1.0 for r in rollouts)
    train = [r for r in _records(result.run_dir) if r["kind"] == "train"]
    assert torch.isfinite(torch.tensor(train[-1]["terms"]["kdrl"]))


def test_rollout_sources_without_a_rollout_are_a_config_error(tiny_lm, tmp_path: Path) -> None:
    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs", terms=[{"loss": "grpo"}])
    with pytest.raises(Exception, match="samples no rollouts"):
        load_experiment(experiment)


def test_qcrd_pairs_each_row_with_a_negative_from_the_epoch_start_student(tiny_lm, tmp_path: Path, single_thread) -> None:
    experiment = tiny_lm_experiment(
        tiny_lm, tmp_path / "runs", training={"epochs": 2, "max_steps": 4},
        terms=[{"loss": "qcrd", "params": {"discriminator_hidden": 8}}],
    )
    experiment["data"]["batch_size"] = 4
    experiment["stages"][0].pop("teacher")
    experiment["stages"][0]["negatives"] = {"from": "epoch_start", "temperature": 1.5, "max_new_tokens": 6}
    result = run_experiment(load_experiment(experiment))
    train = [r for r in _records(result.run_dir) if r["kind"] == "train"]
    assert train and torch.isfinite(torch.tensor(train[-1]["terms"]["qcrd"]))


def test_negatives_from_a_stage_that_is_not_earlier_is_refused(tiny_lm, tmp_path: Path) -> None:
    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs", terms=[{"loss": "qcrd"}])
    experiment["stages"][0]["negatives"] = {"from": "later"}
    with pytest.raises(ValueError, match="negatives.from: 'later' is not an earlier stage"):
        run_experiment(load_experiment(experiment))


def test_answer_accuracy_reads_the_answers_of_greedy_completions(tiny_lm, monkeypatch) -> None:
    """The metric compares the answer of each generated completion with the reference's."""
    from transformers import AutoTokenizer

    from distill.config.schema import AnswerEvalSpec
    from distill.data.base import IGNORE_INDEX, ArraySplit
    from distill.engine import lm

    tok = AutoTokenizer.from_pretrained(tiny_lm["tokenizer"])
    rows = [("Define dog.", "so 12.\nAnswer: 12"), ("Define cat.", "Answer: 7"), ("Define heir.", "Answer: 3")]
    width = 40
    ids = torch.full((3, width), tok.pad_token_id)
    labels = torch.full((3, width), IGNORE_INDEX)
    for i, (prompt, completion) in enumerate(rows):
        p, c = tok(prompt).input_ids, tok(completion).input_ids
        full = p + c
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, len(p) - 1 : len(full) - 1] = torch.tensor(c)
    written = iter(["Answer: 12.0", "no answer here", "Answer: 4"])

    def fake_generate(model, input_ids, labels, spec, *, pad_token_id, eos_token_id):
        out_labels = torch.full_like(labels, IGNORE_INDEX)
        out_ids = input_ids.clone()
        for row in range(input_ids.shape[0]):
            first = int((labels[row] != IGNORE_INDEX).int().argmax())
            text = tok(next(written)).input_ids
            out_ids[row, first + 1 : first + 1 + len(text)] = torch.tensor(text)
            out_labels[row, first : first + len(text)] = torch.tensor(text)
        return out_ids, out_labels

    monkeypatch.setattr(lm, "generate_completions", fake_generate)
    context = SimpleNamespace(data=SimpleNamespace(meta={"tokenizer": str(tiny_lm["tokenizer"]), "pad_token_id": tok.pad_token_id}),
                              world_size=1, rank=0, device=torch.device("cpu"))
    result = lm.answer_accuracy(None, ArraySplit(ids, labels), context, AnswerEvalSpec(), tokenizer=tok)
    # "12.0" == "12" (numbers are normalised); the second has no answer; the third is wrong
    assert result == {"answer_accuracy": pytest.approx(1 / 3), "answer_format": pytest.approx(2 / 3), "answer_rows": 3}


def test_answer_accuracy_appears_in_the_final_table(tiny_lm, tmp_path: Path, single_thread) -> None:
    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs", training={"epochs": 1, "max_steps": 1},
                                    evaluation={"latency": False, "answer": {"max_new_tokens": 4, "limit": 4}})
    result = run_experiment(load_experiment(experiment))
    for row in result.rows:
        assert row["test"]["answer_rows"] == 4 and 0.0 <= row["test"]["answer_accuracy"] <= 1.0


def test_the_teacher_data_example_validates() -> None:
    experiment = load_experiment(Path(__file__).resolve().parents[1] / "examples" / "teacher_data" / "student.yaml")
    stages = {stage.name: stage for stage in experiment.stages}
    assert stages["redi"].data is not None and stages["redi"].data.dataset == "preference_jsonl"
    assert stages["kdrl"].rollout is not None and stages["kdrl"].rollout.reward.name == "answer_match"
    assert experiment.evaluation.answer is not None

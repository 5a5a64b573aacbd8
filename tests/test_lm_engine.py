"""Language models in the engine: tiny real tokenizer and tiny random Llamas from local folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.config import load_experiment
from distill.data.base import IGNORE_INDEX
from distill.engine.lm import generate_completions, generation_draw, prompt_lengths, trim_padding
from distill.engine.runner import run_experiment
from distill.models.causal_lm import hf_causal_lm, layer_subset
from distill.objective import Objective, Term
from tests.lm_fixtures import build_lm_folder, build_tokenizer, tiny_chat_dataset, tiny_lm_experiment


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "stages" / stage / "model.safetensors"))


def test_a_language_model_run_reports_token_metrics(tiny_lm, tmp_path: Path) -> None:
    result = run_experiment(load_experiment(tiny_lm_experiment(tiny_lm, tmp_path)))
    rows = {row["name"]: row for row in result.rows}
    assert set(rows) == {"teacher", "kd"}
    kd = rows["kd"]["test"]
    assert kd["perplexity"] == pytest.approx(torch.tensor(kd["nll"]).exp().item())
    assert kd["kl_to_teacher"] > 0 and 0 <= kd["agreement"] <= 1 and kd["tokens"] > 0
    assert "kl_to_teacher" not in rows["teacher"]["test"]  # the reference is not compared with itself
    report = (result.run_dir / "report.md").read_text()
    assert "perplexity" in report and "KL to teacher" in report
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # "samples" counts the valid target tokens seen, not sequences
    assert train and train[-1]["samples"] > 8 * 4


def _accumulation_run(tiny_lm, folder: Path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    experiment = tiny_lm_experiment(
        tiny_lm,
        folder,
        optimizer={"name": "sgd", "lr": 0.5},
        training={"epochs": 1, "max_steps": 1, "grad_accum_steps": accumulation},
    )
    experiment["data"]["batch_size"] = batch
    return _weights(run_experiment(load_experiment(experiment)).run_dir, "kd")


def test_accumulation_normalizes_by_the_tokens_of_the_whole_step(tiny_lm, tmp_path: Path) -> None:
    """One step of 8 sequences == 2 micro-batches of 4 == 4 of 2, though they hold unequal token counts."""
    reference = _accumulation_run(tiny_lm, tmp_path / "a", 8, 1)
    for batch, accumulation in ((4, 2), (2, 4)):
        other = _accumulation_run(tiny_lm, tmp_path / f"b{batch}", batch, accumulation)
        for name in reference:
            torch.testing.assert_close(other[name], reference[name], atol=1e-6, rtol=1e-5)


def test_per_micro_batch_normalization_would_differ(tiny_lm) -> None:
    """The property above is not vacuous: averaging per micro-batch gives another gradient."""
    raw = tiny_chat_dataset(tokenizer=str(tiny_lm["tokenizer"]), samples=8)
    ids, labels = raw.train.inputs, raw.train.labels
    counts = (labels != IGNORE_INDEX).sum(1)
    order = counts.argsort()  # put short rows in one micro-batch, long ones in the other
    ids, labels = ids[order], labels[order]
    student = hf_causal_lm(num_classes=raw.num_classes, source=str(tiny_lm["student"]))
    objective = Objective([Term("ce", "cross_entropy")])

    def grad(parts: list[slice], per_micro_batch: bool) -> torch.Tensor:
        student.zero_grad()
        total = sum(int((labels[p] != IGNORE_INDEX).sum()) for p in parts)
        for p in parts:
            mask = labels[p] != IGNORE_INDEX
            out = objective({"student.logits": student(ids[p]), "batch.labels": labels[p]}, mask=mask, reduction="sum")
            (out.total / (int(mask.sum()) * len(parts) if per_micro_batch else total)).backward()
        return student.model.lm_head.weight.grad.clone()

    whole = grad([slice(0, 8)], False)
    torch.testing.assert_close(grad([slice(0, 4), slice(4, 8)], False), whole, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grad([slice(0, 4), slice(4, 8)], True), whole, atol=1e-6, rtol=1e-4)


def test_a_teacher_with_another_tokenizer_is_refused(tiny_lm, tmp_path: Path) -> None:
    other_tokenizer = build_tokenizer(tmp_path / "other_tok", vocab_size=280)
    assert len(other_tokenizer) == 280
    other = build_lm_folder(tmp_path / "other", tmp_path / "other_tok", layers=1, hidden=32)
    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs")
    experiment["models"]["teacher"]["params"]["source"] = str(other)
    with pytest.raises(ValueError, match="different tokenizer from the data"):
        run_experiment(load_experiment(experiment))


def test_padded_output_matrices_use_the_shared_range(tiny_lm, tmp_path: Path) -> None:
    """A teacher with 64 extra (never targeted) output rows distills into a student without them."""
    padded = build_lm_folder(tmp_path / "padded", tiny_lm["tokenizer"], layers=1, hidden=48, vocab_size=364)
    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs")
    experiment["models"]["teacher"]["params"]["source"] = str(padded)
    messages: list[str] = []

    class Listen:
        def __getattr__(self, name):
            return (lambda message: messages.append(message)) if name == "on_message" else (lambda *a, **k: None)

    result = run_experiment(load_experiment(experiment), callbacks=[Listen()])
    assert any("shared 300 rows" in m for m in messages)
    assert torch.isfinite(torch.tensor(result.rows[-1]["test"]["kl_to_teacher"]))


def test_fused_loss_equals_the_dense_loss_on_model_sources(tiny_lm) -> None:
    from distill.engine.forward import ForwardPass

    raw = tiny_chat_dataset(tokenizer=str(tiny_lm["tokenizer"]), samples=6)
    student = hf_causal_lm(num_classes=raw.num_classes, source=str(tiny_lm["student"]))
    teacher = hf_causal_lm(num_classes=raw.num_classes, source=str(tiny_lm["teacher"])).eval()
    dense = Objective([Term("kd", "generalized_jsd", params={"beta": 0.3}), Term("ce", "cross_entropy", weight=0.5)])
    fused = Objective([Term("kd", "fused_kd", params={"divergence": "generalized_jsd", "params": {"beta": 0.3}, "ce_weight": 0.5})])
    values, grads = [], []
    for objective in (dense, fused):
        student.zero_grad()
        with ForwardPass(student, teacher, objective.required_sources, lm=True) as forward:
            sources = forward(raw.train.inputs, raw.train.labels)
        assert ("student.logits" in sources) == (objective is dense)  # the fused path never builds logits
        out = objective(sources, mask=sources["batch.mask"], reduction="sum")
        out.total.backward()
        values.append(out.total.detach())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_hidden_state_distillation_with_a_layer_map_and_projection(tiny_lm, tmp_path: Path) -> None:
    terms = [
        {"loss": "cross_entropy"},
        {"name": "h0", "loss": "feature_mse",
         "inputs": {"student_features": "student.model.model.layers.0.output -> p0", "teacher_features": "teacher.model.model.layers.1.output"}},
        {"name": "h_last", "loss": "feature_cosine",
         "inputs": {"student_features": "student.last_hidden -> p1", "teacher_features": "teacher.last_hidden"}},
    ]
    experiment = tiny_lm_experiment(tiny_lm, tmp_path, terms=terms, training={"epochs": 1})
    experiment["stages"][0]["objective"]["adapters"] = {"p0": {"kind": "linear", "to": "teacher.model.model.layers.1.output"},
                                                          "p1": {"kind": "linear", "to": "teacher.last_hidden"}}
    result = run_experiment(load_experiment(experiment))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    terms_logged = [r["terms"] for r in records if r["kind"] == "train"][-1]
    assert set(terms_logged) == {"cross_entropy", "h0", "h_last"}
    assert 0 < terms_logged["h_last"] < 2


def test_taid_advances_during_language_model_training(tiny_lm, tmp_path: Path) -> None:
    experiment = tiny_lm_experiment(tiny_lm, tmp_path, terms=[{"loss": "taid", "params": {"t_start": 0.2}}])
    result = run_experiment(load_experiment(experiment))
    from safetensors.torch import load_file

    checkpoint = sorted((result.run_dir / "checkpoints" / "kd").glob("step-*"))[-1]
    state = load_file(str(checkpoint / "model.safetensors"))
    # t moved from its start, and the schedule saw every optimizer step up to the checkpoint
    assert float(state["objective.losses.taid.t"]) > 0.2
    assert int(state["objective.losses.taid.updates"]) == int(checkpoint.name.split("-")[1]) > 0


def test_layer_selection_keeps_the_chosen_teacher_layers(tiny_lm) -> None:
    assert layer_subset(4, 30) == [0, 10, 19, 29]
    assert layer_subset([1, 3], 4) == [1, 3]
    with pytest.raises(ValueError, match="strictly increasing"):
        layer_subset([3, 1], 4)
    with pytest.raises(ValueError, match="between 1 and 2"):
        hf_causal_lm(num_classes=300, source=str(tiny_lm["teacher"]), keep_layers=3)
    teacher = hf_causal_lm(num_classes=300, source=str(tiny_lm["teacher"]))
    pruned = hf_causal_lm(num_classes=300, source=str(tiny_lm["teacher"]), keep_layers=[1])
    assert pruned.num_layers == 1 and pruned.config.num_hidden_layers == 1
    kept = dict(pruned.model.model.layers[0].named_parameters())
    for name, parameter in teacher.model.model.layers[1].named_parameters():
        assert torch.equal(kept[name], parameter)
    assert torch.equal(pruned.model.lm_head.weight, teacher.model.lm_head.weight)
    ids = torch.randint(0, 300, (2, 12))
    assert pruned(ids).shape == (2, 12, 300)


def test_generated_completions_replace_the_targets(tiny_lm) -> None:
    raw = tiny_chat_dataset(tokenizer=str(tiny_lm["tokenizer"]), samples=4)
    ids, labels = raw.train.inputs, raw.train.labels
    model = hf_causal_lm(num_classes=raw.num_classes, source=str(tiny_lm["student"]))

    class Spec:
        temperature, top_p, max_new_tokens, prompt_tokens = 1.0, 0.9, 7, None

    lengths = prompt_lengths(labels, None)
    torch.manual_seed(0)
    new_ids, new_labels = generate_completions(model, ids, labels, Spec, pad_token_id=raw.meta["pad_token_id"], eos_token_id=raw.meta["eos_token_id"])
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(new_ids[row, :length], ids[row, :length])  # the prompt is kept
        targets = new_labels[row][new_labels[row] != IGNORE_INDEX]
        assert 1 <= targets.numel() <= 7
        # the targets are exactly the generated tokens, each predicted by the position before it
        assert torch.equal(targets, new_ids[row, length : length + targets.numel()])
        assert (new_labels[row, : length - 1] == IGNORE_INDEX).all()
    plain = tiny_chat_dataset(tokenizer=str(tiny_lm["tokenizer"]), samples=2, plain=True)
    with pytest.raises(ValueError, match="prompt_tokens"):
        prompt_lengths(plain.train.labels, None)
    assert prompt_lengths(plain.train.labels, 5).tolist() == [5, 5]
    draws = [generation_draw(0, "s", step) for step in range(200)]
    assert draws == [generation_draw(0, "s", step) for step in range(200)]
    assert 0.4 < sum(d < 0.5 for d in draws) / 200 < 0.6


@pytest.mark.parametrize("writer", ["student", "teacher"])
def test_on_policy_and_sequence_level_stages_run(tiny_lm, tmp_path: Path, writer: str) -> None:
    experiment = tiny_lm_experiment(tiny_lm, tmp_path, training={"epochs": 1}, logging={"every_steps": 1})
    experiment["stages"][0]["generate"] = {"model": writer, "probability": 1.0, "max_new_tokens": 6, "temperature": 0.0 if writer == "teacher" else 1.0}
    result = run_experiment(load_experiment(experiment))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # every step trained on generated completions: at most 6 target tokens per sequence of the batch of 8
    # (the data's own answers have more), and at least one
    assert len(train) == 4 and all(1 <= r["samples"] <= 6 * 8 for r in train)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)


def test_trim_padding_keeps_every_target() -> None:
    ids = torch.tensor([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]])
    labels = torch.tensor([[2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [5, IGNORE_INDEX] + [IGNORE_INDEX] * 4])
    trimmed_ids, trimmed_labels = trim_padding(ids, labels)
    assert trimmed_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert (trimmed_labels != IGNORE_INDEX).sum() == 3

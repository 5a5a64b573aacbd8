"""DistillationTrainer: distillation inside a transformers.Trainer, on the tiny local Llamas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, TrainingArguments

from distill.integrations.hf import (
    OBJECTIVE_STATE_NAME,
    DistillationTrainer,
    build_objective,
    default_objective,
)
from distill.objective import Objective, Term
from tests.lm_fixtures import TEXT

# (total length, masked prompt length): every way of pairing them into two micro-batches of two
# gives very different numbers of valid target tokens, so per-micro-batch means would differ.
SHAPES = [(5, 1), (7, 2), (10, 0), (40, 3)]


def load_models(paths: dict[str, Path]) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    student = LlamaForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = LlamaForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    return student, teacher


def token_ids(paths: dict[str, Path]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    return tokenizer(TEXT)["input_ids"]


def examples(paths: dict[str, Path], shapes: list[tuple[int, int]] = SHAPES) -> list[dict[str, list[int]]]:
    ids = token_ids(paths)
    rows = []
    offset = 0
    for length, prompt in shapes:
        chunk = ids[offset : offset + length]
        offset += 3
        rows.append({"input_ids": chunk, "labels": [-100] * prompt + chunk[prompt:]})
    return rows


class PadCollator:
    """Right padding: pad id in input_ids, 0 in attention_mask, -100 in labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [-100] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}


def arguments(tmp_path: Path, **changes: Any) -> TrainingArguments:
    fields: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    fields.update(changes)
    return TrainingArguments(**fields)


def make_trainer(paths, tmp_path, *, cls=DistillationTrainer, student=None, teacher=None, objective=None, data=None, **changes):
    if student is None or teacher is None:
        loaded_student, loaded_teacher = load_models(paths)
        student = student if student is not None else loaded_student
        teacher = teacher if teacher is not None else loaded_teacher
    return cls(
        model=student,
        teacher=teacher,
        objective=objective,
        args=arguments(tmp_path, **changes),
        train_dataset=data if data is not None else examples(paths),
        data_collator=PadCollator(student.config.pad_token_id),
    )


def hand_forward_kl(student, teacher, batch: dict[str, torch.Tensor], vocab: int | None = None) -> tuple[float, int]:
    """Sum over valid next-token positions of KL(teacher || student), and their number, in float64."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    if vocab is not None:
        s, t = s[..., :vocab], t[..., :vocab]
    valid = batch["labels"][:, 1:] != -100
    log_q = F.log_softmax(s[valid], dim=-1)
    log_p = F.log_softmax(t[valid], dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum()), int(valid.sum())


# ---- (1) training ---------------------------------------------------------------------------------


def test_training_changes_the_student_only_and_logs_every_term(tiny_lm, tmp_path: Path) -> None:
    student, teacher = load_models(tiny_lm)
    teacher.train()
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = [{"loss": "forward_kl", "weight": 0.5}, {"name": "ce", "loss": "cross_entropy", "weight": 0.5}]
    trainer = make_trainer(tiny_lm, tmp_path, student=student, teacher=teacher, objective=objective)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    result = trainer.train()

    assert result.global_step == 3
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for group in trainer.optimizer.param_groups for p in group["params"])
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3
    for entry in steps:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        # the logged loss is the weighted sum of the logged per-token term values
        assert entry["loss"] == pytest.approx(0.5 * entry["terms/forward_kl"] + 0.5 * entry["terms/ce"], rel=1e-4)


def test_objective_forms_and_default(tiny_lm, tmp_path: Path) -> None:
    default = default_objective()
    assert [(t.name, t.loss, t.weight) for t in default.terms] == [("forward_kl", "forward_kl", 1.0)]
    assert [t.name for t in build_objective(None).terms] == ["forward_kl"]
    built = build_objective([{"loss": "reverse_kl", "params": {"temperature": 2.0}}, Term("ce", "cross_entropy", 0.1)])
    assert [(t.name, t.weight, t.params) for t in built.terms] == [("reverse_kl", 1.0, {"temperature": 2.0}), ("ce", 0.1, {})]
    assert [t.name for t in build_objective({"terms": [{"loss": "forward_kl", "name": "kd"}]}).terms] == ["kd"]
    with pytest.raises(ValueError, match="unknown key"):
        build_objective([{"loss": "forward_kl", "wieght": 1.0}])
    with pytest.raises(ValueError, match="no 'loss'"):
        build_objective([{"weight": 1.0}])
    student, teacher = load_models(tiny_lm)
    with pytest.raises(ValueError, match="does not provide"):
        DistillationTrainer(model=student, teacher=teacher, objective=[{"loss": "feature_mse"}], args=arguments(tmp_path))
    with pytest.raises(ValueError, match="no teacher"):
        DistillationTrainer(model=student, objective=None, args=arguments(tmp_path))


# ---- (2) gradient accumulation ------------------------------------------------------------------


def sgd_step_gradient(paths, tmp_path, cls=DistillationTrainer, **changes) -> dict[str, torch.Tensor]:
    """The gradient of one optimizer step over the 4 sequences: (w0 - w1) / lr with plain SGD."""
    student, teacher = load_models(paths)
    before = {k: v.clone() for k, v in student.named_parameters()}
    trainer = make_trainer(
        paths, tmp_path, cls=cls, student=student, teacher=teacher, optim="sgd", learning_rate=1.0,
        max_grad_norm=0.0, weight_decay=0.0, max_steps=1, **changes
    )
    trainer.train()
    return {k: (before[k] - v).detach() for k, v in student.named_parameters()}


class PerMicroBatchMean(DistillationTrainer):
    """The rejected rule: each micro-batch divided by its own token count."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, None)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_gradient_accumulation_matches_one_large_batch(tiny_lm, tmp_path: Path) -> None:
    large = sgd_step_gradient(tiny_lm, tmp_path / "large", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    accumulated = sgd_step_gradient(tiny_lm, tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    per_micro = sgd_step_gradient(
        tiny_lm, tmp_path / "micro", cls=PerMicroBatchMean, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    scale = max(float(g.abs().max()) for g in large.values())
    assert scale > 1e-3
    assert max_difference(accumulated, large) < 1e-5
    # Normalizing each micro-batch by its own count gives another gradient: the check above can fail.
    assert max_difference(per_micro, large) > 100 * 1e-5


# ---- (3) the value ------------------------------------------------------------------------------


def test_loss_is_forward_kl_per_valid_token(tiny_lm, tmp_path: Path) -> None:
    student, teacher = load_models(tiny_lm)
    rows = examples(tiny_lm)
    trainer = make_trainer(tiny_lm, tmp_path, student=student, teacher=teacher)
    collate = PadCollator(student.config.pad_token_id)

    batch = collate(rows)
    total, count = hand_forward_kl(student, teacher, batch)
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    # num_items_in_batch (int or tensor) replaces this call's count
    with torch.no_grad():
        assert float(trainer.compute_loss(student, dict(batch), num_items_in_batch=4 * count)) == pytest.approx(total / count / 4, rel=1e-5)
        assert float(trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(2 * count))) == pytest.approx(
            total / count / 2, rel=1e-5
        )

    # evaluate: every valid token of the set counts once, whatever the batches (2 uneven batches of 2)
    sums = [hand_forward_kl(student, teacher, collate(rows[i : i + 2])) for i in (0, 2)]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    batch_means = sum(s / n for s, n in sums) / 2
    assert abs(batch_means - expected) > 100 * 1e-5 * expected  # a mean of batch means is another number
    metrics = trainer.evaluate(eval_dataset=rows)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_terms/forward_kl"] == pytest.approx(expected, rel=1e-5)


# ---- (4) padded vocabularies --------------------------------------------------------------------


def test_padded_teacher_vocabulary_uses_the_shared_range(tiny_lm, tmp_path: Path) -> None:
    student, teacher = load_models(tiny_lm)
    vocab = student.config.vocab_size
    teacher.resize_token_embeddings(vocab + 13, mean_resizing=False)
    assert teacher.get_output_embeddings().weight.shape[0] == vocab + 13
    trainer = make_trainer(tiny_lm, tmp_path, student=student, teacher=teacher, max_steps=2)
    batch = PadCollator(student.config.pad_token_id)(examples(tiny_lm))
    total, count = hand_forward_kl(student, teacher, batch, vocab=vocab)
    with torch.no_grad():
        assert float(trainer.compute_loss(student, dict(batch))) == pytest.approx(total / count, rel=1e-5)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)

    bad = dict(batch)
    bad["labels"] = batch["labels"].clone()
    bad["labels"][0, 3] = vocab + 2  # a padding row of the teacher: not a token the student knows
    with pytest.raises(ValueError, match="outside the vocabulary shared"):
        trainer.compute_loss(student, bad)


# ---- (5) module losses with update, trainable objectives ----------------------------------------


def test_taid_advances_t_and_checkpoints_its_state(tiny_lm, tmp_path: Path) -> None:
    trainer = make_trainer(
        tiny_lm, tmp_path, objective=[{"loss": "taid", "params": {"t_start": 0.2}}], max_steps=4,
        save_strategy="steps", save_steps=4,
    )
    taid = trainer.objective.losses["taid"]
    assert float(taid.t) == pytest.approx(0.2)
    trainer.train()
    assert int(taid.updates) == 4
    assert float(taid.t) > 0.2 + 0.1  # at least the linear floor after 3 of 4 steps
    assert all("terms/taid" in e for e in trainer.state.log_history if "loss" in e)

    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / OBJECTIVE_STATE_NAME).is_file()
    fresh = make_trainer(tiny_lm, tmp_path / "fresh", objective=[{"loss": "taid", "params": {"t_start": 0.2}}])
    assert fresh.load_objective_state(checkpoint)
    assert float(fresh.objective.losses["taid"].t) == float(taid.t)


def test_trainable_objective_parameters_are_optimized(tiny_lm, tmp_path: Path) -> None:
    student, teacher = load_models(tiny_lm)
    vocab = student.config.vocab_size
    torch.manual_seed(0)
    head = torch.nn.Linear(vocab, vocab)
    objective = Objective(
        [Term("kd", "forward_kl", inputs={"student_logits": "student.logits -> head"})], adapters={"head": head}
    )
    before = head.weight.detach().clone()
    trainer = make_trainer(tiny_lm, tmp_path, student=student, teacher=teacher, objective=objective, max_steps=2)
    trainer.train()
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(head.weight) in held and id(head.bias) in held
    assert not torch.equal(before, head.weight.detach())
    assert head.weight.grad is None  # reset after each step (the Trainer zeroes the student only)


# ---- (6) saving ---------------------------------------------------------------------------------


def test_save_model_writes_the_student_only(tiny_lm, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    student, teacher = load_models(tiny_lm)
    trainer = make_trainer(tiny_lm, tmp_path, student=student, teacher=teacher, objective=[{"loss": "taid"}], max_steps=1)
    trainer.train()
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    weight_files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert weight_files == ["model.safetensors"]
    assert not (folder / OBJECTIVE_STATE_NAME).exists()
    saved = load_file(folder / "model.safetensors")
    expected = student.state_dict()
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], expected[k].cpu()) for k in saved)
    reloaded = LlamaForCausalLM.from_pretrained(folder)
    assert reloaded.config.num_hidden_layers == student.config.num_hidden_layers == 1
    assert reloaded.config.hidden_size == 32 != teacher.config.hidden_size

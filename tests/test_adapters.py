"""Adapters: shapes of every kind, 'source -> adapter' inputs, config checks, training and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.adapters import Adapter, build_adapter, split_source
from distill.config import ConfigError, load_experiment
from distill.engine.runner import run_experiment
from distill.objective import Objective, Term
from distill.registry import load_builtins
from tests.conftest import tiny_experiment

load_builtins()


@pytest.mark.parametrize(
    ("kind", "in_shape", "target", "expected"),
    [
        ("linear", (16,), (24,), (24,)),
        ("linear", (5, 16), (5, 24), (5, 24)),
        ("mlp", (16,), (8,), (8,)),
        ("conv1x1", (8, 14, 14), (32, 7, 7), (32, 7, 7)),
        ("conv1x1", (8, 7, 7), (16, 7, 7), (16, 7, 7)),
        ("token_pool", (17, 32), (64,), (64,)),  # ViT tokens -> a CNN's pooled features
        ("token_pool", (16, 7, 7), (17, 32), (17, 32)),  # a CNN map -> ViT tokens
        ("token_pool", (17, 32), (16, 4, 4), (16, 4, 4)),  # ViT tokens -> a CNN map
        ("logit_branch", (16, 14, 14), (10,), (10,)),
        ("logit_branch", (17, 32), (10,), (10,)),
        ("logit_branch", (64,), (10,), (10,)),
        ("decoder", (17, 32), (17, 48), (17, 48)),
    ],
)
def test_every_kind_produces_the_target_shape(kind, in_shape, target, expected) -> None:
    module = build_adapter("a", Adapter(kind, hidden=16), in_shape, target)
    out = module(torch.randn(3, *in_shape))
    assert tuple(out.shape) == (3, *expected)
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_token_pool_can_skip_a_class_token_and_keeps_the_patch_layout() -> None:
    adapter = build_adapter("t", Adapter("token_pool", params={"skip_tokens": 1}), (17, 8), (8, 4, 4))
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.eye(8))
        adapter.proj.bias.zero_()
    tokens = torch.randn(2, 17, 8)
    out = adapter(tokens)  # patch token 1 + 4 * row + col lands at [:, :, row, col]
    torch.testing.assert_close(out[:, :, 2, 3], tokens[:, 1 + 4 * 2 + 3])
    with pytest.raises(ValueError, match="skip_tokens 17 must leave at least one token"):
        build_adapter("t", Adapter("token_pool", params={"skip_tokens": 17}), (17, 8), (8,))


def test_shapes_that_do_not_fit_the_kind_are_refused() -> None:
    with pytest.raises(ValueError, match=r"adapter 'p' \(conv1x1\) maps feature maps \[C, H, W\] to feature maps; its input is \[16\]"):
        build_adapter("p", Adapter("conv1x1"), (16,), (8, 4, 4))
    with pytest.raises(ValueError, match="set `to`"):
        build_adapter("p", Adapter("linear"), (16,), None)
    assert build_adapter("p", Adapter("linear", out_features=7), (16,), None)(torch.randn(2, 16)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown adapter kind"):
        Adapter("projection")


def test_split_source() -> None:
    assert split_source("student.layer2.output -> proj2") == ("student.layer2.output", "proj2")
    assert split_source("student.features->p") == ("student.features", "p")
    assert split_source("teacher.logits") == ("teacher.logits", None)
    with pytest.raises(ValueError, match="exactly one adapter"):
        split_source("student.features -> a -> b")


def test_an_adapted_source_feeds_the_loss_and_is_computed_once() -> None:
    term = Term("hint", "logit_mse", inputs={"student_logits": "student.features -> proj", "teacher_logits": "teacher.features"})
    objective = Objective(
        [term], adapters={"proj": Adapter("linear", to="teacher.features")},
        source_shapes={"student.features": (4,), "teacher.features": (6,)},
    )
    assert objective.required_sources == {"student.features", "teacher.features"}
    student, teacher = torch.randn(5, 4), torch.randn(5, 6)
    projection = objective.adapters["proj"]
    value = objective({"student.features": student, "teacher.features": teacher}).terms["hint"]
    expected = (projection(student) - teacher).pow(2).sum(-1).mean()  # logit_mse: sum over classes, batchmean
    torch.testing.assert_close(value, expected)
    # zero when the adapted student equals the teacher
    with torch.no_grad():
        projection.weight.copy_(torch.randn(6, 4))
        projection.bias.zero_()
    same = objective({"student.features": student, "teacher.features": projection(student).detach()}).terms["hint"]
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-12)
    calls = []
    projection.register_forward_hook(lambda *args: calls.append(1))
    both = Objective(
        [term, Term("again", "logit_cosine", inputs={"student_logits": "student.features -> proj", "teacher_logits": "teacher.features"})],
        adapters={"proj": projection},
    )
    both({"student.features": student, "teacher.features": teacher})
    assert len(calls) == 1


def test_objective_refuses_undeclared_and_unused_adapters() -> None:
    term = Term("hint", "logit_mse", inputs={"student_logits": "student.features -> proj", "teacher_logits": "teacher.features"})
    with pytest.raises(ValueError, match="uses adapter 'proj', which is not declared"):
        Objective([term])
    with pytest.raises(ValueError, match="declared but used by no term"):
        Objective([Term("ce", "cross_entropy")], adapters={"proj": Adapter("linear", out_features=3)})


def _adapter_experiment(output_dir: Path) -> dict:
    experiment = tiny_experiment(output_dir)
    experiment["checkpoint"] = {"every_steps": 5}
    objective = experiment["stages"][1]["objective"]
    objective["adapters"] = {"proj": {"kind": "mlp", "to": "teacher.features.0.output", "hidden": 32}}
    objective["terms"].append(
        {
            "name": "hint",
            "loss": "logit_mse",
            "weight": 0.5,
            "inputs": {"student_logits": "student.features.0.output -> proj", "teacher_logits": "teacher.features.0.output"},
        }
    )
    return experiment


def test_adapters_train_with_the_student_are_checkpointed_and_not_exported(tmp_path: Path) -> None:
    result = run_experiment(load_experiment(_adapter_experiment(tmp_path)))
    run_dir = result.run_dir
    checkpoint = sorted((run_dir / "checkpoints" / "distilled").iterdir())[-1]
    weights = load_file(str(checkpoint / "model.safetensors"))
    adapter_keys = [k for k in weights if k.startswith("objective.adapters.proj.")]
    assert adapter_keys and weights["objective.adapters.proj.0.weight"].shape == (32, 16)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    hint = [r["terms"]["hint"] for r in records if r["kind"] == "train" and r["stage"] == "distilled"]
    assert hint[-1] < hint[0] / 2
    student = load_file(str(run_dir / "stages" / "distilled" / "model.safetensors"))
    assert not any("adapters" in k or k.startswith("objective") for k in student)


def test_adapter_config_errors_name_the_key(tmp_path: Path) -> None:
    experiment = _adapter_experiment(tmp_path)
    experiment["stages"][1]["objective"]["terms"][-1]["inputs"]["student_logits"] = "student.features.0.output -> prj"
    with pytest.raises(ConfigError) as error:
        load_experiment(experiment)
    message = str(error.value)
    assert "stages[1].objective.terms[2].inputs.student_logits: no adapter 'prj' in this stage's objective.adapters (did you mean 'proj'?)" in message
    assert "stages[1].objective.adapters.proj: adapter 'proj' is used by no term" in message

    experiment = _adapter_experiment(tmp_path)
    experiment["stages"][1]["objective"]["adapters"]["proj"]["kind"] = "conv2x2"
    with pytest.raises(ConfigError, match="stages\\[1\\].objective.adapters.proj.kind"):
        load_experiment(experiment)
    experiment = _adapter_experiment(tmp_path)
    experiment["stages"][1]["objective"]["adapters"]["proj"]["to"] = "teacher.layer9"
    with pytest.raises(ConfigError, match="stages\\[1\\].objective.adapters.proj.to: unknown source 'teacher.layer9'"):
        load_experiment(experiment)


def test_a_wrong_adapter_target_path_fails_before_any_stage_trains(tmp_path: Path) -> None:
    experiment = _adapter_experiment(tmp_path)
    experiment["stages"][1]["objective"]["adapters"]["proj"]["to"] = "teacher.featurs.0.output"
    with pytest.raises(KeyError, match="the teacher \\(MLP\\) has no module 'featurs.0'; nearest existing paths: features.0"):
        run_experiment(load_experiment(experiment))
    run_dir = next((tmp_path / "tiny").iterdir())
    assert not (run_dir / "stages").exists()


def test_nd_gets_the_teachers_class_means_before_training(tmp_path: Path) -> None:
    from distill.data import load_data
    from distill.engine.context import STAGE_WEIGHTS
    from distill.models.build import build_model, load_weights

    experiment = tiny_experiment(tmp_path)
    experiment["checkpoint"] = {"every_steps": 5}
    objective = experiment["stages"][1]["objective"]
    objective["adapters"] = {"proj": {"kind": "linear", "to": "teacher.features"}}
    objective["terms"].append({"name": "nd", "loss": "nd", "inputs": {"student_features": "student.features -> proj"}})
    loaded = load_experiment(experiment)
    result = run_experiment(loaded)
    checkpoint = sorted((result.run_dir / "checkpoints" / "distilled").iterdir())[-1]
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert bool(weights["objective.losses.nd.ready"])
    # the means are those of the trained teacher's penultimate features over the training split
    data = load_data(loaded.data)
    teacher = build_model(loaded.models["teacher"], num_classes=data.num_classes, input_shape=data.input_shape)
    load_weights(teacher, result.run_dir / "stages" / "teacher" / STAGE_WEIGHTS)
    teacher.eval()
    with torch.no_grad():
        features = teacher.features(data.train.inputs.flatten(1))
    expected = torch.stack([features[data.train.labels == k].mean(0) for k in range(data.num_classes)])
    torch.testing.assert_close(weights["objective.losses.nd.class_means"], expected, rtol=1e-4, atol=1e-5)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    nd = [r["terms"]["nd"] for r in records if r["kind"] == "train" and r["stage"] == "distilled"]
    assert nd[-1] < nd[0]


def test_every_feature_method_trains_from_yaml(tmp_path: Path) -> None:
    """CNN and ViT pairs on digits with every feature and relation loss in one objective each."""
    experiment = tiny_experiment(tmp_path)
    experiment["models"] = {
        "cnn_teacher": {"arch": "resnet8", "random_init": True},
        "cnn_student": {"arch": "resnet8", "params": {"width": 0.5}},
        "vit_teacher": {"arch": "vit", "params": {"patch_size": 2, "dim": 32, "depth": 2, "heads": 2}, "random_init": True},
        "vit_student": {"arch": "vit", "params": {"patch_size": 2, "dim": 16, "depth": 2, "heads": 2}},
    }
    experiment["training"] = {"epochs": 1, "max_steps": 3}
    experiment["stages"] = [
        {
            "name": "cnn", "model": "cnn_student", "teacher": "cnn_teacher",
            "objective": {
                "adapters": {"hint": {"kind": "conv1x1", "to": "teacher.layer2.output"},
                             "proj": {"kind": "linear", "to": "teacher.features"}},
                "terms": [
                    {"loss": "cross_entropy"},
                    {"loss": "feature_mse", "inputs": {"student_features": "student.layer2.output -> hint",
                                                        "teacher_features": "teacher.layer2.output"}},
                    {"loss": "attention_transfer", "inputs": {"student_features": "student.layer3.output",
                                                               "teacher_features": "teacher.layer3.output"}},
                    {"loss": "rkd_distance"}, {"loss": "rkd_angle"}, {"loss": "cka_loss"},
                    {"loss": "nd", "inputs": {"student_features": "student.features -> proj"}},
                ],
            },
        },
        {
            "name": "vit", "model": "vit_student", "teacher": "vit_teacher",
            "objective": {
                "adapters": {"tokens": {"kind": "linear", "to": "teacher.blocks.1.output"},
                             "branch": {"kind": "logit_branch", "to": "logits"}},
                "terms": [
                    {"loss": "cross_entropy"},
                    {"loss": "trg", "params": {"inter_tokens": 8},
                     "inputs": {"student_features": "student.blocks.1.output -> tokens",
                                "teacher_features": "teacher.blocks.1.output"}},
                    {"loss": "ofa_loss", "name": "ofa_branch", "inputs": {"student_logits": "student.blocks.0.output -> branch"}},
                ],
            },
        },
    ]
    result = run_experiment(load_experiment(experiment))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {name for r in records if r["kind"] == "train" for name in r["terms"]}
    assert {"feature_mse", "attention_transfer", "rkd_distance", "rkd_angle", "cka_loss", "nd", "trg", "ofa_branch"} <= logged
    for r in records:
        if r["kind"] == "train":
            assert all(value == value and abs(value) < 1e6 for value in r["terms"].values())  # finite

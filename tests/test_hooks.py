"""Feature sources by dotted path, module losses with parameters and state, in the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_experiment
from distill.engine.runner import run_experiment
from distill.hooks import FeatureCapture, classifier_path, parse_feature_source, resolve_module
from distill.models.zoo import mlp
from distill.objective import Objective, Term


class ProjectedFeatureMSE(torch.nn.Module):
    """Test loss: MSE between a learned projection of student features and the teacher's features."""

    def __init__(self, *, input_shapes: dict, scale: float = 1.0) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(input_shapes["student_features"][0], input_shapes["teacher_features"][0])
        self.scale = scale
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_value", torch.zeros((), dtype=torch.float64))

    def forward(self, student_features, teacher_features, *, mask=None, reduction="batchmean"):
        per_sample = (self.projection(student_features) - teacher_features).pow(2).sum(-1) * self.scale
        return per_sample.mean() if reduction == "batchmean" else per_sample.sum()

    def update(self, *, step: int, total_steps: int, value: float) -> None:
        self.updates += 1
        self.last_value.fill_(value)


def test_parse_feature_sources() -> None:
    assert parse_feature_source("student.logits") is None
    assert parse_feature_source("batch.labels") is None
    source = parse_feature_source("teacher.blocks.2.output")
    assert (source.model, source.path, source.kind, source.name) == ("teacher", "blocks.2", "output", "teacher.blocks.2.output")
    assert parse_feature_source("student.features").name == "student.features"
    assert parse_feature_source("student.layer2") is None  # must say input or output


def test_wrong_path_lists_the_nearest() -> None:
    model = mlp(num_classes=3, input_shape=(4,), hidden=[8, 8])
    with pytest.raises(KeyError) as error:
        resolve_module(model, "features.9", "student")
    message = str(error.value)
    assert message.startswith("the student (MLP) has no module 'features.9'; nearest existing paths: ")
    assert "features.0" in message and "features.3" in message
    assert classifier_path(model) == "head"


def test_capture_records_inputs_and_outputs_and_removes_hooks() -> None:
    model = mlp(num_classes=3, input_shape=(4,), hidden=[8])
    sources = [parse_feature_source("student.features.0.output"), parse_feature_source("student.features")]
    x = torch.randn(5, 4)
    with FeatureCapture(model, sources) as capture:
        logits = model(x)
        assert capture.values["student.features.0.output"].shape == (5, 8)
        features = capture.values["student.features"]
        torch.testing.assert_close(model.head(features), logits)
        capture.clear()
        for _ in range(3):
            model(x)
        assert len(capture.values) == 2  # replaced each pass, never accumulated
    assert all(not m._forward_hooks for m in model.modules())


def test_module_loss_in_an_objective() -> None:
    term = Term("proj", ProjectedFeatureMSE, params={"scale": 2.0})
    assert term.injected_arguments() == {"input_shapes"}
    assert term.sources == {"student_features": "student.features", "teacher_features": "teacher.features"}
    with pytest.raises(ValueError, match="needs the shapes of its inputs"):
        Objective([term])
    objective = Objective([term], source_shapes={"student.features": (4,), "teacher.features": (6,)})
    assert sum(p.numel() for p in objective.parameters()) == 4 * 6 + 6
    assert objective.updatable == ["proj"]
    out = objective({"student.features": torch.randn(3, 4), "teacher.features": torch.randn(3, 6)})
    out.total.backward()
    assert objective.losses["proj"].projection.weight.grad is not None


def _feature_experiment(output_dir: Path) -> dict:
    from tests.conftest import tiny_experiment

    experiment = tiny_experiment(output_dir)
    experiment["checkpoint"] = {"every_steps": 5}
    experiment["stages"][1]["objective"]["terms"].append(
        {"name": "hint", "loss": "tests.test_hooks:ProjectedFeatureMSE", "weight": 0.1, "params": {"scale": 0.5}}
    )
    return experiment


def test_feature_terms_train_their_parameters_and_are_checkpointed(tmp_path: Path) -> None:
    result = run_experiment(load_experiment(_feature_experiment(tmp_path)))
    run_dir = result.run_dir
    summary = json.loads((run_dir / "stages" / "distilled" / "summary.json").read_text())
    checkpoints = sorted((run_dir / "checkpoints" / "distilled").iterdir())
    weights = load_file(str(checkpoints[-1] / "model.safetensors"))
    assert "objective.losses.hint.projection.weight" in weights
    assert int(weights["objective.losses.hint.updates"]) == int(checkpoints[-1].name.split("-")[1])
    assert float(weights["objective.losses.hint.last_value"]) > 0
    assert summary["steps"] >= int(checkpoints[-1].name.split("-")[1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    hint = [r["terms"]["hint"] for r in records if r["kind"] == "train" and r["stage"] == "distilled"]
    assert hint[-1] < hint[0]  # the projection (and the student) learned to match the teacher's features
    # the exported student holds no objective weights
    student = load_file(str(run_dir / "stages" / "distilled" / "model.safetensors"))
    assert not any(k.startswith("objective") for k in student)


def test_a_wrong_feature_path_fails_before_training(tmp_path: Path) -> None:
    experiment = _feature_experiment(tmp_path)
    experiment["stages"][1]["objective"]["terms"][-1]["inputs"] = {"student_features": "student.featurs.0.output"}
    with pytest.raises(KeyError, match="the student \\(MLP\\) has no module 'featurs.0'; nearest existing paths: features.0"):
        run_experiment(load_experiment(experiment))
    run_dir = next((tmp_path / "tiny").iterdir())
    assert not (run_dir / "checkpoints").exists()  # not even the teacher stage ran
    assert not (run_dir / "stages").exists()


def test_hooks_capture_what_a_manual_forward_computes() -> None:
    from distill.models.zoo import resnet_cifar

    torch.manual_seed(0)
    model = resnet_cifar(num_classes=10, input_shape=(1, 28, 28), depth=14).eval()
    x = torch.randn(3, 1, 28, 28)
    names = ["student.layer2.1.conv2.output", "student.layer3.output", "student.layer2.0.input", "student.features"]
    with FeatureCapture(model, [parse_feature_source(n) for n in names]) as capture, torch.no_grad():
        logits = model(x)
        captured = dict(capture.values)
    with torch.no_grad():  # the same tensors, computed by hand
        stem = torch.relu(model.bn1(model.conv1(x)))
        layer1 = model.layer1(stem)
        block = model.layer2[0](layer1)
        inner = model.layer2[1].conv2(torch.relu(model.layer2[1].bn1(model.layer2[1].conv1(block))))
        layer3 = model.layer3(model.layer2(layer1))
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(layer3, 1), 1)
    torch.testing.assert_close(captured["student.layer2.0.input"], layer1)
    torch.testing.assert_close(captured["student.layer2.1.conv2.output"], inner)
    torch.testing.assert_close(captured["student.layer3.output"], layer3)
    torch.testing.assert_close(captured["student.features"], pooled)
    torch.testing.assert_close(model.fc(pooled), logits)


def test_hugging_face_paths_and_wrapped_models(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    with FeatureCapture(llm, [parse_feature_source("student.model.layers.4.mlp.output")]) as capture, torch.no_grad():
        out = llm(ids, output_hidden_states=True)
        mlp_out = capture.values["student.model.layers.4.mlp.output"]
    assert mlp_out.shape == (2, 7, 32)
    with torch.no_grad():  # the last block's MLP output, recomputed from its input
        hidden = out.hidden_states[4]
        block = llm.model.layers[4]
        attended = hidden + block.self_attn(
            block.input_layernorm(hidden), position_embeddings=llm.model.rotary_emb(hidden, torch.arange(7)[None]),
            attention_mask=None,
        )[0]
        torch.testing.assert_close(mlp_out, block.mlp(block.post_attention_layernorm(attended)), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="model.layers.4.mlp"):
        resolve_module(llm, "model.layers.4.mlps")

    # a DDP-wrapped model: paths are those of the inner model, and the hooks fire through the wrapper
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = mlp(num_classes=3, input_shape=(4,), hidden=[8])
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
        with FeatureCapture(wrapped, [parse_feature_source("student.features.0.output")]) as capture:
            wrapped(torch.randn(2, 4))
            assert capture.values["student.features.0.output"].shape == (2, 8)
        assert resolve_module(wrapped, "head") is net.head
    finally:
        dist.destroy_process_group()


def test_hooks_keep_no_memory_across_steps() -> None:
    import gc

    from distill.engine.forward import ForwardPass
    from distill.models.zoo import resnet_cifar

    torch.manual_seed(0)
    student = resnet_cifar(num_classes=10, input_shape=(1, 16, 16), depth=8)
    teacher = resnet_cifar(num_classes=10, input_shape=(1, 16, 16), depth=14).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    sources = {"student.layer2.output", "teacher.layer3.output", "student.logits", "teacher.logits"}

    def live_tensors() -> int:
        import warnings

        gc.collect()
        with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    with ForwardPass(student, teacher, sources) as forward:
        for step in range(12):
            values = forward(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
            loss = values["student.layer2.output"].pow(2).mean() + values["student.logits"].logsumexp(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            del values, loss
            assert not forward.student_capture.values and not forward.teacher_capture.values
            if step >= 2:
                counts.append(live_tensors())
    assert max(counts) == min(counts), counts  # nothing accumulates from step to step
    assert all(not m._forward_hooks for m in [*student.modules(), *teacher.modules()])

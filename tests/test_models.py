"""The model zoo, the Hugging Face wrapper, build_model and safetensors weight loading."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import distill.models  # noqa: F401  (registers the zoo)
from distill.config.schema import ModelSpec
from distill.models import build_model, count_parameters
from distill.models.build import load_weights
from distill.registry import MODELS

ZOO = [entry.name for entry in MODELS if entry.builder.__module__ == "distill.models.zoo"]
IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def make(arch: str, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), **params) -> nn.Module:
    return MODELS.get(arch).builder(num_classes=num_classes, input_shape=input_shape, **params)


def test_zoo_has_every_documented_model() -> None:
    expected = {"mlp", "resnet_cifar", "wrn", "mobilenetv2", "vit"} | {
        f"resnet{depth}" for depth in (8, 14, 20, 32, 56, 110)
    }
    assert expected <= set(ZOO)
    for name in ZOO:
        assert MODELS.get(name).summary, f"{name} has no summary"


@pytest.mark.parametrize("input_shape", IMAGE_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("arch", ZOO)
def test_forward_shape_and_finite_gradients(arch: str, input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = make(arch, num_classes=7, input_shape=input_shape).train()
    inputs = torch.randn(3, *input_shape)
    logits = model(inputs)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{arch}: {name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{arch}: {name} has a non-finite gradient"


def test_mlp_takes_flat_features_and_empty_hidden_is_linear() -> None:
    model = make("mlp", num_classes=4, input_shape=(20,), hidden=[16], activation="gelu")
    assert model(torch.randn(5, 20)).shape == (5, 4)
    linear = make("mlp", num_classes=4, input_shape=(20,), hidden=[])
    assert count_parameters(linear) == 20 * 4 + 4
    with pytest.raises(ValueError, match="activation 'swish' is not one of: relu, gelu"):
        make("mlp", input_shape=(20,), activation="swish")


@pytest.mark.parametrize("arch", ["resnet_cifar", "wrn", "mobilenetv2", "vit"])
def test_image_models_reject_flat_inputs(arch: str) -> None:
    with pytest.raises(ValueError, match=r"needs image inputs .*\(64,\)"):
        make(arch, input_shape=(64,))


def test_resnet20_has_about_0_27m_parameters() -> None:
    assert 260_000 <= count_parameters(make("resnet20")) <= 280_000
    assert count_parameters(make("resnet_cifar", depth=20)) == count_parameters(make("resnet20"))


def test_resnet_depth_and_width_scale_parameters() -> None:
    resnet8, resnet20 = count_parameters(make("resnet8")), count_parameters(make("resnet20"))
    assert resnet8 < 0.35 * resnet20
    assert count_parameters(make("resnet56")) > 3 * resnet20
    # Doubling every channel count roughly quadruples the conv weights.
    assert 3.5 * resnet20 < count_parameters(make("resnet20", width=2.0)) < 4.1 * resnet20
    assert make("resnet20", width=0.5).fc.in_features == 32
    assert count_parameters(make("mobilenetv2", width=1.0)) > 2 * count_parameters(make("mobilenetv2", width=0.5))
    assert count_parameters(make("wrn", widen_factor=4)) > 3 * count_parameters(make("wrn", widen_factor=2))


def test_resnet_stages_halve_resolution_with_zero_pad_shortcuts() -> None:
    model = make("resnet20").eval()
    shapes = {}
    for stage in ("layer1", "layer2", "layer3"):
        model.get_submodule(stage).register_forward_hook(lambda m, i, o, s=stage: shapes.__setitem__(s, o.shape))
    model(torch.randn(2, 3, 32, 32))
    assert shapes == {
        "layer1": (2, 16, 32, 32),
        "layer2": (2, 32, 16, 16),
        "layer3": (2, 64, 8, 8),
    }
    # Option A: shortcuts carry no parameters, so only convs, BatchNorms and fc do.
    assert not list(model.layer2[0].shortcut.parameters())


def test_invalid_depths_are_rejected_with_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"6n\+2.*8, 14, 20, 32.*got 21"):
        make("resnet_cifar", depth=21)
    with pytest.raises(ValueError, match=r"6n\+4.*10, 16, 22.*got 15"):
        make("wrn", depth=15)
    assert count_parameters(make("wrn", depth=16, widen_factor=2)) == pytest.approx(691_674, rel=0.01)


def test_mobilenetv2_never_shrinks_small_images_below_2x2() -> None:
    for input_shape, expected_side in [((1, 8, 8), 2), ((1, 28, 28), 4), ((3, 32, 32), 4)]:
        model = make("mobilenetv2", input_shape=input_shape).eval()
        features = model.features(torch.randn(1, *input_shape))
        assert features.shape[-2:] == (expected_side, expected_side)


def test_vit_rejects_patch_size_that_does_not_divide_the_image() -> None:
    with pytest.raises(ValueError, match=r"patch_size 5 must divide .* 32x32"):
        make("vit", input_shape=(3, 32, 32), patch_size=5)
    with pytest.raises(ValueError, match=r"dim \(100\) must be divisible by heads \(3\)"):
        make("vit", dim=100, heads=3)


def test_vit_blocks_are_hookable_token_tensors() -> None:
    model = make("vit", num_classes=5, input_shape=(3, 32, 32), dim=32, depth=3, heads=2).eval()
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 3
    seen: list[torch.Size] = []
    model.get_submodule("blocks.1").register_forward_hook(lambda module, args, output: seen.append(output.shape))
    inputs = torch.randn(2, 3, 32, 32)
    tokens = 1 + (32 // 4) ** 2
    assert model(inputs).shape == (2, 5)
    assert seen == [torch.Size([2, tokens, 32])]
    assert model.forward_features(inputs).shape == (2, tokens, 32)


# ------------------------------------------------------------------------------------ build_model


def test_build_model_by_registry_name() -> None:
    model = build_model(ModelSpec(arch="resnet8", params={"width": 0.5}), num_classes=3, input_shape=(1, 28, 28))
    assert model.fc.out_features == 3 and model.fc.in_features == 32
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self, num_classes, hidden: int = 8):
            super().__init__()
            self.hidden = hidden
            self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.net(x)

    class FixedNet(nn.Module):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x) * self.scale

    def builder(*, num_classes: int, input_shape: tuple, depth: int = 1):
        layers = [nn.Flatten(), nn.Linear(input_shape[0], 16)] + [nn.Linear(16, 16) for _ in range(depth - 1)]
        return nn.Sequential(*layers, nn.Linear(16, num_classes))

    def not_a_model(*, num_classes: int, input_shape: tuple):
        return "oops"
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "distill_test_user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "distill_test_user_nets"


def test_build_model_by_import_path(user_module: str) -> None:
    tiny = build_model(ModelSpec(arch=f"{user_module}:TinyNet", params={"hidden": 5}), num_classes=4, input_shape=(6,))
    assert tiny.hidden == 5
    assert tiny(torch.randn(3, 6)).shape == (3, 4)

    # A class that takes neither num_classes nor input_shape gets only its params.
    fixed_spec = ModelSpec(arch=f"{user_module}:FixedNet", params={"scale": 2.0})
    fixed = build_model(fixed_spec, num_classes=2, input_shape=(4,))
    assert fixed.scale == 2.0

    function_built = build_model(
        ModelSpec(arch=f"{user_module}:builder", params={"depth": 3}), num_classes=2, input_shape=(4,)
    )
    assert function_built(torch.randn(1, 4)).shape == (1, 2)
    assert sum(isinstance(layer, nn.Linear) for layer in function_built) == 4


def test_build_model_rejects_a_builder_that_returns_no_module(user_module: str) -> None:
    with pytest.raises(TypeError, match="returned str, not a torch.nn.Module"):
        build_model(ModelSpec(arch=f"{user_module}:not_a_model"), num_classes=2, input_shape=(4,))


def test_unknown_parameter_names_it_with_did_you_mean() -> None:
    with pytest.raises(ValueError) as error:
        build_model(ModelSpec(arch="mlp", params={"hiden": [32]}), num_classes=2, input_shape=(4,))
    message = str(error.value)
    assert "model 'mlp' has no parameter 'hiden'" in message
    assert "did you mean 'hidden'?" in message
    assert "accepted: activation, dropout, hidden" in message


def test_unknown_parameter_of_an_import_path_class(user_module: str) -> None:
    expected = r"has no parameter 'hiddn'.*did you mean 'hidden'.*accepted: hidden"
    with pytest.raises(ValueError, match=expected):
        build_model(ModelSpec(arch=f"{user_module}:TinyNet", params={"hiddn": 3}), num_classes=2, input_shape=(4,))


@pytest.mark.parametrize("reserved", ["num_classes", "input_shape"])
def test_data_parameters_may_not_be_set_in_params(reserved: str) -> None:
    with pytest.raises(ValueError, match=f"'{reserved}' is set by distill itself and cannot be given in params"):
        build_model(ModelSpec(arch="mlp", params={reserved: 3}), num_classes=2, input_shape=(4,))


def test_count_parameters_trainable_only() -> None:
    model = make("mlp", num_classes=2, input_shape=(4,), hidden=[3])
    assert count_parameters(model) == (4 * 3 + 3) + (3 * 2 + 2)
    model.features[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3 * 2 + 2


# ------------------------------------------------------------------------------------ load_weights


def test_load_weights_round_trip(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = make("resnet8", num_classes=5).eval()
    trained.bn1.running_mean.normal_()
    path = tmp_path / "resnet8.safetensors"
    save_file(trained.state_dict(), str(path))

    torch.manual_seed(1)
    fresh = build_model(ModelSpec(arch="resnet8"), num_classes=5, input_shape=(3, 32, 32)).eval()
    inputs = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(fresh(inputs), trained(inputs))
    assert load_weights(fresh, path) is fresh
    torch.testing.assert_close(fresh(inputs), trained(inputs))

    via_spec = build_model(ModelSpec(arch="resnet8", weights=str(path)), num_classes=5, input_shape=(3, 32, 32))
    torch.testing.assert_close(via_spec.eval()(inputs), trained(inputs))


def test_load_weights_reports_mismatches_with_shapes(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "ten_classes.safetensors"
    save_file(make("resnet8", num_classes=10).state_dict(), str(path))
    with pytest.raises(ValueError) as error:
        load_weights(make("resnet8", num_classes=5), path)
    message = str(error.value)
    assert "ten_classes.safetensors" in message
    assert "fc.weight: file [10, 64] vs model [5, 64]" in message
    assert "fc.bias: file [10] vs model [5]" in message

    with pytest.raises(ValueError) as error:
        load_weights(make("resnet14", num_classes=10), path)
    message = str(error.value)
    assert "missing keys (in the model, not in the file)" in message
    assert "layer1.1.conv1.weight [16, 16, 3, 3]" in message
    assert "... and " in message  # resnet14 has far more than ten extra tensors
    assert "unexpected keys" not in message

    save_file(make("resnet14").state_dict(), str(tmp_path / "resnet14.safetensors"))
    expected = r"unexpected keys \(in the file, not in the model\), 36:\n\s+layer1.1.bn1.bias \[16\]"
    with pytest.raises(ValueError, match=expected):
        load_weights(make("resnet8"), tmp_path / "resnet14.safetensors")


def test_load_weights_missing_and_non_safetensors_files(tmp_path) -> None:
    model = make("mlp", num_classes=2, input_shape=(4,))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(model, tmp_path / "nope.safetensors")
    pickled = tmp_path / "weights.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(ValueError, match="only from .safetensors files"):
        load_weights(model, pickled)


def test_load_weights_accepts_tied_weights_saved_once(tmp_path) -> None:
    from safetensors.torch import save_model

    class TiedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 4, bias=False)
            self.head = nn.Linear(4, 4, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    source, target = TiedNet(), TiedNet()
    save_model(source, str(tmp_path / "tied.safetensors"))  # stores the shared tensor under one name
    load_weights(target, tmp_path / "tied.safetensors")
    torch.testing.assert_close(target.head.weight, source.embed.weight)
    assert target.head.weight is target.embed.weight


# --------------------------------------------------------------------------------- hf_classifier

TINY_VIT = {
    "model_type": "vit",
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 1,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def test_hf_classifier_from_config() -> None:
    pytest.importorskip("transformers")
    model = build_model(
        ModelSpec(arch="hf_classifier", params={"config": TINY_VIT}), num_classes=4, input_shape=(1, 8, 8)
    )
    assert type(model).__name__ == "HFClassifier"
    assert model.get_submodule("model.vit.layers.1") is not None
    logits = model(torch.randn(3, 1, 8, 8))
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 4)


def test_hf_classifier_from_local_folder(tmp_path) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    saved = make("hf_classifier", num_classes=3, input_shape=(1, 8, 8), config=TINY_VIT).eval()
    folder = tmp_path / "tiny-vit"
    saved.model.save_pretrained(folder)
    inputs = torch.randn(2, 1, 8, 8)

    same_head = make("hf_classifier", num_classes=3, input_shape=(1, 8, 8), source=str(folder)).eval()
    torch.testing.assert_close(same_head(inputs), saved(inputs))

    # A head of another size is re-initialized; the backbone still comes from the folder.
    new_head = make("hf_classifier", num_classes=5, input_shape=(1, 8, 8), source=str(folder)).eval()
    assert new_head(inputs).shape == (2, 5)
    torch.testing.assert_close(
        new_head.model.vit.embeddings.patch_embeddings.projection.weight,
        saved.model.vit.embeddings.patch_embeddings.projection.weight,
    )


def test_hf_classifier_sequence_task_pads_with_eos() -> None:
    pytest.importorskip("transformers")
    config = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16}
    model = make("hf_classifier", num_classes=3, input_shape=(12,), config=config, task="sequence")
    assert model(torch.randint(0, 50, (4, 12))).shape == (4, 3)


def test_hf_classifier_errors(tmp_path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        make("hf_classifier", input_shape=(1, 8, 8), source=str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match=r"\./missing-checkpoint"):
        make("hf_classifier", input_shape=(1, 8, 8), source="./missing-checkpoint")
    with pytest.raises(ValueError, match="task 'text' is not one of: image, sequence"):
        make("hf_classifier", input_shape=(1, 8, 8), config=TINY_VIT, task="text")
    with pytest.raises(ValueError, match="exactly one of `source`.*got both"):
        make("hf_classifier", input_shape=(1, 8, 8), config=TINY_VIT, source="org/model")
    with pytest.raises(ValueError, match="exactly one of `source`.*got neither"):
        make("hf_classifier", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="needs a `model_type`"):
        make("hf_classifier", input_shape=(1, 8, 8), config={"hidden_size": 8})
    with pytest.raises(ValueError, match="expects 1-channel images but the data has input_shape \\(3, 8, 8\\)"):
        make("hf_classifier", input_shape=(3, 8, 8), config=TINY_VIT)

"""Registries: names to builders, import paths, and errors with near misses."""

from __future__ import annotations

import pytest

from distill.registry import LOSSES, MODELS, Registry, RegistryError, import_from_path, load_builtins, parameter_problems


def test_register_get_and_list() -> None:
    registry = Registry("widgets", "widget")

    @registry.register("blue", summary="A blue widget.")
    def blue(*, size: int = 1):
        return ("blue", size)

    @registry.register()
    def red():
        """Red widgets. More text."""
        return "red"

    assert registry.names() == ["blue", "red"]
    assert registry.get("red").summary == "Red widgets. More text."
    assert registry.build("blue", size=3) == ("blue", 3)
    with pytest.raises(RegistryError, match="unknown widget 'bleu' \\(did you mean 'blue'\\?\\); registered: blue, red"):
        registry.get("bleu")
    with pytest.raises(ValueError, match="already has an entry named 'blue'"):
        registry.register("blue")(lambda: None)


def test_import_paths() -> None:
    assert import_from_path("collections:OrderedDict").__name__ == "OrderedDict"
    assert MODELS.get("torch.nn:Linear").builder.__name__ == "Linear"
    with pytest.raises(RegistryError, match="cannot import module 'no_such_module_xyz'"):
        import_from_path("no_such_module_xyz:Thing")
    with pytest.raises(RegistryError, match="has no attribute 'OrderdDict' \\(did you mean 'OrderedDict'\\?\\)"):
        import_from_path("collections:OrderdDict")
    with pytest.raises(RegistryError, match="not an import path"):
        import_from_path("collections")


def test_parameter_problems() -> None:
    def builder(*, num_classes: int, path: str, depth: int = 3):
        return None

    problems = dict(parameter_problems(builder, {"depht": 2, "num_classes": 3}, what="model 'x'", injected=("num_classes",)))
    assert "did you mean 'depth'" in problems["depht"]
    assert "set by distill itself" in problems["num_classes"]
    assert "needs the parameter 'path'" in problems["path"]


def test_builtins_are_registered() -> None:
    load_builtins()
    assert {"hinton_kd", "cross_entropy"} <= set(LOSSES.names())
    assert {"mlp", "resnet_cifar", "wrn", "mobilenetv2", "vit", "hf_classifier"} <= set(MODELS.names())
    assert all(entry.summary for entry in MODELS)

"""Build a model from its :class:`~distill.config.schema.ModelSpec`, load safetensors weights, count parameters.

``arch`` is a name in :data:`distill.registry.MODELS` or an import path ``package.module:Name`` naming
a builder function or an ``nn.Module`` subclass. ``num_classes`` and ``input_shape`` come from the
data and are passed to any builder whose signature names them; everything else comes from
``params``, checked against the builder's signature before anything is built.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from distill.registry import MODELS, accepted_parameters, parameter_problems

if TYPE_CHECKING:  # only for annotations: keeps distill.config free to import this module
    from distill.config.schema import ModelSpec

#: Builder arguments that come from the data, never from ``params``.
DATA_PARAMETERS = ("num_classes", "input_shape")

_MAX_LISTED_KEYS = 10


def check_model_params(arch: str, params: Mapping[str, Any]) -> Callable[..., Any]:
    """Resolve ``arch`` and check ``params`` against its builder's signature; return the builder.

    Raises :class:`distill.registry.RegistryError` for an unknown ``arch`` and ``ValueError`` for a
    parameter the builder does not accept (with a did-you-mean and the accepted parameters), a
    required one that is missing, or ``num_classes``/``input_shape`` given in ``params``.
    """
    builder = MODELS.get(arch).builder
    problems = parameter_problems(builder, dict(params), what=f"model '{arch}'", injected=DATA_PARAMETERS)
    if problems:
        raise ValueError("; ".join(message for _, message in problems))
    return builder


def build_model(spec: ModelSpec, *, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Build the network ``spec`` describes, mapping ``[N, *input_shape]`` to logits ``[N, num_classes]``.

    ``num_classes`` and ``input_shape`` are passed only to builders whose signature names them (every
    registered builder does; a user's class may not). If ``spec.weights`` is set, that safetensors
    file is loaded strictly into the new model.
    """
    builder = check_model_params(spec.arch, spec.params)
    accepted, _ = accepted_parameters(builder)
    data_arguments = {"num_classes": int(num_classes), "input_shape": tuple(int(size) for size in input_shape)}
    kwargs = dict(spec.params)
    kwargs.update({name: value for name, value in data_arguments.items() if name in accepted})
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model '{spec.arch}' builder returned {type(model).__name__}, not a torch.nn.Module"
        )
    if spec.weights:
        load_weights(model, spec.weights)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a safetensors file into ``model`` strictly (every key, every shape); return ``model``.

    Only safetensors is read: no ``torch.load``, no pickle. Tensors the model ties together (a
    shared embedding and output layer) may appear in the file under any one of their names.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` listing up to ten missing keys,
    unexpected keys and shape mismatches each, with shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    try:
        file_tensors = load_file(path, device="cpu")
    except SafetensorError as error:
        raise ValueError(
            f"weights file '{path}' is not a readable safetensors file ({error}); "
            "distill loads weights only from .safetensors files"
        ) from error

    model_tensors = model.state_dict()
    aliases = _tied_aliases(model_tensors)
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key in model_tensors:
        source_key = key if key in file_tensors else next((a for a in aliases[key] if a in file_tensors), None)
        if source_key is None:
            missing.append(f"{key} {_shape(model_tensors[key])}")
        else:
            state[key] = file_tensors[source_key]
    unexpected = [f"{key} {_shape(file_tensors[key])}" for key in sorted(file_tensors) if key not in model_tensors]
    mismatched = [
        f"{key}: file {_shape(tensor)} vs model {_shape(model_tensors[key])}"
        for key, tensor in state.items()
        if tensor.shape != model_tensors[key].shape
    ]
    if missing or unexpected or mismatched:
        sections = [
            _listing("missing keys (in the model, not in the file)", missing),
            _listing("unexpected keys (in the file, not in the model)", unexpected),
            _listing("shape mismatches", mismatched),
        ]
        raise ValueError(
            f"weights file '{path}' does not fit the model ({type(model).__name__}):\n"
            + "\n".join(section for section in sections if section)
        )
    model.load_state_dict(state, strict=True)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared parameters counted once); only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    lines = [f"  {title}, {len(items)}:"] + [f"    {item}" for item in items[:_MAX_LISTED_KEYS]]
    if len(items) > _MAX_LISTED_KEYS:
        lines.append(f"    ... and {len(items) - _MAX_LISTED_KEYS} more")
    return "\n".join(lines)


def _tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each key, the other keys naming the very same tensor memory (tied weights)."""
    groups: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for key, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        memory = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        groups[memory].append(key)
    aliases: dict[str, list[str]] = defaultdict(list)
    for keys in groups.values():
        for key in keys:
            aliases[key] = [other for other in keys if other != key]
    return aliases

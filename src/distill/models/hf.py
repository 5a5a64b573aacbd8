"""Hugging Face ``transformers`` classifiers as distill models (registered as ``hf_classifier``).

A checkpoint (hub id or local folder) or a config dict becomes an ``nn.Module`` whose ``forward(x)``
returns the logits tensor, like every other model here. ``transformers`` is imported only when such
a model is built, so ``import distill.models`` stays fast.

Example YAML::

    models:
      teacher:
        arch: hf_classifier
        params: {source: google/vit-base-patch16-224, task: image}
      student:
        arch: hf_classifier
        params:
          config: {model_type: vit, image_size: 32, patch_size: 4, hidden_size: 64,
                   num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from distill.registry import MODELS

TASKS = ("image", "sequence")


class HFClassifier(nn.Module):
    """Wrap a ``transformers`` classification model so ``forward(x)`` returns logits ``[N, num_classes]``.

    The wrapped model is ``self.model``, so its submodules have dotted paths such as
    ``model.vit.encoder.layer.0``. For ``task="image"`` the input is ``pixel_values`` ``[N, C, H, W]``;
    for ``task="sequence"`` it is ``input_ids`` ``[N, T]`` (int64), with an optional
    ``attention_mask`` ``[N, T]``.
    """

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"hf_classifier task '{task}' is not one of: {', '.join(TASKS)}")
        self.model = model
        self.task = task

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, C, H, W]`` images or ``[N, T]`` token ids -> logits ``[N, num_classes]``."""
        if self.task == "image":
            return self.model(pixel_values=x).logits
        return self.model(input_ids=x, attention_mask=attention_mask).logits


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a local path rather than a hub id (``org/name``)."""
    return source.startswith((".", "/", "~"))


def _auto_model_class(task: str) -> Any:
    import transformers

    if task == "image":
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForSequenceClassification


@MODELS.register("hf_classifier", summary="Hugging Face transformers classifier from a hub id, local folder or config.")
def hf_classifier(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    source: str | None = None,
    config: dict | None = None,
    task: str = "image",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """A ``transformers`` image or sequence classifier (Wolf et al., "Transformers: State-of-the-Art
    Natural Language Processing", EMNLP 2020 demos).

    Give exactly one of ``source`` (a hub id or local folder, loaded with ``from_pretrained``; a head
    of the wrong size is re-initialized for ``num_classes``) or ``config`` (a dict with ``model_type``
    and config fields, built with random weights). ``task`` is ``image`` (inputs ``pixel_values``) or
    ``sequence`` (inputs ``input_ids``). Weights are loaded in float32; mixed precision is the
    engine's business. ``trust_remote_code`` runs code from the checkpoint: leave it off unless you
    trust the source.
    """
    if task not in TASKS:
        raise ValueError(f"hf_classifier task '{task}' is not one of: {', '.join(TASKS)}")
    if (source is None) == (config is None):
        raise ValueError(
            "hf_classifier needs exactly one of `source` (a hub id or local folder) or `config` "
            f"(a dict with model_type); got {'both' if source is not None else 'neither'}"
        )
    auto_class = _auto_model_class(task)

    if source is not None:
        expanded = os.path.expanduser(source)
        if _looks_like_path(source) and not os.path.exists(expanded):
            raise FileNotFoundError(f"hf_classifier source '{source}' does not exist (resolved to '{expanded}')")
        model = auto_class.from_pretrained(
            expanded if os.path.exists(expanded) else source,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
            dtype=torch.float32,
        )
    else:
        assert config is not None
        model = auto_class.from_config(
            _config_from_dict(config, num_classes, trust_remote_code), trust_remote_code=trust_remote_code
        )

    _check_input_shape(model, task, input_shape)
    model_config = model.config
    if task == "sequence" and getattr(model_config, "pad_token_id", None) is None:
        # Decoder-only classifiers pool at the last non-pad token and refuse batches > 1 without one.
        eos_token_id = getattr(model_config, "eos_token_id", None)
        if isinstance(eos_token_id, list):
            eos_token_id = eos_token_id[0] if eos_token_id else None
        if eos_token_id is not None:
            model_config.pad_token_id = eos_token_id
    return HFClassifier(model, task)


def _config_from_dict(config: dict, num_classes: int, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("hf_classifier `config` needs a `model_type` (e.g. 'vit', 'bert', 'gpt2')")
    for reserved in ("num_labels", "id2label", "label2id"):
        if reserved in fields:
            raise ValueError(
                f"hf_classifier `config` must not set '{reserved}': the number of classes comes from the data"
            )
    try:
        return AutoConfig.for_model(model_type, **fields, num_labels=num_classes)
    except ValueError as error:
        raise ValueError(f"hf_classifier config model_type '{model_type}': {error}") from error


def _check_input_shape(model: nn.Module, task: str, input_shape: tuple[int, ...]) -> None:
    """Fail early, with both numbers, when an image model's channel count differs from the data's."""
    if task != "image":
        return
    expected_channels = getattr(model.config, "num_channels", None)
    if len(input_shape) == 3 and isinstance(expected_channels, int) and expected_channels != input_shape[0]:
        raise ValueError(
            f"hf_classifier model expects {expected_channels}-channel images but the data has input_shape "
            f"{tuple(input_shape)}; set num_channels: {input_shape[0]} in `config` or pick another checkpoint"
        )

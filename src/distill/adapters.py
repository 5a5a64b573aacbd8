"""Adapters: small trainable modules that map a student feature to the shape a loss needs.

A term's input names a source and, after ``->``, an adapter declared in the objective::

    objective:
      adapters:
        proj2: {kind: conv1x1, to: teacher.layer3.output}
      terms:
        - name: hint
          loss: feature_mse
          inputs:
            student_features: student.layer2.output -> proj2
            teacher_features: teacher.layer3.output

Adapters belong to the objective (an ``nn.Module``): they are trained with the student by the same
optimizer, saved in every checkpoint with it, and left out of the exported student
(``stages/<name>/model.safetensors`` holds the student's own weights only). Their input shape
is the shape of the source fed to them, their output shape that of the source named by ``to``
(``to: logits`` means ``[num_classes]``), both read from one probing forward pass before
training; ``out_features`` may replace ``to`` for the kinds that end in a linear layer.

Kinds (shapes are of one sample; ``[D]`` a vector, ``[N, D]`` tokens, ``[C, H, W]`` a map):

``linear``
    ``nn.Linear`` on the last dimension: ``[..., D] -> [..., D']`` (vectors or tokens).
``mlp``
    ``Linear(D, hidden) -> GELU -> Linear(hidden, D')`` on the last dimension.
``conv1x1``
    FitNets' regressor: ``Conv2d(C, C', 1) -> BatchNorm2d(C')``; when the target map's height and
    width differ, the result is resized to them (bilinear).
``token_pool``
    Between token sequences and maps or vectors: a map ``[C, H, W]`` is read as tokens
    ``[H*W, C]``; ``params: {skip_tokens: k}`` drops the first ``k`` tokens (a ViT's class token)
    first; tokens are average-pooled to the target's token count (``[N', D']`` target) or
    to one vector (``[D']`` target), then a ``Linear`` maps the channels. A ``[C', H', W']``
    target gets tokens pooled to ``H'*W'`` and laid out as a map.
``logit_branch``
    OFA-KD's exit branch (Hao et al., NeurIPS 2023): projects an intermediate feature into the
    logit space. Maps: ``Conv1x1(C, hidden) -> BN -> ReLU -> Conv3x3(hidden, hidden, stride 2 when
    H > 4) -> BN -> ReLU -> global average pool -> Linear(hidden, K)``; tokens: ``LayerNorm ->
    mean over tokens -> Linear(D, K)``; vectors: ``Linear(D, K)``. ``to: logits`` by default.
``decoder``
    G2SD's light decoder (Huang et al., CVPR 2023): ``Linear(D, hidden)``, ``depth`` pre-norm
    transformer blocks (``heads``), ``LayerNorm`` and ``Linear(hidden, D')`` on tokens ``[N, D]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARROW = "->"
KINDS = ("linear", "mlp", "conv1x1", "token_pool", "logit_branch", "decoder")
LOGITS = "logits"


def split_source(source: str) -> tuple[str, str | None]:
    """``"student.layer2.output -> proj2"`` -> ``("student.layer2.output", "proj2")``; no arrow -> ``(source, None)``."""
    if ARROW not in source:
        return source.strip(), None
    base, _, adapter = source.partition(ARROW)
    adapter = adapter.strip()
    if not adapter or ARROW in adapter:
        raise ValueError(f"'{source}': write 'source -> adapter' with exactly one adapter name after '->'")
    return base.strip(), adapter


@dataclass
class Adapter:
    """What an adapter is (the Python counterpart of the YAML ``objective.adapters`` entry)."""

    kind: str
    to: str | None = None
    out_features: int | None = None
    hidden: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind '{self.kind}'; kinds: {', '.join(KINDS)}")


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``; tokens and vectors pass unchanged."""
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


class _Conv1x1(nn.Module):
    def __init__(self, in_channels: int, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_shape[0], kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(out_shape[0])
        self.size = tuple(out_shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        if tuple(y.shape[-2:]) != self.size:
            y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
        return y


class _TokenPool(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], skip_tokens: int = 0) -> None:
        super().__init__()
        self.skip_tokens = skip_tokens
        in_channels = in_shape[0] if len(in_shape) == 3 else in_shape[-1]
        self.out_shape = out_shape
        if len(out_shape) == 1:
            self.tokens, out_channels = None, out_shape[0]
        elif len(out_shape) == 2:
            self.tokens, out_channels = out_shape[0], out_shape[1]
        else:
            self.tokens, out_channels = out_shape[1] * out_shape[2], out_shape[0]
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = _as_tokens(x)
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(1)
        tokens = tokens[:, self.skip_tokens :]
        if self.tokens is None:
            return self.proj(tokens.mean(dim=1))
        pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.tokens).transpose(1, 2)
        out = self.proj(pooled)
        if len(self.out_shape) == 3:
            out = out.transpose(1, 2).reshape(x.shape[0], *self.out_shape)
        return out


class _LogitBranch(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_outputs: int, hidden: int | None) -> None:
        super().__init__()
        self.kind = {1: "vector", 2: "tokens", 3: "map"}[len(in_shape)]
        if self.kind == "map":
            channels, height = in_shape[0], in_shape[1]
            width = hidden or max(64, channels)
            self.body: nn.Module = nn.Sequential(
                nn.Conv2d(channels, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride=2 if height > 4 else 1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.head = nn.Linear(width, num_outputs)
        elif self.kind == "tokens":
            self.body = nn.LayerNorm(in_shape[-1])
            self.head = nn.Linear(in_shape[-1], num_outputs)
        else:
            self.body = nn.Identity()
            self.head = nn.Linear(in_shape[0], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.kind == "tokens":
            y = y.mean(dim=1)
        return self.head(y)


class _Decoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int, depth: int, heads: int) -> None:
        super().__init__()
        from distill.models.vit import TransformerBlock

        self.embed = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, heads, 2.0, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_adapter(
    name: str, adapter: Adapter, in_shape: tuple[int, ...], out_shape: tuple[int, ...] | None
) -> nn.Module:
    """The module of ``adapter`` for inputs of per-sample shape ``in_shape``.

    ``out_shape`` is the per-sample shape to produce (from ``to``), or None when only
    ``out_features`` is given. Raises ``ValueError`` naming the adapter when the shapes do not fit
    its kind.
    """
    in_shape, kind = tuple(in_shape), adapter.kind
    if out_shape is None:
        if adapter.out_features is None:
            raise ValueError(f"adapter '{name}': set `to` (a source, or 'logits') or `out_features`")
        out_shape = (*in_shape[:-1], adapter.out_features) if kind in ("linear", "mlp", "decoder") else (adapter.out_features,)
    out_shape = tuple(out_shape)

    def fail(expected: str) -> ValueError:
        return ValueError(f"adapter '{name}' ({kind}) {expected}; its input is {list(in_shape)}, its target {list(out_shape)}")

    if kind in ("linear", "mlp"):
        if len(in_shape) != len(out_shape) or in_shape[:-1] != out_shape[:-1] or len(in_shape) > 2:
            raise fail("maps the last dimension of vectors [D] or tokens [N, D]; other dimensions must match")
        if kind == "linear":
            return nn.Linear(in_shape[-1], out_shape[-1])
        hidden = adapter.hidden or max(in_shape[-1], out_shape[-1])
        return nn.Sequential(nn.Linear(in_shape[-1], hidden), nn.GELU(), nn.Linear(hidden, out_shape[-1]))
    if kind == "conv1x1":
        if len(in_shape) != 3 or len(out_shape) != 3:
            raise fail("maps feature maps [C, H, W] to feature maps")
        return _Conv1x1(in_shape[0], out_shape)
    if kind == "token_pool":
        if len(in_shape) not in (2, 3):
            raise fail("reads tokens [N, D] or maps [C, H, W]")
        skip = int(adapter.params.get("skip_tokens", 0))
        if not 0 <= skip < (in_shape[0] if len(in_shape) == 2 else in_shape[1] * in_shape[2]):
            raise fail(f"params.skip_tokens {skip} must leave at least one token")
        return _TokenPool(in_shape, out_shape, skip)
    if kind == "logit_branch":
        if len(out_shape) != 1 or len(in_shape) not in (1, 2, 3):
            raise fail("maps a vector, tokens or a map to logits [K]")
        return _LogitBranch(in_shape, out_shape[0], adapter.hidden)
    if kind == "decoder":
        if len(in_shape) != 2 or len(out_shape) != 2 or in_shape[0] != out_shape[0]:
            raise fail("maps tokens [N, D] to tokens [N, D'] (same N)")
        heads = int(adapter.params.get("heads", 4))
        hidden = adapter.hidden or 128
        hidden = int(math.ceil(hidden / heads) * heads)
        return _Decoder(in_shape[-1], out_shape[-1], hidden, int(adapter.params.get("depth", 1)), heads)
    raise ValueError(f"unknown adapter kind '{kind}'")  # pragma: no cover - Adapter checks the kind


ADAPTER_PARAMS = {"decoder": ("depth", "heads"), "token_pool": ("skip_tokens",)}
"""Keys each kind accepts in ``params``."""

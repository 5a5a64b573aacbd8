"""The built-in model zoo: small classifiers for images and flat feature vectors.

Every builder here is registered in :data:`distill.registry.MODELS` and follows one contract:
``num_classes`` and ``input_shape`` (``(C, H, W)`` for images, ``(D,)`` for flat features) are
keyword-only and injected by the engine from the data; every other keyword comes from the YAML
``params`` of the model and has a default. The returned module maps inputs ``[N, *input_shape]``
to logits ``[N, num_classes]``.

The architectures live in :mod:`distill.models.cnn` and :mod:`distill.models.vit`. Stages and
blocks carry stable names (``layer3``, ``blocks.2``, ``features.5``) so feature-based
losses can hook them by dotted path.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from distill.models.cnn import MobileNetV2, ResNetCifar, WideResNet
from distill.models.vit import VisionTransformer
from distill.registry import MODELS

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}

# --------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Flatten ``[N, *input_shape]`` to ``[N, D]``, then Linear-activation-dropout layers and a head."""

    def __init__(
        self, *, num_classes: int, input_dim: int, hidden: list[int], dropout: float, activation: str
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_features = input_dim
        for out_features in hidden:
            layers += [nn.Linear(in_features, out_features), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = out_features
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, *input_shape]`` -> logits ``[N, num_classes]``."""
        return self.head(self.features(x.flatten(1)))


@MODELS.register("mlp", summary="Multi-layer perceptron on flattened inputs (any input shape).")
def mlp(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: list[int] = [256, 256],  # noqa: B006  (never mutated; a list reads naturally in YAML)
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Module:
    """Multi-layer perceptron on flattened inputs (Rumelhart, Hinton & Williams, Nature 1986).

    ``hidden`` lists the widths of the hidden layers (empty: a linear classifier); ``activation`` is
    one of relu, gelu, silu, tanh, leaky_relu.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp activation '{activation}' is not one of: {', '.join(ACTIVATIONS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp dropout must be in [0, 1), got {dropout}")
    hidden_widths = [int(width) for width in hidden]
    if any(width < 1 for width in hidden_widths):
        raise ValueError(f"mlp hidden widths must be positive, got {list(hidden)}")
    return MLP(
        num_classes=num_classes,
        input_dim=math.prod(int(size) for size in input_shape),
        hidden=hidden_widths,
        dropout=dropout,
        activation=activation,
    )


# ------------------------------------------------------------------------------ Convolutional nets


@MODELS.register("resnet_cifar", summary="CIFAR ResNet-(6n+2) of He et al. 2016; depth 8/14/20/32/56/110.")
def resnet_cifar(
    *, num_classes: int, input_shape: tuple[int, ...], depth: int = 20, width: float = 1.0
) -> nn.Module:
    """CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

    ``depth`` = 6n+2 (8, 14, 20, 32, 44, 56, 110); ``width`` multiplies the 16/32/64 stage channels.
    Option-A (zero-padding) shortcuts; ResNet-20 has about 0.27M parameters on CIFAR-10.
    """
    return ResNetCifar(num_classes=num_classes, input_shape=input_shape, depth=depth, width=width)


def _register_resnet_of_depth(depth: int) -> Callable[..., nn.Module]:
    def builder(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0) -> nn.Module:
        return ResNetCifar(num_classes=num_classes, input_shape=input_shape, depth=depth, width=width)

    builder.__name__ = builder.__qualname__ = f"resnet{depth}"
    builder.__doc__ = (
        f"CIFAR ResNet-{depth} of He et al., CVPR 2016: ``resnet_cifar`` with depth {depth}.\n\n"
        "``width`` multiplies the 16/32/64 stage channels."
    )
    return MODELS.register(f"resnet{depth}", summary=f"CIFAR ResNet-{depth} (He et al. 2016).")(builder)


resnet8 = _register_resnet_of_depth(8)
resnet14 = _register_resnet_of_depth(14)
resnet20 = _register_resnet_of_depth(20)
resnet32 = _register_resnet_of_depth(32)
resnet56 = _register_resnet_of_depth(56)
resnet110 = _register_resnet_of_depth(110)


@MODELS.register("wrn", summary="Wide ResNet WRN-d-k of Zagoruyko & Komodakis 2016; depth 6n+4.")
def wrn(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    depth: int = 16,
    widen_factor: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, BMVC 2016).

    ``depth`` = 6n+4 (10, 16, 22, 28, 40); pre-activation blocks; ``dropout`` between the two convs
    of each block. WRN-16-2 has about 0.69M parameters on CIFAR-10.
    """
    return WideResNet(
        num_classes=num_classes, input_shape=input_shape, depth=depth, widen_factor=widen_factor, dropout=dropout
    )


@MODELS.register("mobilenetv2", summary="MobileNetV2 of Sandler et al. 2018, strides adapted to small images.")
def mobilenetv2(*, num_classes: int, input_shape: tuple[int, ...], width: float = 0.5) -> nn.Module:
    """MobileNetV2 (Sandler et al., CVPR 2018) with inverted residual blocks, for small images.

    ``width`` multiplies every layer's channels but the last 1280-channel conv (as in the paper).
    """
    return MobileNetV2(num_classes=num_classes, input_shape=input_shape, width=width)


# ---------------------------------------------------------------------------- Vision Transformer


@MODELS.register("vit", summary="Small Vision Transformer of Dosovitskiy et al. 2021 (conv patches, class token).")
def vit(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    patch_size: int = 4,
    dim: int = 128,
    depth: int = 6,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

    ``patch_size`` must divide the image height and width and ``dim`` be divisible by ``heads``.
    Blocks are ``blocks.0`` .. ``blocks.{depth-1}``, each giving tokens ``[N, 1 + patches, dim]``.
    """
    return VisionTransformer(
        num_classes=num_classes,
        input_shape=input_shape,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
    )

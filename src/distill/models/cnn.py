"""Convolutional architectures of the zoo: CIFAR ResNet, Wide ResNet and a small-image MobileNetV2.

The registered builders live in :mod:`distill.models.zoo`; the classes here take the same keyword
arguments and map images ``[N, C, H, W]`` to logits ``[N, num_classes]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Common CIFAR ResNet depths (any 6n+2 works), named in the error for an invalid depth.
RESNET_CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)


def _image_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``input_shape``, or a ValueError saying ``arch`` needs images."""
    if len(input_shape) != 3 or any(int(size) < 1 for size in input_shape):
        raise ValueError(
            f"{arch} needs image inputs with input_shape (C, H, W); got {tuple(input_shape)}. "
            "Use 'mlp' for flat feature vectors."
        )
    channels, height, width = (int(size) for size in input_shape)
    return channels, height, width


def _check_dropout(arch: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{arch} dropout must be in [0, 1), got {dropout}")


def _scaled_channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _kaiming_init(model: nn.Module) -> None:
    """He initialization for convolutions, unit BatchNorm, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------- CIFAR ResNet


class ZeroPadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("a zero-padding shortcut cannot reduce channels")
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W]`` -> ``[N, C_out, ceil(H/stride), ceil(W/stride)]``."""
        x = x[:, :, :: self.stride, :: self.stride]
        front = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra_channels - front))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation, He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = (
            ZeroPadShortcut(in_channels, out_channels, stride) if needs_projection else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W]`` -> ``[N, C_out, ceil(H/stride), ceil(W/stride)]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

    A 3x3 stem, then three stages ``layer1``-``layer3`` of ``n = (depth - 2) / 6`` basic blocks with
    16, 32, 64 channels (times ``width``), the last two halving height and width, then global average
    pooling and a linear head ``fc``. Shortcuts that change shape use the paper's parameter-free
    option A (strided identity, zero-padded channels), as in the paper's CIFAR experiments.
    """

    def __init__(self, *, num_classes: int, input_shape: tuple[int, ...], depth: int, width: float) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"resnet_cifar depth must be 6n+2 for n >= 1 (e.g. {', '.join(map(str, RESNET_CIFAR_DEPTHS))}); "
                f"got {depth}"
            )
        if width <= 0:
            raise ValueError(f"resnet_cifar width must be positive, got {width}")
        in_channels, _, _ = _image_shape("resnet_cifar", input_shape)
        blocks_per_stage = (depth - 2) // 6
        channels = [_scaled_channels(base, width) for base in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.layer1 = self._stage(channels[0], channels[0], blocks_per_stage, stride=1)
        self.layer2 = self._stage(channels[0], channels[1], blocks_per_stage, stride=2)
        self.layer3 = self._stage(channels[1], channels[2], blocks_per_stage, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[2], num_classes)
        _kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` -> logits ``[N, num_classes]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.pool(out).flatten(1))



# ------------------------------------------------------------------------------------ Wide ResNet


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 with a 1x1 projection if needed."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module | None = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if needs_projection else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W]`` -> ``[N, C_out, ceil(H/stride), ceil(W/stride)]``."""
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # As in the reference code, a projection shortcut reads the pre-activated input.
        return out + (self.shortcut(activated) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

    A 3x3 stem with 16 channels, three stages ``block1``-``block3`` of ``n = (depth - 4) / 6``
    pre-activation blocks with 16k, 32k, 64k channels (the last two halving height and width), then
    BN-ReLU, global average pooling and a linear head ``fc``.
    """

    def __init__(
        self, *, num_classes: int, input_shape: tuple[int, ...], depth: int, widen_factor: int, dropout: float
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wrn depth must be 6n+4 for n >= 1 (e.g. 10, 16, 22, 28, 40); got {depth}")
        if widen_factor < 1:
            raise ValueError(f"wrn widen_factor must be at least 1, got {widen_factor}")
        _check_dropout("wrn", dropout)
        in_channels, _, _ = _image_shape("wrn", input_shape)
        blocks_per_stage = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(channels[0], channels[1], blocks_per_stage, 1, dropout)
        self.block2 = self._stage(channels[1], channels[2], blocks_per_stage, 2, dropout)
        self.block3 = self._stage(channels[2], channels[3], blocks_per_stage, 2, dropout)
        self.bn = nn.BatchNorm2d(channels[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        _kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, num_blocks: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBasicBlock(in_channels, out_channels, stride, dropout)]
        blocks += [WideBasicBlock(out_channels, out_channels, 1, dropout) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` -> logits ``[N, num_classes]``."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(self.pool(out).flatten(1))



# ------------------------------------------------------------------------------------ MobileNetV2


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never below 90% of ``value`` (as in the paper's code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """Conv-BatchNorm-ReLU6 with 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),  # not in place, so a hook on the BatchNorm keeps seeing its own output
        )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 bottleneck; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_channels = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden_channels, 1))
        layers += [
            ConvBNReLU6(hidden_channels, hidden_channels, 3, stride=stride, groups=hidden_channels),
            nn.Conv2d(hidden_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W]`` -> ``[N, C_out, H', W']``."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

    The paper's 17 inverted-residual blocks (expansion t, channels c, repeats n, stride s), adapted to
    small images: the stem and the second stage use stride 1 instead of 2, and any remaining stride-2
    stage downsamples only while the feature map's shorter side is at least 4 pixels, so 32x32 inputs
    end at 4x4, 28x28 at 4x4 and 8x8 at 2x2 (never below 2x2 for inputs of at least 2x2). Blocks are
    ``features.0`` (stem) to ``features.18`` (last 1x1 conv); then pooling and the linear head.
    """

    # (expansion t, output channels c, repeats n, first stride s), from Table 2 of the paper.
    BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, *, num_classes: int, input_shape: tuple[int, ...], width: float) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"mobilenetv2 width must be positive, got {width}")
        in_channels, height, image_width = _image_shape("mobilenetv2", input_shape)
        shorter_side = min(height, image_width)
        channels = _make_divisible(32 * width)
        # The paper keeps the last conv at 1280 channels for width multipliers below 1.
        last_channels = _make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, channels, 3, stride=1)]
        for expansion, base_channels, repeats, first_stride in self.BLOCKS:
            out_channels = _make_divisible(base_channels * width)
            for index in range(repeats):
                stride = first_stride if index == 0 and shorter_side >= 4 else 1
                shorter_side = (shorter_side + stride - 1) // stride
                layers.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        layers.append(ConvBNReLU6(channels, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        _kaiming_init(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` -> logits ``[N, num_classes]``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))

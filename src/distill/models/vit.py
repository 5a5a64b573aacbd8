"""A small Vision Transformer for small images (registered as ``vit`` in :mod:`distill.models.zoo`).

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. https://arxiv.org/abs/2010.11929
"""

from __future__ import annotations

import torch
from torch import nn


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``.

    Input and output are token tensors ``[N, tokens, dim]``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden_dim = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, tokens, dim]`` -> ``[N, tokens, dim]``."""
        normed = self.norm1(tokens)
        attended, _ = self.attention(normed, normed, normed, need_weights=False)
        tokens = tokens + attended
        return tokens + self.mlp(self.norm2(tokens))


class VisionTransformer(nn.Module):
    """ViT classifier (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929).

    A strided convolution cuts the ``[N, C, H, W]`` image into ``(H/p)*(W/p)`` patches embedded in
    ``dim`` channels; a learnable class token is prepended and learnable position embeddings added,
    giving ``tokens = 1 + (H/p)*(W/p)``. ``self.blocks`` (an ``nn.ModuleList``, so ``blocks.2`` is a
    hookable dotted path) are pre-norm transformer blocks, each mapping ``[N, tokens, dim]`` to the
    same shape. A final LayerNorm and a linear head on the class token give logits
    ``[N, num_classes]``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"vit needs image inputs (C, H, W); got input_shape {tuple(input_shape)}")
        channels, height, width = input_shape
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(
                f"vit patch_size {patch_size} must divide the image height and width, but the input is "
                f"{height}x{width} (input_shape {tuple(input_shape)}); pick a patch_size that divides both"
            )
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"vit dim ({dim}) must be divisible by heads ({heads})")
        if depth < 1:
            raise ValueError(f"vit depth must be at least 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"vit dropout must be in [0, 1), got {dropout}")

        self.grid = (height // patch_size, width // patch_size)
        self.num_tokens = 1 + self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` -> normalized tokens ``[N, tokens, dim]`` (class token first)."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, H/p * W/p, dim]
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = self.dropout(torch.cat([cls_tokens, patches], dim=1) + self.pos_embed)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` -> logits ``[N, num_classes]``."""
        return self.head(self.forward_features(x)[:, 0])

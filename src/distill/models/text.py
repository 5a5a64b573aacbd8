"""A small, fast text classifier over token ids (``text_classifier``).

The student of text classification data sets such as ``wordnet_lexnames`` and
``text_classification_jsonl`` (:mod:`distill.data.text_classification`): inputs are token ids
``[N, T]`` int64, right-padded with a pad id; outputs are logits ``[N, num_classes]``. Every
encoder ignores pad positions, so a text's logits do not depend on how much padding follows it.

Encoders (``encoder``):

* ``bag`` (default): token embeddings, mean- and max-pooled over the non-pad tokens and
  concatenated -- a fastText-style bag of embeddings (Joulin et al., "Bag of Tricks for Efficient
  Text Classification", EACL 2017), with max pooling added;
* ``cnn``: one convolution layer over the token embeddings with several kernel widths, ReLU,
  max-pooled over the valid positions (Kim, "Convolutional Neural Networks for Sentence
  Classification", EMNLP 2014);
* ``transformer``: one pre-norm Transformer encoder layer (Vaswani et al., "Attention Is All You
  Need", NeurIPS 2017) with learned positions and a key padding mask, mean-pooled over the valid
  tokens.

The pooled features pass through dropout, an optional hidden ReLU layer (``hidden``) and a linear
head. The vocabulary size and the pad id come from ``tokenizer`` (the same source string as
``data.params.tokenizer``: ``len(tokenizer)`` and its pad id) or from ``vocab_size`` and
``pad_token_id``; the data sets record both in their ``meta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distill.registry import MODELS

ENCODERS = ("bag", "cnn", "transformer")

_TOKENIZER_SIZES: dict[str, tuple[int, int]] = {}


def tokenizer_vocabulary(source: str) -> tuple[int, int]:
    """``(len(tokenizer), pad id)`` of a tokenizer source, loaded once per process.

    A tokenizer without a pad token pads with its EOS token (as the data sets do).
    """
    if source not in _TOKENIZER_SIZES:
        from distill.models.causal_lm import load_tokenizer

        tokenizer = load_tokenizer(source)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"text_classifier: tokenizer '{source}' has neither a pad token nor an EOS token")
        _TOKENIZER_SIZES[source] = (len(tokenizer), int(tokenizer.pad_token_id))
    return _TOKENIZER_SIZES[source]


class TextClassifier(nn.Module):
    """Embeddings, a pad-aware encoder (``bag``, ``cnn`` or ``transformer``) and a linear head.

    ``forward(input_ids [N, T] int64) -> logits [N, num_classes]``; positions holding
    ``pad_token_id`` are ignored. A row of padding only gives the logits of an empty text.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        vocab_size: int,
        pad_token_id: int,
        encoder: str = "bag",
        dim: int = 64,
        hidden: int | None = None,
        kernel_sizes: Sequence[int] = (2, 3, 4),
        channels: int = 64,
        heads: int = 2,
        max_positions: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(vocab_size)
        self.encoder = encoder
        self.embedding = nn.Embedding(self.vocab_size, dim, padding_idx=self.pad_token_id)
        if encoder == "bag":
            features = 2 * dim
        elif encoder == "cnn":
            self.convs = nn.ModuleList(nn.Conv1d(dim, channels, k, padding=k - 1) for k in kernel_sizes)
            features = channels * len(kernel_sizes)
        elif encoder == "transformer":
            self.positions = nn.Embedding(max_positions, dim)
            self.layer = nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
            )
            self.norm = nn.LayerNorm(dim)
            self.max_positions = max_positions
            features = dim
        else:
            raise ValueError(f"text_classifier: encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout)) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or features, num_classes)

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, F]`` of token ids ``[N, T]`` (before dropout and the head)."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text_classifier takes token ids (int64), got {input_ids.dtype} inputs")
        if input_ids.numel() and (int(input_ids.max()) >= self.vocab_size or int(input_ids.min()) < 0):
            raise ValueError(
                f"text_classifier: token ids span {int(input_ids.min())}..{int(input_ids.max())} but the model's "
                f"vocabulary has {self.vocab_size} ids; was it built for another tokenizer?"
            )
        mask = input_ids != self.pad_token_id  # [N, T]
        embedded = self.embedding(input_ids)  # [N, T, D]
        if self.encoder == "bag":
            weights = mask.unsqueeze(-1).to(embedded.dtype)
            mean = (embedded * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            peak = embedded.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
            peak = torch.where(mask.any(1, keepdim=True), peak, torch.zeros_like(peak))
            return torch.cat([mean, peak], dim=1)
        if self.encoder == "cnn":
            # Padding positions enter as zero vectors (not the pad embedding); outputs whose window
            # holds no real token are excluded from the max.
            x = (embedded * mask.unsqueeze(-1).to(embedded.dtype)).transpose(1, 2)  # [N, D, T]
            pooled = []
            length = mask.sum(1)  # right padding: the valid tokens are the first `length`
            for conv in self.convs:
                out = torch.relu(conv(x))  # [N, C, T + k - 1]; output j covers tokens j-k+1 .. j
                valid = torch.arange(out.shape[-1], device=out.device).unsqueeze(0) < (length + conv.kernel_size[0] - 1).unsqueeze(1)
                valid = valid & (length > 0).unsqueeze(1)
                out = out.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(-1)
                pooled.append(torch.where(torch.isfinite(out), out, torch.zeros_like(out)))
            return torch.cat(pooled, dim=1)
        steps = input_ids.shape[1]
        if steps > self.max_positions:
            raise ValueError(f"text_classifier: {steps} tokens exceed max_positions={self.max_positions}")
        x = embedded + self.positions(torch.arange(steps, device=input_ids.device)).unsqueeze(0)
        empty = ~mask.any(1)
        key_padding = ~mask
        key_padding[empty, 0] = False  # an empty text attends to one position rather than to nothing (NaN)
        x = self.norm(self.layer(x, src_key_padding_mask=key_padding))
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, T]`` -> logits ``[N, num_classes]``."""
        return self.head(self.hidden(self.dropout(self.features(input_ids))))


@MODELS.register("text_classifier", summary="Small text classifier over token ids: embeddings, bag/CNN/1-layer transformer, linear head.")
def text_classifier(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    encoder: str = "bag",
    dim: int = 64,
    hidden: int | None = None,
    kernel_sizes: Sequence[int] = (2, 3, 4),
    channels: int = 64,
    heads: int = 2,
    dropout: float = 0.1,
) -> TextClassifier:
    """A :class:`TextClassifier` for token-id inputs ``[N, T]`` (``input_shape`` is ``(T,)``).

    Give ``tokenizer`` (the data's tokenizer source: the vocabulary size and pad id are read from
    it) or both ``vocab_size`` and ``pad_token_id``. ``encoder``: ``bag`` (mean+max pooled
    embeddings), ``cnn`` (``kernel_sizes`` x ``channels`` convolutions, max-pooled) or
    ``transformer`` (one layer, ``heads`` heads, positions up to ``T``). ``dim``: embedding width;
    ``hidden``: an optional hidden layer before the head; ``dropout`` on the pooled features.
    """
    if len(input_shape) != 1:
        raise ValueError(
            f"text_classifier takes token ids [N, T]; the data's inputs are {tuple(input_shape)} per sample"
        )
    if tokenizer is not None:
        if vocab_size is not None or pad_token_id is not None:
            raise ValueError("text_classifier: give either `tokenizer` or `vocab_size` and `pad_token_id`, not both")
        vocab_size, pad_token_id = tokenizer_vocabulary(tokenizer)
    elif vocab_size is None or pad_token_id is None:
        raise ValueError(
            "text_classifier needs the vocabulary: set params.tokenizer to the data's tokenizer source, or both "
            "params.vocab_size and params.pad_token_id"
        )
    checks: list[tuple[str, Any, int]] = [("vocab_size", vocab_size, 1), ("dim", dim, 1), ("channels", channels, 1), ("heads", heads, 1)]
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"text_classifier: {name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"text_classifier: pad_token_id must be an id in 0..{vocab_size - 1}, got {pad_token_id!r}")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"text_classifier: hidden must be a positive integer or null, got {hidden!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"text_classifier: dropout must be in [0, 1), got {dropout!r}")
    if encoder == "transformer" and dim % heads:
        raise ValueError(f"text_classifier: dim ({dim}) must be divisible by heads ({heads})")
    if encoder == "cnn" and (not kernel_sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in kernel_sizes)):
        raise ValueError(f"text_classifier: kernel_sizes must be a non-empty list of positive integers, got {kernel_sizes!r}")
    return TextClassifier(
        num_classes=num_classes,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        encoder=encoder,
        dim=dim,
        hidden=hidden,
        kernel_sizes=tuple(kernel_sizes),
        channels=channels,
        heads=heads,
        max_positions=int(input_shape[0]),
        dropout=float(dropout),
    )

"""Training-time augmentation whose randomness is a pure function of (seed, epoch, sample index).

Nothing here touches a global RNG. Each random number is a splitmix64 hash of
``(seed, epoch, stream, sample index)``, so a sample receives the same augmentation in a given
epoch however the samples are batched, ordered or spread over processes: multi-process runs
match single-process runs, and a resumed run matches an uninterrupted one.

Streams ``0..15`` are reserved for this module (``STREAM_*`` below); further augmentations
should draw from streams ``>= 16`` via :func:`sample_uniforms`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from distill.config.schema import AugmentSpec

STREAM_CROP_ROW = 0
STREAM_CROP_COLUMN = 1
STREAM_FLIP = 2

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    z = values + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def sample_hashes(seed: int, epoch: int, indices: torch.Tensor, stream: int) -> np.ndarray:
    """uint64 ``[N]``: a hash of ``(seed, epoch, stream, index)`` for each sample index.

    ``indices`` is int64 ``[N]`` (any device). Python integers of any sign are reduced modulo
    2**64 first.
    """
    flat = indices.detach().reshape(-1).to(device="cpu", dtype=torch.int64).numpy()
    with np.errstate(over="ignore"):
        state = _splitmix64(np.full(1, seed & _MASK64, dtype=np.uint64))
        state = _splitmix64(state ^ np.full(1, epoch & _MASK64, dtype=np.uint64))
        state = _splitmix64(state ^ np.full(1, stream & _MASK64, dtype=np.uint64))
        return _splitmix64(state ^ flat.view(np.uint64))


def sample_uniforms(seed: int, epoch: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 ``[N]`` uniforms in ``[0, 1)``, one per sample index, a pure function of the arguments.

    The same ``(seed, epoch, index, stream)`` always gives the same number, whatever else is in
    ``indices``. The result is on ``indices.device``. Use a distinct ``stream`` for each random
    quantity (streams 0..15 are reserved by this module).
    """
    hashes = sample_hashes(seed, epoch, indices, stream)
    uniforms = (hashes >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # 53 bits / 2**53
    return torch.from_numpy(uniforms).to(indices.device)


def sample_integers(seed: int, epoch: int, indices: torch.Tensor, stream: int, high: int) -> torch.Tensor:
    """int64 ``[N]`` uniform integers in ``[0, high)``, derived from :func:`sample_uniforms`."""
    uniforms = sample_uniforms(seed, epoch, indices, stream)
    return torch.clamp((uniforms * high).floor().to(torch.int64), max=high - 1)


def augment_batch(
    inputs: torch.Tensor,
    indices: torch.Tensor,
    *,
    epoch: int,
    seed: int,
    spec: AugmentSpec,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Randomly crop (after zero padding) and horizontally flip a batch of images.

    ``inputs`` is ``[N, C, H, W]``; ``indices`` int64 ``[N]`` holds each sample's index in the
    training split. With ``spec.random_crop = p > 0`` each image is zero-padded by ``p`` pixels
    on every side (with ``fill`` ``[C]`` instead of zero when given: pass the normalized value of
    a black pixel, ``-mean / std``, so padding looks like the images' own background) and an
    ``H x W`` window is cut at offsets drawn uniformly from ``0..2p`` per axis; with ``spec.hflip`` each image is mirrored left-right with probability 1/2. All draws
    depend only on ``(seed, epoch, index)``. Returns a new ``[N, C, H, W]`` tensor, or ``inputs``
    itself when both options are off.
    """
    padding = int(spec.random_crop)
    if padding == 0 and not spec.hflip:
        return inputs
    if inputs.dim() != 4:
        raise ValueError(
            f"data.augment needs image batches [N, C, H, W]; got inputs of shape {tuple(inputs.shape)}"
        )
    if indices.shape != (inputs.shape[0],):
        raise ValueError(
            f"augment_batch needs one sample index per input: inputs {tuple(inputs.shape)}, "
            f"indices {tuple(indices.shape)}"
        )
    batch, channels, height, width = inputs.shape
    device = inputs.device
    if padding > 0:
        if fill is None:
            source = F.pad(inputs, (padding, padding, padding, padding))
        else:
            fill_view = fill.to(device=device, dtype=inputs.dtype).reshape(1, channels, 1, 1)
            source = F.pad(inputs - fill_view, (padding, padding, padding, padding)) + fill_view
        row_offsets = sample_integers(seed, epoch, indices, STREAM_CROP_ROW, 2 * padding + 1).to(device)
        column_offsets = sample_integers(seed, epoch, indices, STREAM_CROP_COLUMN, 2 * padding + 1).to(device)
    else:
        source = inputs
        row_offsets = torch.zeros(batch, dtype=torch.int64, device=device)
        column_offsets = torch.zeros(batch, dtype=torch.int64, device=device)
    rows = row_offsets[:, None] + torch.arange(height, device=device)  # [N, H]
    column_steps = torch.arange(width, device=device).expand(batch, width)  # [N, W]
    if spec.hflip:
        flips = (sample_uniforms(seed, epoch, indices, STREAM_FLIP) < 0.5).to(device)
        column_steps = torch.where(flips[:, None], (width - 1) - column_steps, column_steps)
    columns = column_offsets[:, None] + column_steps  # [N, W]
    sample_axis = torch.arange(batch, device=device)[:, None, None, None]
    channel_axis = torch.arange(channels, device=device)[None, :, None, None]
    return source[sample_axis, channel_axis, rows[:, None, :, None], columns[:, None, None, :]]

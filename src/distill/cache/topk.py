"""A compact fixed-size encoding of a teacher's top-k distribution at one token position.

One record per token, ``record_bytes(k, vocab, value_bits)`` bytes, holding:

* **ids** - the k token ids, sorted ascending and Elias-Fano coded (Elias 1974, Fano 1971): with
  ``l = floor(log2(vocab / k))`` low bits stored plainly and the high parts as a unary bitmap of
  ``k + (vocab - 1) >> l + 1`` bits. For k=128 of a 49,152-token vocabulary that is 168 bytes
  (10.5 bits per id, against 16 for a plain uint16), and the size is the same for every token,
  so records are fixed-size and can be memory-mapped and gathered without an index.
* **values** - the log-probabilities, in the same (id) order, as ``d = lp_max - lp >= 0``
  companded with a square root and quantized to ``value_bits`` (8 or 16) bits:
  ``q = round(sqrt(d / D) * (2**bits - 1))`` where ``D`` is the token's largest ``d``. The
  square root spends the resolution on the likely tokens: the error of ``d`` is at most
  ``sqrt(d * D) / (2**bits - 1)`` (about 0.016 nats at ``d = 1``, ``D = 16``, 8 bits) and zero at
  the most likely token.
* **header** (4 bytes) - ``D`` (float16, rounded up) and the log of the teacher's probability mass
  outside the top k (float16; ``-inf`` when none). The most likely token's log-probability is not
  stored: it follows from normalization, ``lp_max = log(1 - tail) - logsumexp(-d)``, so the decoded
  top-k mass is exactly ``1 - tail``.

At k=128 and vocabulary 49,152 a record is 300 bytes (8-bit values). DistillKit's recommended
compression (16 exact bf16 values, a 6-term polynomial fit of the other 112, ids bit-packed at
``ceil(log2 vocab)`` bits) takes about 312 bytes at that vocabulary (they quote ~300 bytes/token
for theirs); ``benchmarks/teacher_cache.py`` measures both sizes and reconstruction errors side by side.
"""

from __future__ import annotations

import math

import numpy as np
import torch

HEADER_BYTES = 4


def low_bits(k: int, vocab: int) -> int:
    """Elias-Fano's number of plainly stored low bits for k ids out of ``vocab``."""
    return max(0, math.floor(math.log2(vocab / k))) if k < vocab else 0


def _layout(k: int, vocab: int, value_bits: int) -> tuple[int, int, int, int]:
    l = low_bits(k, vocab)
    low_bytes = (k * l + 7) // 8
    high_bits = k + ((vocab - 1) >> l) + 1
    high_bytes = (high_bits + 7) // 8
    value_bytes = k * value_bits // 8
    return l, low_bytes, high_bytes, value_bytes


def record_bytes(k: int, vocab: int, value_bits: int = 8) -> int:
    """Bytes of one token's record."""
    _check(k, vocab, value_bits)
    _, low_bytes, high_bytes, value_bytes = _layout(k, vocab, value_bits)
    return low_bytes + high_bytes + value_bytes + HEADER_BYTES


def _check(k: int, vocab: int, value_bits: int) -> None:
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in 1..vocab ({vocab}), got {k}")
    if value_bits not in (8, 16):
        raise ValueError(f"value_bits must be 8 or 16, got {value_bits}")


def _fp16_at_least(values: np.ndarray) -> np.ndarray:
    """float16 values no smaller than ``values`` (so every quantized d stays within range)."""
    half = values.astype(np.float16)
    low = half.astype(np.float32) < values
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half


def encode(logprobs: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor, vocab: int, value_bits: int = 8) -> np.ndarray:
    """Records ``[M, record_bytes]`` uint8 of ``M`` token positions.

    ``logprobs`` ``[M, k]`` float (log-probabilities normalized over the whole vocabulary), ``ids``
    ``[M, k]`` distinct token ids in any order, ``tail`` ``[M]`` the log of the mass outside them.
    """
    m, k = ids.shape
    _check(k, vocab, value_bits)
    l, low_bytes, high_bytes, value_bytes = _layout(k, vocab, value_bits)
    order = ids.argsort(dim=1)
    ids_sorted = ids.gather(1, order).to(torch.int64).numpy()
    lp = logprobs.float().gather(1, order).numpy().astype(np.float64)
    if m and (ids_sorted.min() < 0 or ids_sorted.max() >= vocab):
        raise ValueError(f"token ids must lie in 0..{vocab - 1}")
    if k > 1 and m and np.any(np.diff(ids_sorted, axis=1) == 0):
        raise ValueError("the top-k token ids of a position must be distinct")
    out = np.zeros((m, low_bytes + high_bytes + value_bytes + HEADER_BYTES), dtype=np.uint8)
    # ids: low bits, little-endian bit order, k * l bits per row
    if l:
        low = ids_sorted & ((1 << l) - 1)
        bits = ((low[:, :, None] >> np.arange(l)) & 1).astype(np.uint8).reshape(m, k * l)
        out[:, :low_bytes] = np.packbits(bits, axis=1, bitorder="little")
    high = (ids_sorted >> l) + np.arange(k)
    bitmap = np.zeros((m, high_bytes * 8), dtype=np.uint8)
    np.put_along_axis(bitmap, high, 1, axis=1)
    out[:, low_bytes : low_bytes + high_bytes] = np.packbits(bitmap, axis=1, bitorder="little")
    # values: square-root companded distance to the row's best log-probability
    d = lp.max(axis=1, keepdims=True) - lp
    span = _fp16_at_least(d.max(axis=1).astype(np.float32))
    scale = span.astype(np.float64)[:, None]
    levels = (1 << value_bits) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(scale > 0, np.sqrt(np.clip(d / np.where(scale > 0, scale, 1.0), 0.0, 1.0)), 0.0)
    q = np.rint(u * levels)
    start = low_bytes + high_bytes
    dtype = np.uint8 if value_bits == 8 else np.dtype("<u2")
    out[:, start : start + value_bytes] = q.astype(dtype).view(np.uint8).reshape(m, value_bytes)
    header = np.stack([span, tail.float().numpy().astype(np.float16)], axis=1).astype("<f2")
    out[:, start + value_bytes :] = header.view(np.uint8).reshape(m, HEADER_BYTES)
    return out


def decode(records: np.ndarray, k: int, vocab: int, value_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs [M, k] float32, ids [M, k] int64 ascending, tail [M] float32)`` of records."""
    _check(k, vocab, value_bits)
    l, low_bytes, high_bytes, value_bytes = _layout(k, vocab, value_bits)
    records = np.ascontiguousarray(records)
    m = records.shape[0]
    if records.ndim != 2 or records.shape[1] != low_bytes + high_bytes + value_bytes + HEADER_BYTES:
        raise ValueError(f"records must be [M, {record_bytes(k, vocab, value_bits)}] for k={k}, vocab={vocab}; got {records.shape}")
    bitmap = np.unpackbits(records[:, low_bytes : low_bytes + high_bytes], axis=1, bitorder="little")
    if np.any(bitmap.sum(axis=1, dtype=np.int64) != k):
        raise ValueError("damaged record: its id bitmap does not hold k entries")
    _, positions = np.nonzero(bitmap)
    high = positions.reshape(m, k) - np.arange(k)
    ids = high.astype(np.int64) << l
    if l:
        bits = np.unpackbits(records[:, :low_bytes], axis=1, bitorder="little")[:, : k * l].reshape(m, k, l)
        ids |= (bits.astype(np.int64) << np.arange(l)).sum(axis=2)
    start = low_bytes + high_bytes
    dtype = np.uint8 if value_bits == 8 else np.dtype("<u2")
    q = records[:, start : start + value_bytes].copy().view(dtype).astype(np.float64)
    header = records[:, start + value_bytes :].copy().view("<f2").astype(np.float64)
    span, tail = header[:, 0:1], header[:, 1]
    d = span * (q / ((1 << value_bits) - 1)) ** 2
    with np.errstate(divide="ignore"):
        kept = np.log1p(-np.exp(tail))  # log of the top-k mass
    neg = -d
    top = neg.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(neg - top).sum(axis=1))
    lp = (kept - lse)[:, None] - d
    return torch.from_numpy(lp.astype(np.float32)), torch.from_numpy(ids), torch.from_numpy(tail.astype(np.float32))


@torch.no_grad()
def top_k(logits: torch.Tensor, k: int, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs [M, k], ids [M, k], tail [M])`` of rows of logits ``[M, V]`` at temperature 1.

    ``tail`` is the log of the mass outside the top k, computed directly as a logsumexp over the
    other entries (no cancellation when it is tiny); ``-inf`` when k equals the vocabulary.
    """
    values, ids, tails = [], [], []
    for chunk in torch.split(logits, chunk_rows):
        logprobs = torch.log_softmax(chunk.float(), dim=-1)
        top = logprobs.topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
        rest = logprobs.scatter(1, top.indices, float("-inf"))
        tails.append(torch.logsumexp(rest, dim=-1))
    if not values:
        empty = torch.zeros(0, k)
        return empty, empty.long(), torch.zeros(0)
    return torch.cat(values), torch.cat(ids), torch.cat(tails)

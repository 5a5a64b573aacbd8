"""Evaluation metrics of classifiers: accuracy, NLL, calibration, agreement, size and latency."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3).

    ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|`` where the confidence is the top-class
    probability and bin ``b`` holds confidences in ``((b-1)/M, b/M]``.
    """
    confidence, predictions = probs.max(dim=-1)
    correct = (predictions == labels).float()
    # Bin index: ceil(conf * M) - 1, so conf in ((b-1)/M, b/M] goes to bin b-1; conf = 0 goes to bin 0.
    bins = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    total = labels.numel()
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(num_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count == 0:
            continue
        gap = (correct[in_bin].double().mean() - confidence[in_bin].double().mean()).abs()
        ece += gap * count / total
    return float(ece)


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reference_predictions: torch.Tensor | None = None,
    ece_bins: int = 15,
) -> dict[str, float]:
    """Accuracy, NLL, ECE and (given a reference's predicted classes) top-1 agreement.

    ``logits`` ``[N, C]``, ``labels`` ``[N]``; computed in float64 for stable sums.
    """
    logits = logits.double()
    log_probs = F.log_softmax(logits, dim=-1)
    predictions = log_probs.argmax(dim=-1)
    metrics = {
        "accuracy": float((predictions == labels).double().mean()),
        "nll": float(F.nll_loss(log_probs, labels)),
        "ece": expected_calibration_error(log_probs.exp(), labels, ece_bins),
    }
    if reference_predictions is not None:
        metrics["agreement"] = float((predictions == reference_predictions).double().mean())
    return metrics


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def cpu_latency_ms(model: torch.nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time in milliseconds of one forward pass on one sample, on the CPU.

    The model is copied to the CPU in eval mode; ``example`` is one input ``[1, ...]``.
    """
    was_training = model.training
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    model = model.to("cpu").eval()
    example = example.to("cpu")
    try:
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    finally:
        model.to(device).train(was_training)
    return 1000.0 * statistics.median(times)

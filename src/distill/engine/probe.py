"""Linear probing: how linearly separable a model's features are, the model itself frozen.

Used to evaluate students distilled without labels, e.g. from a random teacher (Sarnthein et al.,
"Random Teachers are Good Teachers", ICML 2023, who evaluate by linear probing): the features
(``evaluation.linear_probe.source``, default the input of the model's last ``nn.Linear``) of the
training split (no augmentation, eval mode) are standardized with the training statistics, a
multinomial logistic regression is fitted on them (full batch, L-BFGS, L2 penalty ``l2``,
deterministic), and its accuracy on the test split is reported as ``probe_accuracy``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distill.data.base import ArraySplit
from distill.hooks import capture_features, parse_feature_source


def features_of(model: torch.nn.Module, split: ArraySplit, source: str, batch_size: int) -> torch.Tensor:
    """``source`` (a student feature source such as ``student.features``) for every sample, ``[N, D]`` float32."""
    feature = parse_feature_source(source)
    if feature is None or feature.model != "student":
        raise ValueError(f"evaluation.linear_probe.source must be a feature of the model, e.g. student.features; got '{source}'")
    return capture_features(model, [feature], split.inputs, batch_size)[feature.name]


def fit_linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int, *, l2: float = 1e-4, steps: int = 100
) -> torch.nn.Linear:
    """Multinomial logistic regression on standardized features (returned module standardizes itself)."""
    mean = train_features.mean(0)
    std = train_features.std(0).clamp_min(1e-6)
    x = ((train_features - mean) / std).double()
    y = train_labels.long()
    probe = torch.nn.Linear(x.shape[1], num_classes).double()
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    # fold the standardization into the layer: w (x - m) / s + b
    with torch.no_grad():
        weight = probe.weight / std.double()
        bias = probe.bias - weight @ mean.double()
    folded = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(weight.float())
        folded.bias.copy_(bias.float())
    return folded


def linear_probe_accuracy(
    model: torch.nn.Module, train: ArraySplit, test: ArraySplit, num_classes: int, spec: Any, batch_size: int
) -> float:
    """Test accuracy of a linear probe fitted on ``model``'s features of ``train``."""
    train_features = features_of(model, train, spec.source, batch_size)
    probe = fit_linear_probe(train_features, train.labels, num_classes, l2=spec.l2, steps=spec.steps)
    test_features = features_of(model, test, spec.source, batch_size)
    predictions = probe(test_features).argmax(-1)
    return float((predictions == test.labels.cpu()).float().mean())

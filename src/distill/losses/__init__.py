"""Loss functions on tensors, in the style of ``torch.nn.functional``.

Each function is registered by name for use in an experiment's ``objective.terms`` and lists its
paper and equation in its docstring. Shared conventions (shapes, ``mask``, ``reduction``, float32)
are described in :mod:`distill.losses._common`.
"""

from distill.losses.divergences import (
    forward_kl,
    generalized_jsd,
    jensen_shannon,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    symmetric_kl,
    total_variation,
)
from distill.losses.kd import cross_entropy, hinton_kd, kl_per_position
from distill.losses.logit_matching import logit_cosine, logit_mse

__all__ = [
    "cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "hinton_kd",
    "jensen_shannon",
    "kl_per_position",
    "logit_cosine",
    "logit_mse",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "symmetric_kl",
    "total_variation",
]

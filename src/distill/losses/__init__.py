"""Loss functions on tensors, in the style of ``torch.nn.functional``.

Each function is registered by name for use in an experiment's ``objective.terms`` and lists its
paper and equation in its docstring. Shared conventions (shapes, ``mask``, ``reduction``, float32)
are described in :mod:`distill.losses._common`.
"""

from distill.losses.kd import cross_entropy, hinton_kd, kl_per_position

__all__ = ["cross_entropy", "hinton_kd", "kl_per_position"]

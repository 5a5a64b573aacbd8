"""Batch-level augmentations for distillation: mixup/CutMix (:mod:`.mixing`) and HARD's learned
spatial augmentations (:mod:`.hard`). Importing this package registers the loss
``mixed_cross_entropy``. See docs/augmentation.md."""

from distill.augment.hard import HardAugmentation, SpatialAugmenter
from distill.augment.mixing import MIXING_PRESETS, MixedBatch, mix_batch, mixed_cross_entropy, sample_beta

__all__ = [
    "MIXING_PRESETS",
    "HardAugmentation",
    "MixedBatch",
    "SpatialAugmenter",
    "mix_batch",
    "mixed_cross_entropy",
    "sample_beta",
]

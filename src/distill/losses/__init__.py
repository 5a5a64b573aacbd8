"""Loss functions on tensors, in the style of ``torch.nn.functional``.

Each function is registered by name for use in an experiment's ``objective.terms`` and lists its
paper and equation in its docstring. Shared conventions (shapes, ``mask``, ``reduction``, float32)
are described in :mod:`distill.losses._common`.
"""

from distill.losses.bdkd import bdkd
from distill.losses.chunked import fused_linear_distill
from distill.losses.dac_kl import dac_kl
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
from distill.losses.dkd import dkd
from distill.losses.dual_head import DualHeadKD, binary_kl, binary_kl_norm
from distill.losses.features import (
    attention_transfer,
    cka_loss,
    cka_table,
    feature_mse,
    linear_cka,
    rkd_angle,
    rkd_distance,
)
from distill.losses.g2sd import masked_feature_mse
from distill.losses.kd import cross_entropy, hinton_kd, kl_per_position
from distill.losses.kd3 import kd3, kd3_weights, kept_fraction
from distill.losses.kdrl import KDRL, grpo, kdrl
from distill.losses.lm import feature_cosine, fused_kd
from distill.losses.logit_matching import logit_cosine, logit_mse
from distill.losses.multi_teacher import MSTDistill, combine_teachers, multi_teacher_kd
from distill.losses.mutual import mutual_kd
from distill.losses.nd import NDLoss
from distill.losses.ofa import ofa_loss, ofa_target_weights
from distill.losses.preference import adpa, dckd
from distill.losses.qcrd import QCRD, qcrd_loss
from distill.losses.ranking import margin_mse
from distill.losses.redi import redi
from distill.losses.self_distill import gt_weighted_kd, optimal_ground_truth_weight
from distill.losses.sinkhorn import sinkhorn
from distill.losses.sparse import sparse_kd
from distill.losses.swing import swing_kd
from distill.losses.taid import TAID, taid_loss, taid_target
from distill.losses.tgeo import TGeoKD
from distill.losses.trg import trg

__all__ = [
    "KDRL",
    "QCRD",
    "TAID",
    "DualHeadKD",
    "MSTDistill",
    "NDLoss",
    "TGeoKD",
    "adpa",
    "attention_transfer",
    "bdkd",
    "binary_kl",
    "binary_kl_norm",
    "cka_loss",
    "cka_table",
    "combine_teachers",
    "cross_entropy",
    "dac_kl",
    "dckd",
    "dkd",
    "feature_cosine",
    "feature_mse",
    "forward_kl",
    "fused_kd",
    "fused_linear_distill",
    "generalized_jsd",
    "grpo",
    "gt_weighted_kd",
    "hinton_kd",
    "jensen_shannon",
    "kd3",
    "kd3_weights",
    "kdrl",
    "kept_fraction",
    "kl_per_position",
    "linear_cka",
    "logit_cosine",
    "logit_mse",
    "margin_mse",
    "masked_feature_mse",
    "multi_teacher_kd",
    "mutual_kd",
    "ofa_loss",
    "ofa_target_weights",
    "optimal_ground_truth_weight",
    "qcrd_loss",
    "redi",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "sinkhorn",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_kd",
    "swing_kd",
    "symmetric_kl",
    "taid_loss",
    "taid_target",
    "total_variation",
    "trg",
]

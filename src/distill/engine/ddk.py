"""DDK's domain-aware data mixture: per-domain teacher-student gaps steer the domain sampling weights.

DDK (Liu et al., 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
arXiv:2407.16154, NeurIPS 2024) splits the distillation corpus into N domains and, every K
optimizer steps, measures the student's and the teacher's loss on per-domain validation data and
moves the domain sampling probabilities toward the domains where the student lags the teacher most.

The paper's formulas (Sec. 3.2 Eq. 1, Sec. 3.3 Eq. 2, read from the arXiv v1 text), with
``CE_S[i]``, ``CE_T[i]`` the mean token cross-entropy of student and teacher on domain ``i``'s
validation data and ``PPL = exp(CE)``::

    Eq. 1 (initial factor):  r_0[i] = exp(PPL_S[i] / PPL_T[i]) / sum_j exp(PPL_S[j] / PPL_T[j])
    Eq. 2 (every K steps):   psi_{t+1}[i] = r_t[i] * exp(PPL_S^{t+1}[i] / PPL_T^{t+1}[i])
                             r_{t+1}[i]   = alpha * psi_{t+1}[i] / sum_j psi_{t+1}[j] + (1 - alpha) / N

with ``alpha = 0.5`` and ``K = 1000`` in the paper's experiments; domains are then sampled with
probabilities ``r_t``. The ratio of perplexities is ``exp(CE_S - CE_T)``. Its softmax is mild for
the paper's pretrained students (ratios about 1.2-1.8, its Fig. 3) but saturates to one-hot for a
student far from its teacher (ratios in the hundreds); ``gap="difference"`` is gentler there.

:class:`DomainMixture` implements these as its defaults (``gap="ratio"``, ``normalize="softmax"``,
``rule="ddk"``, ``smoothing=0.5``, ``init_from_losses=True``) and makes the choices configurable:

* ``gap``: the per-domain discrepancy ``s[i]``: ``"ratio"`` (paper) ``PPL_S/PPL_T = exp(CE_S - CE_T)``,
  or ``"difference"`` ``CE_S - CE_T`` (nats/token; the excess loss of DoReMi-style reweighting);
* ``normalize``: the factor ``f[i]`` the weights move toward: ``"softmax"`` (paper) ``f = exp(s)``,
  or ``"sum"`` ``f = max(s, 0)`` (proportional to the gap; all zero -> uniform); the target is
  ``q = f / sum(f)``;
* ``rule``: ``"ddk"`` (paper Eq. 2, multiplicative with history, plus the uniform share
  ``(1 - alpha)/N``) or ``"ema"``: ``r_{t+1} = (1 - alpha) r_t + alpha q`` (an exponential moving
  average: ``alpha = 1`` jumps to the target, ``alpha = 0`` never moves);
* ``init_from_losses`` (default, paper Alg. 1): the first :meth:`~DomainMixture.update` (call it
  once before training, at step 0) only initializes the factor ``r_0 = q`` (Eq. 1, Alg. 1 line 1)
  while sampling keeps the initial weights for the first interval (Alg. 1 line 2: ``D_0`` is a
  random sample); every later update applies the rule to ``r_t`` and samples by ``r_{t+1}``
  (Alg. 1 lines 11-12). With ``False`` the factor starts at the initial weights and every update,
  the first included, applies the rule and moves the sampling weights;
* ``min_weight``: a floor on every weight, enforced by mixing with the uniform distribution just
  enough (order and sum preserved). The ``ddk`` rule already keeps every weight at or above
  ``(1 - alpha)/N`` after an Eq. 2 update.

Sampling: the paper samples each interval's data set by ``r`` and cycles through a domain's data
when it is exhausted. Here every optimizer step draws its rows afresh (:meth:`DomainMixture.draw`):
the domain of each sample from the weights (with replacement), then a row uniformly within that
domain, as a pure function of ``(seed, step)`` so that a resumed run draws the same rows.
``mode="uniform"`` keeps the weights uniform (the equal-sampling baseline, "DDK (ES)" in the
paper's Table 5) with the same sampler; its updates are still recorded in ``history``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distill.data.base import IGNORE_INDEX, ArraySplit
from distill.engine.batches import derive_seed
from distill.engine.lm import trim_padding

GAPS = ("ratio", "difference")
NORMALIZATIONS = ("softmax", "sum")
RULES = ("ddk", "ema")
MODES = ("ddk", "uniform")
STATE_VERSION = 1


def _require_groups(split: ArraySplit, what: str) -> torch.Tensor:
    if split.groups is None:
        raise ValueError(
            f"{what} needs a split whose rows carry groups (their domain index), but this split has none; "
            "use a data set that records each row's domain, such as 'domain_text'"
        )
    return split.groups


def rows_by_domain(groups: torch.Tensor, num_domains: int) -> list[torch.Tensor]:
    """The row indices (ascending, int64) of each domain ``0..num_domains-1``; an error for ids out of range."""
    if not isinstance(groups, torch.Tensor) or groups.dim() != 1 or groups.dtype != torch.int64:
        raise ValueError("groups must be an int64 tensor [N] of domain indices")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_domains):
        raise ValueError(
            f"domain indices span {int(groups.min())}..{int(groups.max())} but there are {num_domains} domains"
        )
    order = torch.sort(groups, stable=True).indices
    counts = torch.bincount(groups, minlength=num_domains).tolist()
    return list(torch.split(order, counts))


@torch.no_grad()
def domain_losses(
    model: torch.nn.Module,
    split: ArraySplit,
    num_domains: int,
    *,
    batch_size: int,
    device: torch.device | str,
    max_rows_per_domain: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean token negative log-likelihood (nats/token) of a causal LM on each domain of ``split``.

    ``model(input_ids)`` must return logits ``[B, T, V]``; ``split`` holds token ids ``[N, T]`` with
    shifted labels (:class:`~distill.data.base.ArraySplit`) and ``groups``. Each domain's loss is the
    sum of ``-log p(label)`` over its target tokens (labels != -100) divided by their number, in
    float64 and returned as float32 ``[num_domains]``. ``max_rows_per_domain`` scores only the
    first rows of each domain (in split order). Runs without gradients in eval mode; the model's
    train/eval mode is restored afterwards. Every process scores the whole split (no reduction).
    """
    groups = _require_groups(split, "domain_losses")
    if split.inputs.dim() != 2:
        raise ValueError(f"domain_losses scores token sequences [N, T]; got inputs of shape {tuple(split.inputs.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_rows_per_domain is not None and (isinstance(max_rows_per_domain, bool) or max_rows_per_domain < 1):
        raise ValueError(f"max_rows_per_domain must be a positive integer or None, got {max_rows_per_domain!r}")
    rows = rows_by_domain(groups, num_domains)
    empty = [index for index, domain_rows in enumerate(rows) if len(domain_rows) == 0]
    if empty:
        raise ValueError(f"domain(s) {empty} have no rows in this split; every domain needs validation data")
    if max_rows_per_domain is not None:
        rows = [domain_rows[:max_rows_per_domain] for domain_rows in rows]
    indices = torch.cat(rows)
    device = torch.device(device)
    sums = torch.zeros(num_domains, dtype=torch.float64)
    counts = torch.zeros(num_domains, dtype=torch.float64)
    autocast = {"device_type": device.type, "dtype": autocast_dtype or torch.bfloat16, "enabled": autocast_dtype is not None}
    was_training = model.training
    model.eval()
    try:
        for chunk in torch.split(indices, batch_size):
            input_ids, labels = trim_padding(split.inputs[chunk], split.labels[chunk])
            input_ids, labels = input_ids.to(device), labels.to(device)
            with torch.autocast(**autocast):
                logits = model(input_ids)
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="none",
            ).view(labels.shape)
            valid = labels != IGNORE_INDEX
            chunk_groups = groups[chunk]
            sums.index_add_(0, chunk_groups, (nll * valid).sum(1).double().cpu())
            counts.index_add_(0, chunk_groups, valid.sum(1).double().cpu())
            del logits, nll
    finally:
        model.train(was_training)
    missing = [index for index in range(num_domains) if counts[index] == 0]
    if missing:
        raise ValueError(f"domain(s) {missing} have no target tokens (labels != -100) in this split")
    return (sums / counts).float()


def discrepancy(student_losses: torch.Tensor, teacher_losses: torch.Tensor, gap: str = "ratio") -> torch.Tensor:
    """The per-domain gap ``s``: ``"ratio"``: ``PPL_S / PPL_T = exp(CE_S - CE_T)`` (DDK Eq. 1);
    ``"difference"``: ``CE_S - CE_T``. Float64 ``[N]``."""
    difference = student_losses.double() - teacher_losses.double()
    if gap == "ratio":
        return difference.exp()
    if gap == "difference":
        return difference
    raise ValueError(f"gap must be one of {', '.join(GAPS)}, got {gap!r}")


def discrepancy_factor(gaps: torch.Tensor, normalize: str = "softmax") -> torch.Tensor:
    """The distribution ``q`` the weights move toward: ``softmax(s)`` (DDK Eq. 1) or ``max(s, 0) / sum``
    (uniform when no gap is positive). Float64 ``[N]``, sums to one."""
    gaps = gaps.double()
    if normalize == "softmax":
        return torch.softmax(gaps, dim=0)
    if normalize == "sum":
        positive = gaps.clamp_min(0.0)
        total = positive.sum()
        return positive / total if float(total) > 0 else torch.full_like(gaps, 1.0 / gaps.numel())
    raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")


def apply_floor(weights: torch.Tensor, floor: float) -> torch.Tensor:
    """``weights`` renormalized, then mixed with the uniform distribution just enough that every
    entry is at least ``floor`` (``floor >= 1/N`` gives the uniform distribution). Order-preserving."""
    weights = weights.double() / weights.double().sum()
    count = weights.numel()
    uniform = 1.0 / count
    smallest = float(weights.min())
    if floor <= 0 or smallest >= floor:
        return weights
    if floor >= uniform or smallest >= uniform:
        return torch.full_like(weights, uniform)
    share = (floor - smallest) / (uniform - smallest)
    return share * uniform + (1.0 - share) * weights


class DomainMixture:
    """Domain sampling weights of one training split, updated from per-domain losses (DDK).

    ``domains``: the domain names, in group order (``meta["domains"]`` of ``domain_text``);
    ``groups``: the domain index of every training row (``bundle.train.groups``). See the module
    docstring for the update rule and its options. ``initial``: the weights before the first update:
    ``"uniform"``, ``"proportional"`` (to the domains' row counts) or a sequence of N non-negative
    numbers (normalized); ``mode="uniform"`` requires ``initial="uniform"``.

    :attr:`factor` (float64 ``[N]``) is the paper's domain discrepancy factor ``r_t``, the state
    the ``ddk`` rule multiplies; :attr:`weights` (float64 ``[N]``) are the sampling probabilities
    :meth:`draw` uses: ``r_t`` with the ``min_weight`` floor applied (the initial weights until the
    first rule update, see ``init_from_losses``). Both always sum to one; every weight is >=
    :attr:`floor`. :attr:`history` lists every update as plain lists of floats: ``{"step",
    "weights", "factor", "gaps", "target", "student_losses", "teacher_losses"}`` (``weights`` and
    ``factor`` after the update, ``gaps`` the discrepancies ``s``, ``target`` the normalized ``q``).
    """

    def __init__(
        self,
        domains: Sequence[str],
        groups: torch.Tensor,
        *,
        mode: str = "ddk",
        gap: str = "ratio",
        normalize: str = "softmax",
        rule: str = "ddk",
        smoothing: float = 0.5,
        min_weight: float = 0.0,
        initial: str | Sequence[float] = "uniform",
        init_from_losses: bool = True,
    ) -> None:
        if isinstance(domains, str) or not isinstance(domains, Sequence) or len(domains) == 0:
            raise ValueError(f"domains must be a non-empty list of domain names, got {domains!r}")
        self.domains = [str(name) for name in domains]
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domain names must be distinct, got {self.domains}")
        for name, value, allowed in (("mode", mode, MODES), ("gap", gap, GAPS), ("normalize", normalize, NORMALIZATIONS),
                                     ("rule", rule, RULES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing (alpha) must be a number in [0, 1], got {smoothing!r}")
        count = len(self.domains)
        if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float)) or not 0.0 <= min_weight <= 1.0 / count:
            raise ValueError(
                f"min_weight must be a number in [0, 1/N] = [0, {1.0 / count:.6g}] for {count} domains, got {min_weight!r}"
            )
        if not isinstance(init_from_losses, bool):
            raise TypeError(f"init_from_losses must be true or false, got {init_from_losses!r}")
        if not isinstance(groups, torch.Tensor):
            raise TypeError(f"groups must be a tensor of domain indices, got {type(groups).__name__}")
        if groups.dim() != 1:
            raise ValueError(f"groups must be a 1-D tensor [N] (one domain index per training row), got shape {tuple(groups.shape)}")
        groups = groups.to(torch.int64)
        self.mode = mode
        self.gap = gap
        self.normalize = normalize
        self.rule = rule
        self.smoothing = float(smoothing)
        self.min_weight = float(min_weight)
        self.init_from_losses = init_from_losses
        self.groups = groups
        rows = rows_by_domain(groups, count)
        self.counts = torch.tensor([len(domain_rows) for domain_rows in rows], dtype=torch.int64)
        empty = [self.domains[index] for index in range(count) if int(self.counts[index]) == 0]
        if empty:
            raise ValueError(f"domain(s) {', '.join(map(repr, empty))} have no training rows; drop them or give them data")
        self._rows = torch.cat(rows)
        self._starts = torch.cumsum(self.counts, 0) - self.counts
        self.weights = self._initial_weights(initial)
        self.factor = self.weights.clone()
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_split(cls, split: ArraySplit, domains: Sequence[str], **options: Any) -> DomainMixture:
        """A mixture over the rows of ``split`` (its ``groups``); an error if the split has none."""
        return cls(domains, _require_groups(split, "DomainMixture"), **options)

    # -- weights -------------------------------------------------------------------------------

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def floor(self) -> float:
        """The lower bound every weight keeps (``min_weight``)."""
        return self.min_weight

    def _initial_weights(self, initial: str | Sequence[float]) -> torch.Tensor:
        count = self.num_domains
        if self.mode == "uniform" and not (isinstance(initial, str) and initial == "uniform"):
            raise ValueError(f"mode 'uniform' keeps the weights uniform; initial must be 'uniform', got {initial!r}")
        if isinstance(initial, str):
            if initial == "uniform":
                weights = torch.full((count,), 1.0 / count, dtype=torch.float64)
            elif initial == "proportional":
                weights = self.counts.double() / self.counts.sum()
            else:
                raise ValueError(f"initial must be 'uniform', 'proportional' or a list of {count} weights, got {initial!r}")
        else:
            weights = torch.as_tensor(list(initial), dtype=torch.float64)
            if weights.shape != (count,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError(f"initial weights must be {count} non-negative numbers with a positive sum, got {list(initial)!r}")
        return apply_floor(weights, self.min_weight)

    def as_dict(self) -> dict[str, float]:
        """``{domain: weight}`` of the current weights (for logs)."""
        return {name: float(weight) for name, weight in zip(self.domains, self.weights)}

    def _check_losses(self, losses: Any, what: str) -> torch.Tensor:
        tensor = torch.as_tensor(losses, dtype=torch.float64).detach().cpu()
        if tensor.shape != (self.num_domains,):
            raise ValueError(
                f"{what} must hold one loss per domain ({self.num_domains}: {', '.join(self.domains)}), "
                f"got shape {tuple(tensor.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} must be finite, got {tensor.tolist()}")
        return tensor

    def gaps_and_target(self, student_losses: Any, teacher_losses: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gaps s, target q)`` for these per-domain losses, without changing the weights."""
        student = self._check_losses(student_losses, "student_losses")
        teacher = self._check_losses(teacher_losses, "teacher_losses")
        gaps = discrepancy(student, teacher, self.gap)
        return gaps, discrepancy_factor(gaps, self.normalize)

    def update(self, student_losses: Any, teacher_losses: Any, step: int) -> torch.Tensor:
        """Update the factor from the per-domain validation losses (mean token NLL, nats) measured at
        optimizer step ``step`` and, except for the initializing first update (``init_from_losses``),
        set the sampling weights from it; returns (a copy of) the sampling weights and appends to
        :attr:`history`. ``mode="uniform"``: the weights never move (the factor and gaps are still
        computed and recorded).
        """
        student = self._check_losses(student_losses, "student_losses")
        teacher = self._check_losses(teacher_losses, "teacher_losses")
        gaps = discrepancy(student, teacher, self.gap)
        target = discrepancy_factor(gaps, self.normalize)
        initializing = self.init_from_losses and not self.history
        if initializing:
            factor = target  # DDK Eq. 1: r_0 = softmax(PPL_S / PPL_T)
        elif self.rule == "ddk":
            # DDK Eq. 2: psi = r_t * f (f = exp(s) for softmax, max(s, 0) for sum), normalized, then
            # mixed with the uniform distribution: r_{t+1} = alpha psi / sum psi + (1 - alpha) / N.
            if self.normalize == "softmax":
                psi = torch.softmax(self.factor.log() + gaps, dim=0)  # = r * exp(s) / sum, overflow-safe
            else:
                raw = self.factor * gaps.clamp_min(0.0)
                psi = raw / raw.sum() if float(raw.sum()) > 0 else target
            factor = self.smoothing * psi + (1.0 - self.smoothing) / self.num_domains
        else:
            factor = (1.0 - self.smoothing) * self.factor + self.smoothing * target
        self.factor = factor / factor.sum()
        if self.mode != "uniform" and not initializing:
            self.weights = apply_floor(self.factor, self.min_weight)
        self.history.append({
            "step": int(step),
            "weights": self.weights.tolist(),
            "factor": self.factor.tolist(),
            "gaps": gaps.tolist(),
            "target": target.tolist(),
            "student_losses": student.tolist(),
            "teacher_losses": teacher.tolist(),
        })
        return self.weights.clone()

    # -- sampling ------------------------------------------------------------------------------

    def draw(self, step: int, batch_size: int, seed: int, micro_batches: int = 1) -> list[torch.Tensor]:
        """The training-row indices of optimizer step ``step``: ``micro_batches`` int64 tensors of
        ``batch_size`` rows each (global micro-batches; each process takes its slice).

        The domain of each sample is drawn from the current weights (with replacement), then a row
        uniformly within that domain, from a generator seeded by ``derive_seed(seed, "ddk-mixture",
        step)``: a pure function of ``(seed, step)`` and the weights.
        """
        for name, value in (("batch_size", batch_size), ("micro_batches", micro_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        total = batch_size * micro_batches
        generator = torch.Generator().manual_seed(derive_seed(seed, "ddk-mixture", int(step)))
        domains = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        sizes = self.counts[domains]
        uniform = torch.rand(total, generator=generator, dtype=torch.float64)
        position = torch.minimum((uniform * sizes.double()).long(), sizes - 1)
        rows = self._rows[self._starts[domains] + position]
        return list(torch.split(rows, batch_size))

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python state (JSON- and torch.save-friendly): the weights and the history."""
        return {
            "version": STATE_VERSION,
            "domains": list(self.domains),
            "mode": self.mode,
            "weights": self.weights.tolist(),
            "factor": self.factor.tolist(),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s weights and history; the domains must match."""
        if not isinstance(state, dict) or any(key not in state for key in ("weights", "factor", "history")):
            raise ValueError("not a DomainMixture state: expected a dict with 'weights', 'factor' and 'history'")
        if list(state.get("domains", self.domains)) != self.domains:
            raise ValueError(f"the saved mixture is over domains {state.get('domains')}, this one over {self.domains}")
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"the saved mixture has mode {state.get('mode')!r}, this one {self.mode!r}")
        tensors = {}
        for key in ("weights", "factor"):
            tensor = torch.tensor(state[key], dtype=torch.float64)
            if tensor.shape != (self.num_domains,) or not math.isclose(float(tensor.sum()), 1.0, abs_tol=1e-9):
                raise ValueError(f"saved {key} must be {self.num_domains} numbers summing to one, got {state[key]}")
            tensors[key] = tensor
        self.weights, self.factor = tensors["weights"], tensors["factor"]
        self.history = copy.deepcopy(list(state["history"]))

    def __repr__(self) -> str:
        weights = ", ".join(f"{name}={weight:.3f}" for name, weight in self.as_dict().items())
        return f"DomainMixture({self.mode}, {self.rule}, alpha={self.smoothing}: {weights})"


__all__ = [
    "GAPS",
    "MODES",
    "NORMALIZATIONS",
    "RULES",
    "DomainMixture",
    "apply_floor",
    "discrepancy",
    "discrepancy_factor",
    "domain_losses",
    "rows_by_domain",
]

"""HARD: learned spatial augmentations that make the teacher and the student disagree.

Reference: A. F. Nix, M. F. Burg, F. H. Sinz, "HARD: Hard Augmentations for Robust Distillation",
arXiv:2305.14890, 2023. An augmentation model is trained, alternating with the student, to produce
inputs on which teacher and student disagree; the student is then distilled on those inputs. Of the
paper's augmentation models this module implements the spatial-transformer one: a small network
predicts a bounded affine transform per sample, applied with ``F.affine_grid`` / ``F.grid_sample``.

Augmenter objective (minimized by the augmenter's optimizer; teacher and student frozen):

    L_aug = - KL(p_t(x~) || p_s(x~))  +  teacher_weight * KL(p_t(x) || p_t(x~))

with ``x~ = g(x, z)`` the augmented input, ``p = softmax(logits / temperature)``. The first term
*maximizes* teacher-student disagreement on the augmented input (the KD loss the student will
minimize); the second keeps the teacher's prediction on ``x~`` close to its prediction on the
clean ``x``, so the augmentation stays where the teacher's knowledge is valid (in its invariance
set) instead of drifting to inputs on which the teacher itself is lost. This is our reading of the
paper's objective (the official code was not available to us); ``teacher_weight = 0`` gives the
pure disagreement maximization.

Randomness (the noise ``z``) comes from the global torch RNG, which the engine checkpoints, or from
an explicit ``generator``; it is drawn on the CPU and moved to the inputs' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PADDING_MODES: tuple[str, ...] = ("zeros", "border", "reflection")


class SpatialAugmenter(nn.Module):
    """Predicts a bounded affine transform per sample from noise and (optionally) the image.

    The network maps ``[image features, z]`` (``z ~ N(0, I)`` of size ``noise_dim``; image features
    from one strided convolution and global average pooling) to five unbounded numbers, squashed by
    ``tanh`` into the bounds:

    * rotation ``r`` in ``[-max_rotation, max_rotation]`` degrees,
    * isotropic scale ``s`` in ``[1 / (1 + max_scale), 1 + max_scale]`` (log-symmetric),
    * shear ``h`` in ``[-max_shear, max_shear]`` (0 disables it),
    * translation ``(t_x, t_y)`` in ``[-max_translation, max_translation]`` as a fraction of the
      image's width/height (the grid's ``[-1, 1]`` coordinates are scaled by 2).

    The sampling matrix is ``theta = [R(r) @ [[1, h], [0, 1]] / s | 2 t]`` (``affine_grid`` maps
    output coordinates to input coordinates, so ``1 / s`` zooms by ``s``). The last layer is
    initialized to zero: at initialization every transform is the identity and ``forward`` returns
    its input (up to float rounding of bilinear sampling at pixel centres).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        noise_dim: int = 8,
        hidden: int = 32,
        use_image: bool = True,
        max_rotation: float = 30.0,
        max_scale: float = 0.2,
        max_translation: float = 0.1,
        max_shear: float = 0.0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got '{padding_mode}'")
        for name, value in (
            ("max_rotation", max_rotation),
            ("max_scale", max_scale),
            ("max_translation", max_translation),
            ("max_shear", max_shear),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if noise_dim < 0 or (noise_dim == 0 and not use_image):
            raise ValueError("the augmenter needs noise (noise_dim > 0), the image (use_image=True), or both")
        self.in_channels = int(in_channels)
        self.noise_dim = int(noise_dim)
        self.use_image = bool(use_image)
        self.max_rotation = float(max_rotation)
        self.max_scale = float(max_scale)
        self.max_translation = float(max_translation)
        self.max_shear = float(max_shear)
        self.padding_mode = padding_mode
        features = 0
        if use_image:
            self.encoder: nn.Module | None = nn.Sequential(
                nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            features += hidden
        else:
            self.encoder = None
        features += noise_dim
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 5))
        last = self.head[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """float32 ``[batch, noise_dim]`` standard normal noise on the CPU (global RNG or ``generator``)."""
        return torch.randn(batch, self.noise_dim, generator=generator)

    def transform_parameters(self, inputs: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The bounded transform of each sample: ``rotation`` (degrees), ``scale``, ``shear``,
        ``translation`` ``[B, 2]`` (fraction of the image size), each ``[B]`` unless noted."""
        parts = []
        if self.encoder is not None:
            parts.append(self.encoder(inputs))
        if self.noise_dim:
            parts.append(noise.to(device=inputs.device, dtype=inputs.dtype))
        raw = self.head(torch.cat(parts, dim=1))
        squashed = torch.tanh(raw)
        return {
            "rotation": self.max_rotation * squashed[:, 0],
            "scale": torch.exp(math.log1p(self.max_scale) * squashed[:, 1]),
            "shear": self.max_shear * squashed[:, 2],
            "translation": self.max_translation * squashed[:, 3:5],
        }

    def theta(self, inputs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The ``[B, 2, 3]`` sampling matrices of ``F.affine_grid``."""
        params = self.transform_parameters(inputs, noise)
        angle = params["rotation"] * (math.pi / 180.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        shear, inverse_scale = params["shear"], 1.0 / params["scale"]
        # R @ [[1, h], [0, 1]] / s
        a11 = cos * inverse_scale
        a12 = (cos * shear - sin) * inverse_scale
        a21 = sin * inverse_scale
        a22 = (sin * shear + cos) * inverse_scale
        tx, ty = 2.0 * params["translation"][:, 0], 2.0 * params["translation"][:, 1]
        return torch.stack([torch.stack([a11, a12, tx], dim=1), torch.stack([a21, a22, ty], dim=1)], dim=1)

    def forward(self, inputs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The transformed images ``[B, C, H, W]`` in the augmenter's dtype (differentiable in its parameters)."""
        if inputs.dim() != 4:
            raise ValueError(f"SpatialAugmenter needs images [B, C, H, W]; got inputs of shape {tuple(inputs.shape)}")
        work = inputs.to(self.head[0].weight.dtype)  # the augmenter's precision (float32 by default)
        theta = self.theta(work, noise)
        grid = F.affine_grid(theta, list(work.shape), align_corners=False)
        return F.grid_sample(work, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)


class HardAugmentation:
    """HARD's augmenter together with its own optimizer and alternation schedule.

    Typical use inside a training loop (teacher frozen, student being trained)::

        hard = HardAugmentation(in_channels=3)
        hard.to(device)
        for step, (x, y) in enumerate(loader):
            if hard.should_update(step):
                stats = hard.update(teacher, student, x)   # augmenter steps; teacher/student untouched
            x_aug = hard.augment(x)                         # no grad to the augmenter
            loss = kd(student(x_aug), teacher(x_aug))       # same augmented batch for both models
            ...

    Hyper-parameters (keyword-only):

    * ``lr`` (1e-3), ``weight_decay`` (0.0): Adam on the augmenter's parameters.
    * ``every_steps`` (1): update the augmenter at student steps ``0, k, 2k, ...``.
    * ``steps`` (1): augmenter optimizer steps per update.
    * ``teacher_weight`` (1.0): weight of ``KL(p_t(x) || p_t(x~))`` that keeps the teacher's
      prediction (hence the input) in place; 0 maximizes disagreement alone.
    * ``temperature`` (1.0): softmax temperature of both KL terms.
    * ``in_channels``, ``noise_dim`` (8), ``hidden`` (32), ``use_image`` (True), ``max_rotation``
      (30 degrees), ``max_scale`` (0.2), ``max_translation`` (0.1 of the image size), ``max_shear``
      (0.0), ``padding_mode`` (``"zeros"``: for normalized inputs zero is the training mean):
      the :class:`SpatialAugmenter`.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        every_steps: int = 1,
        steps: int = 1,
        teacher_weight: float = 1.0,
        temperature: float = 1.0,
        noise_dim: int = 8,
        hidden: int = 32,
        use_image: bool = True,
        max_rotation: float = 30.0,
        max_scale: float = 0.2,
        max_translation: float = 0.1,
        max_shear: float = 0.0,
        padding_mode: str = "zeros",
    ) -> None:
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if teacher_weight < 0:
            raise ValueError(f"teacher_weight must be >= 0, got {teacher_weight}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.every_steps = int(every_steps)
        self.steps = int(steps)
        self.teacher_weight = float(teacher_weight)
        self.temperature = float(temperature)
        self.augmenter = SpatialAugmenter(
            in_channels=in_channels,
            noise_dim=noise_dim,
            hidden=hidden,
            use_image=use_image,
            max_rotation=max_rotation,
            max_scale=max_scale,
            max_translation=max_translation,
            max_shear=max_shear,
            padding_mode=padding_mode,
        )
        self.optimizer = torch.optim.Adam(self.augmenter.parameters(), lr=lr, weight_decay=weight_decay)
        self.updates = 0

    def to(self, device: torch.device | str) -> HardAugmentation:
        """Move the augmenter (and any optimizer state) to ``device``."""
        self.augmenter.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = value.to(device)
        return self

    def should_update(self, step: int) -> bool:
        """Whether the augmenter trains before student step ``step`` (0-based): every ``every_steps``."""
        return step % self.every_steps == 0

    @torch.no_grad()
    def augment(self, inputs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The augmented batch for the student's step: no gradient reaches the augmenter.

        Draws ``[B, noise_dim]`` normals from ``generator`` or the global RNG (on the CPU). Returns a
        new tensor of ``inputs``' shape and dtype; the engine feeds it to teacher and student alike.
        """
        was_training = self.augmenter.training
        self.augmenter.eval()
        try:
            noise = self.augmenter.sample_noise(inputs.shape[0], generator)
            return self.augmenter(inputs, noise).to(inputs.dtype)
        finally:
            self.augmenter.train(was_training)

    def objective(
        self, teacher: nn.Module, student: nn.Module, inputs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``L_aug`` (differentiable in the augmenter only) and its parts, with the models as they are."""
        temperature = self.temperature
        with torch.no_grad():
            clean_log_p = F.log_softmax(teacher(inputs).float() / temperature, dim=-1)
        augmented = self.augmenter(inputs, noise)
        teacher_log_p = F.log_softmax(teacher(augmented).float() / temperature, dim=-1)
        student_log_q = F.log_softmax(student(augmented).float() / temperature, dim=-1)
        disagreement = (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(-1).mean()
        teacher_shift = (clean_log_p.exp() * (clean_log_p - teacher_log_p)).sum(-1).mean()
        loss = -disagreement + self.teacher_weight * teacher_shift
        return loss, {
            "disagreement": float(disagreement.detach()),
            "teacher_shift": float(teacher_shift.detach()),
            "loss": float(loss.detach()),
        }

    def update(
        self,
        teacher: nn.Module,
        student: nn.Module,
        inputs: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        average_gradients: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> dict[str, float]:
        """Take ``steps`` optimizer steps on the augmenter to maximize teacher-student disagreement.

        ``teacher`` and ``student`` are the bare modules (not DDP wrappers). They are frozen for the
        update: both run in eval mode (no batch-norm statistics change, no dropout), their training
        flags are restored afterwards, and gradients are taken with ``torch.autograd.grad`` with
        respect to the augmenter's parameters only, so no ``.grad`` of theirs is created or changed.
        Each step draws fresh noise (``generator`` or the global RNG). With several processes, pass
        ``average_gradients`` (called with the augmenter's gradient list, to all-reduce in place)
        so every process keeps the same augmenter.

        Returns floats: ``disagreement`` (KL teacher||student on the augmented input) and
        ``teacher_shift`` of the first step (before any change), ``disagreement_last`` and ``loss``
        of the last step, and ``updates`` (the number of updates made so far).
        """
        modes = [(model, model.training) for model in (teacher, student)]
        parameters = [p for p in self.augmenter.parameters() if p.requires_grad]
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        self.augmenter.train()
        try:
            teacher.eval()
            student.eval()
            for _ in range(self.steps):
                noise = self.augmenter.sample_noise(inputs.shape[0], generator)
                loss, parts = self.objective(teacher, student, inputs.detach(), noise)
                grads = torch.autograd.grad(loss, parameters, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]
                if average_gradients is not None:
                    average_gradients(grads)
                for parameter, grad in zip(parameters, grads, strict=True):
                    parameter.grad = grad
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                first = first or parts
                last = parts
        finally:
            for model, mode in modes:
                model.train(mode)
        self.updates += 1
        return {
            "disagreement": first["disagreement"],
            "teacher_shift": first["teacher_shift"],
            "disagreement_last": last["disagreement"],
            "loss": last["loss"],
            "updates": float(self.updates),
        }

    def state_dict(self) -> dict[str, Any]:
        """Augmenter weights, optimizer state and update count (for the engine's checkpoints)."""
        return {
            "augmenter": self.augmenter.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.augmenter.load_state_dict(state["augmenter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state.get("updates", 0))

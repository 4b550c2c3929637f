"""Knowledge distillation (chapter 04): a small student learns from a large teacher.

- :func:`soften` — logits to a temperature-softened distribution;
- :func:`kd_loss` — Hinton, Vinyals & Dean (2015): ``α · T² · KL(p_T^teacher ‖ p_T^student)
  + (1 − α) · CE(student, labels)``;
- :class:`HintRegressor` and :func:`hint_loss` — FitNets (Romero et al. 2015): a small
  regressor maps the student's intermediate features onto the teacher's, trained with MSE;
- :func:`teacher_logits` — the teacher's outputs computed once (when inputs are not
  augmented, every epoch would recompute exactly these numbers);
- :func:`distill` — one explicit training loop that never updates the teacher, and checks it.

PyTorch has the pieces (``F.kl_div``, ``F.log_softmax``) but no distillation loss or loop, and
the libraries that do (e.g. torchdistill) bring configuration systems larger than this course's
examples; so the loss is written here, small and tested against its definition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def soften(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / T)`` over the last dimension: ``[B, C]`` -> ``[B, C]``.

    T = 1 is the usual softmax; a higher T flattens the distribution and shows how the model
    ranks the *wrong* classes — the "dark knowledge" Hinton et al. (2015) distil.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    return F.softmax(logits / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton et al. (2015)'s distillation loss for logits ``[B, C]`` and labels ``[B]``.

    ``α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)``, the KL averaged over the
    batch. The T² keeps the soft term's gradients the same size as T changes (they scale as
    1/T²), so α means the same thing at every temperature. With ``labels=None`` (unlabelled
    transfer data) only the soft term is used, with weight 1. The teacher's logits are detached.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    T = float(temperature)
    if T <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.log_softmax(teacher_logits.detach() / T, dim=-1),
                    reduction="batchmean", log_target=True) * T * T
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


class HintRegressor(nn.Module):
    """FitNets' regressor: student feature maps ``[B, c_s, h, w]`` -> the teacher's shape
    ``[B, c_t, h_t, w_t]`` with a 1x1 convolution (and resizing when the grids differ)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        out = self.proj(student_features)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, regressor: HintRegressor) -> torch.Tensor:
    """FitNets (Romero et al. 2015) hint loss: mean squared error between the regressed student
    features and the (detached) teacher features ``[B, c_t, h_t, w_t]``."""
    guided = regressor(student_features, size=tuple(teacher_features.shape[-2:]))
    return F.mse_loss(guided, teacher_features.detach())


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher's logits ``[N, C]`` for ``images [N, ...]``, in eval mode, on the CPU.

    Compute them once when the student's inputs are fixed (no augmentation): the teacher is
    usually the expensive network, and its outputs on the same image never change.
    """
    was_training = teacher.training
    teacher.eval()
    out = torch.cat([teacher(images[i:i + batch_size].to(device)).float().cpu()
                     for i in range(0, len(images), batch_size)])
    teacher.train(was_training)
    return out


@dataclass
class DistillResult:
    student: nn.Module
    seconds: float
    history: dict = field(default_factory=dict)


def _fingerprint(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def distill(student: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, *,
            teacher: nn.Module | None = None, cached_logits: torch.Tensor | None = None,
            temperature: float = 4.0, alpha: float = 0.9, epochs: int = 10, batch_size: int = 64,
            lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
            device: torch.device | str = "cpu") -> DistillResult:
    """Train ``student`` on ``images [N, ...]`` (and ``labels [N]``, or None for unlabelled
    transfer data) to match ``teacher``'s softened outputs with :func:`kd_loss`.

    Give either ``teacher`` (its logits are computed once, up front, with :func:`teacher_logits`)
    or ``cached_logits [N, C]``. ``alpha=0`` with labels is plain training on the labels (the
    "from scratch" baseline, same loop). AdamW, cosine learning rate over the epochs. The
    teacher is kept in eval mode and is **never updated**: its weights are compared before and
    after, and a change raises ``RuntimeError``.
    """
    if (teacher is None) == (cached_logits is None):
        raise ValueError("give exactly one of teacher= or cached_logits=")
    if labels is None and alpha != 1.0:
        alpha = 1.0  # no labels: the soft targets are all there is
    device = torch.device(device)
    before = _fingerprint(teacher) if teacher is not None else None
    if cached_logits is None:
        cached_logits = teacher_logits(teacher, images, device=device)
    if len(cached_logits) != len(images):
        raise ValueError(f"{len(cached_logits)} teacher logits for {len(images)} images")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = student.to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    history = {"loss": []}
    start = time.perf_counter()
    for _ in range(epochs):
        student.train()
        order = torch.randperm(len(images), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, t = images[idx].to(device), cached_logits[idx].to(device)
            y = labels[idx].to(device) if labels is not None else None
            loss = kd_loss(student(x), t, y, temperature, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history["loss"].append(loss.item())
    student.eval()
    if teacher is not None and any(not torch.equal(a, b) for a, b in zip(before, _fingerprint(teacher))):
        raise RuntimeError("the teacher's weights or statistics changed during distillation")
    return DistillResult(student, time.perf_counter() - start, history)

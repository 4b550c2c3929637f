"""Knowledge distillation (chapter 04): a small student learns from a large teacher.

- :func:`soften` — logits to a temperature-softened distribution;
- :func:`kd_loss` — Hinton, Vinyals & Dean (2015): ``α · T² · KL(p_T^teacher ‖ p_T^student)
  + (1 − α) · CE(student, labels)``;
- :class:`HintRegressor`, :func:`hint_loss` and :func:`fit_hints` — FitNets (Romero et al.
  2015): a small regressor maps the student's intermediate features onto the teacher's, trained
  with MSE, as a first stage before distillation;
- :func:`teacher_logits` — the teacher's outputs computed once (when inputs are not
  augmented, every epoch would recompute exactly these numbers);
- :func:`distill` — one explicit training loop that never updates the teacher, and checks it;
- :func:`class_bias_shift` — the bias added to one class's logit that a held-out set prefers
  (Hinton et al. 2015's check that a student taught without a class still knows it);
- :class:`StudentCNN` — the small student; :func:`augmented_views` and :func:`to_input` — a fixed
  transfer set of augmented views, so teacher and student see the same crops and the teacher's
  logits can be cached.

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

from . import train


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
    ``[B, c_t, h_t, w_t]`` with a 1x1 convolution (and bilinear resizing when the grids differ).
    Feature vectors ``[B, c_s]`` (a fully connected student) map to ``[B, c_t]``: the 1x1
    convolution of a 1x1 map is a linear layer.

    A simplification of Romero et al. (2015), whose convolutional regressor's kernel is sized so
    that the grids match; :func:`fit_hints` is their first training stage."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if student_features.dim() == 2:
            return self.proj(student_features[:, :, None, None]).flatten(1)
        out = self.proj(student_features)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, regressor: HintRegressor) -> torch.Tensor:
    """FitNets (Romero et al. 2015) hint loss: mean squared error between the regressed student
    features and the (detached) teacher features ``[B, c_t, h_t, w_t]`` (or vectors ``[B, c_t]``)."""
    size = tuple(teacher_features.shape[-2:]) if teacher_features.dim() == 4 else None
    guided = regressor(student_features, size=size)
    return F.mse_loss(guided, teacher_features.detach())


def fit_hints(guided: nn.Module, regressor: HintRegressor, images: torch.Tensor, hints: torch.Tensor, *,
              epochs: int = 10, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4,
              seed: int = 0, device: torch.device | str = "cpu") -> list[float]:
    """FitNets' first stage (Romero et al. 2015): train the student's layers up to its *guided*
    layer, and the regressor, so that the regressed features match the teacher's *hint* layer.

    ``guided`` maps ``images [N, ...]`` to the student's features (e.g. ``student[:3]`` of an
    ``nn.Sequential``, or ``student.body[:6]``): a module that *shares* its parameters with the
    student, so training it trains the student's lower layers in place. ``hints [N, ...]`` are
    the teacher's features on the same images, computed once (the teacher is frozen). Then
    train the whole student with :func:`distill` (the second stage). AdamW, constant learning
    rate. Returns the per-step hint losses.
    """
    if len(images) != len(hints):
        raise ValueError(f"{len(images)} images but {len(hints)} hints")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    guided, regressor = guided.to(device).train(), regressor.to(device)
    images, hints = images.to(device), hints.to(device)
    opt = torch.optim.AdamW([*guided.parameters(), *regressor.parameters()], lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen).to(device)
        for i in range(max(1, len(images) // batch_size)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = hint_loss(guided(images[idx]), hints[idx], regressor)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return torch.stack(losses).cpu().tolist()


def class_bias_shift(logits: torch.Tensor, labels: torch.Tensor, cls: int,
                     shifts: torch.Tensor | None = None) -> float:
    """The amount added to class ``cls``'s logit (``logits [N, C]``, ``labels [N]``) that gives the
    highest accuracy on these examples; ties go to the smallest shift.

    Hinton et al. (2015) distil MNIST without a single 3 in the transfer set: the student's
    errors on 3s are then mostly a bias too low for the class it never saw, and raising that one
    bias recovers most 3s. Choose the shift on held-out examples and report on others.
    ``shifts`` defaults to 0, 0.25, ..., 20.
    """
    shifts = torch.arange(0, 20.25, 0.25) if shifts is None else torch.as_tensor(shifts, dtype=logits.dtype)
    onehot = F.one_hot(torch.tensor(cls), logits.shape[1]).to(logits.dtype)
    acc = torch.stack([((logits + d * onehot).argmax(1) == labels).float().mean() for d in shifts])
    return float(shifts[int(acc.argmax())])     # argmax returns the first maximum


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, batch_size: int = 256,
                   device: torch.device | str | None = None, transform=None) -> torch.Tensor:
    """The teacher's logits ``[N, C]`` for ``images [N, ...]``, in eval mode, returned on the CPU.

    Compute them once when the student's inputs are fixed (no augmentation): the teacher is
    usually the expensive network, and its outputs on the same image never change.
    ``transform`` (e.g. ``lambda x: to_input(x, 224)``) is applied batch by batch, so a large
    ``uint8`` transfer set never has to exist in float32 all at once. ``device`` defaults to
    the teacher's own. The teacher's train/eval mode is restored afterwards.
    """
    if device is None:
        device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = (transform(x) if transform is not None else x).to(device)
        if x.dim() == 4:
            # Channels-last inputs alone make convolutions pick the faster NHWC kernels
            # (EfficientNet-Lite0, 128 px, 2 CPU cores: 7.5 instead of 18 ms per image).
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(teacher(x).float().cpu())
    teacher.train(was_training)
    return torch.cat(out)


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

    Without labels ``alpha`` is ignored: the soft term is the whole loss. ``seed`` seeds torch's
    global generator (dropout) and the batch order; build the student under a known seed too,
    since its initial weights are drawn before this function is called.
    """
    if (teacher is None) == (cached_logits is None):
        raise ValueError("give exactly one of teacher= or cached_logits=")
    if labels is None and alpha != 1.0:
        alpha = 1.0  # no labels: the soft targets are all there is
    device = torch.device(device)
    before = _fingerprint(teacher) if teacher is not None else None
    if cached_logits is None:
        cached_logits = teacher_logits(teacher, images)
    if len(cached_logits) != len(images):
        raise ValueError(f"{len(cached_logits)} teacher logits for {len(images)} images")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # The transfer set lives on the device for the whole run (it is small: a GPU then never
    # waits for host copies), channels-last, which oneDNN on CPUs and cuDNN on GPUs convolve
    # faster (measured here: 1.7x per step for StudentCNN at 64 px on 2 CPU cores).
    fast = torch.channels_last if images.dim() == 4 else torch.contiguous_format
    student = student.to(device, memory_format=fast)
    images = images.to(device).contiguous(memory_format=fast)
    cached_logits = cached_logits.to(device)
    labels = labels.to(device) if labels is not None else None
    amp = device.type == "cuda" and train._native_bf16()   # bfloat16 needs no loss scaling
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    history = {"loss": []}
    start = time.perf_counter()
    for _ in range(epochs):
        student.train()
        step_losses = []
        order = torch.randperm(len(images), generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            with train.autocast(device, enabled=amp):
                logits = student(images[idx])
            loss = kd_loss(logits.float(), cached_logits[idx], labels[idx] if labels is not None else None,
                           temperature, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_losses.append(loss.detach())   # .item() every step would wait for a GPU
        history["loss"] += torch.stack(step_losses).cpu().tolist()
    student = student.to(memory_format=torch.contiguous_format)
    student.eval()
    if teacher is not None and any(not torch.equal(a, b) for a, b in zip(before, _fingerprint(teacher))):
        raise RuntimeError("the teacher's weights or statistics changed during distillation")
    return DistillResult(student, time.perf_counter() - start, history)


# ----------------------------------------------------------------------------- student and data


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class StudentCNN(nn.Module):
    """A small CNN student: ``[B, 3, S, S]`` -> logits ``[B, num_classes]``.

    Four 3x3 conv-BatchNorm-ReLU layers with ``width``, 2, 4 and 8 x ``width`` channels; the
    first has stride 2 and two max-pools follow, so the last feature map is ``S/8`` on a side
    (8 x 8 for 64 px). Then global average pooling, dropout and a linear layer. At
    ``width=16`` and 2 classes it has ~98k parameters, ~35x fewer than EfficientNet-Lite0.
    :meth:`features` returns the last feature map ``[B, 8 * width, S/8, S/8]`` (for FitNets hints).
    """

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.2):
        super().__init__()
        w = width
        self.body = nn.Sequential(*_conv_bn_relu(3, w, stride=2), *_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
                                  *_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2), *_conv_bn_relu(4 * w, 8 * w))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(8 * w, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def augmented_views(images, labels, views: int, size: int, scale: tuple[float, float] = (0.25, 1.0),
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``views`` random crops of every image: a fixed transfer set for distillation.

    ``images``: a sequence of ``uint8 [3, h, w]`` tensors (e.g. ``PreDecoded.images``) with
    ``labels [N]``. Each view is a random resized crop covering ``scale`` of the image, resized
    to ``size``, flipped half of the time. Returns ``uint8 [N * views, 3, size, size]`` and the
    labels repeated ``[N * views]`` (view ``v`` of image ``i`` at ``v * N + i``). Fixing the views
    up front lets the teacher label each one once (:func:`teacher_logits`), and the student then
    sees exactly the crop the teacher labelled.
    Deterministic by ``seed``; the global random state is left as it was.

    Beyer et al. (2022) go further: their *consistent* teacher labels a *fresh* crop at every
    step (no caching), with very long ("patient") schedules; they found precomputed teacher
    outputs on a fixed set overfit. A fixed set is the cheap approximation a CPU can afford.
    """
    import torchvision.transforms.v2 as T

    augment = T.Compose([T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip()])
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)   # the CPU generator only; CUDA's is untouched
        out = torch.stack([augment(x) for _ in range(views) for x in images])
    return out, torch.as_tensor(list(labels) * views, dtype=torch.long)


def to_input(images: torch.Tensor, size: int | None = None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
             batch_size: int = 512) -> torch.Tensor:
    """``uint8 [N, 3, h, w]`` -> normalised ``float32 [N, 3, size, size]`` (antialiased resize).

    The teacher gets the views at its resolution, the student the same views smaller.
    """
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().div_(255)
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        out.append((x - m) / s)
    return torch.cat(out)

"""Multi-task learning (chapter 05): one shared backbone, one head per task.

The pieces, each small enough for the notebook to show whole:

- :func:`multi_digits` — two overlapping digits in one image (the MultiMNIST construction of
  Sener & Koltun 2018), from scikit-learn's digits offline or MNIST online, with the tasks
  ``left``, ``right`` (classification), ``sum`` (regression) and ``same`` (classification);
- :class:`Task` and the registry :data:`TASKS` — what each task predicts, its loss and metric;
- :class:`MultiTaskNet` — hard parameter sharing (Caruana 1997): a shared backbone and one
  head per task; :func:`digit_backbone`, :func:`make_heads`, :func:`multitask_net`, and
  :func:`single_task` for the one-model-per-task baseline, :func:`parameter_counts`;
- loss combiners, all ``nn.Module``\\ s that map ``{task: loss}`` to one loss:
  :class:`FixedWeights` (equal weights are ``FixedWeights`` of ones),
  :class:`UncertaintyWeighting` (Kendall, Gal & Cipolla 2018) and :class:`PCGrad`
  (Yu et al. 2020), whose backward pass is :func:`pcgrad_backward`;
- :func:`gradient_cosine` — how much the tasks' gradients on the shared weights agree;
- :func:`train_multitask` — one explicit loop with per-task history; :func:`evaluate`;
  :func:`delta_mtl`, the average relative change against single-task models.

PyTorch has no multi-task losses or gradient surgery, and the libraries that do (LibMTL, the
papers' own code) bring trainers and configuration systems larger than this chapter; so these
are written here, small and tested (``tests/test_multitask.py``) against their definitions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import adapt, digits
from . import train as _train

__all__ = [
    "CANVAS", "DIGIT", "OFFSET", "BASES", "SPLITS", "MultiDigits", "overlay", "multi_digits",
    "KINDS", "Task", "TASKS", "get_tasks", "task_losses",
    "digit_backbone", "make_heads", "MultiTaskNet", "multitask_net", "single_task", "parameter_counts",
    "FixedWeights", "UncertaintyWeighting", "RandomWeights", "PCGrad", "COMBINERS", "make_combiner",
    "task_gradients", "pcgrad_combine", "pcgrad_backward", "gradient_cosine",
    "MultiTaskResult", "train_multitask", "predict", "evaluate", "delta_mtl",
]

# ----------------------------------------------------------------------------- data

CANVAS = 36   # side of Sener & Koltun's canvas
DIGIT = 28    # side of each digit's frame on it (MNIST's image size)
OFFSET = 6    # the bottom-right frame starts OFFSET pixels right of and below the top-left one
_BOX = 20     # MNIST's digits are size-normalised into a 20x20 box centred in the 28x28 frame

BASES = ("digits", "mnist")
SPLITS = ("train", "val", "test")


@dataclass
class MultiDigits:
    """Overlapping-digit images and their task targets.

    - ``images``: float32 ``[N, 1, S, S]`` in [0, 1], white digits on black.
    - ``targets``: ``"left"`` int64 ``[N]`` (the top-left digit), ``"right"`` int64 ``[N]``
      (bottom-right), ``"sum"`` float32 ``[N]`` (left + right, 0-18), ``"same"`` int64 ``[N]``
      (1 where the two digits are equal).
    - ``sources``: ``"left"``/``"right"`` int64 ``[N]``, the index of each source image in its
      base data set (scikit-learn's 1,797 digits, or MNIST's ``base_split``), for checks.

    A map-style dataset too: ``data[i]`` is ``(image [1, S, S], {task: target})``.
    """

    images: torch.Tensor
    targets: dict[str, torch.Tensor]
    sources: dict[str, torch.Tensor]
    base: str
    split: str
    base_split: str
    seed: int

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], {k: v[i] for k, v in self.targets.items()}

    def subset(self, index) -> MultiDigits:
        """The images at ``index`` (indices, a slice or a boolean mask), targets and sources alike."""
        return replace(self, images=self.images[index], targets={k: v[index] for k, v in self.targets.items()},
                       sources={k: v[index] for k, v in self.sources.items()})

    def __str__(self) -> str:
        return (f"MultiDigits({self.base}, {self.split}: {len(self)} images of {tuple(self.images.shape[1:])}, "
                f"tasks {', '.join(self.targets)})")


def overlay(top_left: torch.Tensor, bottom_right: torch.Tensor, size: int = 28) -> torch.Tensor:
    """Sener & Koltun (2018)'s MultiMNIST image from two digit frames ``[n, 1, 28, 28]``.

    On a black ``36 x 36`` canvas the first frame fills rows and columns 0-27, the second
    6-33; where they overlap the brighter pixel wins (``max``); the canvas is then resized to
    ``size`` (antialiased bicubic, the resize :mod:`tlcourse.digits` uses; ``size=36`` keeps
    the canvas as it is). Returns float32 ``[n, 1, size, size]`` in [0, 1].
    """
    if top_left.shape != bottom_right.shape or top_left.shape[1:] != (1, DIGIT, DIGIT):
        raise ValueError(f"overlay takes two [n, 1, {DIGIT}, {DIGIT}] batches, got {tuple(top_left.shape)} "
                         f"and {tuple(bottom_right.shape)}")
    canvas = top_left.new_zeros(len(top_left), 1, CANVAS, CANVAS)
    canvas[..., :DIGIT, :DIGIT] = top_left
    region = canvas[..., OFFSET:OFFSET + DIGIT, OFFSET:OFFSET + DIGIT]
    canvas[..., OFFSET:OFFSET + DIGIT, OFFSET:OFFSET + DIGIT] = torch.maximum(region, bottom_right)
    return digits._resize(canvas, size)


def _pool(base: str, split: str, seed: int, val_fraction: float, limit: int | None,
          download: bool) -> tuple[digits._Base, str]:
    """The source digits one split may draw from: ``x [M, 1, 28, 28]`` in MNIST's geometry,
    labels and ids. ``train`` and ``val`` are disjoint stratified parts of the base training
    split, ``test`` is the base test split, so no source image is in two splits."""
    base_split = "test" if split == "test" else "train"
    if base == "digits":
        # The 8x8 digits fill their frame; MNIST's fill a 20x20 box centred in 28x28. Upsample
        # to 20 px and pad, so that the two frames overlap as much as in MultiMNIST.
        src = digits._sklearn_base(base_split, _BOX, seed, None, download)
        pad = (DIGIT - _BOX) // 2
        src = digits._Base(F.pad(src.x, (pad, pad, pad, pad)), src.y, src.ids)
    else:
        src = digits._torchvision_base("mnist")(base_split, DIGIT, seed, limit, download)
    if split != "test":
        val, rest = digits._stratified_split(src.y.numpy(), val_fraction, digits._stable(seed, base, "val"))
        keep = torch.from_numpy(val if split == "val" else rest)
        src = digits._Base(src.x[keep], src.y[keep], src.ids[keep])
    return src, base_split


def multi_digits(n: int, size: int = 28, seed: int = 0, base: str = "digits", split: str = "train", *,
                 val_fraction: float = 1 / 6, limit: int | None = None, download: bool = True) -> MultiDigits:
    """``n`` images of two overlapping digits: the MultiMNIST construction of Sener & Koltun (2018).

    What Sener & Koltun describe (NeurIPS 2018, after the MultiMNIST of Sabour et al. 2017),
    and their code does (``multi_mnist_loader.py`` of their MultiObjectiveOptimization
    repository): every MNIST image of a split is paired with another image of the same split
    drawn uniformly at random; the first is put at the top left and the second at the bottom right
    of a 36x36 canvas (frames at 0-27 and 6-33), overlapping, the brighter pixel winning; the
    canvas is resized to 28x28. Tasks: classify the top-left digit (``left``) and the
    bottom-right one (``right``). This function does the same, with these differences:

    - ``base="digits"`` (offline): scikit-learn's 8x8 handwriting, upsampled into a 20x20 box
      centred in a 28x28 frame (MNIST's layout, LeCun et al. 1998), so the overlap matches;
      ``base="mnist"`` (online, ``limit`` images per base split at most, class-balanced):
      MNIST through :func:`tlcourse.datasets.torchvision_dataset` (torchvision md5-checks it).
    - The canvas is resized with antialiased bicubic interpolation (theirs: nearest
      neighbour, through ``scipy.misc.imresize``, which also rescales intensities).
    - ``n`` images per call: the top-left digits run through the split's images in a random
      order (each once while ``n`` is at most the pool's size, as in theirs), and the
      bottom-right one is any *other* image of the split (their text says "a different one";
      their code does not rule out the image itself, a 1-in-60,000 chance).
    - Two more targets: ``sum`` (left + right, for regression) and ``same`` (the digits are equal).
    - ``split``: ``"train"`` and ``"val"`` draw from disjoint stratified parts of the base
      training split (``val_fraction`` of it for ``val``), ``"test"`` from the base test split
      (scikit-learn's digits: the stratified third of :func:`tlcourse.digits.domain_pair`), so
      no source image appears in two splits. Theirs have no validation split.

    Deterministic by ``seed``: the same ``(n, size, seed, base, split)`` give the same tensors,
    and the seed also fixes which images form each split (the same for every ``split``).
    Returns a :class:`MultiDigits`.
    """
    if base not in BASES:
        raise ValueError(f"base must be one of {', '.join(BASES)}, not {base!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if n < 0 or size < 8 or not 0 < val_fraction < 1:
        raise ValueError(f"need n >= 0, size >= 8 and 0 < val_fraction < 1; got n={n}, size={size}, "
                         f"val_fraction={val_fraction}")
    src, base_split = _pool(base, split, seed, val_fraction, limit, download)
    m = len(src.y)
    if m < 2:
        raise ValueError(f"the {split!r} split of {base!r} has {m} source image(s); two are needed")
    rng = np.random.default_rng(digits._stable(seed, base, split, "pairs"))
    left = np.concatenate([rng.permutation(m) for _ in range(max(1, math.ceil(n / m)))])[:n]
    right = rng.integers(m - 1, size=n)
    right += right >= left                     # any image but the left one
    left, right = torch.from_numpy(left), torch.from_numpy(right)
    # In chunks: 60,000 canvases of 36x36 in float32 would be 300 MB at once.
    images = torch.cat([overlay(src.x[left[i:i + 8192]], src.x[right[i:i + 8192]], size)
                        for i in range(0, n, 8192)]) if n else torch.empty(0, 1, size, size)
    yl, yr = src.y[left], src.y[right]
    targets = {"left": yl, "right": yr, "sum": (yl + yr).float(), "same": (yl == yr).long()}
    return MultiDigits(images, targets, {"left": src.ids[left], "right": src.ids[right]},
                       base, split, base_split, seed)


# ----------------------------------------------------------------------------- tasks

KINDS = ("classification", "regression")
_LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


@dataclass(frozen=True)
class Task:
    """One task: what its head predicts, which loss trains it and which metric reports it.

    - ``kind="classification"``: a head of ``num_classes`` logits ``[B, C]``, target int64
      ``[B]``; loss ``"cross_entropy"``; metric ``"accuracy"`` (higher is better).
    - ``kind="regression"``: a head of one number ``[B]``, target float ``[B]``; loss ``"mse"``
      (default) or ``"smooth_l1"``; metric ``"mae"`` (mean absolute error, lower is better).
      The head predicts the *standardised* target ``(y - shift) / scale``, so its loss is on
      the scale of a cross-entropy; :meth:`decode` and the metric work in the target's units.
      ``shift=0, scale=1`` trains on raw values (a loss that can dwarf the others).
    """

    name: str
    kind: str
    num_classes: int | None = None
    loss: str | None = None
    shift: float = 0.0
    scale: float = 1.0
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "classification" and (self.num_classes is None or self.num_classes < 2):
            raise ValueError(f"classification task {self.name!r} needs num_classes >= 2")
        default = "cross_entropy" if self.kind == "classification" else "mse"
        object.__setattr__(self, "loss", self.loss or default)
        allowed = ("cross_entropy",) if self.kind == "classification" else ("mse", "smooth_l1")
        if self.loss not in allowed:
            raise ValueError(f"task {self.name!r} ({self.kind}): loss must be one of {', '.join(allowed)}")
        if self.scale <= 0:
            raise ValueError(f"task {self.name!r}: scale must be positive")

    @property
    def out_features(self) -> int:
        return self.num_classes if self.kind == "classification" else 1

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "mae"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch: ``output`` ``[B, C]`` or ``[B]``, ``target`` ``[B]``; float32."""
        if self.kind == "classification":
            return F.cross_entropy(output.float(), target)
        return _LOSSES[self.loss](output.float(), (target.float() - self.shift) / self.scale)

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        """Predictions in the target's terms: class indices ``[B]`` or values ``[B]``."""
        if self.kind == "classification":
            return output.argmax(dim=1)
        return output.float() * self.scale + self.shift

    def score(self, output: torch.Tensor, target: torch.Tensor) -> float:
        """The task's metric on a batch: accuracy, or mean absolute error in the target's units."""
        pred = self.decode(output)
        if self.kind == "classification":
            return (pred == target).float().mean().item()
        return (pred - target.float()).abs().mean().item()


# sum = left + right of two independent digits: mean 9, variance 2 x 8.25 (a digit's variance).
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("left", "classification", 10, description="the digit at the top left"),
    Task("right", "classification", 10, description="the digit at the bottom right"),
    Task("sum", "regression", shift=9.0, scale=math.sqrt(16.5), description="left + right (0-18), a number"),
    Task("same", "classification", 2, description="whether the two digits are equal (about 1 image in 10)"),
)}


def get_tasks(tasks: Sequence[str | Task] | str | Task) -> list[Task]:
    """Names from :data:`TASKS` or :class:`Task` objects -> a list of tasks with distinct names."""
    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    out = []
    for t in tasks:
        if isinstance(t, str):
            if t not in TASKS:
                raise ValueError(f"no task named {t!r}; the registered ones are {', '.join(TASKS)}")
            t = TASKS[t]
        out.append(t)
    names = [t.name for t in out]
    if not out or len(set(names)) != len(names):
        raise ValueError(f"need at least one task and distinct names, got {names}")
    return out


def task_losses(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                tasks: Sequence[Task]) -> dict[str, torch.Tensor]:
    """``{task: scalar loss}`` (float32) from the model's ``{task: output}`` and the targets."""
    return {t.name: t.compute_loss(outputs[t.name], targets[t.name]) for t in tasks}


# ----------------------------------------------------------------------------- models


def digit_backbone(in_channels: int = 1, feature_dim: int = 128) -> nn.Module:
    """A small shared backbone: chapter 03's :class:`tlcourse.adapt.DigitNet` without its head.

    ``[B, in_channels, S, S]`` in [0, 1] (S >= 16) -> features ``[B, feature_dim]``: two
    conv-BatchNorm-ReLU-pool blocks (32 and 48 channels) and a ``feature_dim`` bottleneck. Its
    ``feature_dim`` attribute tells :func:`make_heads` the width. A pretrained backbone works
    the same way: :func:`tlcourse.models.split_backbone_head` gives one for 3-channel images.
    """
    net = adapt.DigitNet(feature_dim=feature_dim, in_channels=in_channels)
    net.head = nn.Identity()
    return net


def make_heads(tasks: Sequence[str | Task], feature_dim: int, hidden: int | None = None) -> nn.ModuleDict:
    """One head per task, ``[B, feature_dim]`` -> ``[B, num_classes]`` (classification) or
    ``[B]`` (regression): a linear layer, or with ``hidden`` a two-layer MLP (hidden ReLU units)."""
    heads = {}
    for t in get_tasks(tasks):
        layers = [nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, t.out_features)] if hidden \
            else [nn.Linear(feature_dim, t.out_features)]
        if t.kind == "regression":
            layers.append(nn.Flatten(0))       # [B, 1] -> [B]
        heads[t.name] = nn.Sequential(*layers)
    return nn.ModuleDict(heads)


class MultiTaskNet(nn.Module):
    """Hard parameter sharing (Caruana 1997): ``heads[t](backbone(x))`` for every task ``t``.

    ``backbone``: ``[B, ...]`` -> features ``[B, D]``; ``heads``: ``{task: module [B, D] -> output}``.
    ``forward`` returns ``{task: output}``. The backbone's parameters are the *shared* ones:
    every task's gradient lands on them, which is where tasks help or hurt each other.
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        if not heads:
            raise ValueError("a MultiTaskNet needs at least one head")
        self.backbone = backbone
        self.heads = heads if isinstance(heads, nn.ModuleDict) else nn.ModuleDict(dict(heads))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)    # computed once, shared by every head
        return {name: head(features) for name, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]


def multitask_net(tasks: Sequence[str | Task], backbone: nn.Module | None = None, feature_dim: int | None = None,
                  hidden: int | None = None) -> MultiTaskNet:
    """A :class:`MultiTaskNet` for ``tasks``: ``backbone`` (default :func:`digit_backbone`) and
    :func:`make_heads`. ``feature_dim`` defaults to ``backbone.feature_dim`` or ``num_features``."""
    backbone = backbone if backbone is not None else digit_backbone()
    dim = feature_dim or getattr(backbone, "feature_dim", None) or getattr(backbone, "num_features", None)
    if dim is None:
        raise ValueError("give feature_dim: the backbone has no feature_dim or num_features attribute")
    return MultiTaskNet(backbone, make_heads(tasks, int(dim), hidden))


def single_task(tasks: Sequence[str | Task], backbone_fn=digit_backbone, hidden: int | None = None
                ) -> dict[str, MultiTaskNet]:
    """The baseline: one separate network per task, ``{task: MultiTaskNet with one head}``, each
    with a fresh backbone from ``backbone_fn()``. Train each with :func:`train_multitask` on its
    own task; nothing is shared, so no task can help or hurt another."""
    return {t.name: multitask_net([t], backbone_fn(), hidden=hidden) for t in get_tasks(tasks)}


def parameter_counts(multi: nn.Module, singles: Mapping[str, nn.Module]) -> dict:
    """Parameters of a multi-task net vs separate single-task nets: ``{"multi_task": n,
    "single_task": {task: n}, "single_task_total": n, "saving": 1 - multi / total}``."""
    from .models import count_parameters   # models imports timm: only when asked

    per_task = {name: count_parameters(m) for name, m in singles.items()}
    total = sum(per_task.values())
    n = count_parameters(multi)
    return {"multi_task": n, "single_task": per_task, "single_task_total": total,
            "saving": 1 - n / total if total else 0.0}


# ----------------------------------------------------------------------------- loss combiners


class FixedWeights(nn.Module):
    """``Σ_t w_t L_t`` with fixed weights ``{task: w}``; equal weighting is all ones.

    Every combiner maps ``{task: loss}`` to one scalar and reports the weights it currently
    gives each task (:meth:`weights`, :meth:`weight_vector`, in :attr:`names` order).
    """

    def __init__(self, weights: Mapping[str, float]):
        super().__init__()
        if not weights:
            raise ValueError("FixedWeights needs at least one task")
        self.names = list(weights)
        self.register_buffer("w", torch.tensor([float(weights[n]) for n in self.names]))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (self.w * _stack(losses, self.names)).sum()

    def weight_vector(self) -> torch.Tensor:
        return self.w.detach().clone()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.weight_vector().tolist()))


def _stack(losses: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    missing = [n for n in names if n not in losses]
    if missing:
        raise KeyError(f"no loss for task(s) {', '.join(missing)}; got {', '.join(losses)}")
    return torch.stack([losses[n].float() for n in names])


class UncertaintyWeighting(nn.Module):
    """Kendall, Gal & Cipolla (2018): weigh each task by a learned homoscedastic uncertainty.

    With ``s_t = log σ_t²`` learned per task (initialised at ``init``, i.e. σ² = 1), the loss is
    the paper's joint objective (eq. 10, generalised to any number of tasks as in its eq. 7)::

        regression:      1/(2σ²) L + log σ   =  ½ exp(-s) L + ½ s
        classification:  1/σ²    L + log σ   =    exp(-s) L + ½ s

    (regression from a Gaussian likelihood; classification from a softmax whose logits are
    scaled by 1/σ², with the paper's approximation, exact at σ = 1). The paper trains
    ``s = log σ²`` rather than σ² because it is unconstrained and never divides by zero; so
    does this module. Its authors' Keras example uses ``exp(-s) L + s`` for every task: twice
    the regression line above, the same minimiser.

    For a fixed loss L the objective is smallest at ``s* = log(2 c L)``, c = 1 for
    classification and ½ for regression (:meth:`optimal_log_var`); there the task's weight
    ``c exp(-s*)`` is ``1 / (2 L)`` for both kinds — tasks with a small loss are weighted up,
    tasks with a large one down, and the ``+ ½ s`` term stops every weight going to zero.
    :meth:`weights` gives the current ``c exp(-s)`` per task (for plots over training).
    """

    def __init__(self, tasks: Sequence[str | Task], init: float = 0.0):
        super().__init__()
        tasks = get_tasks(tasks)
        self.names = [t.name for t in tasks]
        self.log_vars = nn.Parameter(torch.full((len(tasks),), float(init)))
        self.register_buffer("c", torch.tensor([1.0 if t.kind == "classification" else 0.5 for t in tasks]))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        s = self.log_vars
        return (self.c * torch.exp(-s) * _stack(losses, self.names) + 0.5 * s).sum()

    def weight_vector(self) -> torch.Tensor:
        return (self.c * torch.exp(-self.log_vars)).detach()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.weight_vector().tolist()))

    def sigmas(self) -> dict[str, float]:
        """σ_t = exp(s_t / 2) per task."""
        return dict(zip(self.names, torch.exp(0.5 * self.log_vars.detach()).tolist()))

    @staticmethod
    def optimal_log_var(loss: float, kind: str) -> float:
        """The ``s`` that minimises the task's term for a fixed loss ``L > 0``: ``log(2 c L)``."""
        c = 1.0 if kind == "classification" else 0.5
        return math.log(2 * c * loss)


# ----------------------------------------------------------------------------- gradients


def task_gradients(losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                   params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each loss's gradient on ``params``, flattened: float32 ``[T, P]`` (zeros where a loss
    does not reach a parameter). The graph is kept, so the losses can still be backpropagated."""
    losses = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
    params = list(params)
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def pcgrad_combine(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's update direction (Yu et al. 2020, Algorithm 1) from task gradients ``[T, P]`` -> ``[P]``.

    For each task i, start from ``g_i`` and go through the *other* tasks j in a random order:
    where ``g_i^PC · g_j < 0`` (a conflict), remove from ``g_i^PC`` its component along ``g_j``,
    ``g_i^PC -= (g_i^PC · g_j / ||g_j||²) g_j`` — a projection onto the normal plane of the
    original ``g_j``. Return ``Σ_i g_i^PC``. Gradients that do not conflict are left as they
    are, so without conflicts this is the plain sum. For two tasks the result has a
    non-negative inner product with both gradients; for more, the order matters (hence random).
    ``generator`` draws the orders (CPU generator; ``None``: torch's global one).
    """
    T = len(grads)
    out = grads.clone()
    sq_norms = grads.pow(2).sum(1).clamp_min(1e-20)
    for i in range(T):
        for j in torch.randperm(T, generator=generator).tolist():
            if j == i:
                continue
            dot = out[i] @ grads[j]
            # min(dot, 0) instead of `if dot < 0`: the same arithmetic, no GPU -> CPU sync.
            out[i] = out[i] - dot.clamp(max=0) / sq_norms[j] * grads[j]
    return out.sum(0)


def pcgrad_backward(losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                    shared_params: Sequence[torch.Tensor], other_params: Sequence[torch.Tensor] = (),
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Backward pass with PCGrad (Yu et al. 2020) on the shared parameters.

    The shared parameters receive :func:`pcgrad_combine` of the task gradients; the others
    (``other_params``, e.g. the heads) receive the gradient of ``Σ_t L_t``, which for a head is
    its own task's gradient alone. This is PCGrad on the shared parameters, as LibMTL applies it.
    The authors' TensorFlow code projects the whole flattened gradient instead; that differs
    slightly, because head j's gradient then counts in ‖g_j‖² and a projection onto g_j also
    changes head j's update. Gradients are *added* to ``.grad`` as ``backward()`` does (zero them first).
    Returns the flat shared update ``[P]``.
    """
    loss_list = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
    shared = [p for p in shared_params if p.requires_grad]
    direction = pcgrad_combine(task_gradients(loss_list, shared), generator)
    start = 0
    for p in shared:
        g = direction[start:start + p.numel()].view_as(p).to(p.dtype)
        p.grad = g if p.grad is None else p.grad + g
        start += p.numel()
    others = [p for p in other_params if p.requires_grad]
    if others:
        torch.stack(loss_list).sum().backward(inputs=others)
    return direction


def gradient_cosine(losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                    shared_params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarity of the tasks' gradients on the shared parameters: ``[T, T]``.

    1 on the diagonal; a negative entry is a *conflict* (a step that lowers one task's loss
    raises the other's, to first order), the situation PCGrad is designed for. A task whose
    gradient is zero gets 0 against every other. The graph is kept for a later backward.
    """
    g = task_gradients(losses, [p for p in shared_params if p.requires_grad])
    norms = g.norm(dim=1)
    cos = (g @ g.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-20)
    return cos.fill_diagonal_(1.0)


class PCGrad(FixedWeights):
    """PCGrad (Yu et al. 2020) as a combiner: weighted losses (default all 1, the sum the paper
    uses), combined by gradient surgery. ``forward`` gives the weighted sum (for logging);
    training calls :meth:`backward`, which runs :func:`pcgrad_backward` with a seeded order."""

    def __init__(self, tasks_or_weights: Sequence[str | Task] | Mapping[str, float], seed: int = 0):
        if not isinstance(tasks_or_weights, Mapping):
            tasks_or_weights = {t.name: 1.0 for t in get_tasks(tasks_or_weights)}
        super().__init__(tasks_or_weights)
        self.generator = torch.Generator().manual_seed(seed)

    def backward(self, losses: Mapping[str, torch.Tensor], shared_params: Sequence[torch.Tensor],
                 other_params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        weighted = (self.w * _stack(losses, self.names)).unbind()
        pcgrad_backward(weighted, shared_params, other_params, self.generator)
        return self(losses).detach()


class RandomWeights(FixedWeights):
    """Random loss weighting (Lin et al. 2022): fresh weights at every step, ``T · softmax(λ)``
    with ``λ ~ N(0, I)`` over the ``T`` tasks.

    The paper normalises the weights to sum to 1; here they sum to ``T``, as equal weights do,
    so a learning rate means the same step size under both and the comparison is like for like.
    Any weighting method worth its cost should beat this baseline. Seeded by ``seed``.
    """

    def __init__(self, tasks: Sequence[str | Task], seed: int = 0):
        super().__init__({t.name: 1.0 for t in get_tasks(tasks)})
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        lam = torch.randn(len(self.names), generator=self.generator)
        self.w = (len(self.names) * torch.softmax(lam, dim=0)).to(self.w.device)
        return super().forward(losses)


COMBINERS = ("equal", "uncertainty", "random", "pcgrad")


def make_combiner(spec: str | Mapping[str, float] | nn.Module, tasks: Sequence[str | Task],
                  seed: int = 0) -> nn.Module:
    """``"equal"`` -> :class:`FixedWeights` of ones, ``{task: weight}`` -> :class:`FixedWeights`
    of those, ``"uncertainty"`` -> :class:`UncertaintyWeighting`, ``"random"`` ->
    :class:`RandomWeights`, ``"pcgrad"`` -> :class:`PCGrad`; a module is returned as is."""
    if isinstance(spec, nn.Module):
        return spec
    tasks = get_tasks(tasks)
    if isinstance(spec, Mapping):
        if set(spec) != {t.name for t in tasks}:
            raise ValueError(f"fixed weights for {sorted(spec)} do not match the tasks {[t.name for t in tasks]}")
        return FixedWeights({t.name: spec[t.name] for t in tasks})
    if spec == "equal":
        return FixedWeights({t.name: 1.0 for t in tasks})
    if spec == "random":
        return RandomWeights(tasks, seed=seed)
    if spec == "uncertainty":
        return UncertaintyWeighting(tasks)
    if spec == "pcgrad":
        return PCGrad(tasks, seed=seed)
    raise ValueError(f"unknown combiner {spec!r}; choose one of {', '.join(COMBINERS)} or pass a module")


# ----------------------------------------------------------------------------- training


def _unpack(data) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(data, MultiDigits):
        return data.images, data.targets
    images, targets = data
    return images, dict(targets)


@dataclass
class MultiTaskResult:
    """What :func:`train_multitask` returns. ``history``:

    - ``"tasks"``: the task names, the order of every per-task list below;
    - ``"step_loss"``: ``{task: [loss per step]}``; ``"train_loss"``: ``{task: [mean per epoch]}``;
    - ``"val"``: ``{task: [metric per epoch]}`` (accuracy or MAE; empty without ``val``);
    - ``"weights"``: ``{task: [the combiner's weight per step]}``;
    - ``"cosine"``: ``{"step": [...], "matrix": [[T x T] ...]}``, :func:`gradient_cosine`
      sampled every ``cosine_every`` steps;
    - ``"epoch_seconds"``: training time per epoch (without validation).

    ``metrics``: the validation metrics after the last epoch (empty without ``val``).
    ``seconds``: wall-clock time of the whole run; ``cpu_seconds``: this process's CPU time over it
    (every thread), which other programs on the machine do not lengthen: the fairer one for
    comparing the cost of two runs made at different moments.
    """

    model: MultiTaskNet
    combiner: nn.Module
    history: dict
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0


def train_multitask(model: MultiTaskNet, data, tasks: Sequence[str | Task], *, val=None,
                    combiner: str | nn.Module = "equal", epochs: int = 10, batch_size: int = 64,
                    lr: float = 1e-3, weight_decay: float = 1e-4, combiner_lr: float | None = None, seed: int = 0,
                    device: torch.device | str = "cpu", cosine_every: int = 50,
                    progress: bool = False) -> MultiTaskResult:
    """Train ``model`` on ``tasks`` with one explicit loop; returns a :class:`MultiTaskResult`.

    ``data`` and ``val``: a :class:`MultiDigits` or ``(images [N, ...], {task: targets [N]})``.
    Each step: one batch through the shared backbone and every head, one loss per task
    (:func:`task_losses`), combined by ``combiner`` (:data:`COMBINERS` or a module such as
    ``FixedWeights({...})``); PCGrad does its own backward pass. AdamW with a cosine learning
    rate over all steps; the combiner's own parameters (uncertainty's log-variances) get no
    weight decay, which would pull every σ² towards 1, and ``combiner_lr`` (default ``lr``):
    Adam moves each log-variance by about its learning rate per step, so a short run at a
    small ``lr`` ends far from the weights the losses call for. ``epochs`` of
    ``len(data) // batch_size`` steps; ``val`` metrics after each epoch. ``seed`` fixes the
    batch order, dropout and (for ``"pcgrad"``) PCGrad's order; build the model under a known
    seed too. The data live on ``device``
    for the whole run, channels-last; on CUDA with native bfloat16 the forward pass runs
    under bf16 autocast (losses and gradient surgery stay float32).
    """
    tasks = get_tasks(tasks)
    names = [t.name for t in tasks]
    missing = [n for n in names if n not in model.heads]
    if missing:
        raise ValueError(f"the model has no head for {', '.join(missing)} (heads: {', '.join(model.heads)})")
    images, targets = _unpack(data)
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(images)} training images is less than one batch of {batch_size}")
    device = torch.device(device)
    combiner = make_combiner(combiner, tasks, seed).to(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fast = torch.channels_last if images.dim() == 4 else torch.contiguous_format
    model = model.to(device, memory_format=fast)
    images = images.to(device).contiguous(memory_format=fast)
    targets = {n: targets[n].to(device) for n in names}
    shared, heads = model.shared_parameters(), [p for n in names for p in model.heads[n].parameters()
                                                 if p.requires_grad]
    groups = [{"params": shared + heads, "weight_decay": weight_decay}]
    if list(combiner.parameters()):
        groups.append({"params": list(combiner.parameters()), "weight_decay": 0.0,
                       "lr": lr if combiner_lr is None else combiner_lr})
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    amp = device.type == "cuda" and _train._native_bf16()   # bfloat16 needs no loss scaling
    surgery = isinstance(combiner, PCGrad)

    history = {"tasks": names, "step_loss": {n: [] for n in names}, "train_loss": {n: [] for n in names},
               "val": {n: [] for n in names}, "weights": {n: [] for n in names},
               "cosine": {"step": [], "matrix": []}, "epoch_seconds": []}
    metrics: dict[str, float] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    epoch_bar = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        epoch_bar = tqdm(epoch_bar, desc=type(combiner).__name__)
    step = 0
    for epoch in epoch_bar:
        model.train()
        tic = time.perf_counter()
        order = torch.randperm(len(images), generator=gen).to(device)
        # Kept on the device and read once per epoch: .item() every step would wait for a GPU.
        step_losses, step_weights = [], []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            with _train.autocast(device, enabled=amp):
                outputs = model(images[idx])
            losses = task_losses(outputs, {n: targets[n][idx] for n in names}, tasks)
            if cosine_every and step % cosine_every == 0:
                history["cosine"]["step"].append(step)
                history["cosine"]["matrix"].append(gradient_cosine(losses, shared).cpu().tolist())
            step_losses.append(torch.stack([losses[n].detach() for n in names]))
            opt.zero_grad(set_to_none=True)
            if surgery:
                combiner.backward(losses, shared, heads)
            else:
                combiner(losses).backward()
            step_weights.append(combiner.weight_vector())    # the weights this step used (random ones are drawn in forward)
            opt.step()
            sched.step()
            step += 1
        epoch_losses = torch.stack(step_losses).cpu()
        if not torch.isfinite(epoch_losses).all():
            raise FloatingPointError(f"a task loss became non-finite in epoch {epoch + 1}; lower lr or "
                                     "standardise the regression targets (Task.shift/scale)")
        history["epoch_seconds"].append(time.perf_counter() - tic)
        for k, n in enumerate(names):
            history["step_loss"][n] += epoch_losses[:, k].tolist()
            history["train_loss"][n].append(epoch_losses[:, k].mean().item())
            history["weights"][n] += torch.stack(step_weights)[:, k].cpu().tolist()
        if val is not None:
            metrics = evaluate(model, val, tasks)
            for n in names:
                history["val"][n].append(metrics[n])
            if progress:
                epoch_bar.set_postfix({n: f"{v:.3f}" for n, v in metrics.items()})
    model = model.to(memory_format=torch.contiguous_format)
    model.eval()
    return MultiTaskResult(model, combiner, history, time.perf_counter() - start, metrics,
                           cpu_seconds=time.process_time() - cpu_start)


@torch.no_grad()
def predict(model: MultiTaskNet, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """The model's raw outputs ``{task: [N, ...]}`` (float32, on the CPU), in eval mode, batch by batch."""
    model.eval()
    device = next(model.parameters()).device
    outs: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        with _train.autocast(device, enabled=device.type == "cuda" and _train._native_bf16()):
            out = model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
        for name, value in out.items():
            outs.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(v) for name, v in outs.items()}


def evaluate(model: MultiTaskNet, data, tasks: Sequence[str | Task], batch_size: int = 512) -> dict[str, float]:
    """Each task's metric on ``data`` (a :class:`MultiDigits` or ``(images, {task: targets})``):
    ``{task: accuracy or mean absolute error}``. Leaves the model in eval mode."""
    images, targets = _unpack(data)
    outputs = predict(model, images, batch_size)
    return {t.name: t.score(outputs[t.name], targets[t.name].cpu()) for t in get_tasks(tasks)}


def delta_mtl(multi: Mapping[str, float], single: Mapping[str, float], tasks: Sequence[str | Task]) -> float:
    """Average relative change of the multi-task model against single-task ones, in percent:
    ``(100 / T) Σ_t ± (M_t - S_t) / S_t``, + where higher is better (accuracy), − where lower
    is (MAE) — the Δ_MTL of Maninis, Radosavovic & Kokkinos (2019). Positive: sharing helped
    on average; negative: negative transfer."""
    tasks = get_tasks(tasks)
    terms = [(1 if t.higher_is_better else -1) * (multi[t.name] - single[t.name]) / single[t.name] for t in tasks]
    return 100.0 * sum(terms) / len(terms)

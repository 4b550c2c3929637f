"""Fine-tuning: which weights to train, how fast, and how to keep what the backbone knew.

Chapter 02's toolbox, one small function per idea:

- **What to train.** :func:`freeze` / :func:`unfreeze`, :func:`layer_groups` (a backbone cut
  into groups from the output back to the input), :func:`unfreeze_last_blocks` (head + the
  last ``k`` groups) and :class:`GradualUnfreezing` (one more group per epoch, from the top;
  Howard & Ruder 2018).
- **How fast.** :func:`layerwise_param_groups` (discriminative learning rates: the head gets
  ``base_lr``, each group below it ``decay`` times less) and :func:`warmup_cosine` (linear
  warm-up then cosine decay, built from torch's own schedulers, stepped once per batch).
- **BatchNorm.** :func:`keep_batchnorm_eval` keeps BN layers in inference mode even inside
  ``model.train()``: their running statistics stay the ImageNet ones (Ioffe & Szegedy 2015).
- **Data on a small budget.** :class:`PreDecoded` decodes each JPEG once to a small ``uint8``
  tensor; :func:`train_transform` / :func:`eval_transform` then augment tensors every epoch.
- **Forgetting.** :func:`transplant_head` puts a fine-tuned backbone under the original
  ImageNet head; :func:`imagenet_agreement` measures how much the source task changed
  (Li & Hoiem 2017).
- **Experiments.** :class:`Strategy` + :func:`run_strategy` train one configuration with
  :func:`tlcourse.train.fit`; :func:`results_markdown` tabulates several.

Layer groups are defined for timm EfficientNet / MobileNet-style models (``conv_stem``,
``blocks``, ``conv_head``, classifier) and torchvision ResNets (``conv1`` ... ``layer4``, ``fc``).
"""

from __future__ import annotations

import copy
import math
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import train

# ----------------------------------------------------------------------------- what to train


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients for every parameter of ``module`` (``requires_grad=False``); returns it.

    Note what this does *not* do: BatchNorm layers in train mode still update their running
    statistics, because those are buffers, not parameters (see :func:`keep_batchnorm_eval`).
    """
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Let every parameter of ``module`` receive gradients again; returns it."""
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def trainable_parameters(model: nn.Module) -> int:
    """Number of scalar parameters that will receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_groups(model: nn.Module) -> list[nn.ModuleList]:
    """The model cut into groups, **from the output back to the input**.

    Group 0 is the head (the classifier). For a timm EfficientNet(-Lite) or MobileNet the
    next groups are the stages ``blocks[-1]``, ``blocks[-2]``, ... ``blocks[0]``; the last
    stage carries the 1x1 ``conv_head`` (+ its BN) that feeds the classifier, and the first
    stage carries the stem. EfficientNet-Lite0 thus has 1 + 7 groups. A torchvision ResNet
    gives ``fc``, ``layer4`` ... ``layer1`` (with the stem). Every parameter lies in exactly
    one group, so the groups can drive freezing and per-group learning rates alike.
    """
    def group(*mods):
        return nn.ModuleList([m for m in mods if m is not None])

    if hasattr(model, "blocks") and hasattr(model, "conv_stem"):  # timm EfficientNet / MobileNet
        head = model.get_classifier() if hasattr(model, "get_classifier") else model.classifier
        stages = list(model.blocks)
        groups = [group(head)]
        for i in range(len(stages) - 1, -1, -1):
            extra = []
            if i == len(stages) - 1:  # the layers between the last stage and the classifier
                extra = [getattr(model, n, None) for n in ("conv_head", "bn2", "norm_head")]
            if i == 0:
                extra = [model.conv_stem, getattr(model, "bn1", None)]
            groups.append(group(stages[i], *extra))
    elif all(hasattr(model, n) for n in ("conv1", "layer1", "layer4", "fc")):  # torchvision ResNet
        groups = [group(model.fc), group(model.layer4), group(model.layer3), group(model.layer2),
                  group(model.layer1, model.conv1, model.bn1)]
    else:
        raise ValueError(
            f"Do not know the layer groups of {type(model).__name__}; finetune.layer_groups knows "
            "timm EfficientNet/MobileNet models (blocks, conv_stem) and torchvision ResNets."
        )
    grouped = sum(p.numel() for g in groups for p in g.parameters())
    if grouped != sum(p.numel() for p in model.parameters()):  # a layer we did not expect
        raise ValueError(f"The layer groups of {type(model).__name__} miss some parameters.")
    return groups


def unfreeze_last_blocks(model: nn.Module, k: int | None) -> nn.Module:
    """Freeze everything, then unfreeze the head and the last ``k`` groups of :func:`layer_groups`.

    ``k=0``: head only (a linear probe, trained end to end); ``k=None`` or ``k >=`` the
    number of stages: the whole model. Returns the model.
    """
    groups = layer_groups(model)
    k = len(groups) - 1 if k is None else k
    if k < 0:
        raise ValueError(f"k must be >= 0 (0 = head only), not {k}.")
    freeze(model)
    for g in groups[: k + 1]:
        unfreeze(g)
    return model


class GradualUnfreezing:
    """Unfreeze one more layer group every ``every`` epochs, from the top (Howard & Ruder 2018).

    ULMFiT's recipe: first train the head alone (``start=0``), so that its random
    initial gradients do not wreck the pretrained features; then unfreeze the next
    group down each epoch. It behaves as a *scheduler*: give it to
    :func:`tlcourse.train.fit` as ``scheduler`` (it wraps the real LR scheduler, if any),
    since ``fit`` steps the scheduler after every optimizer step. Put *all* parameters in
    the optimizer from the start: frozen ones get no gradient, and torch optimizers skip
    parameters whose ``grad`` is ``None``.

    ``k`` is the number of groups below the head that are trainable now; ``history`` lists
    ``k`` per epoch.
    """

    def __init__(self, model: nn.Module, steps_per_epoch: int, start: int = 0, every: int = 1,
                 scheduler=None):
        if steps_per_epoch < 1 or every < 1:
            raise ValueError("steps_per_epoch and every must be >= 1")
        self.model, self.steps_per_epoch, self.start, self.every = model, steps_per_epoch, start, every
        self.scheduler = scheduler
        self.max_k = len(layer_groups(model)) - 1
        self.steps = 0
        self.k = -1
        self.history: list[int] = []
        self._apply(0)

    def k_at(self, epoch: int) -> int:
        """Groups below the head trainable during ``epoch`` (0-based)."""
        return min(self.start + epoch // self.every, self.max_k)

    def _apply(self, epoch: int) -> None:
        self.k = self.k_at(epoch)
        unfreeze_last_blocks(self.model, self.k)
        self.history.append(self.k)

    def step(self) -> None:
        """Call after every optimizer step; unfreezes at each epoch boundary."""
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        if self.steps % self.steps_per_epoch == 0:
            self._apply(self.steps // self.steps_per_epoch)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr() if self.scheduler is not None else []


# ----------------------------------------------------------------------------- how fast


def layerwise_param_groups(model: nn.Module, base_lr: float, decay: float = 1.0,
                           trainable_only: bool = True, weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups with discriminative (layer-wise) learning rates.

    Group ``d`` of :func:`layer_groups` (0 = head, 1 = last stage, ...) gets
    ``lr = base_lr * decay ** d``: with ``decay < 1`` the early, generic layers move least
    (Howard & Ruder 2018 use ``decay = 1/2.6``). Each dict also has ``name`` and ``depth``.
    With ``trainable_only`` frozen parameters are left out (groups left empty are dropped);
    :class:`GradualUnfreezing` needs ``trainable_only=False``.
    """
    out = []
    for depth, group in enumerate(layer_groups(model)):
        params = [p for p in group.parameters() if p.requires_grad or not trainable_only]
        if not params:
            continue
        entry = {"params": params, "lr": base_lr * decay ** depth, "depth": depth,
                 "name": "head" if depth == 0 else f"group -{depth}"}
        if weight_decay is not None:
            entry["weight_decay"] = weight_decay
        out.append(entry)
    return out


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  start_factor: float = 0.01, eta_min: float = 0.0):
    """Linear warm-up for ``warmup_steps`` then cosine decay to ``eta_min`` at ``total_steps``.

    Built from torch's schedulers (``LinearLR`` then ``CosineAnnealingLR``, chained by
    ``SequentialLR``; the cosine is SGDR's, Loshchilov & Hutter 2017, without restarts).
    Step it after every optimizer step. Each parameter group is scaled by the same factor,
    so discriminative learning rates keep their ratios. Warm-up matters in fine-tuning
    because a new, random head sends large gradients into pretrained layers at first.
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=eta_min)
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def lr_curve(total_steps: int, warmup_steps: int, base_lr: float = 1.0, **kwargs) -> list[float]:
    """The learning rate at every step ``0 .. total_steps-1`` of :func:`warmup_cosine` (for plots)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = warmup_cosine(opt, total_steps, warmup_steps, **kwargs)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


# ----------------------------------------------------------------------------- BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (timm's ``BatchNormAct2d`` included: it subclasses ``BatchNorm2d``)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_batchnorm_eval(model: nn.Module) -> nn.Module:
    """Put the BN layers in eval mode now (call after ``model.train()``); returns the model."""
    for bn in batchnorm_layers(model):
        bn.eval()
    return model


def _train_stays_eval(self, mode: bool = True):
    return nn.Module.train(self, False)


def keep_batchnorm_eval(model: nn.Module, freeze_affine: bool = False) -> nn.Module:
    """Make every BN layer stay in eval mode, even when ``model.train()`` is called.

    In eval mode a BN layer normalises with its stored (ImageNet) running mean and variance
    and does not update them; in train mode it normalises with the statistics of the
    current batch and moves the running ones towards them. With small batches the batch
    statistics are noisy, and the running statistics drift to the new data, so the
    features the pretrained layers compute change even where their weights are frozen.
    ``freeze_affine`` also freezes BN's scale and shift (``weight``, ``bias``).

    Works by overriding ``train`` on each BN *instance* (``nn.Module.train`` calls it on
    every child), so any training loop, e.g. :func:`tlcourse.train.fit`, respects it;
    ``copy.deepcopy`` keeps it. :func:`release_batchnorm` undoes it. Returns the model.
    """
    for bn in batchnorm_layers(model):
        bn.train = types.MethodType(_train_stays_eval, bn)
        bn.eval()
        if freeze_affine:
            freeze(bn)
    return model


def release_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`keep_batchnorm_eval` (BN follows ``model.train()`` again); returns the model."""
    for bn in batchnorm_layers(model):
        bn.__dict__.pop("train", None)
        bn.training = model.training
    return model


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BN running mean and variance, by name (to measure drift later)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith("running_mean") or k.endswith("running_var")}


def batchnorm_drift(before: dict[str, torch.Tensor], model: nn.Module) -> float:
    """How far the BN running means moved since ``before`` (from :func:`batchnorm_state`).

    Mean over all channels of all BN layers of ``|mean_now - mean_before| / sqrt(var_before)``,
    i.e. in units of the original standard deviation; 0.0 when nothing moved.
    """
    now = model.state_dict()
    shifts = []
    for key, old_mean in before.items():
        if key.endswith("running_mean"):
            old_var = before[key[: -len("running_mean")] + "running_var"]
            shifts.append(((now[key].cpu() - old_mean.cpu()).abs() / (old_var.cpu() + 1e-5).sqrt()).flatten())
    return float(torch.cat(shifts).mean()) if shifts else 0.0


# ----------------------------------------------------------------------------- data


class PreDecoded(Dataset):
    """Images decoded once into ``uint8`` tensors ``[3, h, w]``; ``transform`` runs per item.

    Decoding a JPEG costs more than the augmentations that follow it, and a CPU fine-tuning
    run reads every image once per epoch. So decode each file once, at a modest size (the
    shorter side ``short_side``), keep the tensors in memory, and augment the tensors each
    epoch (torchvision ``transforms.v2`` works on tensors directly). Samples are
    ``(transform(image), label)``; ``classes`` names the labels.
    """

    def __init__(self, images: Sequence[torch.Tensor], labels: Sequence[int], classes: Sequence[str],
                 transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = list(images), [int(y) for y in labels]
        self.classes, self.transform = list(classes), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.labels[i]

    def with_transform(self, transform: Callable | None) -> "PreDecoded":
        """The same decoded images (shared, not copied) with another transform."""
        return PreDecoded(self.images, self.labels, self.classes, transform)

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], labels: Sequence[int], classes: Sequence[str],
                   short_side: int = 256, transform: Callable | None = None) -> "PreDecoded":
        """Decode image files once; each is resized so its shorter side is ``short_side``."""
        return cls([decode(p, short_side) for p in paths], labels, classes, transform)

    @classmethod
    def from_dataset(cls, dataset, short_side: int = 256, transform: Callable | None = None) -> "PreDecoded":
        """From any dataset whose items are ``(PIL image, label)`` and that has ``.classes``,
        e.g. :func:`tlcourse.datasets.lfw_faces` (the offline fallback for hymenoptera)."""
        import torchvision.transforms.v2.functional as TF

        images, labels = [], []
        for img, y in dataset:
            x = TF.pil_to_tensor(img.convert("RGB"))
            images.append(TF.resize(x, short_side, interpolation=TF.InterpolationMode.BICUBIC, antialias=True))
            labels.append(y)
        return cls(images, labels, dataset.classes, transform)

    @classmethod
    def from_folder(cls, dataset, short_side: int = 256, transform: Callable | None = None) -> "PreDecoded":
        """From an ImageFolder-like dataset (``.samples`` of ``(path, label)``, ``.classes``)."""
        paths, labels = zip(*dataset.samples)
        return cls.from_paths(paths, labels, dataset.classes, short_side, transform)


def course_photos(short_side: int, seed: int = 0) -> tuple[PreDecoded, PreDecoded, str]:
    """The course's two-class photos decoded once: ``(train, val, name)``.

    Hymenoptera (ants vs bees: 244 train, 153 val) when it is on disk or downloadable, else the
    bundled faces (:func:`tlcourse.datasets.lfw_faces`, split by ``seed``), whose name then says
    ``"(fallback)"``. No transform is set: add one with :meth:`PreDecoded.with_transform`.
    """
    from . import datasets

    try:
        train_files, val_files = datasets.hymenoptera("train"), datasets.hymenoptera("val")
        return (PreDecoded.from_folder(train_files, short_side), PreDecoded.from_folder(val_files, short_side),
                "hymenoptera")
    except datasets.DatasetUnavailable:
        return (PreDecoded.from_dataset(datasets.lfw_faces("train", seed=seed), short_side),
                PreDecoded.from_dataset(datasets.lfw_faces("val", seed=seed), short_side),
                "lfw_subset (fallback)")


def decode(path: str | Path, short_side: int) -> torch.Tensor:
    """One image file -> ``uint8 [3, h, w]`` with ``min(h, w) == short_side``, RGB."""
    from PIL import Image
    import torchvision.transforms.v2.functional as TF

    with Image.open(path) as im:
        # JPEG can decode straight to 1/2, 1/4, 1/8 size (DCT scaling): far faster than
        # decoding the full image and shrinking it afterwards.
        im.draft("RGB", (short_side, short_side))
        im = im.convert("RGB")
        x = TF.pil_to_tensor(im)
    return TF.resize(x, short_side, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def train_transform(size: int, mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3,
                    scale: tuple[float, float] = (0.25, 1.0)):
    """Augmentation on ``uint8 [3, h, w]`` tensors -> float ``[3, size, size]``, normalised.

    A random crop covering ``scale`` of the image with a random aspect ratio, resized to
    ``size`` (Szegedy et al. 2015's *RandomResizedCrop*), a horizontal flip, then the
    backbone's own normalisation (``models.normalization(model)``).
    """
    import torchvision.transforms.v2 as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def eval_transform(size: int, mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3):
    """Centre crop ``size`` of a ``uint8`` tensor decoded at ``short_side = size / 0.875``
    (the usual ImageNet evaluation: resize 256, crop 224), normalised. ``[3, size, size]``."""
    import torchvision.transforms.v2 as T

    return T.Compose([T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def short_side_for(size: int) -> int:
    """The decode size whose centre crop is ``size`` (ImageNet's 224/256 ratio)."""
    return int(math.ceil(size / 0.875))


# ----------------------------------------------------------------------------- forgetting


def transplant_head(finetuned: nn.Module, original: nn.Module) -> nn.Module:
    """A copy of ``original`` (e.g. the ImageNet model) with every weight except the head
    taken from ``finetuned``: the fine-tuned backbone under the original classifier.

    Compare its predictions with ``original``'s to see what the backbone forgot.
    """
    head = layer_groups(original)[0][0]
    head_prefixes = tuple(name + "." for name, m in original.named_modules() if m is head)
    model = copy.deepcopy(original).cpu()
    state = {k: v for k, v in finetuned.state_dict().items() if not k.startswith(head_prefixes)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(head_prefixes) for k in missing):
        raise ValueError(f"The two models differ outside the head: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


@torch.no_grad()
def imagenet_agreement(original: nn.Module, changed: nn.Module, x: torch.Tensor,
                       batch_size: int = 64) -> dict[str, float | torch.Tensor]:
    """How far ``changed``'s predictions moved from ``original``'s on images ``x [N, 3, S, S]``.

    Returns ``agreement`` (fraction of images with the same top-1 class), ``kl`` (mean
    KL(original || changed) of the softmax outputs, in nats) and the probabilities
    ``p_original``, ``p_changed`` ``[N, C]``.
    """
    original, changed = original.eval(), changed.eval()
    p0 = torch.cat([original(b).softmax(1) for b in x.split(batch_size)])
    p1 = torch.cat([changed(b).softmax(1) for b in x.split(batch_size)])
    agreement = (p0.argmax(1) == p1.argmax(1)).float().mean().item()
    kl = (p0 * (p0.clamp_min(1e-12).log() - p1.clamp_min(1e-12).log())).sum(1).mean().item()
    return {"agreement": agreement, "kl": kl, "p_original": p0, "p_changed": p1}


# ----------------------------------------------------------------------------- experiments


@dataclass
class Strategy:
    """One fine-tuning configuration.

    ``blocks``: groups below the head to train (0 = head only, ``None`` = everything);
    ``gradual``: start from the head and unfreeze one more group per epoch instead;
    ``layer_decay``: discriminative learning rates (1.0 = one learning rate for all);
    ``bn_eval``: keep BatchNorm in eval mode; ``warmup``: fraction of steps warming up.
    ``prepare``: instead of ``blocks``, a function that takes the new model and returns the
    model to train with the right parameters trainable (LoRA, BitFit, LP-FT's probe head:
    chapter 06); one learning rate for everything it leaves trainable.
    """

    name: str
    blocks: int | None = None
    gradual: bool = False
    lr: float = 1e-3
    layer_decay: float = 1.0
    bn_eval: bool = True
    epochs: int = 5
    warmup: float = 0.1
    weight_decay: float = 0.01
    prepare: Callable[[nn.Module], nn.Module] | None = field(default=None, repr=False)


@dataclass
class Result:
    """What :func:`run_strategy` measured. ``val_acc`` is after the last epoch (no picking
    the best epoch on the validation set)."""

    strategy: Strategy
    val_acc: float
    trainable: int
    seconds: float
    history: train.History
    model: nn.Module = field(repr=False)
    bn_drift: float = 0.0


def build_optimizer(model: nn.Module, strategy: Strategy, steps_per_epoch: int):
    """AdamW over layer-wise groups + warm-up/cosine (+ gradual unfreezing) for ``strategy``.

    Returns ``(optimizer, scheduler)``; the scheduler is stepped per batch by ``train.fit``.
    """
    if strategy.prepare is not None:
        if strategy.gradual or strategy.layer_decay != 1.0:
            raise ValueError(f"{strategy.name}: a prepared model trains with one learning rate, "
                             "without gradual unfreezing")
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": strategy.lr}]
    elif strategy.gradual:
        unfreeze(model)  # every parameter goes into the optimizer; the unfreezer gates them
        groups = layerwise_param_groups(model, strategy.lr, strategy.layer_decay, trainable_only=False)
    else:
        unfreeze_last_blocks(model, strategy.blocks)
        groups = layerwise_param_groups(model, strategy.lr, strategy.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=strategy.lr, weight_decay=strategy.weight_decay)
    total = strategy.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, total, min(int(strategy.warmup * total), total - 1))
    if strategy.gradual:
        scheduler = GradualUnfreezing(model, steps_per_epoch, scheduler=scheduler)
    return optimizer, scheduler


def run_strategy(make_model: Callable[[], nn.Module], strategy: Strategy, train_loader: DataLoader,
                 val_loader: DataLoader, device: torch.device | str = "cpu", seed: int = 0,
                 progress: bool = True) -> Result:
    """Train a fresh ``make_model()`` with ``strategy`` and measure it.

    Every strategy starts from the same seed (same new head, same batch order, same
    augmentations), so differences come from the strategy, not the dice.
    """
    from . import env

    env.seed_everything(seed)
    model = make_model()
    if strategy.bn_eval:
        keep_batchnorm_eval(model)
    if strategy.prepare is not None:
        model = strategy.prepare(model)
    before = batchnorm_state(model)
    optimizer, scheduler = build_optimizer(model, strategy, len(train_loader))
    start = time.perf_counter()
    history = train.fit(model, train_loader, val_loader, optimizer, strategy.epochs, device=device,
                        scheduler=scheduler, keep_best=False, progress=progress)
    seconds = time.perf_counter() - start
    if strategy.gradual:
        history["unfrozen_groups"] = scheduler.history[: strategy.epochs]
        unfreeze_last_blocks(model, history["unfrozen_groups"][-1])  # as in the last epoch
    return Result(strategy, history["val_acc"][-1], trainable_parameters(model), seconds, history,
                  model.cpu().eval(), batchnorm_drift(before, model))


def results_markdown(results: Sequence[Result]) -> str:
    """A Markdown table: strategy, val accuracy, trainable parameters, seconds, BN drift."""
    rows = ["| strategy | val accuracy | trainable parameters | seconds | BN drift |", "|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.strategy.name} | {r.val_acc:.3f} | {r.trainable:,} | {r.seconds:.1f} | {r.bn_drift:.3f} |")
    return "\n".join(rows)

"""Unsupervised domain adaptation (chapter 03): labelled source, unlabelled target.

The pieces, each a few lines so the notebook can show them whole:

- :class:`GradientReversal` / :func:`grad_reverse` and the λ schedule :func:`dann_lambda`
  (Ganin & Lempitsky 2015; Ganin et al. 2016, "DANN");
- :class:`DomainDiscriminator`, the adversary DANN trains through the reversal;
- :func:`coral_loss`, Deep CORAL (Sun & Saenko 2016): match the feature covariances;
- :func:`mmd_loss`, multi-kernel maximum mean discrepancy (Gretton et al. 2012, JMLR and NIPS;
  used for deep adaptation by Long et al. 2015, "DAN");
- :func:`adabn`, re-estimate BatchNorm statistics on the target (Li et al. 2018, "AdaBN");
- :func:`pseudo_labels`, confident target predictions for self-training (pseudo-labels: Lee 2013,
  who kept every prediction; the confidence threshold as in FixMatch, Sohn et al. 2020);
- :class:`DigitNet`, a LeNet-style CNN with BatchNorm, split into ``features`` and ``head``;
- :func:`train_adapt`, one explicit loop that takes a source set, an unlabelled target set and
  a method name from :data:`METHODS`; :func:`benchmark` runs methods × seeds into a table.

scikit-learn, timm and torchvision have no domain-adaptation losses, and the research library
that does (TLlib) targets old PyTorch releases (its README suggests 1.7.1) and downloads its data
from links that have moved; so these are written here, small and tested
(``tests/test_adapt.py``) against hand-computed values.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from . import train as _train

METHODS = ("source_only", "dann", "coral", "mmd", "adabn", "self_training")
"""Method names :func:`train_adapt` understands. ``adabn`` trains like ``source_only`` and
re-estimates the BatchNorm statistics on the target afterwards."""

# ----------------------------------------------------------------------------- gradient reversal


class GradientReversal(torch.autograd.Function):
    """Identity going forward; multiplies the gradient by ``-lambd`` going back.

    Put between the features and a domain classifier, it makes one backward pass train the
    classifier to *tell* the domains apart and the feature extractor to make that *harder*
    (Ganin & Lempitsky 2015): the minimax of adversarial training without a second optimiser.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = float(lambd)
        return x.view_as(x)  # a new tensor node, so autograd calls our backward

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return -ctx.lambd * grad_output, None  # no gradient for lambd


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """:class:`GradientReversal` as a function: ``x`` unchanged, gradient times ``-lambd``."""
    return GradientReversal.apply(x, lambd)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al. (2016)'s schedule for the reversal weight: ``2 / (1 + exp(-γ p)) - 1``.

    ``progress`` p runs from 0 to 1 over training. λ starts at 0 — the domain classifier's
    gradient is pure noise while the features mean nothing — and rises smoothly towards 1.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], not {progress}")
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class DomainDiscriminator(nn.Module):
    """Features ``[B, in_features]`` -> one logit ``[B]``: "is this from the target domain?"

    Two hidden layers with BatchNorm, as in TLlib's discriminator; trained with
    binary cross-entropy (source = 0, target = 1).
    """

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


# ----------------------------------------------------------------------------- statistics matching


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko 2016): ``||C_s - C_t||_F^2 / (4 d^2)``.

    ``source`` ``[n_s, d]`` and ``target`` ``[n_t, d]`` are feature batches; ``C`` are their
    (unbiased, n - 1) covariance matrices. Zero when the second-order statistics agree.
    """
    if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"expected [n, d] feature batches with the same d, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    d = source.shape[1]
    cs, ct = torch.cov(source.T), torch.cov(target.T)
    return (cs - ct).pow(2).sum() / (4 * d * d)


def mmd_loss(source: torch.Tensor, target: torch.Tensor,
             multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Squared multi-kernel MMD between two feature batches ``[n_s, d]`` and ``[n_t, d]``.

    The kernel is a sum of Gaussians ``exp(-||x - y||² / (m σ²))`` over ``multipliers`` m,
    with σ² the mean pairwise squared distance of the joint batch (detached, so the scale does
    not chase the loss) — a family of bandwidths as in Long et al. (2015)'s DAN, but with fixed,
    equal kernel weights (DAN learns them, after Gretton et al. 2012, NIPS) on one layer. The estimate
    is Gretton et al. (2012)'s biased quadratic one, ``mean K_ss + mean K_tt - 2 mean K_st``:
    simple and low-variance at batch sizes of a few dozen (DAN used a linear-time estimate to
    scale to large batches). Zero when the batches are identical.
    """
    if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"expected [n, d] feature batches with the same d, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    joint = torch.cat([source, target])
    sq = torch.cdist(joint, joint).pow(2)
    n = len(joint)
    scale = sq.detach().sum() / (n * n - n)
    kernel = sum(torch.exp(-sq / (m * scale)) for m in multipliers)
    ns = len(source)
    k_ss, k_tt, k_st = kernel[:ns, :ns], kernel[ns:, ns:], kernel[:ns, ns:]
    return k_ss.mean() + k_tt.mean() - 2 * k_st.mean()


@torch.no_grad()
def adabn(model: nn.Module, target: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """AdaBN (Li et al. 2018): replace every BatchNorm's running statistics by the target's.

    Weights are untouched; only the per-channel means and variances the network normalises
    with change, so features of target images are centred as source features were in
    training. ``target`` is images ``[N, C, H, W]`` (unlabelled). Modifies ``model`` in place,
    leaves it in eval mode and returns it.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("the model has no BatchNorm layers: AdaBN has nothing to adapt")
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative average over all batches, not an EMA
    model.eval()
    for m in bns:
        # Only BN in train mode (dropout etc. stay off). nn.Module.train, not m.train(): a BN
        # kept in eval mode by finetune.keep_batchnorm_eval ignores m.train(), and would then
        # normalise with the freshly reset statistics.
        nn.Module.train(m, True)
    device = next(model.parameters()).device
    bounds = list(range(0, len(target), batch_size)) + [len(target)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]  # a last batch of one image has no variance (BatchNorm1d refuses it): merge it
    for start, stop in zip(bounds, bounds[1:]):
        model(target[start:stop].to(device))
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    return model.eval()


def pseudo_labels(logits: torch.Tensor, threshold: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident predictions as labels: ``(labels [B], mask [B] bool)`` where softmax ≥ ``threshold``."""
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    return labels, confidence >= threshold


# ----------------------------------------------------------------------------- the network


class DigitNet(nn.Module):
    """LeNet-style CNN for ``[B, 3, 28, 28]`` digits in [0, 1] -> logits ``[B, num_classes]``.

    ``features`` (two conv-BN-ReLU-pool blocks and a 128-unit bottleneck) gives ``[B, 128]``;
    ``head`` is one linear layer. The conv widths 32/48 follow Ganin et al. (2016)'s MNIST
    network; BatchNorm is added so AdaBN has statistics to adapt. Works for any input size
    ≥ 16 px (the last pooling is adaptive). ``in_channels=1`` takes grey ``[B, 1, H, W]``
    images (chapter 05's overlapping digits use it as their shared backbone).
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 5, padding=2), nn.BatchNorm2d(48), nn.ReLU(), nn.AdaptiveMaxPool2d(7),
            nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(48 * 7 * 7, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1))  # [0, 1] -> [-1, 1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[B, feature_dim]`` (what the adaptation losses align)."""
        return self.features(x * 2 - 1)


# ----------------------------------------------------------------------------- training


@dataclass
class AdaptConfig:
    """Hyper-parameters of :func:`train_adapt`; the defaults are the `quick` profile's.

    ``weight`` multiplies the adaptation loss (DANN's domain loss, CORAL, MMD, or the
    pseudo-label loss); ``warmup`` is the fraction of steps trained on the source alone
    before self-training starts labelling the target.
    """

    steps: int = 600
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    weight: float | None = None
    threshold: float = 0.9
    warmup: float = 0.3

    def adaptation_weight(self, method: str) -> float:
        if self.weight is not None:
            return self.weight
        # Set by hand from the loss scales, never from target labels: DANN's and MMD's terms are
        # of order 1 like the cross-entropy; CORAL's is tiny (divided by 4 d²), so it gets a
        # large weight to matter (Sun & Saenko 2016 balance the two losses the same way).
        return {"dann": 1.0, "coral": 20.0, "mmd": 1.0, "self_training": 1.0}.get(method, 0.0)


@dataclass
class AdaptResult:
    method: str
    seed: int
    model: nn.Module
    target_acc: float | None = None
    source_acc: float | None = None
    seconds: float = 0.0
    history: dict = field(default_factory=dict)


def _tensors(data) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images [N, C, H, W], labels [N] or None)`` from a tensor, a ``(x, y)`` pair, a
    TensorDataset, any map-style Dataset of ``(image, label)`` / images, or a DataLoader of
    such batches — loaded into memory once (digit sets are small; see :func:`batches`)."""
    if isinstance(data, TensorDataset):
        tensors = data.tensors
    elif isinstance(data, (tuple, list)):
        tensors = tuple(data)
    elif torch.is_tensor(data):
        tensors = (data,)
    elif isinstance(data, (DataLoader, torch.utils.data.Dataset)):
        items = list(data) if isinstance(data, DataLoader) else [data[i] for i in range(len(data))]
        if not items:
            raise ValueError(f"the {type(data).__name__} is empty")
        first = items[0]
        labelled = isinstance(first, (tuple, list))
        join = torch.cat if isinstance(data, DataLoader) else torch.stack
        xs = join([it[0] if labelled else it for it in items])
        tensors = (xs, join([torch.as_tensor(it[1]) for it in items])) if labelled else (xs,)
    else:
        tensors = (data,)
    x = tensors[0]
    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W] (a tensor, TensorDataset, Dataset or DataLoader), got "
                         f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}")
    return x, (tensors[1] if len(tensors) > 1 else None)


def batches(*tensors: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled mini-batches of in-memory tensors (a new permutation each pass).

    A DataLoader over a TensorDataset with ``batch_size=None`` and a BatchSampler: the dataset
    is indexed with a whole list of indices at once, instead of 64 single items collated one
    by one — that per-item collation would cost as much as a step of this small CNN on a CPU.
    """
    dataset = TensorDataset(*tensors)
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=True)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler)
    while True:
        yield from loader


def train_adapt(
    method: str, source, target, model: nn.Module | None = None, config: AdaptConfig | None = None,
    seed: int = 0, device: torch.device | str = "cpu", progress: bool = False,
) -> AdaptResult:
    """Train ``model`` (default a fresh :class:`DigitNet`) on labelled ``source`` while adapting
    to unlabelled ``target`` with ``method`` (one of :data:`METHODS`).

    ``source``: ``TensorDataset(x [N, 3, H, W] in [0, 1], y [N])`` — or any Dataset or
    DataLoader of ``(image, label)``, read into memory once; ``target``: the same kinds, whose
    labels, if any, are **ignored** (only the images are read). Each step draws
    one source and one target batch; the loss is source cross-entropy plus
    ``config.adaptation_weight(method)`` × the method's term. SGD with momentum and the
    learning-rate annealing of Ganin et al. (2016), ``lr / (1 + 10 p)^0.75``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    config = config or AdaptConfig()
    device = torch.device(device)
    xs, ys = _tensors(source)
    xt, _ = _tensors(target)  # target labels, if present, are never read
    # Seed after loading: iterating a DataLoader draws from the global generator.
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if ys is None:
        raise ValueError("the source must be labelled: pass TensorDataset(images, labels)")
    if min(len(xs), len(xt)) < config.batch_size:
        raise ValueError(f"need at least batch_size={config.batch_size} source and target images, got "
                         f"{len(xs)} and {len(xt)}: lower AdaptConfig.batch_size")
    # Digits fit in memory, even on a GPU. Channels-last images and weights: oneDNN on CPUs and
    # cuDNN on GPUs convolve and pool them faster (measured on 2 CPU cores: DigitNet's 16-px step
    # 1.3x, its max-pools 10x), as in distill.distill and multitask.train_multitask.
    fast = torch.channels_last if xs.dim() == 4 else torch.contiguous_format
    model = _train.channels_last(model or DigitNet(num_classes=int(ys.max()) + 1), device, on=xs.dim() == 4)
    xs, ys = xs.to(device).contiguous(memory_format=fast), ys.to(device)
    xt = xt.to(device).contiguous(memory_format=fast)

    params = list(model.parameters())
    disc = None
    if method == "dann":
        disc = DomainDiscriminator(model.feature_dim).to(device)
        params += list(disc.parameters())
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                          nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (1 + 10 * step / config.steps) ** -0.75)
    scaler = torch.amp.GradScaler(enabled=_train._needs_scaler(device, True))
    weight = config.adaptation_weight(method)
    source_batches = batches(xs, ys, batch_size=config.batch_size, generator=gen)
    target_batches = batches(xt, batch_size=config.batch_size, generator=gen)
    domain = torch.cat([torch.zeros(config.batch_size), torch.ones(config.batch_size)]).to(device)  # 0 = source
    history = {"loss": [], "adapt_loss": []}
    model.train()
    start = time.perf_counter()
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=method, leave=False)
    for step in steps:
        p = step / config.steps
        (bx, by), (bt,) = next(source_batches), next(target_batches)
        with _train.autocast(device):
            adapt_loss = torch.zeros((), device=device)
            if method in ("source_only", "adabn"):
                loss = F.cross_entropy(model(bx), by)
            elif method == "self_training":
                loss = F.cross_entropy(model(bx), by)
                if p >= config.warmup:
                    with torch.no_grad():
                        model.eval()
                        labels, mask = pseudo_labels(model(bt), config.threshold)
                        model.train()
                    # The whole target batch goes through the network (BatchNorm sees the usual
                    # batch, even when only one image is confident); unconfident images weigh 0.
                    per_image = F.cross_entropy(model(bt), labels, reduction="none")
                    adapt_loss = (per_image * mask).mean()
            else:
                # One forward pass over both domains, as in TLlib: BatchNorm then sees a mixed batch.
                f = model.embed(torch.cat([bx, bt]))
                fs, ft = f[: len(bx)], f[len(bx):]
                loss = F.cross_entropy(model.head(fs), by)
                if method == "dann":
                    d = disc(grad_reverse(f, dann_lambda(p)))
                    adapt_loss = F.binary_cross_entropy_with_logits(d.float(), domain)
                else:
                    # Covariances and kernels in float32: under CUDA autocast torch.cov's matmul
                    # would run in half precision, and C_s - C_t cancels badly there.
                    with _train.autocast(device, enabled=False):
                        loss_fn = coral_loss if method == "coral" else mmd_loss
                        adapt_loss = loss_fn(fs.float(), ft.float())
            total = loss + weight * adapt_loss
        if not torch.isfinite(total):
            raise FloatingPointError(f"{method}: loss became {total.item()} at step {step}; lower lr or the weight")
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        schedule.step()
        history["loss"].append(loss.item())
        history["adapt_loss"].append(adapt_loss.item())
    if method == "adabn":
        adabn(model, xt)
    model = _train.channels_last(model, on=False).eval()
    return AdaptResult(method, seed, model, seconds=time.perf_counter() - start, history=history)


@torch.no_grad()
def accuracy(model: nn.Module, dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on a labelled TensorDataset ``(x, y)``."""
    x, y = _tensors(dataset)
    if y is None:
        raise ValueError("accuracy needs labels")
    model.eval()
    device = next(model.parameters()).device
    correct = sum((model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``model.embed`` over ``images [N, C, H, W]`` in eval mode -> ``[N, feature_dim]`` on CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.embed(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def domain_accuracy(source: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                    folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """How well a linear classifier tells the two domains apart: ``(accuracy, proxy A-distance)``.

    ``source`` ``[n_s, d]`` and ``target`` ``[n_t, d]`` are features (or flattened pixels).
    Cross-validated logistic regression on equal-sized samples; the proxy A-distance of
    Ben-David et al. (2007) is ``2 (1 - 2 ε)`` with ε the error: 0 when the domains are
    indistinguishable, 2 when they are perfectly separable.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    s, t = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    n = min(len(s), len(t))
    rng = np.random.default_rng(seed)
    s, t = s[rng.choice(len(s), n, replace=False)], t[rng.choice(len(t), n, replace=False)]
    X, y = np.concatenate([s, t]), np.r_[np.zeros(n), np.ones(n)]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    acc = float(cross_val_score(clf, X, y, cv=folds).mean())
    err = 1.0 - acc
    return acc, 2.0 * (1.0 - 2.0 * min(err, 0.5))


# ----------------------------------------------------------------------------- benchmark


# Published target accuracies (%) for the anchor pairs; source-only -> DANN (and CDAN), from
# the TLlib benchmark (LeNet / DTN trained from scratch) and Ganin et al. (2016, Table 2).
PUBLISHED = {
    ("mnist", "usps"): {"source_only": 82.1, "dann": 91.7, "cdan": 96.0, "source": "TLlib benchmark"},
    ("usps", "mnist"): {"source_only": 74.6, "dann": 95.2, "cdan": 97.7, "source": "TLlib benchmark"},
    ("svhn", "mnist"): {"source_only": 74.1, "dann": 90.8, "cdan": 93.8, "source": "TLlib benchmark"},
    ("mnist", "mnist_m"): {"source_only": 52.3, "dann": 76.7, "source": "Ganin et al. 2016",
                           "note": "theirs: MNIST on BSDS500 patches; ours (digits.DOMAINS['mnist_m']): "
                                   "MNIST on scikit-image's photos, so comparable in spirit only"},
}
for _pair in (("mnist", "usps"), ("usps", "mnist"), ("svhn", "mnist")):
    PUBLISHED[_pair]["note"] = ("TLlib: LeNet (DTN for SVHN, 32 px), its own schedule; ours: DigitNet at the "
                                "profile's size, so the comparison is of the gain, not digit for digit")
del _pair


def benchmark(source, target, target_test, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1, 2),
              config: AdaptConfig | None = None, device: torch.device | str = "cpu",
              progress: bool = True, oracle=None, source_test=None, keep: dict | None = None) -> list[dict]:
    """Every method × seed: one row each ``{method, seed, target_acc, source_acc, seconds}``.

    Source and target as in :func:`train_adapt`; ``target_test`` is labelled. ``source_acc``
    is measured on ``source_test`` when given (else on the source training set).
    ``oracle``: optionally the *labelled* target training set; adds a "target oracle" row
    (trained on target labels — the ceiling no unsupervised method should pass).
    ``keep``: a dict that receives every :class:`AdaptResult` (with its model and loss
    history) under ``(method, seed)``, for plots after the table.
    """
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    runs = [(m, s) for m in methods for s in seeds]
    if oracle is not None:
        runs += [("target_oracle", s) for s in seeds]
    rows = []
    source_only = {s: r for (m, s), r in (keep or {}).items() if m == "source_only"}
    for method, seed in tqdm(runs, desc="runs", disable=not progress):
        if method == "target_oracle":
            result = train_adapt("source_only", oracle, oracle, config=config, seed=seed, device=device)
            result.method = method
        elif method == "adabn" and seed in source_only:
            # AdaBN trains exactly like source-only, so adapt a copy of that run's model
            # instead of training it again (the seeds give the same weights).
            start = time.perf_counter()
            model = adabn(copy.deepcopy(source_only[seed].model), _tensors(target)[0])
            result = AdaptResult("adabn", seed, model, seconds=source_only[seed].seconds + time.perf_counter() - start)
        else:
            result = train_adapt(method, source, target, config=config, seed=seed, device=device)
            if method == "source_only":
                source_only[seed] = result
        if keep is not None:
            keep[result.method, seed] = result
        rows.append({"method": result.method, "seed": seed, "target_acc": accuracy(result.model, target_test),
                     "source_acc": accuracy(result.model, source if source_test is None else source_test),
                     "seconds": round(result.seconds, 2)})
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Rows of :func:`benchmark` -> one per method: mean and sample standard deviation (n - 1,
    over seeds; 0 for one seed) of target accuracy, mean source accuracy and seconds, in the
    order methods first appear."""
    order = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in order:
        acc = np.array([r["target_acc"] for r in rows if r["method"] == m])
        out.append({"method": m, "target_mean": float(acc.mean()), "target_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    "seeds": len(acc), "target_min": float(acc.min()), "target_max": float(acc.max()),
                    "source_mean": float(np.mean([r["source_acc"] for r in rows if r["method"] == m])),
                    "seconds": float(np.mean([r["seconds"] for r in rows if r["method"] == m]))})
    return out


def summary_markdown(summary: Sequence[dict]) -> str:
    """:func:`summarize`'s output as a Markdown table (target accuracy mean ± std)."""
    lines = ["| method | target accuracy (mean ± std) | min–max | source accuracy | seconds / run |",
             "|---|---|---|---|---|"]
    lines += [f"| {s['method']} | {s['target_mean']:.3f} ± {s['target_std']:.3f} | "
              f"{s['target_min']:.3f}–{s['target_max']:.3f} | {s['source_mean']:.3f} | {s['seconds']:.1f} |"
              for s in summary]
    return "\n".join(lines)




# Benchmark settings per profile. `quick` is what the notebook runs on a laptop CPU in a few
# minutes; `full` is the GPU setting for the published anchor pairs (the data downloads once).
BENCH_PROFILES = {
    "quick": {"pairs": (("digits", "digits_m"),), "size": 16, "limit": None,
              "config": AdaptConfig(steps=400, batch_size=64)},
    "full": {"pairs": (("mnist", "usps"), ("usps", "mnist"), ("svhn", "mnist"), ("mnist", "mnist_m")),
             "size": 28, "limit": None, "config": AdaptConfig(steps=10_000, batch_size=128)},
}


def bench_pair(source: str, target: str, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1, 2),
               config: AdaptConfig | None = None, size: int = 28, limit: int | None = None,
               device: torch.device | str = "cpu", progress: bool = True, download: bool = True) -> dict:
    """One row of the chapter's benchmark: build the :func:`tlcourse.digits.domain_pair`, run
    :func:`benchmark` (with the target oracle) and return a JSON-ready dict with the runs, the
    per-method summary and, for the anchor pairs, the published numbers (:data:`PUBLISHED`)."""
    from . import digits

    config = config or AdaptConfig()
    pair = digits.domain_pair(source, target, size=size, seed=0, limit=limit, download=download)
    start = time.perf_counter()
    rows = benchmark(pair.source_train, pair.target_train, pair.target_test, methods, seeds, config,
                     device=device, progress=progress, oracle=pair.target_train, source_test=pair.source_test)
    return {"source": source, "target": target, "size": size, "sizes": {k: len(getattr(pair, k)) for k in
            ("source_train", "target_train", "target_test")}, "config": vars(config),
            "device": str(device), "seconds": round(time.perf_counter() - start, 1),
            "runs": rows, "summary": summarize(rows), "published": PUBLISHED.get((source, target))}

"""Robust fine-tuning: keep what pretraining knew when the test data drifts.

- **LP-FT** (Kumar et al. 2022): fit a linear probe on frozen features first, then fine-tune
  everything starting from it. A random head sends large, arbitrary gradients into the
  backbone during the first steps and distorts features that served other inputs well;
  a trained head does not. :func:`start_from_probe` puts a fitted probe (chapter 01's
  :func:`tlcourse.features.linear_probe`) into a model's head.
- **WiSE-FT** (Wortsman et al. 2022a): the weights
  ``(1 - alpha) * theta_0 + alpha * theta_1`` between the starting point and the fine-tuned
  model; :func:`interpolate` builds them, :func:`wise_ft_curve` scores a sweep over alpha.
  **Model soups** (Wortsman et al. 2022b): :func:`uniform_soup` averages
  several fine-tuned runs from the same start.
- **Tent** (Wang et al. 2021): at test time, without labels, minimise the entropy of the
  predictions on each incoming batch by updating only BatchNorm's scales and shifts, with
  BatchNorm normalising by the batch's own statistics (:class:`Tent`). Beside it, AdaBN
  (:func:`tlcourse.adapt.adabn`) only re-estimates the statistics.

No maintained package on PyPI implements Tent or weight interpolation for arbitrary PyTorch
models (the authors' code is a research repository), and each is a few lines: they are written
here, following the papers.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .efficient import head_name
from .features import probe_to_linear
from .finetune import batchnorm_layers


def start_from_probe(model: nn.Module, probe) -> nn.Module:
    """LP-FT's starting point: ``model`` with its head replaced by the fitted scikit-learn
    ``probe`` (trained on this backbone's pooled features). Returns the model."""
    head = probe_to_linear(probe)
    old = getattr(model, head_name(model))
    if not isinstance(old, nn.Linear) or old.in_features != head.in_features:
        raise ValueError(f"the probe takes {head.in_features} features but the model's head is {old}: "
                         "fit the probe on this backbone's pooled features")
    setattr(model, head_name(model), head.to(old.weight.device))
    return model


def _check_same(states: Sequence[dict[str, torch.Tensor]]) -> None:
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys:
            missing = sorted(set(keys) ^ set(s))[:5]
            raise ValueError(f"the state dicts hold different tensors (e.g. {missing}): "
                             "interpolate only models of the same architecture and head")
        for k in keys:
            if s[k].shape != states[0][k].shape:
                raise ValueError(f"{k} has shape {tuple(states[0][k].shape)} in one model and "
                                 f"{tuple(s[k].shape)} in another")


def interpolate(theta_0: dict[str, torch.Tensor], theta_1: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * theta_0 + alpha * theta_1`` for every floating-point tensor of two state
    dicts of one architecture (``alpha = 0``: the start, ``1``: the fine-tuned model).

    BatchNorm's running means and variances are interpolated like the weights; integer
    buffers (``num_batches_tracked``) come from ``theta_1``. Interpolating the variance is an
    approximation: re-estimate the statistics afterwards (AdaBN on training images) if it
    matters.
    """
    _check_same([theta_0, theta_1])
    return {k: torch.lerp(v0, theta_1[k].to(v0.dtype), alpha) if v0.is_floating_point() else theta_1[k].clone()
            for k, v0 in theta_0.items()}


def uniform_soup(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The average of several state dicts of one architecture (a uniform model soup); integer
    buffers from the first. Only fine-tuned runs that started from the same weights average
    into a good model: their weights lie in one basin of the loss."""
    if not states:
        raise ValueError("a soup needs at least one model")
    _check_same(states)
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in states[0].items()}


def wise_ft_curve(model: nn.Module, theta_0: dict[str, torch.Tensor], theta_1: dict[str, torch.Tensor],
                  alphas: Iterable[float], evaluate: Callable[[nn.Module], dict[str, float]]) -> list[dict[str, float]]:
    """``[{"alpha": a, **evaluate(model with interpolate(theta_0, theta_1, a))}, ...]``.

    ``model`` is a scratch copy of the architecture (its weights are overwritten);
    ``evaluate`` returns the metrics for one set of weights, e.g. accuracy in distribution and
    under each corruption."""
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate(theta_0, theta_1, alpha))
        rows.append({"alpha": float(alpha), **evaluate(model.eval())})
    return rows


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of ``logits`` ``[N, C]``: Tent's loss."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def tent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Tent may change: every BatchNorm's scale and shift, nothing else."""
    return [p for bn in batchnorm_layers(model) for p in (bn.weight, bn.bias) if p is not None]


class Tent:
    """Test-time entropy minimisation (Wang et al. 2021) on a copy of ``model``.

    Calling ``tent(x)`` on a batch ``[N, 3, H, W]`` takes ``steps`` gradient steps of
    :func:`entropy` on that batch, then returns the logits ``[N, C]`` of the adapted model.
    BatchNorm normalises with each batch's own statistics (as in training) and only its affine
    parameters change; every other layer, dropout included, stays in eval mode (the paper
    puts the whole model in train mode; for a timm EfficientNet that would also switch on
    dropout and stochastic depth, noise the method does not need). It returns the logits after
    the update, one more forward pass per batch (the authors' code returns those of the pass
    that adapts). ``episodic=True`` resets the weights before every batch; otherwise they keep
    adapting along the stream, which can drift towards confident wrong answers on long streams.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, steps: int = 1, episodic: bool = False,
                 momentum: float = 0.9):
        if steps < 1:
            raise ValueError("Tent needs at least one step per batch")
        self.model = copy.deepcopy(model).eval()
        bns = batchnorm_layers(self.model)
        if not bns:
            raise ValueError("the model has no BatchNorm layers: Tent has nothing to adapt")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for bn in bns:
            nn.Module.train(bn, True)  # even a BN kept in eval mode by finetune.keep_batchnorm_eval
            # Batch statistics always: not the source's running ones, and none stored.
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = None
        self.params = tent_parameters(self.model)
        for p in self.params:
            p.requires_grad_(True)
        self.steps, self.episodic = steps, episodic
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        self._start = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def reset(self) -> None:
        """Back to the weights Tent started from."""
        self.model.load_state_dict(self._start[0])
        self.optimizer.load_state_dict(self._start[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise ValueError("Tent normalises by batch statistics: give it batches of at least 2 images")
        if self.episodic:
            self.reset()
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = entropy(self.model(x))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        with torch.no_grad():
            return self.model(x)


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 64) -> float:
    """Accuracy of ``predict`` (batch ``[B, 3, H, W]`` -> logits ``[B, C]``) over ``images``
    ``[N, 3, H, W]`` in order, batch by batch, as a stream: what Tent sees at test time. A last
    batch of one image joins the batch before it (batch statistics need two)."""
    bounds = list(range(0, len(images), batch_size)) + [len(images)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    correct = 0
    for start, stop in zip(bounds, bounds[1:]):
        logits = predict(images[start:stop])
        correct += (logits.argmax(1) == labels[start:stop].to(logits.device)).sum().item()
    return correct / len(images)


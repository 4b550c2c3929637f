"""Parameter-efficient fine-tuning: train a sliver of the weights, ship a file of kilobytes.

- **LoRA** (Hu et al. 2022) through Hugging Face's ``peft``: a frozen weight ``W`` gets a
  trainable low-rank update, ``W + (alpha / r) * B @ A`` with ``A`` ``[r, in]`` and ``B``
  ``[out, r]``; ``B`` starts at zero, so training starts from exactly the pretrained network.
  :func:`add_lora` wraps every pointwise (1x1) convolution of a timm EfficientNet by default;
  :func:`merge_lora` folds the update into ``W`` for inference (the original layers again,
  nothing extra to run); :func:`save_adapter` / :func:`load_adapter` keep only what was trained.
- **BitFit** (Ben Zaken et al. 2022): train only the bias terms. EfficientNet's convolutions
  have no bias (a BatchNorm follows each), so :func:`select_bitfit` trains BatchNorm's shift
  and scale, the biases that this architecture has, plus the new head.

Which layers LoRA can wrap. A pointwise convolution is a matrix ``[out, in]`` applied at every
pixel, exactly what LoRA factorises. A depthwise convolution (``groups == channels``) has one
3x3 or 5x5 filter per channel and nothing low-rank to factor: ``peft`` refuses it unless the
rank is a multiple of the number of channels, and cannot merge it. :func:`depthwise_convs`
names them so a chapter can show the refusal.

``peft`` (and the ``transformers`` it imports, about 3 s) is imported only when needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .finetune import batchnorm_layers, freeze

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def pointwise_convs(model: nn.Module) -> list[str]:
    """Names of the ``Conv2d`` layers with a 1x1 kernel and ``groups == 1``: LoRA's targets in
    a MobileNet/EfficientNet (93 % of EfficientNet-Lite0's weights)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]


def depthwise_convs(model: nn.Module) -> list[str]:
    """Names of the grouped ``Conv2d`` layers (``groups > 1``): no low-rank update to learn."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


def head_name(model: nn.Module) -> str:
    """The attribute that holds the classifier (``classifier`` in timm's EfficientNets, ``fc``
    in ResNets): the layer a new task replaces, trained in full beside the adapter."""
    for name in ("classifier", "fc", "head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the classifier of {type(model).__name__} (looked for classifier, fc, head)")


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             targets: list[str] | None = None) -> nn.Module:
    """``model`` with LoRA adapters of rank ``rank`` on ``targets`` (default: every pointwise
    convolution), through ``peft.get_peft_model``. Only the adapters and the head are
    trainable; the head (new for the task) is trained in full and saved with the adapter.

    ``alpha`` defaults to ``rank`` (a scaling ``alpha / rank`` of 1). Returns a
    ``peft.PeftModel``: call it like the model. BatchNorm layers stay in the model and, in
    train mode, still update their running statistics although their weights are frozen:
    keep them in eval mode (:func:`tlcourse.finetune.keep_batchnorm_eval`) unless that drift
    is what you want.
    """
    import peft

    if rank < 1:
        raise ValueError(f"rank must be at least 1, not {rank}")
    config = peft.LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=pointwise_convs(model) if targets is None else list(targets),
                             modules_to_save=[head_name(model)])
    return peft.get_peft_model(model, config)


def lora_parameters(model: nn.Module) -> int:
    """Scalars in the LoRA matrices alone (without the head)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain ``nn.Module`` with every LoRA update added into its frozen weight and the
    trained head in place: the architecture of the original model, its latency, and the
    same outputs (to float rounding)."""
    return model.merge_and_unload()


def save_adapter(model: nn.Module, folder: str | Path) -> int:
    """Save only the adapters and the head into ``folder`` with ``peft``'s ``save_pretrained``
    (a JSON config and a safetensors file, plus a model-card README that loading does not
    need); the bytes of the two files loading needs."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    return sum((folder / f).stat().st_size for f in ADAPTER_FILES)


def load_adapter(base: nn.Module, folder: str | Path) -> nn.Module:
    """``base`` (the pretrained model with a new head of the right size) with the adapter
    saved in ``folder``; a clear error when the folder holds no adapter."""
    import peft

    folder = Path(folder)
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no LoRA adapter (missing {', '.join(missing)}); "
                                "save one with tlcourse.efficient.save_adapter")
    return peft.PeftModel.from_pretrained(base, str(folder))


def select_bitfit(model: nn.Module) -> nn.Module:
    """Freeze ``model`` except its biases, its BatchNorm scales and shifts, and its head.

    BitFit trains bias terms only. Where convolutions have no bias, BatchNorm's shift
    ``beta`` is the bias and its scale ``gamma`` is a per-channel gain beside it; both are
    trained here (about 1 % of EfficientNet-Lite0). Returns the model."""
    freeze(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    for bn in batchnorm_layers(model):
        for p in bn.parameters():
            p.requires_grad_(True)
    for p in getattr(model, head_name(model)).parameters():
        p.requires_grad_(True)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``model`` by name: all a BitFit or head-only run must save
    beside the pretrained weights everyone already has."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

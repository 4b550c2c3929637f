"""Distribution shift you can dial: ImageNet-C-style corruptions of any batch of images.

Hendrycks & Dietterich (2019) built ImageNet-C by applying 15 corruptions at 5 severities to
ImageNet's validation images, and held out 4 more. This module applies four of the 15 and one
held-out one (Gaussian blur) to any ``uint8`` image batch, with their severity constants, so every chapter can ask the same question of a model: how
much accuracy is left when the test photos are noisier, blurrier, more compressed, flatter or
brighter than the training ones?

- ``gaussian_noise``: ``x + N(0, c^2)`` on ``[0, 1]`` pixels, ``c`` = 0.08 ... 0.38.
- ``gaussian_blur``: a Gaussian of standard deviation ``c`` = 1 ... 6 pixels.
- ``jpeg``: re-encoded at quality ``c`` = 25 ... 7.
- ``contrast``: pixels pulled towards the image mean, ``(x - mean) * c + mean``, ``c`` = 0.4 ... 0.05
  (one mean over all channels; ImageNet-C uses one per channel).
- ``brightness``: ``c`` = 0.1 ... 0.5 added to the value channel of HSV, hue and saturation kept.

The constants are ImageNet-C's, chosen for 224-pixel images: on smaller images a blur of
the same standard deviation covers more of the object, so the same severity is harsher.

Built on torchvision's ``gaussian_blur`` and Pillow's JPEG encoder (torchvision's own image
codecs are deprecated since 0.29) rather than the ``imagecorruptions`` package, which
depends on OpenCV and re-implements the same formulas in NumPy. Everything here is deterministic: the only random
corruption, the noise, draws from a generator seeded by ``seed``, so a learner who reruns a
chapter with the same ``TLCOURSE_SEED`` shifts the test set the same way.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

SEVERITIES = (1, 2, 3, 4, 5)
# ImageNet-C's constants per severity (Hendrycks & Dietterich 2019, their code's defaults).
CONSTANTS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "jpeg": (25, 18, 15, 10, 7),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
}


def _noise(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    return x + c * torch.randn(x.shape, generator=generator)


def _blur(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    size = 2 * math.ceil(3 * c) + 1  # +-3 standard deviations: 99.7 % of the kernel's mass
    return gaussian_blur(x, [size, size], [c, c])


def _jpeg(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    out = []
    for img in _to_uint8(x):  # through Pillow's encoder, as ImageNet-C was made
        buffer = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=int(c))
        out.append(torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def _contrast(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    # One mean over the whole image and all channels: pixels are pulled towards a grey, so colour
    # fades too. ImageNet-C takes one mean per channel, pulling towards the image's mean colour.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def _brightness(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    # HSV's value is the largest channel, and RGB = value * f(hue, saturation): adding c to the
    # value with hue and saturation kept scales each pixel by (value + c) / value. The same as a
    # round trip through skimage.color's HSV, without leaving the tensor.
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + c).clamp(max=1.0)
    scale = torch.where(value > 0, new_value / value.clamp(min=1e-8), torch.zeros_like(value))
    grey = torch.where(value > 0, torch.zeros_like(x), new_value.expand_as(x))  # black pixels turn grey
    return x * scale + grey


CORRUPTIONS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _noise,
    "gaussian_blur": _blur,
    "jpeg": _jpeg,
    "contrast": _contrast,
    "brightness": _brightness,
}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (``uint8`` ``[N, 3, H, W]`` or ``[3, H, W]``) with corruption ``name`` at
    ``severity`` 1-5; the same shape and dtype back.

    Works on the decoded pixels a chapter keeps (e.g. :class:`tlcourse.finetune.PreDecoded`),
    before resizing and normalisation. ``seed`` fixes the noise; the other corruptions do not
    draw random numbers.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity!r}")
    if images.dtype != torch.uint8:
        raise TypeError(f"corrupt() takes uint8 images (0-255), not {images.dtype}: "
                        "corrupt the decoded pixels, before normalisation")
    single = images.dim() == 3
    batch = images.unsqueeze(0) if single else images
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W] or [3, H, W], got {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    out = _to_uint8(CORRUPTIONS[name](batch.float() / 255, CONSTANTS[name][severity - 1], generator))
    return out[0] if single else out


def corruption_suite(images: torch.Tensor, severities=(1, 3, 5), names=None,
                     seed: int = 0) -> Iterator[tuple[str, int, torch.Tensor]]:
    """``(name, severity, corrupted images)`` for every corruption and severity, in order.

    Each (corruption, severity) gets its own seed derived from ``seed``, so adding or removing
    one never changes the noise drawn for another."""
    order = list(CORRUPTIONS)
    for name in order if names is None else names:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose among {', '.join(order)}")
        for severity in severities:
            yield name, severity, corrupt(images, name, severity, seed=seed * 1000 + 10 * order.index(name) + severity)

"""Where a notebook runs: profile, device, seeds, and a plain-words report.

Every notebook starts with::

    from tlcourse import env
    cfg = env.setup()          # profile + device + seed, printed once

``TLCOURSE_PROFILE`` chooses ``quick`` (small subsets, minutes on a 2-core CPU; what CI
runs) or ``full`` (complete datasets and schedules, meant for a GPU). When it is unset the
profile is ``full`` if a CUDA GPU is present, else ``quick``.
"""

from __future__ import annotations

import os
import platform
import random
import sys
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch

PROFILES = ("quick", "full")


def profile() -> str:
    """The active profile, ``"quick"`` or ``"full"`` (see module docstring)."""
    value = os.environ.get("TLCOURSE_PROFILE", "").strip().lower()
    if not value:
        return "full" if torch.cuda.is_available() else "quick"
    if value not in PROFILES:
        raise ValueError(
            f"TLCOURSE_PROFILE={value!r} is not a profile; use one of {', '.join(PROFILES)} "
            "(or leave it unset: full on a CUDA GPU, quick otherwise)."
        )
    return value


def is_quick() -> bool:
    return profile() == "quick"


def device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU.

    ``prefer`` (or ``TLCOURSE_DEVICE``) forces one, e.g. ``"cpu"`` to compare timings.
    """
    choice = prefer or os.environ.get("TLCOURSE_DEVICE")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a torch generator for data loaders.

    CPU runs are then repeatable. cuDNN autotuning stays on: on a GPU we trade bitwise
    repeatability for speed, and the chapters report mean ± std over seeds instead.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class RunConfig:
    """What :func:`setup` decided; chapters read ``cfg.quick`` to size their experiments."""

    profile: str
    device: torch.device
    seed: int

    @property
    def quick(self) -> bool:
        return self.profile == "quick"


def setup(seed: int = 0, verbose: bool = True) -> RunConfig:
    """Choose profile and device, seed everything, and say so in one line."""
    cfg = RunConfig(profile=profile(), device=device(), seed=seed)
    seed_everything(seed)
    if cfg.device.type == "cpu":
        # Two-core laptops and CI: more threads than cores only adds contention.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    if verbose:
        print(f"tlcourse: profile={cfg.profile}, device={describe_device(cfg.device)}, seed={seed}")
    return cfg


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    if dev.type == "cpu":
        return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return dev.type


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def on_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def report() -> dict:
    """Versions, device, profile; the facts ``tlcourse env`` prints.

    Returns a plain dict so it can be printed, logged or dumped as JSON.
    """
    dev = device()
    try:
        prof = profile()
    except ValueError as exc:
        prof = f"invalid ({exc})"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tlcourse": _version("tlcourse"),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "scikit-learn": _version("scikit-learn"),
        "tensorflow": _version("tensorflow-cpu") if _version("tensorflow") == "not installed" else _version("tensorflow"),
        "device": describe_device(dev),
        "cuda_available": torch.cuda.is_available(),
        "profile": prof,
        "profile_source": "TLCOURSE_PROFILE" if os.environ.get("TLCOURSE_PROFILE") else "default (by device)",
        "colab": on_colab(),
    }

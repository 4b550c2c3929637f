"""Where a notebook runs: profile, device, seeds, and a plain-words report.

Every notebook starts with::

    from tlcourse import env
    cfg = env.setup()          # profile + device + seed, printed once

``TLCOURSE_PROFILE`` chooses ``quick`` (small subsets, minutes on a 2-core CPU; what CI
runs) or ``full`` (complete datasets and schedules, meant for a GPU). When it is unset the
profile is ``full`` if a CUDA GPU is present, else ``quick``.

``TLCOURSE_SEED`` (an integer, default 0) is the one seed every random choice of a notebook
derives from: data splits and subsets, augmented views, few-shot samples, initial weights,
batch order. A chapter that repeats an experiment over several seeds takes them from
:meth:`RunConfig.seeds`, so another ``TLCOURSE_SEED`` gives a fresh set. The chapters' claims
must hold for any value (``tlcourse run --seed N`` reruns a notebook with another one).
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


def course_seed() -> int:
    """The course seed: ``TLCOURSE_SEED`` as an integer, 0 when unset (see module docstring)."""
    value = os.environ.get("TLCOURSE_SEED", "").strip()
    if not value:
        return 0
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"TLCOURSE_SEED={value!r} is not an integer; use e.g. TLCOURSE_SEED=1 "
                         "(or leave it unset for seed 0).") from None
    if number < 0:
        raise ValueError(f"TLCOURSE_SEED={number} is negative; use a seed of 0 or more.")
    return number


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

    def seeds(self, n: int) -> list[int]:
        """``n`` seeds for repeated runs, derived from :attr:`seed`.

        ``seed * n`` to ``seed * n + n - 1``: seed 0 gives 0 … n−1, and two course seeds never
        share a run, so a claim checked with ``TLCOURSE_SEED=1`` meets fresh splits and weights.
        """
        return list(range(self.seed * n, self.seed * n + n))


def setup(seed: int | None = None, verbose: bool = True) -> RunConfig:
    """Choose profile and device, seed everything, and say so in one line.

    ``seed`` defaults to ``TLCOURSE_SEED`` (0 when unset): notebooks call ``env.setup()`` and
    use ``cfg.seed`` / ``cfg.seeds(n)`` for every random choice.
    """
    seed = course_seed() if seed is None else int(seed)
    cfg = RunConfig(profile=profile(), device=device(), seed=seed)
    seed_everything(seed)
    if cfg.device.type == "cpu":
        # Two-core laptops and CI: more threads than cores only adds contention.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    if verbose:
        print(f"tlcourse: profile={cfg.profile}, device={describe_device(cfg.device)}, seed={seed}"
              + ("" if os.environ.get("TLCOURSE_SEED") else " (set TLCOURSE_SEED to rerun with another)"))
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


def _seed_or_problem():
    try:
        return course_seed()
    except ValueError as exc:
        return f"invalid ({exc})"


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
        "seed": _seed_or_problem(),
        "colab": on_colab(),
    }

"""TensorFlow and Keras 3 for the Keras companions, imported safely beside PyTorch.

Every ``tlcourse.keras_*`` module imports ``tf`` and ``keras`` from here, because two things
must happen before TensorFlow loads:

- Keras 3 picks its backend when first imported; the companions use TensorFlow (tf.data, a
  ``GradientTape`` train step), so ``KERAS_BACKEND`` defaults to ``tensorflow``.
- Triton (loaded by ``torch._dynamo``, which torchvision and timm import) must load *before*
  TensorFlow: in the other order the process dies with a segmentation fault (measured with
  tensorflow-cpu 2.21 and torch 2.14 on Linux; both bundle their own LLVM). So PyTorch's side is
  imported first here, when PyTorch is installed.

TensorFlow's C++ start-up notices (oneDNN, CPU instruction sets, "log messages before
absl::InitializeLog") are printed before its logging is configured, so ``TF_CPP_MIN_LOG_LEVEL``
cannot silence them; :func:`_import_tensorflow` filters exactly those lines out of the import's
stderr and passes everything else through.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "tensorflow" in sys.modules and "triton" not in sys.modules:
    warnings.warn(
        "TensorFlow was imported before tlcourse. Importing torchvision or timm after TensorFlow "
        "can crash the kernel (a segmentation fault while loading Triton). If it does, restart the "
        "kernel and import tlcourse (or torch._dynamo) before tensorflow.", RuntimeWarning, stacklevel=2)
else:
    try:
        import torch._dynamo  # noqa: F401 - loads Triton before TensorFlow, see the docstring
    except ImportError:  # a TensorFlow-only environment: nothing to order
        pass

_NOTICES = ("All log messages before absl::InitializeLog", "oneDNN custom operations are on",
            "This TensorFlow binary is optimized", "To enable the following instructions")


def _import_tensorflow():
    """``import tensorflow, keras`` with TensorFlow's start-up notices removed from stderr.

    The notices are written by C++ straight to file descriptor 2 (a notebook shows them as red
    text), so the descriptor is pointed at a temporary file for the import and its lines, less
    the notices, are written back afterwards, whether or not the import succeeded.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import keras
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(notice in line for notice in _NOTICES)]
            sys.stderr.write("".join(kept))
    return keras, tensorflow


try:
    keras, tf = _import_tensorflow()
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "The Keras companions need TensorFlow and Keras 3: install them with "
        "`pip install 'tlcourse[tensorflow]'` (the README's two commands already do). "
        "On Colab both are preinstalled."
    ) from exc

if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    raise RuntimeError(
        f"Keras runs on the {keras.backend.backend()!r} backend; the Keras companions need "
        "'tensorflow'. Unset KERAS_BACKEND (or set it to tensorflow) and restart the kernel.")

__all__ = ["keras", "tf"]

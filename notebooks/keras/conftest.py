"""The Keras companions need the ``tensorflow`` extra; without it their cells are skipped, with a reason.

The README's commands install that extra, so CI executes these notebooks; a contributor who installed
only ``.[dev]`` sees "SKIPPED ... TensorFlow and Keras 3 are not installed" in pytest's summary instead
of every cell failing on ``import tensorflow``. ``find_spec`` looks the packages up without importing
TensorFlow (seconds of start-up) into the pytest process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _keras_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("keras") is not None


def pytest_collection_modifyitems(config, items):
    if _keras_installed():
        return
    skip = pytest.mark.skip(reason="TensorFlow and Keras 3 are not installed (pip install 'tlcourse[tensorflow]')")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)

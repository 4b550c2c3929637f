"""How pytest runs this repository's tests and notebooks, wherever they are started from:
pytest-xdist's workers and the order of the run. The tests' own fixtures are in tests/conftest.py."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (the README's test command: two processes) each worker, and the nbval
    # kernels it starts, takes its share of the cores; two processes with all the threads each
    # would fight over them. PyTorch and oneDNN read OMP_NUM_THREADS when they start,
    # TensorFlow its own two variables.
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(_name, _share)


# Seconds each notebook took in the last fresh-clone run (quick profile, 2 cores, one process),
# rounded. Only the order of the run depends on them: under pytest-xdist the longest notebooks
# start first, so that the two processes finish together instead of one waiting for the other's
# last long notebook. A notebook missing here runs after these, before tests/.
NOTEBOOK_SECONDS = {
    "05_multitask_learning.ipynb": 480,
    "04_distillation_keras.ipynb": 220,
    "03_domain_adaptation.ipynb": 370,
    "06_parameter_efficient_and_robust_fine_tuning.ipynb": 420,
    "04_distillation.ipynb": 250,
    "02_fine_tuning_keras.ipynb": 240,
    "02_fine_tuning.ipynb": 210,
    "01_feature_extraction.ipynb": 160,
    "07_text_transfer.ipynb": 260,
    "08_scaling_out.ipynb": 70,
    "03_domain_adaptation_keras.ipynb": 120,
    "05_multitask_learning_keras.ipynb": 200,
}


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return
    if getattr(config.option, "numprocesses", None) and config.getoption("dist", "no") not in ("loadscope", "loadfile"):
        raise pytest.UsageError("a notebook's cells must run in one kernel: with -n, add --dist loadscope "
                                "(or run python3 -m tlcourse.bootstrap test, which does)")
    if "TLCOURSE_TEST_GRADES" not in os.environ:
        # The grades one test made, for the others (grading_support.grade_once), whichever
        # pytest-xdist worker made them; the workers inherit this variable.
        import tempfile

        config._tlcourse_grades = tempfile.mkdtemp(prefix="tlcourse-grades-")
        os.environ["TLCOURSE_TEST_GRADES"] = config._tlcourse_grades


def pytest_unconfigure(config):
    folder = getattr(config, "_tlcourse_grades", None)
    if folder:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("TLCOURSE_TEST_GRADES", None)


def pytest_collection_modifyitems(config, items):
    """Notebooks first, the longest first (NOTEBOOK_SECONDS), then tests/, and
    test_check_agreement.py last: it grades the notebooks the chapters' grading tests grade, and
    reuses their grades (grading_support.grade_once) instead of grading them again. The sort is
    stable, so each file keeps its own order (a notebook's cells run top to bottom)."""
    def rank(item):
        if item.path.name == "test_check_agreement.py":
            return (3, 0)
        if item.path.suffix == ".ipynb":
            return (0, -NOTEBOOK_SECONDS.get(item.path.name, 0)) if item.path.parent.name != "solutions" else (1, 0)
        return (2, 0)
    items.sort(key=rank)

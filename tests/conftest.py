"""Shared fixtures. Tests never need the internet: downloads are served from 127.0.0.1."""

from __future__ import annotations

import os

import pytest

# Tests run in the quick profile on the CPU whatever the machine, so thresholds are stable.
os.environ.setdefault("TLCOURSE_PROFILE", "quick")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TLCOURSE_HEADLESS", "1")  # nbval kernels inherit it: widgets draw static figures

@pytest.fixture
def call(capsys, monkeypatch):
    """``call(*args, env=None)``: the ``tlcourse`` command's ``cli.main(args)`` in this process (torch
    already imported), as a CompletedProcess: return code, captured stdout and stderr; argparse's exits
    become return codes. For the tests of what a command prints and returns; the tests of how it
    starts run the installed script in a subprocess."""
    import subprocess

    from tlcourse import cli

    def call(*args, env=None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


@pytest.fixture(scope="session")
def lite0():
    from tlcourse import models

    return models.efficientnet_lite0()


@pytest.fixture(scope="session")
def bundled_photos():
    from tlcourse import datasets

    return datasets.photos(["chelsea", "coffee"])

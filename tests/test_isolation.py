"""How the grader's worker is walled off (tlcourse.grading.isolation)."""

from __future__ import annotations

import shutil

import pytest

from tlcourse.grading import isolation


def test_binds_come_after_the_writable_tmpfs():
    """A Python installation (or a clone with its .venv) under /tmp must be bound on top of the
    sandbox's own /tmp, not hidden by it: CI clones into a temporary folder."""
    argv = isolation._bwrap_argv("bwrap", [])
    tmpfs = [i for i, a in enumerate(argv) if a == "--tmpfs"]
    binds = [i for i, a in enumerate(argv) if a in ("--ro-bind", "--ro-bind-try")]
    remounts = [i for i, a in enumerate(argv) if a == "--remount-ro"]
    assert tmpfs and binds and max(tmpfs) < min(binds) and max(binds) < min(remounts)
    assert argv[argv.index("--remount-ro") + 1] == "/dev" and "/" in argv[remounts[-1] + 1]
    for path in isolation.readable_paths():
        assert ["--ro-bind", path, path] == argv[argv.index(path) - 1:argv.index(path) + 2]


def test_the_sandbox_sees_python_and_the_package_only(tmp_path):
    if isolation.available_level() != isolation.BUBBLEWRAP:
        pytest.skip("no usable bubblewrap here")
    import subprocess
    import sys

    secret = tmp_path / "secret.txt"
    secret.write_text("not for learners")
    probe = ("import os, tlcourse, torch; print(os.path.exists(%r), os.getuid(), os.access('/etc', os.W_OK))"
             % str(secret))
    out = subprocess.run(isolation._bwrap_argv(shutil.which("bwrap"), []) + [sys.executable, "-I", "-c", probe],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", str(isolation.SANDBOX_UID), "False"]

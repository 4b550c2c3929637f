"""tools/device/run_cells.py: the GPU machine's notebook runner (no Jupyter, no IPython there)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tools" / "device" / "run_cells.py"

CELLS = [
    'import sys\nif "google.colab" in sys.modules:\n    %pip install --quiet something\n    !ls',
    "x = 2\nx * 21",
    'from IPython.display import Markdown, display\ndisplay(Markdown("**seen**"))\nNone',
    "import matplotlib.pyplot as plt\nplt.plot([1, 2]);",
    'assert x == 3, "x is not 3"',
    'print("never runs")',
]


@pytest.mark.parametrize("ipython", ["installed", "missing"])
def test_runner_executes_cells_in_order_and_stops_at_the_first_failure(tmp_path, ipython):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in CELLS])
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    # "missing": the machine's image has no IPython; sys.modules[name] = None makes imports fail.
    block = "import sys; sys.modules['IPython'] = None; " if ipython == "missing" else ""
    code = f"{block}import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    res = subprocess.run([sys.executable, "-c", code, str(RUNNER), str(path), "--out", str(tmp_path / "out"),
                          "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    record = json.loads((tmp_path / "out" / "cells.json").read_text())
    assert [(r["cell"], r["passed"]) for r in record] == [(1, True), (2, True), (3, True), (4, True), (5, False)]
    assert record[3]["figures"] == 1 and (tmp_path / "out" / "cell04-0.png").stat().st_size > 0
    output = (tmp_path / "out" / "output.txt").read_text()
    assert "\n42\n" in output and "**seen**" in output and "x is not 3" in output
    assert "never runs" not in output and "None" not in output.replace("NoneType", "")

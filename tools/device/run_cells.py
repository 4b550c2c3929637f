"""Execute a chapter notebook's code cells in one Python process, without Jupyter.

For the GPU machine lent to some of this project's sessions (see CONTRIBUTING.md, "Running the
full profile on the GPU machine"). Its image has PyTorch, torchvision, timm, scikit-learn,
scikit-image, matplotlib and tqdm, but no Jupyter, IPython or nbval, and a call may carry only
64 MiB: the hymenoptera photos (44 MB) and the backbone's weights (17 MB) leave no room for
IPython's dependencies. Everywhere else use ``tlcourse run`` (nbclient) or ``pytest --nbval``:
they run the notebook in a real kernel.

What a kernel would do and this runner does instead:

- every code cell runs in one namespace, in order; the first exception stops the run (as nbval
  does) and the runner exits 1;
- a line that is an IPython magic (``%pip ...``, ``!ls``) is replaced by ``pass``: the chapters
  use them only under ``if "google.colab" in sys.modules``;
- the value of a cell's last expression is printed, as a notebook shows it;
- ``IPython.display`` is a small stand-in when IPython is missing: ``display`` prints an
  object's Markdown or text form;
- each figure left open at the end of a cell is saved as ``<out>/<cell>-<k>.png`` and closed.

``<out>/cells.json`` lists every cell's seconds and whether it passed; ``<out>/output.txt``
holds everything the cells printed.

Usage: ``python tools/device/run_cells.py NOTEBOOK --out DIR [--seed N] [--profile full]``
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import sys
import time
import traceback
import types
from pathlib import Path

MAGIC = re.compile(r"^(\s*)[%!].*$")


def strip_magics(source: str) -> str:
    """Replace each magic line by ``pass`` at the same indentation (a bare ``if`` stays valid)."""
    return "\n".join(MAGIC.sub(r"\1pass", line) for line in source.splitlines())


def _as_text(obj) -> str:
    """What a notebook would show of ``obj``, in text: its Markdown if it has one."""
    if callable(getattr(obj, "_repr_markdown_", None)):
        return obj._repr_markdown_()
    if type(obj).__module__.startswith("IPython") and hasattr(obj, "data"):  # Code, HTML
        return str(obj.data)
    return str(obj)


def display(*objs, **kwargs):
    """``IPython.display.display`` for a process without a kernel: print the text form."""
    for obj in objs:
        print(_as_text(obj))


def install_display() -> None:
    """Make ``from IPython.display import display`` print text; stand in for IPython if missing."""
    try:
        import IPython.display
    except ImportError:
        class _Text:
            def __init__(self, data="", **kwargs):
                self.data = data

            def _repr_markdown_(self):
                return str(self.data)

        module = types.ModuleType("IPython.display")
        module.Markdown = module.Code = module.HTML = module.Latex = _Text
        package = types.ModuleType("IPython")
        # matplotlib and tqdm look for a running shell through IPython.get_ipython (none here);
        # matplotlib skips its fix for IPython < 8.24 by the version.
        package.display, package.get_ipython, package.version_info = module, lambda: None, (9, 0, 0, "")
        sys.modules["IPython"], sys.modules["IPython.display"] = package, module
    sys.modules["IPython.display"].display = display


def run_cell(source: str, namespace: dict, name: str) -> None:
    """Execute one cell; print the value of its last expression (not None), as a notebook does."""
    tree = ast.parse(strip_magics(source), filename=name)
    # A trailing ";" hides the value in a notebook; the syntax tree does not keep it.
    shown = not strip_magics(source).rstrip().endswith(";")
    last = tree.body[-1] if shown and tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body = tree.body[:-1]
    exec(compile(tree, name, "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
        if value is not None:
            print(_as_text(value) if type(value).__module__.startswith("IPython") else repr(value))


def save_figures(out: Path, stem: str) -> int:
    import matplotlib.pyplot as plt

    numbers = plt.get_fignums()
    for k, number in enumerate(numbers):
        plt.figure(number).savefig(out / f"{stem}-{k}.png", dpi=80)
    plt.close("all")
    return len(numbers)


class _Tee(io.TextIOBase):
    """Writes to the terminal and to the output file at once (a run can be killed mid-cell)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for output.txt, cells.json, figures")
    parser.add_argument("--seed", type=int, help="TLCOURSE_SEED (default: as set, else 0)")
    parser.add_argument("--profile", choices=("quick", "full"), help="TLCOURSE_PROFILE")
    args = parser.parse_args(argv)

    if args.seed is not None:
        os.environ["TLCOURSE_SEED"] = str(args.seed)
    if args.profile:
        os.environ["TLCOURSE_PROFILE"] = args.profile
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TLCOURSE_HEADLESS", "1")  # widgets draw static figures, as under tlcourse run
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    install_display()

    cells = [c for c in json.loads(args.notebook.read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    record = []
    status = 0
    # Cells resolve paths (build/results, the repository root) from the notebook's folder.
    os.chdir(args.notebook.resolve().parent)
    with open(args.out / "output.txt", "w") as log:
        tee = _Tee(sys.__stdout__, log)
        for number, cell in enumerate(cells, start=1):
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            print(f"\n===== cell {number} =====", file=tee)
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
                    run_cell(source, namespace, f"<cell {number}>")
                    figures = save_figures(args.out, f"cell{number:02d}")
                ok = True
            except BaseException:  # noqa: BLE001 - an assert, an error or a KeyboardInterrupt ends the run
                tee.write(traceback.format_exc())
                figures, ok, status = 0, False, 1
            seconds = time.perf_counter() - start
            record.append({"cell": number, "seconds": round(seconds, 2), "passed": ok, "figures": figures})
            print(f"----- cell {number}: {'passed' if ok else 'FAILED'} in {seconds:.1f} s", file=tee)
            (args.out / "cells.json").write_text(json.dumps(record, indent=1))
            if not ok:
                break
    return status


if __name__ == "__main__":
    sys.exit(main())

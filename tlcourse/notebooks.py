"""Notebook chores: headless execution into ``build/``, Colab badges and the setup cell.

The repository URL lives here, once (:data:`GITHUB_REPO`); badges and the Colab setup
cell of every notebook are generated from it and a test checks that they still match.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

GITHUB_REPO = "tlcourse/tlcourse"
BRANCH = "main"
ROOT = Path(__file__).resolve().parent.parent

SETUP_CELL = f'''# Setup: on Google Colab this installs tlcourse; anywhere else it does nothing.
import sys

if "google.colab" in sys.modules:
    %pip install --quiet "tlcourse @ git+https://github.com/{GITHUB_REPO}@{BRANCH}"'''


def colab_url(notebook: str | Path) -> str:
    """Open-in-Colab address of a notebook given by its path inside the repository."""
    return f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/{Path(notebook).as_posix()}"


def colab_badge(notebook: str | Path) -> str:
    """Markdown for the Open-in-Colab badge of a notebook (path relative to the repo root)."""
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook)})"


@dataclass
class RunResult:
    """Outcome of executing one notebook headless."""

    notebook: Path
    ok: bool
    seconds: float
    executed: Path | None = None
    html: Path | None = None
    error: str = ""
    failing_cell: str = ""
    results: dict = field(default_factory=dict)


_PROGRESS_BAR = re.compile(r"\d+%\|")


def drop_progress_widgets(nb) -> int:
    """Remove tqdm's widget progress bars from a notebook's outputs; returns how many.

    ``tqdm.auto`` draws a Jupyter widget whose live state never reaches the saved file: what
    is saved is its first frame, a bar frozen at 0 %, which is all a reader on GitHub or
    nbviewer would see. The printed results next to it are kept.
    """
    removed = 0
    for cell in nb.cells:
        outputs = cell.get("outputs", [])
        kept = [o for o in outputs
                if not (o.get("output_type") == "display_data"
                        and "application/vnd.jupyter.widget-view+json" in o.get("data", {})
                        and _PROGRESS_BAR.search(str(o["data"].get("text/plain", ""))))]
        removed += len(outputs) - len(kept)
        if outputs:
            cell["outputs"] = kept
    return removed


def _html(nb, path: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    path.write_text(body, encoding="utf-8")


def run_notebook(
    path: str | Path, out_dir: str | Path = "build", profile: str | None = None,
    timeout: int = 1800, inplace: bool = False, html: bool = True, seed: int | None = None,
) -> RunResult:
    """Execute a notebook in a fresh kernel (its own folder as working directory).

    Writes ``out_dir/<name>.ipynb`` and ``out_dir/<name>.html`` even when a cell fails (the
    partial run shows where), and with ``inplace`` also saves the outputs back into the
    source notebook — that is how the committed notebooks get their quick-profile outputs.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    path = Path(path).resolve()
    if not path.exists():
        return RunResult(path, ok=False, seconds=0.0, error=f"{path} does not exist")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        return RunResult(path, ok=False, seconds=0.0, error=f"{path} is not a readable notebook: {exc}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The kernel inherits our environment: the profile, the seed, and HEADLESS so widgets draw
    # static figures (viz.temperature_slider). All are restored afterwards, so calling this from
    # a live session leaves that session's widgets interactive.
    settings = {"TLCOURSE_HEADLESS": "1", **({"TLCOURSE_PROFILE": profile} if profile else {}),
                **({"TLCOURSE_SEED": str(seed)} if seed is not None else {})}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    result = RunResult(path, ok=True, seconds=0.0)
    try:
        client.execute()
    except CellTimeoutError as exc:
        result.ok = False
        result.error = f"{exc}\nA cell ran longer than the {timeout} s limit (--timeout) and was stopped."
        result.failing_cell = _running_cell_source(nb)
    except CellExecutionError as exc:
        result.ok = False
        result.error = str(exc)
        result.failing_cell = _failing_cell_source(nb)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result.seconds = time.perf_counter() - start
    # Keep the repository's folders (notebooks/, solutions/) so same-named files don't collide.
    relative = path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path(path.name)
    result.executed = out_dir / relative
    result.executed.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, result.executed)
    if html:
        result.html = result.executed.with_suffix(".html")
        _html(nb, result.html)
    if inplace and result.ok:
        drop_progress_widgets(nb)
        nbformat.write(nb, path)
    return result


def _running_cell_source(nb) -> str:
    """The cell a timeout interrupted: the last code cell that started executing."""
    started = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    return started[-1].source if started else ""


def _failing_cell_source(nb) -> str:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return cell.source
    return ""


def write_results(chapter: str, results: dict, out_dir: str | Path | None = None) -> Path:
    """Save a chapter's headline numbers as ``build/results/<chapter>.json``.

    The README's results table is regenerated from these files, never typed by hand.
    """
    if out_dir is None:
        # In a clone: <repo>/build/results. Installed elsewhere (Colab): ./build/results.
        base = ROOT if (ROOT / "pyproject.toml").exists() else Path.cwd()
        out_dir = Path(os.environ.get("TLCOURSE_BUILD", base / "build")) / "results"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{chapter}.json"
    target.write_text(json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    return target


RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def results_table(results_dir: str | Path | None = None) -> str:
    """A Markdown table of every chapter's headline numbers (``build/results/*.json``)."""
    results_dir = Path(results_dir) if results_dir else ROOT / "build" / "results"
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return "_No results yet: run `tlcourse run` first._"
    rows = ["| notebook | profile | result | value |", "|---|---|---|---|"]
    for file in files:
        data = json.loads(file.read_text())
        profile = data.pop("profile", "")
        for key, value in data.items():
            shown = f"{value:.3f}" if isinstance(value, float) else ("—" if value is None else f"{value}")
            rows.append(f"| {file.stem} | {profile} | {key} | {shown} |")
    return "\n".join(rows)


def update_readme(readme: str | Path | None = None, results_dir: str | Path | None = None) -> Path:
    """Replace the README's results table (between the results markers) with fresh numbers."""
    readme = Path(readme) if readme else ROOT / "README.md"
    text = readme.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        raise ValueError(f"{readme} has no {RESULTS_START} ... {RESULTS_END} block to update")
    head, rest = text.split(RESULTS_START, 1)
    _, tail = rest.split(RESULTS_END, 1)
    readme.write_text(f"{head}{RESULTS_START}\n{results_table(results_dir)}\n{RESULTS_END}{tail}")
    return readme


def show_source(obj):
    """Display the source code of a tlcourse function or class in a notebook (syntax-coloured),
    so a chapter can show the package's code instead of redefining it."""
    import inspect

    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


def markdown_table(rows, formats: dict | None = None):
    """A list of dicts (one per row, same keys) as a Markdown table for ``display``.

    ``formats`` maps a column to a format string, e.g. ``{"parameters": "{:,}"}``; other
    values are printed with ``str``. Returns an ``IPython.display.Markdown`` object.
    """
    from IPython.display import Markdown

    rows = list(rows)
    if not rows:
        raise ValueError("no rows to show")
    formats = formats or {}
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [formats.get(c, "{}").format(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return Markdown("\n".join(lines))

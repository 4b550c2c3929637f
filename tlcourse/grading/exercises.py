"""Generate ``exercises/`` from ``solutions/``: the solution notebooks are the one source of truth.

For every ``solutions/NN_*.ipynb`` the exercise notebook of the same name gets:

- the code between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` replaced by
  ``raise NotImplementedError(...)`` at the same indentation (the ``def`` line and
  docstring above ``# BEGIN SOLUTION`` stay, so the learner sees the signature);
- no cells tagged ``solution-only``; outputs and execution counts cleared;
- the Open-in-Colab badge pointed at the exercise notebook;
- cell metadata reduced to ``tlcourse`` (question ids) and ``tags``; notebook metadata to
  ``kernelspec``, the language name and ``tlcourse``.

The output is deterministic (same bytes on every build), so a test can compare.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from tlcourse.notebooks import colab_url

BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
SOLUTION_ONLY = "solution-only"


class MarkerError(ValueError):
    """Unbalanced or nested solution markers; the message names the notebook and cell."""


def stub_source(source: str, question: str | None, where: str = "") -> str:
    """``source`` with every marked solution region replaced by a stub."""
    out, inside = [], False
    what = f"{question}: " if question else ""
    for n, line in enumerate(source.splitlines(), start=1):
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise MarkerError(f"{where} line {n}: BEGIN SOLUTION inside another solution")
            inside = True
            out.append(f'{begin.group(1)}raise NotImplementedError("{what}replace this line with your code")')
        elif END.match(line):
            if not inside:
                raise MarkerError(f"{where} line {n}: END SOLUTION without BEGIN SOLUTION")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: BEGIN SOLUTION is never closed by END SOLUTION")
    return "\n".join(out)


def exercise_notebook(solution: dict, name: str = "") -> dict:
    """The exercise version of a solution notebook (a new dict)."""
    nb = copy.deepcopy(solution)
    cells = []
    for i, cell in enumerate(nb["cells"], start=1):
        meta = cell.get("metadata", {})
        tags = [t for t in meta.get("tags", []) if t != SOLUTION_ONLY]
        if SOLUTION_ONLY in meta.get("tags", []):
            continue
        new_meta = {}
        if "tlcourse" in meta:
            new_meta["tlcourse"] = meta["tlcourse"]
        if tags:
            new_meta["tags"] = tags
        cell["metadata"] = new_meta
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code":
            question = meta.get("tlcourse", {}).get("question")
            source = stub_source(source, question, f"{name} cell {i}")
            cell["outputs"] = []
            cell["execution_count"] = None
        elif cell["cell_type"] == "markdown" and name:
            # The Open-in-Colab badge must open the exercise, not the solution.
            source = source.replace(colab_url(f"solutions/{name}"), colab_url(f"exercises/{name}"))
        cell["source"] = source
        cell.pop("attachments", None) if cell["cell_type"] == "code" else None
        cells.append(cell)
    nb["cells"] = cells
    meta = nb.get("metadata", {})
    keep = {k: meta[k] for k in ("kernelspec", "tlcourse") if k in meta}
    if "language_info" in meta:
        keep["language_info"] = {"name": meta["language_info"].get("name", "python")}
    nb["metadata"] = keep
    return nb


def render(nb: dict) -> str:
    """Notebook JSON as Jupyter writes it (indent 1, sorted keys), newline-terminated."""
    import nbformat

    node = nbformat.from_dict(nb)
    return nbformat.writes(node, version=4) + "\n"


def planned(solutions_dir: Path, exercises_dir: Path) -> dict[Path, str]:
    """exercise path -> the text ``build`` would write there."""
    out = {}
    for sol in sorted(Path(solutions_dir).glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(sol.read_text(encoding="utf-8"))
        out[Path(exercises_dir) / sol.name] = render(exercise_notebook(nb, sol.name))
    return out


def build(solutions_dir: Path, exercises_dir: Path) -> list[Path]:
    """Write the exercise notebooks; returns those whose content changed."""
    changed = []
    Path(exercises_dir).mkdir(parents=True, exist_ok=True)
    for path, text in planned(solutions_dir, exercises_dir).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def stale(solutions_dir: Path, exercises_dir: Path) -> list[str]:
    """Why ``exercises/`` differs from what ``build`` would write (empty: up to date)."""
    plan = planned(solutions_dir, exercises_dir)
    problems = []
    for path, text in plan.items():
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path} differs from its solution notebook")
    for path in sorted(Path(exercises_dir).glob("*.ipynb")):
        if path not in plan:
            problems.append(f"{path} has no solution notebook (solutions/{path.name})")
    return problems

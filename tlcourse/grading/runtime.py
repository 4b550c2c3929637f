"""Collect the tests of a checks module and run one, turning failures into kind sentences.

Shared by the in-notebook :func:`~tlcourse.grading.check` (runs in the learner's kernel,
for feedback) and the grader's sandbox (runs in a forked process, for scores), so both
say exactly the same thing about the same mistake. No torch import here.
"""

from __future__ import annotations

import inspect
import linecache
import os
import sysconfig
import traceback
from dataclasses import dataclass, field

MAX_MESSAGE = 600  # characters of one failure message: enough to act on, too few to flood


class TestTimeout(BaseException):
    """Raised inside a test that ran past its time (BaseException: a bare ``except
    Exception`` in a test must not swallow it)."""


class ProcessEnded(BaseException):
    """Raised inside a test when the process running the learner's code is gone (it crashed,
    called ``os._exit``, ran out of memory, or sent something that is not a message)."""

    def __init__(self, message: str = "", status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class TestSpec:
    name: str
    question: str
    points: float
    visibility: str
    doc: str
    params: list[str]
    fn: object = field(repr=False, default=None)


def collect(module_globals: dict) -> tuple[dict, list[TestSpec]]:
    """``(QUESTIONS, tests)`` of a checks module's globals, tests in definition order
    (imported tests, e.g. public checks reused by hidden tests, come where imported)."""
    questions = module_globals.get("QUESTIONS")
    if not isinstance(questions, dict) or not questions:
        raise ValueError("a checks module needs a non-empty QUESTIONS dict")
    # Longest id first so "q1" does not claim "test_q10_...".
    ids = sorted(questions, key=len, reverse=True)
    tests = []
    for name, fn in list(module_globals.items()):
        if not (name.startswith("test_") and inspect.isfunction(fn)):
            continue
        qid = next((q for q in ids if name.startswith(f"test_{q}_")), None)
        if qid is None:
            raise ValueError(f"{name}: name must start with test_<question id>_ (ids: {', '.join(questions)})")
        doc = inspect.getdoc(fn) or name[len(f"test_{qid}_"):].replace("_", " ")
        tests.append(TestSpec(
            name=name, question=qid, points=float(getattr(fn, "points", 1.0)),
            visibility=getattr(fn, "visibility", "visible"), doc=doc.strip().splitlines()[0],
            params=list(inspect.signature(fn).parameters), fn=fn,
        ))
    return questions, tests


def run_test(test: TestSpec, namespace: dict, test_file: str | None = None) -> tuple[bool, str]:
    """Run one test against ``namespace``; ``(passed, message)``, message empty on a pass."""
    missing = [p for p in test.params if p not in namespace]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        return False, (f"{names} is not defined. Run the cell that defines it, and keep "
                       f"the name exactly as given.")
    try:
        test.fn(*[namespace[p] for p in test.params])
    except TestTimeout:
        return False, "your code took too long (an endless loop, or far too much work?)"
    except ProcessEnded as exc:
        return False, _clip(ended_message(exc))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes feedback
        return False, _clip(describe_failure(exc, test, test_file))
    return True, ""


def ended_message(exc: ProcessEnded) -> str:
    detail = f" ({exc.status})" if exc.status else ""
    return (f"the process running your code ended during this check{detail}; did the code call os._exit(), "
            "crash Python, or run out of memory?")


def describe_failure(exc: BaseException, test: TestSpec, test_file: str | None) -> str:
    """One or two plain sentences: what was expected and where the learner's code failed.

    An exception that came from the sandbox carries the learner's frames as data
    (``__tlcourse_frames__``: filename, line number, function, line)."""
    carried = getattr(exc, "__tlcourse_frames__", None)
    frames = traceback.extract_tb(exc.__traceback__)
    if carried is not None:
        frames = [traceback.FrameSummary(f, n, name, line=line or None, lookup_line=False)
                  for f, n, name, line in carried] + [f for f in frames if f.filename == (test_file or "")]
    test_file = test_file or test.fn.__code__.co_filename
    learner = [f for f in frames if _is_learner_frame(f.filename, test_file)]
    kind = type(exc).__name__
    text = str(exc).strip()
    if isinstance(exc, NotImplementedError) and learner:
        return (f"not answered yet: `{learner[-1].name}` still raises NotImplementedError. "
                "Replace that line with your code.")
    if isinstance(exc, SystemExit):
        return "your code called exit() / sys.exit(); a function should return its result instead."
    if isinstance(exc, AssertionError) and not learner:
        return text or "this expectation was not met."
    if isinstance(exc, MemoryError):
        return "your code ran out of memory."
    where = ""
    if learner:
        f = learner[-1]
        line = (f.line or linecache.getline(f.filename, f.lineno or 0)).strip()
        where = f" (in `{f.name}`, line {f.lineno}: `{line}`)" if line else f" (in `{f.name}`)"
    detail = f"{kind}: {text}" if text else kind
    return f"your code raised {detail}{where}"


_LIBRARY_DIRS = tuple(
    os.path.realpath(p) for p in {
        sysconfig.get_paths().get("stdlib", ""), sysconfig.get_paths().get("purelib", ""),
        sysconfig.get_paths().get("platlib", ""), os.path.dirname(os.path.dirname(__file__)),
    } if p
)


def _is_learner_frame(filename: str, test_file: str) -> bool:
    if filename == test_file or filename.startswith("<frozen"):
        return False
    if filename.startswith("<"):  # "<answer q1>" in the grader, "<ipython-input-..>"
        return True
    return not os.path.realpath(filename).startswith(_LIBRARY_DIRS)


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

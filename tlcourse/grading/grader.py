"""``tlcourse grade``: score submitted notebooks; learner code and tests never share a process.

Three kinds of process, from the teacher's side outwards:

- this one (the grader): reads each notebook (a corrupt file costs that file only), finds its
  chapter (``--chapter``, notebook metadata, or the ``NN_`` file-name prefix), builds one
  program per question (:mod:`tlcourse.grading.extract`) and keeps the books. It never runs
  learner code and never imports torch;
- a *checker* per grading thread (:mod:`tlcourse.grading.checker`): loads the tests (hidden
  ones included, which exist nowhere else), runs them, and is the grader's only source of
  results;
- the checker's *worker* (:mod:`tlcourse.grading.worker`), walled off by the operating system
  (:mod:`tlcourse.grading.isolation`): runs the learner's code; tests call its functions
  through proxies that move only data (:mod:`tlcourse.grading.wire`).

Each question runs under a per-question timeout and a per-notebook budget; several checkers
grade a class in parallel.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tlcourse.grading import extract

DEFAULT_TIMEOUT = 10.0       # seconds per question; exercises are small units, not training runs
DEFAULT_TOTAL_TIMEOUT = 120.0  # seconds per notebook, all questions together
DEFAULT_MAX_OUTPUT = 1000    # characters of a question's printed output shown as feedback
DEFAULT_MEMORY_MB = 4096     # address space a question's process may add
PACKAGE_CHECKS = Path(__file__).resolve().parent / "checks"
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from tlcourse.grading.checker import main; main()")


@dataclass
class TestResult:
    name: str
    doc: str
    points: float
    visibility: str
    passed: bool
    message: str

    @property
    def score(self) -> float:
        return self.points if self.passed else 0.0


@dataclass
class QuestionResult:
    id: str
    title: str
    tests: list[TestResult]
    output: str = ""          # what the code printed, outside tests that are not "visible"
    hidden_output: str = ""   # what it printed while hidden/after_due_date tests ran
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return sum(t.score for t in self.tests)

    @property
    def max_score(self) -> float:
        return sum(t.points for t in self.tests)


@dataclass
class Submission:
    path: str
    chapter: str | None = None
    questions: list[QuestionResult] = field(default_factory=list)
    error: str | None = None            # the whole notebook could not be graded (why)
    notes: list[str] = field(default_factory=list)
    review: list[str] = field(default_factory=list)  # for the teacher: audit notes
    seconds: float = 0.0
    isolation: str = ""                 # how learner code was walled off (isolation.describe)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def score(self) -> float:
        return sum(q.score for q in self.questions)

    @property
    def max_score(self) -> float:
        return sum(q.max_score for q in self.questions)


@dataclass
class Suite:
    """One chapter's tests: source read once at start, so a submission that rewrites the
    file on disk changes nothing in this run (and :meth:`changed_on_disk` tells)."""

    chapter: str
    path: Path
    source: str
    spec: dict | None = None
    secret_lines: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, chapter: str, path: Path) -> "Suite":
        return cls(chapter, path, path.read_text(encoding="utf-8"))

    def tests_lines(self) -> set[str]:
        """Lines of the tests folder's files (the suite and the modules beside it), which
        learner output must not echo; empty for the public checks, which are public."""
        if self.path.parent == PACKAGE_CHECKS:
            return set()
        texts = [self.source]
        for other in sorted(self.path.parent.glob("*")):
            if other != self.path and other.is_file() and other.stat().st_size < (1 << 20):
                try:
                    texts.append(other.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    pass
        return {line.strip() for text in texts for line in text.splitlines() if len(line.strip()) >= 8}

    def changed_on_disk(self) -> bool:
        try:
            return self.path.read_text(encoding="utf-8") != self.source
        except OSError:
            return True


class GradingError(Exception):
    """A problem with the grading set-up itself (not with a submission)."""


class CheckerProcess:
    """A checker process (:mod:`tlcourse.grading.checker`: the tests, trusted) with its
    sandboxed worker (learner code), and a line-based channel to the checker."""

    def __init__(self, start_timeout: float = 180.0, level: str = ""):
        self.start_timeout = start_timeout
        self.level = level
        self.proc = None
        self._buf = b""
        self._n = 0
        self.start()

    def start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        self._log = tempfile.TemporaryFile()
        # -I: no PYTHONPATH, no user site, no current directory on sys.path.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, root, self.level], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, start_new_session=True,
        )
        self._buf = b""
        ready = self._readline(time.monotonic() + self.start_timeout)
        info = json.loads(ready) if ready else {}
        if not info.get("ready"):
            self._log.seek(0)
            tail = self._log.read()[-2000:].decode("utf-8", "replace")
            self.close()
            raise GradingError(f"the grading sandbox did not start: {info.get('fatal', '')}\n{tail}")
        self.level = info.get("isolation", self.level)

    def request(self, job: dict, timeout: float) -> dict | None:
        """Send ``job``; its reply, or None when the zygote itself failed (then restarted)."""
        self._n += 1
        job = dict(job, id=self._n)
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            while True:
                line = self._readline(deadline)
                if line is None:
                    raise TimeoutError
                reply = json.loads(line)
                if reply.get("id") == self._n:
                    return reply
        except (OSError, ValueError, TimeoutError):
            self.close()
            self.start()
            return None

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                self.proc.kill()
        if self.proc:
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass


def find_suites(tests_dir: str | Path | None) -> dict[str, Path]:
    """chapter -> checks file, from ``--tests DIR`` or the package's public checks."""
    folder = Path(tests_dir) if tests_dir else PACKAGE_CHECKS
    if not folder.is_dir():
        raise GradingError(f"tests folder {folder} does not exist")
    found = {p.stem[2:]: p for p in sorted(folder.glob("ch*.py")) if p.stem[2:].isdigit()}
    if not found:
        raise GradingError(f"no checks modules (ch00.py, ch01.py, ...) in {folder}")
    return found


def grade(paths, tests_dir=None, chapter=None, timeout=DEFAULT_TIMEOUT,
          total_timeout=DEFAULT_TOTAL_TIMEOUT, jobs=None, max_output=DEFAULT_MAX_OUTPUT,
          memory_mb=DEFAULT_MEMORY_MB, progress=None) -> list[Submission]:
    """Grade every notebook in ``paths``; never raises for a bad submission."""
    if not hasattr(os, "fork"):
        raise GradingError("tlcourse grade needs a POSIX system (Linux, macOS, WSL)")
    for name, value in (("timeout", timeout), ("total_timeout", total_timeout)):
        if not float(value) > 0:
            raise GradingError(f"{name} must be a positive number of seconds, not {value}")
    if jobs is not None and int(jobs) < 1:
        raise GradingError(f"jobs must be at least 1, not {jobs}")
    available = find_suites(tests_dir)
    from tlcourse.grading import isolation

    isolation.check_tests_hidden(tests_dir)
    level = isolation.available_level()
    suites: dict[str, Suite] = {}
    paths = [str(p) for p in paths]
    jobs = max(1, min(jobs or min(4, os.cpu_count() or 1), len(paths) or 1))
    todo: "queue.Queue[tuple[int, str]]" = queue.Queue()
    for item in enumerate(paths):
        todo.put(item)
    results: list[Submission | None] = [None] * len(paths)
    lock = threading.Lock()
    opts = dict(timeout=float(timeout), total_timeout=float(total_timeout),
                max_output=int(max_output), memory_mb=int(memory_mb))

    def suite_for(ch: str, sandbox: CheckerProcess) -> Suite:
        with lock:
            if ch not in suites:
                suites[ch] = Suite.read(ch, available[ch])
            suite = suites[ch]
        if suite.spec is None:
            reply = sandbox.request({"kind": "describe", "tests_source": suite.source,
                                     "tests_file": str(suite.path)}, timeout=120)
            if not reply or "fatal" in reply:
                raise GradingError(f"the tests in {suite.path} could not be loaded: "
                                   f"{(reply or {}).get('fatal', 'sandbox failure')}")
            suite.secret_lines = suite.tests_lines()
            suite.spec = reply
        return suite

    errors: list[BaseException] = []

    def worker():
        try:
            sandbox = CheckerProcess(level=level)
        except GradingError as exc:
            errors.append(exc)
            return
        try:
            while True:
                try:
                    index, path = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[index] = _grade_one(path, chapter, available, suite_for, sandbox, opts)
                    results[index].isolation = sandbox.level
                except GradingError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a grader bug must not lose a submission
                    sub = Submission(path)
                    sub.error = f"the grader itself failed on {sub.name} ({type(exc).__name__}: {exc}); grade it again"
                    sub.review.append("internal grader error: " + "".join(
                        traceback.format_exception_only(type(exc), exc)).strip())
                    results[index] = sub
                if progress:
                    progress(results[index])
        except GradingError as exc:
            errors.append(exc)
        finally:
            sandbox.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors and any(r is None for r in results):
        raise errors[0]
    for suite in suites.values():
        if suite.changed_on_disk():
            for sub in results:
                if sub and sub.chapter == suite.chapter:
                    sub.review.append(f"the tests file {suite.path} changed on disk during grading")
    return results  # type: ignore[return-value]


def _grade_one(path, chapter_override, available, suite_for, sandbox, opts) -> Submission:
    started = time.monotonic()
    sub = Submission(path)
    nb = None
    try:
        nb = extract.load_notebook(path)
    except extract.NotebookError as exc:
        sub.error = f"could not read {sub.name}: {exc}"
    ch = extract.chapter_of(nb or {}, path, chapter_override)
    if ch is None and len(available) == 1:
        ch = next(iter(available))
    if ch is None or ch not in available:
        sub.error = sub.error or (
            f"cannot tell which chapter {sub.name} belongs to" if ch is None
            else f"no checks for chapter {ch} (have {', '.join(sorted(available))})")
        sub.error += "; pass --chapter NN"
        sub.seconds = time.monotonic() - started
        return sub
    sub.chapter = ch
    suite = suite_for(ch, sandbox)
    spec = suite.spec
    budget_end = started + opts["total_timeout"]
    if nb is not None:
        try:
            sub.review.extend(extract.audit(nb))
        except Exception as exc:  # noqa: BLE001 - an audit must never stop grading
            sub.review.append(f"audit failed: {exc}")
    for qid, qspec in spec["questions"].items():
        tests = [t for t in spec["tests"] if t["question"] == qid]
        q = QuestionResult(qid, qspec["title"], [])
        if sub.error:
            q.tests = [_failed(t, sub.error) for t in tests]
            sub.questions.append(q)
            continue
        prog = extract.build_program(nb, qid, qspec)
        sub.notes.extend(prog.notes)
        left = budget_end - time.monotonic()
        if not prog.answer_found:
            names = " or ".join(f"`{f}`" for f in qspec["functions"]) or "its function"
            msg = (f"no answer found for {qid}: no code cell is marked as question {qid} or defines "
                   f"{names}. Was the cell deleted, or the function renamed?")
            q.tests = [_failed(t, msg) for t in tests]
        elif left <= 0:
            q.tests = [_failed(t, "not graded: this notebook used up its total grading time") for t in tests]
        else:
            if prog.hatches:
                # Only a note: the tests run in another process that this code cannot reach.
                why = "; ".join(prog.hatches[:4]) + (" ..." if len(prog.hatches) > 4 else "")
                sub.review.append(f"{qid}: {why} (graded as usual; worth a look)")
            limit = min(opts["timeout"], left)
            job = {"kind": "run", "question": qid, "tests_source": suite.source,
                   "tests_file": str(suite.path), "timeout": limit, "max_output": opts["max_output"],
                   "memory_mb": opts["memory_mb"],
                   "snippets": [vars(s) for s in prog.snippets]}
            reply = sandbox.request(job, timeout=limit + 30)
            if not reply or "fatal" in reply:
                why = (reply or {}).get("fatal", "the sandbox stopped responding")
                q.tests = [_failed(t, f"could not be graded ({why})") for t in tests]
                sub.review.append(f"{qid}: sandbox failure: {why}")
            else:
                by_name = {r["name"]: r for r in reply["tests"]}
                q.tests = [TestResult(t["name"], t["doc"], t["points"], t["visibility"],
                                      by_name[t["name"]]["passed"], by_name[t["name"]]["message"])
                           for t in tests]
                q.seconds = reply["seconds"]
                for key, attr in (("output", "output"), ("hidden_output", "hidden_output")):
                    if reply.get(f"{key}_bytes"):
                        shown, scrubbed = _scrub(reply[key], suite.secret_lines)
                        more = reply[f"{key}_bytes"] - len(reply[key].encode())
                        setattr(q, attr, shown + (f"\n… ({more} more bytes not shown)" if more > 0 else ""))
                        if scrubbed:
                            sub.review.append(f"{qid}: printed {scrubbed} line(s) of the tests folder's "
                                              "files (not shown to the learner)")
        sub.questions.append(q)
    sub.seconds = time.monotonic() - started
    return sub


def _uses(hatches: list[str]) -> str:
    """``["uses sys._getframe", "imports gc"]`` -> "sys._getframe, gc" for a message."""
    names = [h.split(" ", 1)[-1] if h.startswith(("uses ", "imports ")) else h for h in hatches[:3]]
    return ", ".join(names) + (" ..." if len(hatches) > 3 else "")


def _scrub(output: str, secret: set[str]) -> tuple[str, int]:
    """``output`` with every line that repeats a line of the tests folder's files replaced."""
    if not secret:
        return output, 0
    lines, n = [], 0
    parts = output.split("\n")
    for i, line in enumerate(parts):
        stripped = line.strip()
        cut = i == len(parts) - 1 and len(stripped) >= 8  # the capture may end mid-line
        if (stripped in secret or any(len(s) >= 20 and s in line for s in secret if len(s) <= len(line))
                or (cut and any(s.startswith(stripped) for s in secret))):
            lines.append("[not shown: a line of the grader's tests]")
            n += 1
        else:
            lines.append(line)
    return "\n".join(lines), n


def _failed(test: dict, message: str) -> TestResult:
    return TestResult(test["name"], test["doc"], test["points"], test["visibility"], False, message)


# --- reports ---------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return f"{x:g}"


def table(subs: list[Submission]) -> str:
    """A plain-text table: one row per submission, one column per question."""
    qids = _question_columns(subs)
    names = [s.name for s in subs]
    if len(set(names)) < len(names):  # same file name in several folders: show the paths
        names = [s.path for s in subs]
    width = max([len("submission")] + [len(n) for n in names])
    head = f"{'submission':<{width}}  " + "  ".join(f"{q:>7}" for q in qids) + f"  {'total':>9}  notes"
    lines = [head, "-" * len(head)]
    for s, name in zip(subs, names):
        cells = []
        byq = {q.id: q for q in s.questions}
        for qid in qids:
            q = byq.get(qid)
            cells.append(f"{_fmt(q.score) + '/' + _fmt(q.max_score) if q else '-':>7}")
        notes = s.error or ""
        if s.review:
            notes = (notes + "; " if notes else "") + "REVIEW: " + s.review[0] + (
                f" (+{len(s.review) - 1} more)" if len(s.review) > 1 else "")
        total = f"{_fmt(s.score)}/{_fmt(s.max_score)}"
        lines.append(f"{name:<{width}}  " + "  ".join(cells) + f"  {total:>9}  {notes}".rstrip())
    return "\n".join(lines)


def details(sub: Submission) -> str:
    """Per-test feedback for one submission (failures only, plus a line per full question)."""
    out = [f"{sub.path}: {_fmt(sub.score)}/{_fmt(sub.max_score)}"]
    if sub.error:
        out.append(f"  {sub.error}")
    for q in sub.questions:
        mark = "✅" if q.score == q.max_score else "❌"
        out.append(f"  {mark} {q.id} ({q.title}): {_fmt(q.score)}/{_fmt(q.max_score)}")
        if sub.error:
            continue
        failed = [t for t in q.tests if not t.passed]
        if failed and len(failed) == len(q.tests) and len({t.message for t in failed}) == 1:
            out.append(f"      - every check: {failed[0].message}")  # one cause, said once
            continue
        for t in failed:
            out.append(f"      - {t.doc}: {t.message}")
    for r in sub.review:
        out.append(f"  REVIEW: {r}")
    return "\n".join(out)


def _question_columns(subs):
    seen = []
    for s in subs:
        for q in s.questions:
            if q.id not in seen:
                seen.append(q.id)
    return seen


def gradescope(sub: Submission) -> dict:
    """One submission in Gradescope's ``results.json`` schema."""
    tests = []
    for q in sub.questions:
        # Printed output goes with one test: the learner's own prints with the first failed
        # visible test (else the first visible one); what was printed during hidden tests
        # with the first hidden test, which the learner does not see.
        visible = [t for t in q.tests if t.visibility == "visible"]
        hidden = [t for t in q.tests if t.visibility != "visible"]
        show_at = next((t for t in visible if not t.passed), (visible or q.tests or [None])[0])
        for t in q.tests:
            output = "passed" if t.passed else t.message
            if q.output and t is show_at:
                output += f"\n\nYour code printed:\n{q.output}"
            if q.hidden_output and hidden and t is hidden[0]:
                output += f"\n\nYour code printed during the hidden checks:\n{q.hidden_output}"
            tests.append({"name": f"{q.id} ({q.title}): {t.doc}", "score": t.score,
                          "max_score": t.points, "status": "passed" if t.passed else "failed",
                          "visibility": t.visibility, "output": output})
    if sub.review:
        # Instructors see hidden tests on Gradescope; students do not.
        tests.append({"name": "for the instructor: review", "score": 0.0, "max_score": 0.0,
                      "visibility": "hidden", "output": "\n".join(sub.review)})
    summary = sub.error or f"{_fmt(sub.score)} of {_fmt(sub.max_score)} points."
    return {"score": sub.score, "execution_time": round(sub.seconds, 3), "output": summary,
            "visibility": "visible", "stdout_visibility": "hidden", "tests": tests,
            "extra_data": {"isolation": sub.isolation}}


def _labels(paths: list[str]) -> list[str]:
    """How each notebook is named in a report: its file name, or, when two notebooks share
    a file name (``a/01.ipynb``, ``b/01.ipynb``), its path below their common folder."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    try:
        common = os.path.commonpath([str(Path(p).parent) for p in paths])
    except ValueError:  # relative and absolute paths mixed
        return [str(p) for p in paths]
    return [os.path.relpath(p, common or ".") for p in paths]


def gradescope_all(subs: list[Submission], pending=()) -> dict:
    """Several notebooks of ONE Gradescope submission as one ``results.json`` object.

    The score and execution time are the sums over the notebooks; each test is named
    ``"<notebook> · <question>: <expectation>"``; the overall ``output`` says each notebook's
    score or error; each notebook's instructor-only review entry stays hidden. ``pending``
    (paths not graded yet) makes a partial file, written while grading, say what is missing.
    ``extra_data.notebooks`` keeps one record per file for the teacher.
    """
    pending = [str(p) for p in pending]
    labels = _labels([s.path for s in subs] + pending)
    tests, lines, records = [], [], []
    for sub, label in zip(subs, labels):
        one = gradescope(sub)
        tests.extend(dict(t, name=f"{label} · {t['name']}") for t in one["tests"])
        lines.append(f"{label}: {one['output']}")
        records.append({"file": sub.path, "chapter": sub.chapter, "score": sub.score,
                        "max_score": sub.max_score, "error": sub.error, "isolation": sub.isolation})
    for label in labels[len(subs):]:
        lines.append(f"{label}: not graded yet (grading was still running when this was written)")
    score = sum(s.score for s in subs)
    n = len(subs) + len(pending)
    head = (f"{n} notebook{'s' if n != 1 else ''}: {_fmt(score)} of "
            f"{_fmt(sum(s.max_score for s in subs))} points" + (
                f" so far ({len(pending)} not graded yet)." if pending else "."))
    return {"score": score, "execution_time": round(sum(s.seconds for s in subs), 3),
            "output": "\n".join([head, *lines]), "visibility": "visible", "stdout_visibility": "hidden",
            "tests": tests, "extra_data": {"notebooks": records,
                                           "isolation": sorted({s.isolation for s in subs if s.isolation})}}


def write_json(subs: list[Submission], path: str | Path, pending=()) -> None:
    """Write Gradescope's ``results.json``, atomically: one notebook (and none pending) gives
    :func:`gradescope`'s object, several give :func:`gradescope_all`'s single object."""
    if len(subs) == 1 and not pending:
        data = gradescope(subs[0])
    else:
        data = gradescope_all(subs, pending)
    _atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_csv(subs: list[Submission], path: str | Path) -> None:
    """One row per submission (score, max, one column per question, error, review), atomically."""
    qids = _question_columns(subs)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["file", "chapter", "score", "max_score", *qids, "error", "review", "isolation"])
    for s in subs:
        byq = {q.id: q for q in s.questions}
        w.writerow([s.path, s.chapter or "", _fmt(s.score), _fmt(s.max_score),
                    *[_fmt(byq[q].score) if q in byq else "" for q in qids],
                    s.error or "", " | ".join(s.review), s.isolation])
    _atomic_write(path, buf.getvalue())


def _atomic_write(path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader (or a grader killed midway) sees
    the old file or the new one, never half of one. The temporary file is unique (several
    threads or graders may write at once) and in the same folder (``os.replace`` cannot
    cross file systems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777   # keep the mode of the file it replaces
    except OSError:
        mode = 0o644                         # mkstemp's 0600 would hide grades from the teacher's group
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


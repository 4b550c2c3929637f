"""``check()`` in the notebook and ``tlcourse grade`` agree, test by test.

For every chapter, on the solution, the exercise, every crafted wrong (and right) answer that
the grading tests already build, and the cases of issue 15 (an alias of the answer in a later
cell, a helper ``lambda`` in another cell, a count returned as a NumPy integer or ``67.0``):

- *the kernel's view*: the notebook's code cells run in order in one fresh namespace, as
  "Run all" does (cells that call ``check()`` skipped, ``check``/``checker`` no-ops while
  the cells run, a cell that runs too long interrupted as a learner would), and then each
  visible test of the chapter runs there with :func:`tlcourse.grading.runtime.run_test`,
  which is what ``check("qN")`` runs. Crafted answers loop, exit and crash, so this happens
  in a subprocess (one per chapter), which forks a child per notebook and a grandchild per
  question, each under a timeout;
- *the grader's view*: the per-test ``passed`` of :func:`tlcourse.grading.grader.grade` on
  the same files, with each chapter's grading-test timeout (one call per chapter, two jobs; pytest
  runs this module after the chapters' grading tests, whose grades of these files it reuses).

The two must agree on every visible test; when they do not, the table of disagreements is
printed. Left out on purpose (``HOSTILE``): the crafted submissions that tamper with the
process they run in (patching torch, builtins or the checks; forging results through frames;
writing on every file descriptor). A kernel running those is itself fooled or broken, which
is why the grader runs the tests elsewhere: there the two views are meant to differ.

Run as a script (``python tests/test_check_agreement.py``) this file is the kernel side.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CHAPTERS = ["00", "01", "02", "03", "04", "05", "06", "07"]
QUESTION_SECONDS = 6.0    # kernel: seconds for the visible tests of one question
CELL_SECONDS = 4.0        # kernel: a cell running longer is interrupted (a learner would press stop)
HOSTILE = {"writes_result_channel", "patches_torch", "patches_builtins", "patches_checks_module",
           "patches_in_function", "forges_via_frames", "forges_in_helper_cell"}


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _cell(source: str) -> dict:
    return {"cell_type": "code", "metadata": {}, "source": source, "outputs": [], "execution_count": None}


def _source(nb: dict, qid: str) -> str:
    from tlcourse.grading import extract

    return extract.cell_source(next(c for c in nb["cells"] if extract.question_of(c) == qid))


def _set_answer(nb: dict, qid: str, source: str) -> dict:
    from tlcourse.grading import extract

    nb = copy.deepcopy(nb)
    next(c for c in nb["cells"] if extract.question_of(c) == qid)["source"] = source
    return nb


def _insert_after(nb: dict, qid: str | None, source: str, offset: int = 1) -> dict:
    """``nb`` with a new untagged code cell ``offset`` cells below question ``qid``'s cell
    (``None``: below the setup cell)."""
    from tlcourse.grading import extract

    nb = copy.deepcopy(nb)
    if qid is None:
        at = next(i for i, c in enumerate(nb["cells"]) if "checker(" in extract.cell_source(c)) + 1
    else:
        at = next(i for i, c in enumerate(nb["cells"]) if extract.question_of(c) == qid) + offset
    nb["cells"].insert(at, _cell(source))
    return nb


def issue_cases(solution: dict) -> dict:
    """Chapter 00 notebooks for issue 15's cases: each a correct answer, written as a learner may."""
    topk, count, freeze = _source(solution, "q1"), _source(solution, "q2"), _source(solution, "q4")
    my_topk = topk.replace("def topk_predictions", "def my_topk")
    my_count = count.replace("def count_parameters", "def my_count")
    stub = 'def topk_predictions(logits, k=5):\n    raise NotImplementedError("q1: replace this line with your code")\n'
    cases = {}
    # An alias in a later cell: the answer cell defines my_topk.
    cases["alias_in_later_cell"] = _insert_after(_set_answer(solution, "q1", my_topk), "q1",
                                                 "topk_predictions = my_topk  # the name the checks ask for", 3)
    # The stub left untouched; the function and its alias in a new cell below it.
    cases["alias_below_the_stub"] = _insert_after(_set_answer(solution, "q1", stub), "q1",
                                                  my_topk + "\ntopk_predictions = my_topk\n")
    # A helper lambda in another cell, used by the answer.
    nb = _insert_after(solution, None, "softmax_rows = lambda logits: logits.softmax(dim=1)")
    cases["helper_lambda_in_other_cell"] = _set_answer(nb, "q1", (
        "def topk_predictions(logits, k=5):\n    values, indices = softmax_rows(logits).topk(k, dim=1)\n"
        "    return values, indices\n"))
    # An attribute of a helper class as the answer, and answers aliased through tuples.
    as_method = "class Answers:\n    @staticmethod\n" + "".join(f"    {line}\n" for line in my_topk.splitlines())
    nb = _set_answer(_set_answer(solution, "q1", as_method), "q2", my_count)
    nb = _insert_after(nb, "q2", "topk_predictions = Answers.my_topk\ncount, counter = my_count, my_count\n")
    cases["attribute_and_tuple_aliases"] = _insert_after(nb, "q4", "count_parameters, _unused = counter, None\n")
    # Metadata stripped (an old Jupyter, a copy-paste into a new notebook): the answer is an assignment.
    nb = _insert_after(_set_answer(solution, "q2", my_count), "q3", "count_parameters = my_count\n")
    cases["alias_without_metadata"] = {**nb, "cells": [{**c, "metadata": {}} for c in nb["cells"]]}
    # Numbers of the right kind: a NumPy integer, a whole float, a 0-d tensor.
    total = "sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)"
    assert total in count
    cases["count_as_numpy_int"] = _set_answer(solution, "q2", "import numpy as np\n" + count.replace(
        total, f"np.int64({total})"))
    cases["count_as_whole_float"] = _set_answer(solution, "q2", count.replace(total, f"float({total})"))
    cases["freeze_count_as_0d_tensor"] = _set_answer(solution, "q4", freeze.replace(
        "    return frozen", "    return torch.tensor(frozen)"))
    return cases


def grade_timeout(chapter: str) -> float:
    """The grader's seconds per question for ``chapter``: those of the chapter's grading tests,
    whose grades of the same notebooks :func:`grading_support.grade_once` then reuses."""
    import test_grading
    import test_grading_ch01_02

    if chapter == "00":
        return test_grading.TIMEOUT
    if chapter in ("01", "02"):
        return test_grading_ch01_02.TIMEOUT
    return __import__(f"test_grading_ch{chapter}").TIMEOUT


def chapter_notebooks(chapter: str, folder: Path) -> dict[str, Path]:
    """``name -> path`` of the notebooks compared for ``chapter``: its solution, its exercise and
    the crafted notebooks of the grading tests (their variant lists imported, not copied)."""
    from grading_support import crafted, write_crafted

    solution = next((ROOT / "solutions").glob(f"{chapter}_*.ipynb"))
    paths = {"solution": solution, "exercise": ROOT / "exercises" / solution.name}

    def write(name: str, nb: dict) -> None:
        paths[name] = folder / f"{chapter}_{name}.ipynb"
        paths[name].write_text(json.dumps(nb), encoding="utf-8")

    if chapter == "00":
        import test_grading

        for name, (make, _, _) in test_grading.CASES.items():
            content = make() if callable(make) else make
            if isinstance(content, dict) and name not in HOSTILE:
                write(name, content)
        for name, nb in issue_cases(_load(solution)).items():
            write(name, nb)
    elif chapter in ("01", "02"):
        import test_grading_ch01_02 as mod

        variants = {qid: v for (ch, qid), v in mod.WRONG.items() if ch == chapter}
        for i in range(max(len(v) for v in variants.values())):
            write(f"wrong{i}", crafted(_load(solution), variants, i))
    else:
        mod = __import__(f"test_grading_ch{chapter}")
        for kind in ("WRONG", "RIGHT"):
            if getattr(mod, kind, None):
                made = write_crafted(folder, solution, getattr(mod, kind), f"{chapter}_{kind.lower()}")
                paths.update({f"{kind.lower()}{i}": p for i, p in made.items()})
    return paths


# --- the kernel's view (this file run as a script, in a subprocess) ----------------------

class _Interrupted(BaseException):
    """SIGALRM in a cell or a test: what a learner pressing stop raises (KeyboardInterrupt-like)."""


def _on_alarm(signum, frame):
    raise _Interrupted()


def _noop(*args, **kwargs):
    return None


def _calls_check(cell: dict, source: str) -> bool:
    meta = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
    return "check" in (meta.get("tlcourse") or {}) or re.search(r"^\s*check\s*\(", source, re.M) is not None


def _kernel_cells(nb: dict) -> list[tuple[int, str]]:
    """``(number, source)`` of the code cells "Run all" runs; line magics and shell escapes (only
    the Colab install, inside an ``if``, in these notebooks) become ``pass``, as they do nothing here."""
    out = []
    for number, cell in enumerate(nb["cells"], start=1):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if _calls_check(cell, src):
            continue
        out.append((number, re.sub(r"^([ \t]*)[%!].*$", r"\1pass", src, flags=re.M)))
    return out


def _read_all(fd: int, deadline: float) -> bytes:
    import selectors

    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                return data
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return data
            data += chunk


def _fork(child, deadline: float, group: bool = False) -> bytes:
    """Run ``child(write_fd)`` in a forked process; what it wrote, once it exits or ``deadline``
    passes (then it is killed; with ``group``, it leads a process group, killed whole)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            if group:
                os.setpgid(0, 0)
            child(write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        data = _read_all(read_fd, deadline)
    finally:
        os.close(read_fd)
        try:
            os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(pid, 0)
    return data


def _write(fd: int, msg) -> None:
    data = (json.dumps(msg) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _run_guarded(fn, seconds: float):
    """``fn()`` interrupted after ``seconds`` (SIGALRM: what the stop button does); an exception
    of any kind ends it, as in a kernel."""
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        return fn()
    except BaseException:  # noqa: BLE001 - the exception stops this cell (or test) only
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _namespace() -> dict:
    return {"__name__": "__main__", "check": _noop, "checker": lambda *a, **k: _noop}


def _exec_cell(number: int, source: str, ns: dict) -> None:
    _run_guarded(lambda: exec(compile(source, f"<cell {number}>", "exec", dont_inherit=True), ns), CELL_SECONDS)
    ns["check"], ns["checker"] = _noop, (lambda *a, **k: _noop)  # the setup cell made real ones


def _run_question(tests: list, ns: dict, test_file: str, fd: int) -> None:
    """The visible tests of one question, as ``check("qN")`` runs them, one result line each."""
    from tlcourse.grading import runtime

    end = time.monotonic() + QUESTION_SECONDS
    for test in tests:
        got = _run_guarded(lambda: runtime.run_test(test, ns, test_file), end - time.monotonic())
        passed, message = got if got else (False, "interrupted: too long")
        _write(fd, {"test": [test.name, bool(passed), message]})


def _fast_view(nb: dict, questions: dict, tests: list, test_file: str, fd: int) -> None:
    """"Run all", then ``check()`` of every question, in this one process (forked by the runner),
    a line after each cell and each test: the runner falls back to :func:`_careful_view` when a
    line is late or the process dies (a cell that ignores the interrupt, ``os._exit``)."""
    ns = _namespace()
    for number, source in _kernel_cells(nb):
        _exec_cell(number, source, ns)
        _write(fd, {"cell": number})
    for qid in questions:
        _run_question([t for t in tests if t.question == qid], ns, test_file, fd)
    _write(fd, {"end": True})


def _careful_view(nb: dict, questions: dict, tests: list, test_file: str, fd: int) -> None:
    """The same, each cell in a new process that carries the notebook on (a cell that ends its
    process or ignores the interrupt is dropped, as after a restart and re-running the cells
    above it), and each question in a process of its own."""
    ns = _namespace()
    for number, source in _kernel_cells(nb):
        _run_cell_in_new_process(number, source, ns)
        _write(fd, {"cell": number})
    for qid in questions:
        mine = [t for t in tests if t.question == qid]
        lines = _fork(lambda w, mine=mine: _run_question(mine, ns, test_file, w),
                      time.monotonic() + QUESTION_SECONDS + 3)
        for line in lines.decode("utf-8", "replace").splitlines():
            try:
                _write(fd, {"test": json.loads(line)["test"]})
            except (ValueError, KeyError, TypeError):
                continue
    _write(fd, {"end": True})


def _run_cell_in_new_process(number: int, source: str, ns: dict) -> None:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the notebook goes on in this process
        os.close(read_fd)
        _exec_cell(number, source, ns)
        os.write(write_fd, b"done")
        os.close(write_fd)
        return
    os.close(write_fd)
    done = _read_all(read_fd, time.monotonic() + CELL_SECONDS + 3) == b"done"
    os.close(read_fd)
    if done:  # the child carries the notebook on; this process waits for it, then leaves
        os.waitpid(pid, 0)
        os._exit(0)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os.waitpid(pid, 0)


class _Watched:
    """One view of one notebook, running in a forked process group; its result lines are read
    as they come (see :func:`kernel_main`)."""

    def __init__(self, name: str, view, careful: bool, allowance: float):
        self.name, self.careful, self.allowance = name, careful, allowance
        self.results, self.finished, self.buf = {}, False, b""
        self.started = self.last = time.monotonic()
        read_fd, write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_fd)
            try:
                os.setpgid(0, 0)
                view(write_fd)
            finally:
                os._exit(0)
        os.close(write_fd)
        self.fd = read_fd

    def feed(self) -> bool:
        """Read what is there; False once the process is done (its pipe closed)."""
        chunk = os.read(self.fd, 1 << 16)
        self.last = time.monotonic()
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
                if "test" in msg:
                    name, passed, message = msg["test"]
                    self.results[name] = [passed, message]
                self.finished = self.finished or bool(msg.get("end"))
            except (ValueError, TypeError, AttributeError):
                continue  # not a line of ours
        return bool(chunk) and not self.finished

    def late(self) -> bool:
        return time.monotonic() - self.last > self.allowance

    def stop(self) -> None:
        """Kill it with everything it started."""
        os.close(self.fd)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(self.pid, 0)


def kernel_main(parallel: int = 2) -> None:
    """``python tests/test_check_agreement.py CHAPTER JOB.json OUT.json``: the kernel's view of
    every notebook in JOB (``{name: path}``), written to OUT. ``parallel`` notebooks at a time
    (a looping or sleeping one then costs little); a notebook whose fast view does not finish
    (a line late, its process dead) is run again with the careful view."""
    import importlib
    import selectors
    import tempfile

    import torch

    from tlcourse.grading import runtime

    torch.set_num_threads(1)  # forked children share the cores with the grader
    # Imported once here, as a kernel imports them once (and as the grader's worker does): an
    # import in a forked child costs seconds each time, and one cut by a timeout leaves a
    # half-initialised module behind ("partially initialized module ...").
    import torch._dynamo  # noqa: F401 - the first optimiser step imports it
    try:
        import timm  # noqa: F401 - chapters 01-02 build EfficientNet-Lite0 in their tests
    except ImportError:
        timm = None
    chapter, job, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    module = importlib.import_module(f"tlcourse.grading.checks.ch{chapter}")
    questions, tests = runtime.collect(vars(module))
    tests = [t for t in tests if t.visibility == "visible"]
    signal.signal(signal.SIGALRM, _on_alarm)
    devnull = os.open(os.devnull, os.O_RDWR)
    allowance = max(CELL_SECONDS, QUESTION_SECONDS) + 3

    def view_of(name: str, careful: bool):
        nb, workdir = _load(job[name]), tempfile.mkdtemp(prefix="kernel-")
        view = _careful_view if careful else _fast_view

        def run(fd):
            for target in (0, 1, 2):  # what the notebook prints is not this process's report
                os.dup2(devnull, target)
            os.chdir(workdir)
            view(nb, questions, tests, module.__file__, fd)
        return run

    results: dict = {}
    todo = [(name, False) for name in job]
    running: dict[int, _Watched] = {}
    with selectors.DefaultSelector() as sel:
        while todo or running:
            while todo and len(running) < parallel:
                name, careful = todo.pop(0)
                w = _Watched(name, view_of(name, careful), careful, allowance + 3 * careful)
                running[w.fd] = w
                sel.register(w.fd, selectors.EVENT_READ)
            ready = {key.fd for key, _ in sel.select(timeout=0.5)}
            for fd, w in list(running.items()):
                if (fd in ready and w.feed()) or (fd not in ready and not w.late()):
                    continue
                sel.unregister(fd)
                del running[fd]
                w.stop()
                if not w.finished and not w.careful:
                    todo.insert(0, (w.name, True))
                    continue
                how = ("careful" if w.careful else "fast") + ("" if w.finished else ", unfinished")
                results[w.name] = {t.name: w.results.get(t.name, [False, "no result: the kernel died or hung"])
                                   for t in tests}
                print(f"{w.name}: {time.monotonic() - w.started:.1f} s ({how})", flush=True)
    out.write_text(json.dumps({name: results[name] for name in job}), encoding="utf-8")


# --- the comparison ----------------------------------------------------------------------

def _grader_view(subs: dict) -> dict:
    """``{name: {test name: [passed, message]}}`` of the visible tests, from the grader's results."""
    out = {}
    for name, sub in subs.items():
        out[name] = {t.name: [t.passed, t.message or sub.error or ""]
                     for q in sub.questions for t in q.tests if t.visibility == "visible"}
    return out


def _table(rows: list[tuple]) -> str:
    head = ("chapter", "notebook", "test", "check()", "grade", "check() says", "grade says")
    rows = [head] + [tuple(str(x) for x in r) for r in rows]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(head))]
    return "\n".join("  ".join(c[:60].ljust(w) for c, w in zip(r, widths)) for r in rows)


def compare(chapter: str, kernel: dict, graded: dict) -> list[tuple]:
    rows = []
    for name in sorted(set(kernel) | set(graded)):
        k, g = kernel.get(name, {}), graded.get(name, {})
        for test in sorted(set(k) | set(g)):
            kp, km = k.get(test, [None, "(no result)"])
            gp, gm = g.get(test, [None, "(no result)"])
            if kp != gp:
                rows.append((chapter, name, test, _mark(kp), _mark(gp), km, gm))
    return rows


def _mark(passed) -> str:
    return {True: "pass", False: "fail"}.get(passed, "-")


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    """Both views of every chapter's notebooks: the kernel's in one subprocess per chapter, two at a
    time, by a thread, while this process grades the chapters one after the other (or
    takes the grades the chapters' grading tests made of the same files: see ``grade_once``)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from grading_support import grade_once

    started = time.monotonic()
    jobs = {}
    for chapter in CHAPTERS:
        folder = tmp_path_factory.mktemp(f"ch{chapter}")
        paths = chapter_notebooks(chapter, folder)
        (folder / "job.json").write_text(json.dumps({name: str(p) for name, p in paths.items()}), encoding="utf-8")
        jobs[chapter] = (folder, paths)
    kernel, logs = {}, {}

    def kernel_view(chapter):
        folder = jobs[chapter][0]
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), chapter, str(folder / "job.json"),
                              str(folder / "kernel.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
        logs[chapter] = f"exit {run.returncode} after {time.monotonic() - t0:.1f} s\n{run.stdout}{run.stderr}"
        if run.returncode == 0:
            kernel[chapter] = json.loads((folder / "kernel.json").read_text(encoding="utf-8"))

    def kernel_side():
        # Two chapters at a time: most of a chapter's time is its crafted hangs waiting out their
        # timeouts, which overlap for free.
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(kernel_view, jobs))

    thread = threading.Thread(target=kernel_side, daemon=True)
    thread.start()
    graded = {}
    for chapter, (_, paths) in jobs.items():
        t0 = time.monotonic()
        subs = dict(zip(paths, grade_once(list(paths.values()), grade_timeout(chapter))))
        for name, sub in subs.items():
            assert not sub.error, f"{name}: {sub.error}"
        graded[chapter] = _grader_view(subs)
        print(f"chapter {chapter}: {len(paths)} notebooks, {sum(len(v) for v in graded[chapter].values())} "
              f"visible test results, graded in {time.monotonic() - t0:.1f} s")
    thread.join(timeout=900)
    rows, counts = [], {}
    for chapter in CHAPTERS:
        assert chapter in kernel, f"the kernel side of chapter {chapter} failed:\n{logs.get(chapter)}"
        print(f"chapter {chapter}, kernel side: {logs[chapter].splitlines()[0]}")
        rows += compare(chapter, kernel[chapter], graded[chapter])
        counts[chapter] = (len(jobs[chapter][1]), sum(len(v) for v in graded[chapter].values()))
    print(f"all chapters, both views, in {time.monotonic() - started:.1f} s")
    return rows, counts


def test_check_and_grade_agree_on_every_visible_test(agreement):
    rows, counts = agreement
    assert sum(n for n, _ in counts.values()) >= 60 and all(t > 0 for _, t in counts.values()), counts
    if rows:
        print("\ncheck() and tlcourse grade disagree:\n" + _table(rows))
    assert not rows, f"{len(rows)} disagreement(s):\n{_table(rows)}"


def test_issue_cases_get_full_marks(tmp_path):
    """The issue's unfair zeros are gone: each is graded full (and, by the agreement above,
    passes check() too)."""
    from grading_support import grade_once
    from tlcourse.grading import grader

    paths = []
    for name, nb in issue_cases(_load(ROOT / "solutions" / "00_setup_and_first_look.ipynb")).items():
        paths.append(tmp_path / f"00_{name}.ipynb")
        paths[-1].write_text(json.dumps(nb), encoding="utf-8")
    subs = grade_once(paths, grade_timeout("00"))
    print(grader.table(subs))
    for sub in subs:
        assert sub.score == sub.max_score == 13, grader.details(sub)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    kernel_main()

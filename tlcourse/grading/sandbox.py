"""The sandbox: a trusted "zygote" process that forks one child per (notebook, question).

Why this shape:

- **Separate processes.** The grader never runs learner code itself. A zygote imports
  torch once (2 s) and forks a child per question (milliseconds), so a class grades in
  seconds and one question's crash, hang or ``os._exit`` cannot touch another.
- **Trusted authority on tests and points.** The zygote loads the tests (from source text
  the grader read at start-up) and decides which tests exist and what they are worth; a
  child only reports pass/fail per test name, on a private pipe, tagged with a per-job
  random token. Fake results printed to stdout land in the capped output capture, never
  in the results; unknown or repeated test names, a missing end marker or a dead child
  count as failures.
- **Tests load after the learner's code**, fresh from source, into a module object the
  learner's code never saw, with every reference the child needs captured beforehand.
  The public checks modules (``tlcourse.grading.checks.*``, which hidden tests reuse with
  ``from tlcourse.grading.checks.ch00 import *``) are dropped from ``sys.modules`` and
  re-created from the source text the grader read at start, so a patch the learner's code
  made to them (or to the files on disk) reaches no test.
- **Integrity checks.** Before learner code runs, the zygote snapshots ``builtins``,
  torch, ``torch.Tensor``, ``nn.Module`` and the grading modules; after the answer cell and
  after every test the child compares. Any monkeypatch scores the question 0 and says so.
- **Limits.** Per-test soft timeout (``SIGALRM``), per-question hard kill of the child's
  process group, capped output capture, file-size and core-dump limits, a fresh temporary
  working directory.
- **Output.** What the learner's code prints is captured (and flushed before the child
  exits); what it prints while a test that is not ``visible`` runs goes to a separate
  capture, so hidden tests' inputs do not show up in learner-visible feedback.

What it cannot promise: learner code runs in the same process as its tests, so a
determined attacker who walks interpreter frames could in principle forge a result. The
grader therefore does not run a question whose code uses the tools such an attack needs
(:func:`tlcourse.grading.extract.escape_hatches`): it scores 0 and is held for review.
POSIX only (``fork``); run ``python -m tlcourse.grading.sandbox`` is what the grader does.
"""

from __future__ import annotations

import hashlib
import json
import linecache
import os
import secrets
import selectors
import shutil
import signal
import sys
import tempfile
import time

from tlcourse.grading import runtime

GRACE = 2.0  # seconds between the soft timeout inside the child and the hard kill
CHECKS = "tlcourse.grading.checks"
MAX_RESULT_BYTES = 1 << 20


def _watched():
    import builtins

    import torch

    from tlcourse.grading import spec

    mods = {"builtins": builtins, "torch": torch, "torch.nn": torch.nn,
            "torch.nn.functional": torch.nn.functional, "torch.nn.init": torch.nn.init,
            "tlcourse.grading.spec": spec, "tlcourse.grading.runtime": runtime,
            "json": json, "os": os, "signal": signal, "linecache": linecache}
    try:
        import math

        import numpy

        mods.update({"numpy": numpy, "math": math})
    except ImportError:
        pass
    classes = {"torch.Tensor": torch.Tensor, "torch._C.TensorBase": torch._C.TensorBase,
               "nn.Module": torch.nn.Module, "nn.Parameter": torch.nn.Parameter,
               "nn.Linear": torch.nn.Linear, "nn.Sequential": torch.nn.Sequential}
    return mods, classes


def take_snapshot():
    mods, classes = _watched()
    snap = {name: (vars(m), dict(vars(m)), name == "builtins") for name, m in mods.items()}
    # Classes: an *added* attribute counts too, since it can shadow an inherited one
    # (``nn.Parameter.requires_grad = False``). Modules may legitimately grow (lazy imports).
    snap.update({name: (vars(c), dict(vars(c)), True) for name, c in classes.items()})
    return snap, {name: m for name, m in mods.items()}


def compare_snapshot(snapshot) -> list[str]:
    """What learner code changed in the watched modules/classes (empty: nothing)."""
    snap, mods = snapshot
    changed = []
    for name, (live, saved, strict) in snap.items():
        for key, value in saved.items():
            if key not in live or live[key] is not value:
                changed.append(f"{name}.{key}")
        if strict and len(live) != len(saved):
            changed += [f"{name}.{k} (added)" for k in live if k not in saved]
    for name, module in mods.items():
        if name != "builtins" and sys.modules.get(name) is not module:
            changed.append(f"sys.modules[{name!r}]")
    return changed


# --- the child: runs learner code, then the tests -------------------------------------

class _Sources:
    """Meta-path finder and loader: ``tlcourse.grading.checks`` and its modules, fresh from
    source text read at start (never the live modules the learner's code could patch,
    never the files on disk the learner's code could rewrite)."""

    def __init__(self, modules: dict, spec_from_loader):
        self.modules = {name: (str(f), str(src)) for name, (f, src) in modules.items()}
        self.spec_from_loader = spec_from_loader

    def find_spec(self, name, path=None, target=None):
        if name == CHECKS or name in self.modules:
            origin = self.modules.get(name, ("<checks>", ""))[0]
            return self.spec_from_loader(name, self, origin=origin, is_package=name == CHECKS)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename, source = self.modules.get(module.__name__, ("<checks>", ""))
        module.__file__ = filename
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)


def _child(job, nonce, res_fd, out_fd, hid_fd, snapshot, workdir):
    # Capture everything the child needs *before* learner code can patch anything.
    import importlib.util

    write, dumps, monotonic, dup2 = os.write, json.dumps, time.monotonic, os.dup2
    setitimer, ITIMER_REAL = signal.setitimer, signal.ITIMER_REAL
    run_test, collect, compare = runtime.run_test, runtime.collect, compare_snapshot
    threading_count = _thread_count
    modules, meta_path = sys.modules, sys.meta_path
    fresh_checks = _Sources(job.get("modules") or {}, importlib.util.spec_from_loader)
    streams = (sys.stdout, sys.stderr)

    def flush():
        for stream in streams:
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed or broken stream: nothing to save
                pass

    def report(**msg):
        msg["nonce"] = nonce
        data = (dumps(msg) + "\n").encode()
        while data:
            data = data[write(res_fd, data):]

    os.setpgid(0, 0)
    _limits(job)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    for fd in _open_fds():
        if fd > 2 and fd not in (res_fd, out_fd, hid_fd):
            try:
                os.close(fd)
            except OSError:
                pass
    os.chdir(workdir)

    def on_alarm(signum, frame):
        raise runtime.TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    deadline = monotonic() + job["timeout"]
    noop = lambda *a, **k: None  # noqa: E731 - check() cells do nothing in the grader
    ns = {"__name__": "__main__", "check": noop, "checker": lambda *a, **k: noop}

    for snip in job["snippets"]:
        filename, source = snip["filename"], snip["source"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            code = compile(source, filename, "exec", dont_inherit=True)
            setitimer(ITIMER_REAL, max(0.05, deadline - monotonic()))
            try:
                exec(code, ns)
            finally:
                setitimer(ITIMER_REAL, 0)
        except SyntaxError as exc:
            if snip["essential"]:
                text = (exc.text or "").strip()
                report(kind="error", message=f"syntax error in {filename}, line {exc.lineno}: "
                       f"{exc.msg}" + (f": `{text}`" if text else ""))
        except runtime.TestTimeout:
            if snip["essential"]:
                report(kind="error", message=f"running {filename} took too long (an endless loop at top level?)")
        except BaseException as exc:  # noqa: BLE001
            if snip["essential"]:
                report(kind="error", message=f"running {filename} raised {type(exc).__name__}: "
                       f"{str(exc)[:300]}")
    changed = compare(snapshot)
    if changed:
        report(kind="tamper", detail=", ".join(changed[:5]))
        return
    flush()
    # Public checks reused by hidden tests: fresh copies, not what the learner's code saw.
    for name in [n for n in list(modules) if n == CHECKS or n.startswith(CHECKS + ".")]:
        modules.pop(name, None)
    if fresh_checks not in meta_path:
        meta_path.insert(0, fresh_checks)
    tests_globals = {"__name__": "_tlcourse_tests_" + nonce[:12], "__file__": job["tests_file"]}
    try:
        exec(compile(job["tests_source"], job["tests_file"], "exec", dont_inherit=True), tests_globals)
        _, tests = collect(tests_globals)
    except BaseException as exc:  # noqa: BLE001
        report(kind="error", message=f"the tests could not be loaded: {type(exc).__name__}: {exc}")
        return
    for test in [t for t in tests if t.question == job["question"]]:
        left = deadline - monotonic()
        if left <= 0:
            report(kind="test", name=test.name, passed=False, message="not run: the time for this question ran out")
            continue
        hidden = test.visibility != "visible"
        if hidden:  # what the code prints during a hidden test goes to the hidden capture
            flush()
            dup2(hid_fd, 1)
            dup2(hid_fd, 2)
        setitimer(ITIMER_REAL, left)
        try:
            passed, message = run_test(test, ns, job["tests_file"])
        except BaseException:  # noqa: BLE001 - a KeyboardInterrupt raised by learner code
            passed, message = False, "your code raised KeyboardInterrupt"
        finally:
            setitimer(ITIMER_REAL, 0)
            if hidden:
                flush()
                dup2(out_fd, 1)
                dup2(out_fd, 2)
        changed = compare(snapshot)
        if changed:
            report(kind="tamper", detail=", ".join(changed[:5]))
            return
        if threading_count() > 1:
            report(kind="tamper", detail="started a background thread")
            return
        report(kind="test", name=test.name, passed=passed, message=message)
    report(kind="end")


def _thread_count() -> int:
    import threading

    return threading.active_count()


def _limits(job):
    try:
        import resource
    except ImportError:  # not POSIX
        return
    for what, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 64 << 20)):
        try:
            resource.setrlimit(what, (value, value))
        except (ValueError, OSError):
            pass
    memory = job.get("memory_mb")
    if memory:
        try:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limit = used + (memory << 20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (OSError, ValueError):
            pass


def _open_fds():
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


# --- the zygote: one job at a time, results on a private channel ----------------------

_tests_cache: dict[str, list] = {}


def _test_specs(source: str, filename: str):
    key = hashlib.sha256(source.encode()).hexdigest()
    if key not in _tests_cache:
        g = {"__name__": "_tlcourse_tests_" + key[:12], "__file__": filename}
        exec(compile(source, filename, "exec", dont_inherit=True), g)
        questions, tests = runtime.collect(g)
        _tests_cache[key] = [questions, tests]
    return _tests_cache[key]


def describe(job) -> dict:
    questions, tests = _test_specs(job["tests_source"], job["tests_file"])
    return {"questions": {q: {"title": str(v.get("title", "")), "functions": list(v.get("functions", []))}
                          for q, v in questions.items()},
            "tests": [{"name": t.name, "question": t.question, "points": t.points,
                       "visibility": t.visibility, "doc": t.doc} for t in tests]}


def run_job(job, snapshot) -> dict:
    started = time.monotonic()
    _, tests = _test_specs(job["tests_source"], job["tests_file"])
    mine = [t for t in tests if t.question == job["question"]]
    nonce = secrets.token_hex(16)
    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    hid_r, hid_w = os.pipe()
    workdir = tempfile.mkdtemp(prefix="tlcourse-grade-")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child never returns into the zygote's loop
        try:
            os.close(res_r)
            os.close(out_r)
            os.close(hid_r)
            _child(job, nonce, res_w, out_w, hid_w, snapshot, workdir)
        finally:
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                try:  # short prints sit in the buffer: os._exit would drop them
                    stream.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(0)
    os.close(res_w)
    os.close(out_w)
    os.close(hid_w)
    results, outputs, status, exit_code = _collect(pid, res_r, (out_r, hid_r), job, started)
    (output, output_bytes), (hidden_output, hidden_bytes) = outputs
    shutil.rmtree(workdir, ignore_errors=True)

    reported, errors, tamper, ended, forged = {}, [], None, False, False
    known = {t.name for t in mine}
    for line in results.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            forged = True
            continue
        if not isinstance(msg, dict) or msg.get("nonce") != nonce:
            forged = True
            continue
        kind = msg.get("kind")
        if kind == "test":
            name = msg.get("name")
            if name not in known or name in reported or ended:
                forged = True
            else:
                reported[name] = (msg.get("passed") is True, str(msg.get("message", ""))[:runtime.MAX_MESSAGE])
        elif kind == "error":
            errors.append(str(msg.get("message", ""))[:runtime.MAX_MESSAGE])
        elif kind == "tamper":
            tamper = str(msg.get("detail", ""))[:300]
        elif kind == "end":
            ended = True
    if forged:
        tamper = tamper or "wrote messages on the grader's result channel"
    out = []
    for t in mine:
        if tamper:
            passed, message = False, (f"not scored: the submission changed the grading environment "
                                      f"({tamper}); a person should review it")
        elif t.name in reported:
            passed, message = reported[t.name]
        elif status == "timeout":
            passed, message = False, (f"your code took too long: grading this question stopped after "
                                      f"{job['timeout']:g} s (an endless loop?)")
        else:
            passed, message = False, (f"the grading process ended during this check ({exit_code}); did the "
                                      "code call os._exit(), crash Python, or run out of memory?")
        if not passed and errors and not tamper:
            # The answer cell's own error (syntax, top-level loop, crash) often explains
            # the failure better than "not defined" or "time ran out".
            message = f"{message} [{errors[0]}]"
        out.append({"name": t.name, "passed": passed, "message": message})
    return {"tests": out, "errors": errors, "tamper": tamper, "status": status,
            "output": output, "output_bytes": output_bytes,
            "hidden_output": hidden_output, "hidden_output_bytes": hidden_bytes,
            "seconds": round(time.monotonic() - started, 3)}


def _collect(pid, res_r, out_fds, job, started):
    """Read the result channel and the output captures until the child is done; the
    results text, ``[(output, bytes printed)]`` per capture, status and exit code."""
    max_out = int(job.get("max_output", 4000))
    deadline = started + job["timeout"] + GRACE
    sel = selectors.DefaultSelector()
    for fd in (res_r, *out_fds):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    results = bytearray()
    outputs = {fd: [bytearray(), 0] for fd in out_fds}
    status, exit_code, exited_at = "ok", "exit code ?", None
    while sel.get_map():
        now = time.monotonic()
        if exited_at is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                exit_code = _describe_exit(code)
                exited_at = now
                _kill_group(pid)  # grandchildren holding our pipes open
        if now > deadline or (exited_at and now > exited_at + 1.0):
            if exited_at is None:
                status = "timeout"
            break
        for key, _ in sel.select(timeout=0.05):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
                continue
            if key.fd == res_r:
                if len(results) < MAX_RESULT_BYTES:
                    results += chunk
            else:
                captured = outputs[key.fd]
                captured[1] += len(chunk)
                if len(captured[0]) < max_out:
                    captured[0] += chunk[: max_out - len(captured[0])]
    if exited_at is None:
        _kill_group(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, code = os.waitpid(pid, 0)
        exit_code = _describe_exit(code)
    sel.close()
    for fd in (res_r, *out_fds):
        os.close(fd)
    return (results.decode("utf-8", "replace"),
            [(outputs[fd][0].decode("utf-8", "replace"), outputs[fd][1]) for fd in out_fds],
            status, exit_code)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(code) -> str:
    if os.WIFSIGNALED(code):
        return f"killed by signal {os.WTERMSIG(code)}"
    return f"exit code {os.WEXITSTATUS(code)}"


def main() -> None:
    # Our stdout is the grader's channel: keep a private copy of it and point fd 1 at
    # stderr, so nothing printed by an import can corrupt the channel.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch
    # The first optimizer built in a process imports torch._dynamo, which rebinds
    # torch.manual_seed; import it before the snapshot so building an optimizer in an
    # answer or a check is not mistaken for tampering.
    import torch._dynamo  # noqa: F401

    torch.set_num_threads(1)  # several sandboxes share the cores; children fork after this
    snapshot = take_snapshot()
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = {}
        try:
            job = json.loads(line)
            if job.get("kind") == "describe":
                reply = describe(job)
            else:
                reply = run_job(job, snapshot)
        except Exception as exc:  # noqa: BLE001 - the grader reports it; the zygote lives on
            reply = {"fatal": f"{type(exc).__name__}: {exc}"}
        reply["id"] = job.get("id")
        channel.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()

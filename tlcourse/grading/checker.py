"""The checker: the trusted process that runs the tests and never runs learner code.

One checker per grading thread. It loads the tests (public checks, or a hidden-tests folder
whose source only it ever holds), keeps the points, and is the only process that talks to the
grader. Learner code runs in a worker (:mod:`tlcourse.grading.worker`) that the checker
starts inside the sandbox of :mod:`tlcourse.grading.isolation`; a test calls a learner
function through a proxy (:mod:`tlcourse.grading.wire`), so the worker sees the arguments
a test passes and nothing else: not the test's code, not its expected values, not the
channel that carries results. A worker can return wrong values, raise, hang or die; each
costs that test (or the rest of that question) and nothing more.

Protocol with the grader (JSON lines on stdin/stdout, as before): ``{"kind": "describe",
"tests_source", "tests_file"}`` -> the questions and tests; ``{"kind": "run", "question",
"snippets", "tests_source", "tests_file", "timeout", "max_output", "memory_mb"}`` -> per-test
results, printed output (visible and hidden apart) and the worker's exit status.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import socket
import sys
import time
import types

from tlcourse.grading import isolation, runtime

PUBLIC_PREFIX = "tlcourse.grading.checks."
START_TIMEOUT = 180.0


class WorkerFailed(Exception):
    """The sandboxed worker could not be started or stopped answering its control socket."""


class Worker:
    """The sandboxed zygote and its control socket; restarted when it fails."""

    def __init__(self, level: str, wait: bool = True):
        self.level = level
        self.nproc = isolation.process_limit()
        self.proc = None
        self.start(wait)

    def start(self, wait: bool = True) -> None:
        self.close()
        self.ctl, theirs = socket.socketpair()
        try:
            self.proc, self.log = isolation.start_worker(self.level, theirs.fileno())
        finally:
            theirs.close()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        msg = self._recv(START_TIMEOUT)
        if not msg or msg.get("kind") != "ready":
            self.log.seek(0)
            tail = self.log.read()[-3000:].decode("utf-8", "replace")
            self.close()
            raise WorkerFailed(f"the sandbox ({self.level}) did not start:\n{tail}")

    def begin(self, job: dict) -> socket.socket:
        """Start one job; the socket to talk to its child."""
        mine, theirs = socket.socketpair()
        try:
            data = (json.dumps(dict(job, kind="job", nproc=self.nproc)) + "\n").encode()
            self.ctl.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))])
        except OSError as exc:
            mine.close()
            raise WorkerFailed(f"the sandbox stopped answering ({exc})") from None
        finally:
            theirs.close()
        msg = self._recv(30)
        if not msg or msg.get("kind") != "started":
            mine.close()
            raise WorkerFailed("the sandbox did not start the job")
        return mine

    def end(self, unread_from: int = 0) -> tuple[str, str]:
        """End the current job: the zygote kills what is left of it. Its exit status, and what
        it printed from byte ``unread_from`` of its output on."""
        try:
            self.ctl.sendall((json.dumps({"kind": "end", "unread_from": unread_from}) + "\n").encode())
            msg = self._recv(30)
        except OSError:
            msg = None
        if not msg or msg.get("kind") != "ended":
            self.start()
            return "the sandbox was restarted", ""
        out = msg.get("out")
        return str(msg.get("status", ""))[:100], out if isinstance(out, str) else ""

    def _recv(self, timeout: float):
        import select

        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.ctl], [], [], left)[0]:
                return None
            try:
                chunk = self.ctl.recv(1 << 16)
            except OSError:
                return None
            if not chunk or len(buf) > 1 << 18:
                return None
            buf += chunk
        try:
            return json.loads(buf)
        except ValueError:
            return None

    def close(self) -> None:
        if getattr(self, "ctl", None) is not None:
            self.ctl.close()
            self.ctl = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                self.proc.kill()
            self.proc.wait()
        self.proc = None


# --- tests -----------------------------------------------------------------------------------

_suites: dict[str, tuple[dict, list]] = {}


def load_tests(source: str, filename: str) -> tuple[dict, list]:
    """``(QUESTIONS, tests)`` of a checks module, from the source text the grader read.

    The package's public checks become the module ``tlcourse.grading.checks.chNN`` (so the
    classes they pass to learners, e.g. a backbone that counts its calls, can be rebuilt in
    the worker, which imports the same public file); a hidden-tests file becomes a private
    module, which never leaves this process.
    """
    key = hashlib.sha256((filename + "\0" + source).encode()).hexdigest()
    if key not in _suites:
        from tlcourse.grading.grader import PACKAGE_CHECKS

        path = os.path.realpath(filename)
        public = os.path.dirname(path) == os.path.realpath(PACKAGE_CHECKS)
        name = PUBLIC_PREFIX + os.path.basename(path)[:-3] if public else "_tlcourse_tests_" + key[:12]
        module = types.ModuleType(name)
        module.__file__ = filename
        if public:
            import tlcourse.grading.checks  # noqa: F401 - the parent package first

            sys.modules[name] = module
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)  # noqa: S102 - trusted tests
        _suites[key] = runtime.collect(vars(module))
    return _suites[key]


def describe(job: dict) -> dict:
    questions, tests = load_tests(job["tests_source"], job["tests_file"])
    return {"questions": {q: {"title": str(v.get("title", "")), "functions": list(v.get("functions", []))}
                          for q, v in questions.items()},
            "tests": [{"name": t.name, "question": t.question, "points": t.points,
                       "visibility": t.visibility, "doc": t.doc} for t in tests]}


def _vjp_back(session, msg, blobs):
    """The worker differentiates a tensor this process built (a loss with its graph): the
    vector-Jacobian product with respect to the leaves that were sent with it."""
    import torch

    from tlcourse.grading import wire

    wire.free_graphs(session, msg.get("free"))
    key = str(msg.get("tensor"))
    t, leaves = session.objects.get(key), session.graphs.get(key)
    if t is None or leaves is None:
        raise wire.WireError("a gradient for an unknown tensor")
    grad = wire.Decoder(session, blobs, import_classes=False)(msg.get("grad"))
    if type(grad) is not torch.Tensor or grad.shape != t.shape:
        raise wire.WireError("a gradient of the wrong shape")
    with torch.enable_grad():
        got = torch.autograd.grad(t, leaves, grad.to(t.dtype), retain_graph=True, allow_unused=True)
    enc = wire.Encoder(session)
    return {"grads": [None if g is None else enc(g) for g in got], "_blobs": enc.blobs}


HANDLERS = {"vjp_back": _vjp_back}


def run_job(job: dict, worker: Worker) -> dict:
    """Grade one question of one notebook: start its worker child, run the tests here."""
    from tlcourse.grading import wire

    started = time.monotonic()
    _, tests = load_tests(job["tests_source"], job["tests_file"])
    # Visible tests first: what the learner's code sees of a hidden test's inputs can then
    # reach only hidden feedback (as in check(), which runs the visible ones alone).
    mine = sorted((t for t in tests if t.question == job["question"]), key=lambda t: t.visibility != "visible")
    timeout = float(job["timeout"])
    deadline = started + timeout
    max_out = int(job.get("max_output", 4000))
    captured = {"visible": [[], 0], "hidden": [[], 0]}

    def keep(bucket: str, texts: list[str]) -> None:
        store = captured[bucket]
        for text in texts:
            store[1] += len(text.encode())
            have = sum(len(x) for x in store[0])
            if have < max_out:
                store[0].append(text[: max_out - have])

    names = sorted({p for t in mine for p in t.params})
    results, errors, status = {}, [], "ok"
    sock = worker.begin({"memory_mb": job.get("memory_mb"), "cpu_seconds": timeout + 2})
    session = wire.Session(sock, "c", HANDLERS, deadline=lambda: deadline)
    stop = None  # why the remaining tests cannot run
    bucket = "visible"  # where what the learner's code prints now belongs
    try:
        try:
            wire.send_frame(sock, {"kind": "program", "snippets": job["snippets"], "names": names}, [])
            ready, _ = wire.recv_frame(sock, deadline)
            session.take_output(ready)
            keep("visible", session.output)
            session.output.clear()
            errors = [str(e)[: runtime.MAX_MESSAGE] for e in ready.get("errors", [])][:5]
            defined = ready.get("names") if isinstance(ready.get("names"), dict) else {}
        except wire.Timeout:
            stop = (f"your code took too long: grading this question stopped after {timeout:g} s "
                    "(an endless loop at the top level of a cell?)")
            status = "timeout"
        except wire.WorkerGone as exc:
            stop = runtime.ended_message(runtime.ProcessEnded(str(exc)))
        if stop is None:
            ns = {name: wire.RemoteCallable(session, "name:" + name, name=name) for name in names
                  if name in defined}
        for test in mine:
            if stop is None and time.monotonic() >= deadline:
                stop = "not run: the time for this question ran out"
            if stop is not None:
                results[test.name] = (False, stop)
                continue
            bucket = "visible" if test.visibility == "visible" else "hidden"
            passed, message = runtime.run_test(test, ns, job["tests_file"])
            keep(bucket, session.output)
            session.output.clear()
            if not passed and message.startswith("your code took too long"):
                status = "timeout"
                message = (f"your code took too long: grading this question stopped after {timeout:g} s "
                           "(an endless loop?)")
                stop = "not run: the time for this question ran out"
            elif not passed and message.startswith("the process running your code ended"):
                stop = message
            results[test.name] = (passed, message)
    finally:
        try:
            if status != "timeout" and stop is None:
                wire.send_frame(sock, {"kind": "close"}, [])
        except BaseException:  # noqa: BLE001 - already gone
            pass
        sock.close()
        # What the code printed after its last reply: before an endless loop or a crash, the
        # most useful output of all.
        exit_status, unread = worker.end(session.output_read)
        keep(bucket, [unread])
    out = []
    for test in mine:
        passed, message = results.get(test.name, (False, "not run"))
        if not passed and errors:
            message = f"{message} [{errors[0]}]"
        out.append({"name": test.name, "passed": passed, "message": message[: runtime.MAX_MESSAGE * 2]})
    (vis, vis_bytes), (hid, hid_bytes) = captured["visible"], captured["hidden"]
    return {"tests": out, "errors": errors, "status": status, "exit": exit_status,
            "output": "".join(vis), "output_bytes": vis_bytes, "hidden_output": "".join(hid),
            "hidden_output_bytes": hid_bytes, "seconds": round(time.monotonic() - started, 3)}


def main() -> None:
    # Our stdout is the grader's channel: keep a private copy and point fd 1 at stderr, so
    # nothing printed by an import can corrupt it.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    isolation.protect_from_same_user()
    level = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else isolation.available_level()
    try:
        worker = Worker(level, wait=False)  # it imports torch while we do
        import torch
        import torch._dynamo  # noqa: F401 - the first optimiser a test builds imports it: not on a question's clock

        torch.set_num_threads(1)  # several checkers and workers share the cores
        worker.wait_ready()
    except WorkerFailed as exc:
        channel.write(json.dumps({"ready": False, "fatal": str(exc)}) + "\n")
        return
    channel.write(json.dumps({"ready": True, "isolation": level}) + "\n")
    for line in sys.stdin:
        job = {}
        try:
            job = json.loads(line)
            reply = describe(job) if job.get("kind") == "describe" else run_job(job, worker)
        except WorkerFailed as exc:
            reply = {"fatal": str(exc)}
            try:
                worker.start()
            except WorkerFailed:
                pass
        except Exception as exc:  # noqa: BLE001 - the grader reports it; the checker lives on
            reply = {"fatal": f"{type(exc).__name__}: {exc}"}
        reply["id"] = job.get("id")
        channel.write(json.dumps(reply) + "\n")
    worker.close()


if __name__ == "__main__":
    main()

"""The worker: runs a learner's code inside the sandbox and answers the checker's calls.

It holds no test, no answer key and no channel to the grader. A *zygote* starts once per
sandbox (imports torch, ~2 s) and forks one child per (notebook, question):

- the child receives the question's program (:mod:`tlcourse.grading.extract`) on its own
  socket (never through the zygote, whose memory every later child inherits), runs it, then serves the
  checker's requests on its own socket: call a learner function with these arguments
  (:mod:`tlcourse.grading.wire` decodes them), the vector-Jacobian product of an earlier
  call, close. Everything it prints goes to a file in its private temporary directory and
  travels with its replies, capped; each reply also says how far the file has been read;
- the zygote takes jobs on a control socket (the data socket arrives with the job, as a
  file descriptor), and after each job kills whatever the child left running — in a PID
  namespace every process but itself (``kill(-1)``), otherwise the child's process group —
  sends back what the child printed after its last reply (a question stopped for time or a
  crash still shows what it printed), and empties the temporary directories, so nothing of
  one submission meets the next.

The zygote marks itself non-dumpable, so a child (same uid) cannot ptrace it or write its
memory. Started by :mod:`tlcourse.grading.isolation`, never imported by the grader.
"""

from __future__ import annotations

import array
import json
import linecache
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time

OUTPUT_CHUNK = 64 << 10  # bytes of printed output carried by one reply
UNREAD_CHUNK = 8 << 10  # bytes of output sent back after a job (more than the grader keeps)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    pid_namespace = os.environ.get("TLCOURSE_SANDBOX_PIDNS") == "1"
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    import torch
    import torch._dynamo  # noqa: F401 - the first optimiser imports it; once here, not per child

    torch.set_num_threads(1)  # several workers share the cores
    from tlcourse.grading import wire  # noqa: F401

    from tlcourse.grading.isolation import protect_from_same_user

    protect_from_same_user()  # a child (same uid) may not ptrace the zygote or write its memory
    _send_json(control, {"kind": "ready", "pid": os.getpid()})
    while True:
        msg, fds = _recv_json(control)
        if msg is None:
            return
        if msg.get("kind") != "job" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        workdir = tempfile.mkdtemp(prefix="job-")
        # The folder itself, not its name: the child may rename it or put a link in its place.
        workdir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                os.close(workdir_fd)
                _child(msg, fds[0], workdir)
                code = 0
            finally:
                os._exit(code)
        os.close(fds[0])
        _send_json(control, {"kind": "started", "pid": pid})
        end, _ = _recv_json(control)  # the checker says when the job is over
        status = _kill_job(pid, pid_namespace)
        unread = _unread_output(workdir_fd, (end or {}).get("unread_from"))
        os.close(workdir_fd)
        _clean_up(workdir, pid_namespace)
        if end is None:
            return
        _send_json(control, {"kind": "ended", "status": status, "out": unread})


def _kill_job(pid: int, pid_namespace: bool) -> str:
    """Kill what is left of a job; how its child ended."""
    status = "still running"
    try:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = _describe(code)
    except ChildProcessError:
        status = "gone"
    if pid_namespace:
        try:
            os.kill(-1, signal.SIGKILL)  # in our own PID namespace: every process but us and init
        except OSError:
            pass
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    while True:  # reap what we can
        try:
            reaped, code = os.waitpid(-1, os.WNOHANG if status != "still running" else 0)
        except ChildProcessError:
            break
        if reaped == 0:
            break
        if reaped == pid and status == "still running":
            status = "killed: it was still running"
    return status


def _unread_output(workdir_fd: int, offset) -> str:
    """What the job printed from byte ``offset`` of its output file on (at most 8 KB).

    Its processes are dead, so the file no longer changes. The child wrote it and may have
    replaced it: only a regular file is read (never a link, a pipe that would block, or a
    device), and never more than 8 KB."""
    if type(offset) is not int or offset < 0:
        return ""
    try:
        fd = os.open(".output", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=workdir_fd)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.pread(fd, UNREAD_CHUNK, offset).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _clean_up(workdir: str, pid_namespace: bool) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if pid_namespace:
        for folder in ("/tmp", "/dev/shm", "/var/tmp"):
            _empty(folder)


def _empty(folder: str) -> None:
    """Delete what a job left in ``folder``, but never a mount point: the read-only binds of
    the Python installation may lie under /tmp (a clone there), and walking into them would
    be slow and pointless. A folder that holds a mount point stays; it is empty otherwise."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        path = entry.path
        try:
            if os.path.ismount(path):
                continue
            if entry.is_dir(follow_symlinks=False):
                _empty(path)
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError:
            pass


def _describe(code: int) -> str:
    if os.WIFSIGNALED(code):
        return f"killed by signal {os.WTERMSIG(code)}"
    return f"exit code {os.WEXITSTATUS(code)}"


def _send_json(sock: socket.socket, msg: dict) -> None:
    sock.sendall((json.dumps(msg) + "\n").encode())


def _recv_json(sock: socket.socket):
    """One line of JSON and the file descriptors that came with it; ``(None, [])`` at EOF."""
    buf, fds = b"", []
    while not buf.endswith(b"\n"):
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
        except OSError:
            return None, []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
        if not data:
            return None, fds
        buf += data
    try:
        return json.loads(buf), fds
    except ValueError:
        return {}, fds


# --- the child: one question of one notebook ---------------------------------------------------

def _child(job: dict, data_fd: int, workdir: str) -> None:
    os.setsid()
    _limits(job)
    os.chdir(workdir)
    os.environ["TMPDIR"] = workdir
    out_path = os.path.join(workdir, ".output")
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    reader = open(out_path, "rb")  # noqa: SIM115 - read as the learner writes
    # A line printed just before an endless loop or a crash must reach the file to be shown.
    sys.stdout.reconfigure(line_buffering=True)
    sock = socket.socket(fileno=data_fd)
    from tlcourse.grading import wire

    def new_output() -> str:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed or replaced stream
                pass
        return reader.read(OUTPUT_CHUNK).decode("utf-8", "replace")

    # The program comes on the child's own socket, never through the zygote: whatever the
    # zygote held would be in the memory of every child forked after it (another submission's).
    program, _ = wire.recv_frame(sock, None)
    ns = {"__name__": "__main__", "check": _noop, "checker": lambda *a, **k: _noop}
    session = wire.Session(sock, "w", HANDLERS)
    session.namespace = ns
    session.calls = {}
    session.new_output = new_output
    session.output_position = reader.tell  # bytes of the file sent to the checker so far
    errors = []
    cells: dict[str, list[str]] = {}  # several snippets of one cell: their lines together
    for snip in program.get("snippets", []):
        filename, source = str(snip.get("filename")), str(snip.get("source"))
        lines = cells.setdefault(filename, [])
        for i, line in enumerate(source.splitlines(True)):
            if i >= len(lines):
                lines.append("\n")
            if line.strip():
                lines[i] = line
        linecache.cache[filename] = (len(source), None, lines, filename)
        try:
            exec(compile(source, filename, "exec", dont_inherit=True), ns)  # noqa: S102 - learner code, sandboxed
        except SyntaxError as exc:
            if snip.get("essential"):
                text = (exc.text or "").strip()
                errors.append(f"syntax error in {filename}, line {exc.lineno}: {exc.msg}" + (f": `{text}`" if text else ""))
        except BaseException as exc:  # noqa: BLE001 - the tests then say what is missing
            if snip.get("essential"):
                errors.append(f"running {filename} raised {type(exc).__name__}: {str(exc)[:300]}")
    names = {}
    for name in program.get("names", []):
        if name in ns:
            names[name] = "callable" if callable(ns[name]) else "value"
    out = new_output()
    wire.send_frame(sock, {"kind": "ready", "names": names, "errors": errors, "out": out,
                           "out_read": reader.tell()}, [])
    while True:
        msg, blobs = wire.recv_frame(sock, None)
        if msg.get("kind") == "close":
            return
        session.serve_one(msg, blobs)


def _noop(*args, **kwargs):
    return None


def _call(session, msg, blobs):
    import copy

    import torch

    from tlcourse.grading import wire

    dec = wire.Decoder(session, blobs, import_classes=True)
    if "method" in msg:
        obj = dec(msg["method"])
        name = str(msg.get("name"))
        fn = obj if name == "forward" else getattr(obj, name)
    elif "copy" in msg:
        obj = dec(msg["copy"])
        fn = lambda: copy.deepcopy(obj)  # noqa: E731
    elif "attr" in msg:
        obj = session.objects[str(msg["attr"])]
        name = str(msg.get("name"))
        fn = lambda: getattr(obj, name)  # noqa: E731
    else:
        key = str(msg.get("fn"))
        if key.startswith("name:"):
            name = key[5:]
            if name not in session.namespace:
                raise NameError(f"name {name!r} is not defined")
            fn = session.namespace[name]
        else:
            fn = session.objects[key]
    args = dec(msg.get("args", []))
    kwargs = dec(msg.get("kwargs", {"$": "dict", "v": []}))
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise wire.WireError("malformed keyword arguments")
    wire.set_rng_states(dec(msg.get("rng")))
    for node in msg.get("sync", []):
        dec(node)
    inputs = [session.objects[str(k)] for k in msg.get("gin", [])]
    touched = [o for o in dec._memo.values() if isinstance(o, (torch.Tensor, torch.nn.Module))]
    error = result = None
    with torch.set_grad_enabled(bool(msg.get("grad", True))):
        try:
            result = fn(*args, **kwargs)
        except (wire.WorkerGone, wire.Timeout):
            raise
        except BaseException as exc:  # noqa: BLE001 - the learner's error, reported as data
            error = exc
    enc = wire.Encoder(session)
    reply = {"state": [enc(o) for o in touched], "rng": enc(wire.rng_states()), "free": wire.freed_graphs(session)}
    if error is not None:
        reply["error"] = enc.exception(error)
    else:
        known = {id(t) for t in inputs}
        outputs = [t for t in _tensors_in(result) if t.requires_grad and not t.is_leaf and id(t) not in known]
        outputs = list({id(t): t for t in outputs}.values())
        reply["outputs"] = [enc(t) for t in outputs]
        reply["result"] = enc(result)
        call_id = f"call{len(session.calls) + 1}"
        session.calls[call_id] = (outputs, inputs)
        reply["call"] = call_id
    reply["_blobs"] = enc.blobs
    return reply


def _tensors_in(value, depth=0):
    import torch

    if depth > 32:
        return
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        yield value
    elif isinstance(value, (list, tuple)):
        for x in value:
            yield from _tensors_in(x, depth + 1)
    elif isinstance(value, dict):
        for x in value.values():
            yield from _tensors_in(x, depth + 1)


def _vjp(session, msg, blobs):
    import torch

    from tlcourse.grading import wire

    outputs, inputs = session.calls[str(msg.get("call"))]
    dec = wire.Decoder(session, blobs, import_classes=True)
    grads = [None if g is None else dec(g) for g in msg.get("grads", [])]
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    result = [None] * len(inputs)
    if pairs and wanted:
        with torch.enable_grad():
            got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                      allow_unused=True, retain_graph=True)
        for i, g in zip(wanted, got):
            result[i] = g
    enc = wire.Encoder(session)
    return {"grads": [None if g is None else enc(g.detach()) for g in result], "_blobs": enc.blobs}


HANDLERS = {"call": _call, "vjp": _vjp}


def _limits(job: dict) -> None:
    import resource

    wanted = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 64 << 20)]
    seconds = job.get("cpu_seconds")
    if seconds:
        wanted.append((resource.RLIMIT_CPU, int(seconds) + 1))
    nproc = job.get("nproc")
    if nproc:
        wanted.append((resource.RLIMIT_NPROC, int(nproc)))
    memory = job.get("memory_mb")
    if memory:
        try:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            wanted.append((resource.RLIMIT_AS, used + (int(memory) << 20)))
        except (OSError, ValueError):
            pass
    for what, value in wanted:
        try:
            soft, hard = resource.getrlimit(what)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(what, (value, value))
        except (ValueError, OSError):
            pass


if __name__ == "__main__":
    main()

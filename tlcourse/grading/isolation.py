"""How the worker that runs learners' code is walled off by the operating system.

Two levels; ``tlcourse grade`` names the one it used in its output and in the JSON:

``bubblewrap`` (Linux with the ``bwrap`` program, Debian/Ubuntu package ``bubblewrap``)
    The worker runs in its own user, mount, PID, IPC, UTS and network namespaces, as uid
    65534 with no capabilities, and dies with the checker that started it. Its file system
    is a read-only view of the Python installation, the installed packages and the system
    libraries, a private ``/tmp`` and nothing else: no home directory, no other submission,
    no tests folder, no output path, and no process outside its own namespace. No network.
    After each question every process it started is killed.
``process`` (macOS, or Linux without a usable ``bwrap``)
    The worker is a separate process in its own session, with resource limits (address
    space, CPU time, file size, number of processes); when the grader runs as root and the
    Python installation is readable by others, it also drops to uid/gid 65534. It can read
    whatever files that user can read and reach the network, and a process it starts in a
    new session of its own is not killed after the question. Grades stay right — the tests
    and the result channel live in the checker, which it cannot reach — but a submission
    could read other files or other submissions on that machine: use the ``bubblewrap``
    level for a class.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

BUBBLEWRAP = "bubblewrap"
PROCESS = "process"
SANDBOX_UID = 65534  # "nobody" on Debian, Ubuntu and macOS
TMP_BYTES = 512 << 20  # the sandbox's /tmp (a tmpfs, i.e. memory)
BOOT = ("import sys; sys.path.insert(0, sys.argv[2]) if sys.argv[2] else None; "
        "from tlcourse.grading.worker import main; main()")
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime", "/etc/nsswitch.conf", "/etc/passwd",
                "/etc/group")


def describe(level: str) -> str:
    """One line for the grader's output: what isolated the learners' code."""
    if level == BUBBLEWRAP:
        return ("each submission's code ran in a bubblewrap sandbox (own namespaces, uid 65534, read-only Python, "
                "private /tmp, no network, no view of other files or processes)")
    return ("each submission's code ran in a separate process with resource limits only (no bubblewrap here): "
            "grades stay right, but that code could read files and reach the network as "
            + ("uid 65534" if _drop_uid() else "the grader's user"))


@functools.lru_cache(maxsize=None)
def available_level() -> str:
    """``bubblewrap`` when ``bwrap`` can start a sandbox here (it needs user namespaces), else ``process``."""
    if os.environ.get("TLCOURSE_ISOLATION") == PROCESS:
        return PROCESS
    bwrap = shutil.which("bwrap")
    if not bwrap or not sys.platform.startswith("linux"):
        return PROCESS
    probe = _bwrap_argv(bwrap, []) + [sys.executable, "-I", "-c", "pass"]
    try:
        ok = subprocess.run(probe, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return BUBBLEWRAP if ok else PROCESS


def readable_paths() -> list[str]:
    """What the sandbox may read: the interpreter, its standard library, the installed
    packages and tlcourse itself (for an editable install, only its package folder)."""
    import tlcourse

    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             os.path.dirname(os.path.abspath(tlcourse.__file__))}
    paths.update(p for p in sysconfig.get_paths().values() if p)
    for entry in sys.path:
        if entry and os.path.isdir(entry) and ("site-packages" in entry or entry.endswith(("dist-packages", "lib-dynload"))):
            paths.add(entry)
    real = {os.path.realpath(p) for p in paths if p and os.path.exists(p)}
    # Drop paths inside others: one bind each.
    return sorted(p for p in real if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in real))


def check_tests_hidden(tests_dir: str | Path | None) -> None:
    """Refuse a hidden-tests folder the sandbox could read (it lies inside a bound path)."""
    if tests_dir is None:
        return
    folder = os.path.realpath(tests_dir)
    from tlcourse.grading.grader import GradingError, PACKAGE_CHECKS

    if folder == os.path.realpath(PACKAGE_CHECKS):
        return
    for path in readable_paths():
        if folder == path or folder.startswith(path.rstrip("/") + "/"):
            raise GradingError(f"the tests folder {tests_dir} lies inside {path}, which learners' code must be able "
                               "to read (it holds Python or its packages); keep hidden tests somewhere else")


def _bwrap_argv(bwrap: str, extra_env: list[str]) -> list[str]:
    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "MPLCONFIGDIR", "/tmp", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--setenv", "OMP_NUM_THREADS", "1", "--setenv", "TLCOURSE_SANDBOX_PIDNS", "1", *extra_env]
    # The writable places first, each a size-limited tmpfs (files fill memory, and a question's
    # files must not fill the host's); then the read-only binds, so that a Python installation
    # or a clone that lies under /tmp is mounted on top of the tmpfs, not hidden by it.
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(64 << 20), "--tmpfs", "/dev/shm",
             "--size", str(TMP_BYTES), "--tmpfs", "/tmp", "--size", str(64 << 20), "--tmpfs", "/var/tmp"]
    for path in SYSTEM_PATHS:
        argv += ["--ro-bind-try", path, path]
    for path in readable_paths():
        argv += ["--ro-bind", path, path]
    # Writable: /tmp, /var/tmp and /dev/shm only (emptied after every question). The root and
    # /dev are tmpfs that bwrap builds the mount points in: read-only once built, or a job could
    # leave a file (in /etc, /root, ...) for the next submission to find.
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
    return argv


@functools.lru_cache(maxsize=None)
def _drop_uid() -> bool:
    """As root, run the ``process`` level as uid 65534 when that uid can run this Python."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        return subprocess.run([sys.executable, "-I", "-c", "import torch"], preexec_fn=_become_nobody,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=120, cwd="/").returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(SANDBOX_UID)
    os.setuid(SANDBOX_UID)


def process_limit() -> int:
    """RLIMIT_NPROC for a question: the processes this user already has, plus 256 (the
    limit counts every process of the user, and a sandbox's uid maps to ours)."""
    uid = os.getuid()
    count = 0
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid:
                        count += 1
                except OSError:
                    pass
    except OSError:
        return 0
    return count + 256


def start_worker(level: str, control_fd: int) -> tuple[subprocess.Popen, object]:
    """Start the worker zygote at ``level``; it talks on the socket ``control_fd``.
    Returns the process and the file its standard error goes to (for start-up errors)."""
    log = tempfile.TemporaryFile()
    if level == BUBBLEWRAP:
        argv = _bwrap_argv(shutil.which("bwrap"), []) + [sys.executable, "-I", "-c", BOOT, str(control_fd), ""]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(control_fd,),
                                start_new_session=True, cwd="/")
        return proc, log
    home = tempfile.mkdtemp(prefix="tlcourse-worker-")
    drop = _drop_uid()
    if drop:
        os.chown(home, SANDBOX_UID, SANDBOX_UID)
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "MPLCONFIGDIR": home,
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[2])

    def prepare():
        os.setsid()
        if drop:
            _become_nobody()

    proc = subprocess.Popen([sys.executable, "-I", "-c", BOOT, str(control_fd), root], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, pass_fds=(control_fd,), preexec_fn=prepare, cwd=home, env=env)
    return proc, log


def protect_from_same_user() -> None:
    """Linux: make this process non-dumpable, so another process of the same uid (the worker at
    the ``process`` level, when the grader is not root) can neither ptrace it nor read or write
    its memory through /proc. Elsewhere nothing to do here (macOS: a separate uid is the wall)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass

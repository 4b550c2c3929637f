"""Browser tests: a real Chromium, driven by Selenium, against JupyterLab, as a learner uses the course.

Each test file gets its own JupyterLab server and browser (module scope), so that the files stay
independent under pytest-xdist (``--dist loadscope``). The server is started as
``python3 -m tlcourse.bootstrap lab`` starts it (``bootstrap.lab_arguments``, the news pop-up
disabled by ``bootstrap.write_lab_config``), but headless: no browser of its own, a free port, a
random token, and a temporary root folder into which the tests copy the notebooks they need.
Screenshots go to ``build/browser/`` (and ``<test>-failed.png`` there when a test fails).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the ``dev``
extra (selenium, jupyterlab); the tests are skipped, saying which is missing, without them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tlcourse import bootstrap

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "build" / "browser"
KERNEL_START_S = 90  # a kernel's start and a page's load, on a busy 2-core machine
WINDOW = (1400, 1000)


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium and chromedriver are not installed: apt-get install chromium chromium-driver")
    return browser, driver


def _require_python_packages() -> None:
    for module, package in (("selenium", "selenium"), ("jupyterlab", "jupyterlab"), ("nbformat", "nbformat")):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{package} is not installed: pip install -e '.[dev]'")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabServer:
    """A headless JupyterLab on ``root`` (a temporary folder): ``url(path)`` gives a page's address."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.token = secrets.token_hex(16)
        self.log_path = home / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def copy(self, relative: str) -> str:
        """Copy the repository's file ``relative`` to the same place under the root (never edit the
        repository's notebooks); return ``relative``."""
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / relative, target)
        return relative

    def environment(self) -> dict[str, str]:
        # bootstrap's mechanism: the news pop-up disabled through JUPYTER_CONFIG_PATH.
        env = bootstrap.write_lab_config(self.home / "lab-config")
        # A learner's live notebook: widgets, not the static figures of TLCOURSE_HEADLESS
        # (tests/conftest.py sets it for nbval), and the inline backend, not MPLBACKEND=Agg.
        for name in ("TLCOURSE_HEADLESS", "MPLBACKEND"):
            env.pop(name, None)
        # Nothing read from or written to the user's Jupyter and IPython folders (settings, saved
        # workspaces, startup files), nor to the repository's build/results.
        for name, sub in (("JUPYTER_CONFIG_DIR", "jupyter-config"), ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
                          ("IPYTHONDIR", "ipython"), ("TLCOURSE_BUILD", "build")):
            env[name] = str(self.home / sub)
        # TLCOURSE_DATA and TLCOURSE_PROFILE pass through when set (the notebooks fall back to
        # bundled data without them).
        return env

    def start(self, timeout: float = 60) -> None:
        from jupyter_server import version_info

        token = "IdentityProvider.token" if version_info >= (2,) else "ServerApp.token"
        as_root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        env = self.environment()
        for _ in range(3):  # another process may take the free port before the server does
            self.port = _free_port()
            log = open(self.log_path, "w")
            cmd = [sys.executable, "-m", "jupyterlab", *bootstrap.lab_arguments(self.root),
                   "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                   "--ServerApp.port_retries=0", f"--{token}={self.token}", "--expose-app-in-browser",
                   *as_root]
            # Its own process group: the kernels it starts are stopped with it.
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            if self._wait_until_ready(timeout):
                return
            if self.proc.poll() is None:
                break  # running but not answering: no point in another port
        log_tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        pytest.fail(f"JupyterLab did not answer on port {self.port} within {timeout:.0f} s; its log:\n{log_tail}")

    def _wait_until_ready(self, timeout: float) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never a proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with opener.open(self.url("api/status"), timeout=2) as response:
                    if response.status == 200 and "started" in json.load(response):
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGTERM: jupyter_server shuts its kernels down and exits; the group's leftovers after that.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Lab:
    """The browser on one JupyterLab: open a notebook, run its cells, read what it shows.

    ``window.jupyterapp`` (``--expose-app-in-browser``) gives the notebook's model (execution
    counts, outputs, kernel status) and runs JupyterLab's own commands; what a learner sees is read
    from the page (the DOM) and typed with the keyboard.
    """

    PANEL = "const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;"

    def __init__(self, driver, server: LabServer):
        self.driver, self.server = driver, server

    def js(self, script: str, *args):
        return self.driver.execute_script(self.PANEL + script, *args)

    def wait(self, condition, timeout: float, message: str):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25).until(condition)
        except TimeoutException:
            pytest.fail(f"{message} (after {timeout:.0f} s); cells: {self.cells()}")

    def open(self, path: str = "", timeout: float = KERNEL_START_S) -> None:
        """Load ``/lab/tree/<path>`` (``path=""``: the server's default URL, as a learner's browser
        opens it) and wait until that notebook is shown with its kernel idle."""
        self.driver.get(self.server.url(f"lab/tree/{path}" if path else ""))
        ready = """
            const kernel = panel && panel.sessionContext && panel.sessionContext.session
                && panel.sessionContext.session.kernel;
            return !!(kernel && panel.context.isReady && kernel.connectionStatus === 'connected'
                && kernel.status === 'idle') && panel.context.path;"""
        shown = self.wait(lambda d: self.js(ready), timeout, f"the notebook {path or '(default URL)'} did not open "
                          "with an idle kernel")
        if path:
            assert shown == path

    def command(self, name: str) -> None:
        """Run a JupyterLab command (what the menus and the command palette run); not awaited."""
        self.js("window.jupyterapp.commands.execute(arguments[0]); return null;", name)

    def cells(self) -> list[dict]:
        """The notebook's code cells: index, execution count, outputs (type, error name and value)."""
        return self.js("""
            if (!panel || !panel.content || !panel.content.model) return [];
            const cells = panel.content.model.cells, found = [];
            for (let i = 0; i < cells.length; i++) {
                const cell = cells.get(i);
                if (cell.type !== 'code') continue;
                found.push({index: i, count: cell.executionCount, source: cell.sharedModel.getSource().length,
                            outputs: cell.outputs.toJSON().map(o => ({type: o.output_type, ename: o.ename,
                                                                       evalue: o.evalue}))});
            }
            return found;""")

    def find_all(self, css: str) -> list:
        """The elements matching ``css`` in the notebook shown (not in other, hidden tabs)."""
        return self.js("return panel ? [...panel.node.querySelectorAll(arguments[0])] : [];", css)

    def kernel_status(self) -> str:
        return self.js("return panel.sessionContext.session.kernel.status;")

    def cell_node(self, index: int):
        """The page's element of cell ``index`` (scrolled into view)."""
        return self.js("""const cell = panel.content.widgets[arguments[0]];
                          cell.node.scrollIntoView({block: 'center'}); return cell.node;""", index)

    def error_outputs(self) -> list[str]:
        """Error outputs (exceptions), from the model and from what the page shows; stderr text that
        is only a warning does not count."""
        errors = [f"cell {c['index']}: {o['ename']}: {o['evalue']}"
                  for c in self.cells() for o in c["outputs"] if o["type"] == "error"]
        shown = self.js("""
            return [...panel.node.querySelectorAll(
                '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
              .map(e => e.textContent)
              .filter(t => /Traceback \\(most recent call last\\)|^\\s*\\w*(Error|Exception)\\b/m.test(t));""")
        return errors + [f"shown: {text[-500:]}" for text in shown]

    def run_all(self, timeout: float) -> list[dict]:
        """Clear the outputs, run every cell, wait until the kernel is idle and every code cell has
        an execution count (or an error stopped the run); return the code cells."""
        self.command("notebook:clear-all-cell-outputs")
        self.wait(lambda d: all(c["count"] is None for c in self.cells()), 30, "the outputs were not cleared")
        self.command("notebook:run-all-cells")

        def finished(_):
            cells = [c for c in self.cells() if c["source"]]
            failed = any(o["type"] == "error" for c in cells for o in c["outputs"])
            done = all(c["count"] for c in cells) or failed
            return cells if done and self.kernel_status() == "idle" else False

        return self.wait(finished, timeout, "the notebook did not finish running")

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    _require_python_packages()
    _chromium()
    home = tmp_path_factory.mktemp("lab")
    root = home / "course"
    root.mkdir()
    server = LabServer(root, home)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    _require_python_packages()
    browser_path, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--disable-gpu", "--no-first-run"):
        options.add_argument(argument)
    # An explicit chromedriver: Selenium Manager never runs (it would try to download one).
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def lab(browser, lab_server, request):
    """The browser on this module's JupyterLab; a screenshot ``<test>-failed.png`` when the test fails."""
    page = Lab(browser, lab_server)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        try:
            page.screenshot(f"{request.node.name}-failed")
        except Exception:  # noqa: BLE001 - a screenshot must not hide the failure
            pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report

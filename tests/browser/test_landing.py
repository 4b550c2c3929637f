"""The landing notebook, as ``python3 -m tlcourse.bootstrap lab`` opens it: Run All in the browser."""

from __future__ import annotations

from tlcourse import bootstrap


def test_landing_notebook_runs_in_jupyterlab(lab, lab_server):
    lab_server.copy(bootstrap.LANDING)
    lab.open()  # the server's default URL, bootstrap's: it opens the landing notebook
    assert lab.js("return panel.context.path;") == bootstrap.LANDING

    cells = lab.run_all(timeout=300)  # ~20 s in a kernel on 2 idle cores; the suite runs beside it

    assert not lab.error_outputs(), lab.error_outputs()
    assert all(c["count"] for c in cells), f"cells not run: {[c['index'] for c in cells if not c['count']]}"
    counts = [c["count"] for c in cells]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts  # one run, top to bottom
    # The figures are drawn in the page (the inline backend), not only saved.
    figures = [c["index"] for c in cells if any(o["type"] == "display_data" for o in c["outputs"])]
    assert figures, cells
    lab.wait(lambda d: lab.find_all(".jp-OutputArea-output img"), 30, "no figure is shown")
    # No "Would you like to get notified about official Jupyter news?" over the notebook.
    assert not lab.js("return window.jupyterapp.hasPlugin(arguments[0]);", bootstrap.ANNOUNCEMENTS)
    toasts = lab.driver.execute_script(
        "return [...document.querySelectorAll('.Toastify__toast')].map(e => e.innerText);")
    assert not [t for t in toasts if "news" in t.lower()], toasts

    figure = lab.cell_node(figures[0]).find_element("css selector", ".jp-OutputArea-output img")
    lab.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", figure)
    lab.screenshot("landing_executed")  # the photos and their top-5 classes

"""Chapter 04's temperature slider (``viz.temperature_slider``) live in JupyterLab: it moves, the
readout and the figure follow, and its label is shown in full."""

from __future__ import annotations

import nbformat

SOURCE = """\
import torch
from tlcourse import viz

logits = torch.tensor([4.0, 2.5, 1.0, 0.5, -1.0, -2.0])
viz.temperature_slider(logits, ["cat", "dog", "fox", "owl", "bee", "ant"], k=5);"""


def _figures(lab) -> list[str]:
    # Read in the page in one call: an element fetched first and read later may have been redrawn.
    return lab.js("return [...panel.node.querySelectorAll('.jp-OutputArea-output img')].map(e => e.src);")


def _texts(lab, css: str) -> list[str]:
    return lab.js("return [...panel.node.querySelectorAll(arguments[0])].map(e => e.textContent.trim());", css)


def test_temperature_slider_moves_and_redraws(lab, lab_server):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SOURCE)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, lab_server.root / "slider.ipynb")
    lab.open("slider.ipynb")

    cells = lab.run_all(timeout=180)
    assert not lab.error_outputs(), lab.error_outputs()
    # A live widget (TLCOURSE_HEADLESS is not set for this server), not a static figure.
    outputs = cells[0]["outputs"]
    assert [o["type"] for o in outputs] == ["display_data"], outputs

    from selenium.webdriver.common.keys import Keys

    driver = lab.driver
    handle = lab.wait(lambda d: lab.find_all(".widget-slider .noUi-handle"), 60, "no slider is shown")[0]
    before = lab.wait(lambda d: (lambda f: f if len(f) == 1 else False)(_figures(lab)), 60,
                      "no figure under the slider")
    assert _texts(lab, ".widget-slider .widget-readout") == ["1.00"]

    # The label in full: "temperature T", not cut to "temperat…" by a narrow description width.
    assert _texts(lab, ".widget-slider .widget-label") == ["temperature T"]
    widths = lab.wait(lambda d: (lambda w: w if w and w[1] else False)(lab.js(
        "const l = panel.node.querySelector('.widget-slider .widget-label');"
        "return l ? [l.scrollWidth, l.clientWidth] : null;")), 30, "the slider's label is not laid out")
    assert widths[0] <= widths[1], f"the label is cut: {widths[0]} px of text in {widths[1]} px"
    lab.cell_node(0)
    lab.screenshot("slider_T1")

    # Keyboard, as a learner without a mouse: four steps of 2^0.25 to the right, T = 1 -> 2.
    # The widget's elements may be drawn anew while the output below it changes, so each step and
    # each check looks them up again instead of holding on to an element that may have gone stale.
    driver.execute_script("arguments[0].focus();", handle)
    for _ in range(4):
        lab.find_all(".widget-slider .noUi-handle")[0].send_keys(Keys.ARROW_RIGHT)
    lab.wait(lambda d: _texts(lab, ".widget-slider .widget-readout") == ["2.00"], 30,
             "the readout did not move from 1.00 to 2.00")
    lab.wait(lambda d: (lambda f: len(f) == 1 and f != before)(_figures(lab)), 60, "the figure was not redrawn")
    lab.wait(lambda d: lab.kernel_status() == "idle", 60, "the kernel stayed busy")
    after = _figures(lab)
    assert len(after) == 1 and after != before  # one figure, replaced, not one more appended
    assert lab.js("return [...panel.node.querySelectorAll('.widget-slider .noUi-handle')]"
                  ".map(e => e.getAttribute('aria-valuenow'));") == ["1.0"]  # log2(T)
    lab.screenshot("slider_T2")

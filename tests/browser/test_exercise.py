"""An exercise notebook as a learner works it in JupyterLab: type an answer to q1 into its cell, run
it and ``check("q1")`` with Shift+Enter, read the pass mark; then a wrong answer and its hint."""

from __future__ import annotations

EXERCISE = "exercises/00_setup_and_first_look.ipynb"
# q1: topk_predictions(logits, k) -> (probabilities, indices) of the k most likely classes.
RIGHT = "return logits.softmax(dim=1).topk(k, dim=1)"
WRONG = "return logits.topk(k, dim=1)"  # the raw logits: check("q1") says to take a softmax first
HEADER = "def topk_predictions(logits, k=5):"


def _shift_enter(lab, times: int = 1) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(times):
        ActionChains(lab.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()


def _type_answer(lab, index: int, body: str) -> None:
    """Replace cell ``index``'s text by typing it, as a learner does: click, select all, type."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    editor = lab.cell_node(index).find_element("css selector", ".cm-content")
    editor.click()
    ActionChains(lab.driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).perform()
    # Enter, then select back to the line's start: whatever the editor indented by itself is
    # replaced by the four spaces typed.
    ActionChains(lab.driver).send_keys(HEADER, Keys.ENTER).key_down(Keys.SHIFT).send_keys(Keys.HOME) \
        .key_up(Keys.SHIFT).send_keys("    " + body).perform()
    wanted = f"{HEADER}\n    {body}"
    lab.wait(lambda d: lab.js("return panel.content.model.cells.get(arguments[0]).sharedModel.getSource();",
                              index) == wanted, 10, f"cell {index} does not hold the typed answer")


def _check_output(lab, index: int, mark: str, timeout: float = 60) -> str:
    """Wait until cell ``index`` (``check("q1")``) shows ``mark`` and the kernel is idle; its text."""
    def shown(_):
        text = lab.js("""return [...panel.content.widgets[arguments[0]].node
                                 .querySelectorAll('.jp-OutputArea-output')].map(e => e.textContent).join('\\n');""",
                      index)
        return text if mark in text and lab.kernel_status() == "idle" else False

    return lab.wait(shown, timeout, f"cell {index} does not show {mark!r}")


def test_exercise_check_passes_then_gives_a_hint(lab, lab_server):
    lab_server.copy(EXERCISE)
    lab.open(EXERCISE)
    roles = lab.js("""const cells = panel.content.model.cells, roles = [];
                      for (let i = 0; i < cells.length; i++) roles.push(cells.get(i).getMetadata('tlcourse') || null);
                      return roles;""")
    question = roles.index({"question": "q1"})
    check = roles.index({"check": "q1"})
    assert check == question + 1, roles

    # The cells above q1 (the Colab install, the setup with `check = checker("00")`): select the
    # first code cell, then Shift+Enter down to q1, as a learner does.
    first = next(c["index"] for c in lab.cells())
    lab.cell_node(first).find_element("css selector", ".jp-InputPrompt").click()
    _shift_enter(lab, question - first)
    lab.wait(lambda d: lab.js("return panel.content.activeCellIndex;") == question, 30,
             "Shift+Enter did not reach q1")

    _type_answer(lab, question, RIGHT)
    _shift_enter(lab, 2)  # the answer, then check("q1") under it
    text = _check_output(lab, check, "✅ q1")
    assert "all 3 checks passed" in text, text
    assert not lab.error_outputs(), lab.error_outputs()
    lab.screenshot("exercise_pass")

    _type_answer(lab, question, WRONG)
    _shift_enter(lab, 2)
    text = _check_output(lab, check, "❌ q1")
    assert "2 of 3 checks passed" in text and "softmax" in text, text
    assert "Traceback" not in text, text  # the hint alone, not a traceback
    lab.screenshot("exercise_fail")

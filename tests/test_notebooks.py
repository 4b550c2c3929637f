"""Structure every chapter notebook must keep (nbval executes them; see pytest addopts)."""

import json
import re
from pathlib import Path

import pytest

from tlcourse import notebooks

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").rglob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_chapter_notebooks():
    assert any(p.name.startswith("00_") for p in CHAPTERS)


@pytest.mark.parametrize("path", CHAPTERS + SOLUTIONS + EXERCISES, ids=lambda p: str(p.relative_to(ROOT)))
def test_badge_and_setup_cell_come_from_one_place(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    relative = path.relative_to(ROOT)
    assert notebooks.colab_badge(relative) in "".join(cells[0]["source"]), "the first cell must hold notebooks.colab_badge(path)"
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert "".join(first_code["source"]) == notebooks.SETUP_CELL


@pytest.mark.parametrize("path", CHAPTERS + SOLUTIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_with_outputs_and_modest_size(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "commit notebooks executed by `tlcourse run --inplace`"
    assert path.stat().st_size < 1_000_000


def test_results_table_is_regenerated_from_json(tmp_path):
    results = tmp_path / "results"
    notebooks.write_results("00_demo", {"profile": "quick", "accuracy": 0.9412, "note": None}, results)
    table = notebooks.results_table(results)
    assert "| 00_demo | quick | accuracy | 0.941 |" in table and "| note | — |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{notebooks.RESULTS_START}\nold\n{notebooks.RESULTS_END}\noutro\n")
    notebooks.update_readme(readme, results)
    text = readme.read_text()
    assert "old" not in text and "0.941" in text and text.startswith("intro") and text.endswith("outro\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="results"):
        notebooks.update_readme(readme, results)


def test_markdown_table_formats_columns():
    table = notebooks.markdown_table([{"model": "a", "parameters": 1234567, "ms": 1.23456},
                                      {"model": "b", "parameters": 12, "ms": 0.5}], {"parameters": "{:,}", "ms": "{:.1f}"})
    lines = table.data.splitlines()
    assert lines[0] == "| model | parameters | ms |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| a | 1,234,567 | 1.2 |" and lines[3] == "| b | 12 | 0.5 |"
    with pytest.raises(ValueError, match="no rows"):
        notebooks.markdown_table([])


def test_readme_lists_every_notebook_with_its_badge():
    readme = (ROOT / "README.md").read_text()
    for path in CHAPTERS + EXERCISES:
        relative = path.relative_to(ROOT)
        assert notebooks.colab_badge(relative) in readme, f"README's course table lacks {relative}"


def test_readme_commands_install_every_extra_the_notebooks_need():
    # The Keras companions run in the test suite, so the README's two commands must install
    # TensorFlow: bootstrap's default extras must exist in pyproject and include `tensorflow`.
    import tomllib

    from tlcourse import bootstrap

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = bootstrap.EXTRAS.split(",")
    assert "tensorflow" in wanted and "dev" in wanted
    assert set(wanted) <= set(extras)
    assert any(req.startswith("keras>=3") for req in extras["tensorflow"])


def test_test_command_runs_two_processes_unless_told_otherwise(monkeypatch):
    # nbval needs a notebook's cells in one kernel: --dist loadscope, whatever the worker count.
    import sys

    from tlcourse import bootstrap

    py = Path(sys.executable)
    monkeypatch.delenv("TLCOURSE_TEST_WORKERS", raising=False)
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 2)
    assert bootstrap._parallel(py, []) == ["-n", "2", "--dist", "loadscope", "--no-loadscope-reorder"]
    for chosen in (["-n", "4"], ["-n4"], ["-nauto"], ["--numprocesses=3"], ["-p", "no:xdist"], ["--dist", "loadfile"],
                   ["--pdb"], ["--trace"], ["-s"]):
        assert bootstrap._parallel(py, ["-x", *chosen]) == [], chosen
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:xdist")
    assert bootstrap._parallel(py, []) == []
    monkeypatch.delenv("PYTEST_ADDOPTS")
    assert bootstrap._parallel(py, ["--nbval-lax", "-k", "data"])[:2] == ["-n", "2"]
    monkeypatch.setenv("TLCOURSE_TEST_WORKERS", "0")
    assert bootstrap._parallel(py, []) == []
    monkeypatch.setenv("TLCOURSE_TEST_WORKERS", "3")
    assert bootstrap._parallel(py, [])[:2] == ["-n", "3"]
    monkeypatch.delenv("TLCOURSE_TEST_WORKERS")
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 1)
    assert bootstrap._parallel(py, []) == []


# A literal seed in a chapter would freeze that choice for every TLCOURSE_SEED (CONTRIBUTING's
# protocol): every random choice derives from cfg.seed / cfg.seeds(n).
LITERAL_SEED = re.compile(
    r"(?:\bseed|random_state|manual_seed|set_random_seed|default_rng|seed_everything)\s*[=(]\s*\d")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_chapters_take_every_seed_from_the_course_seed(path):
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "env.setup()" in code, "call env.setup() without a seed: it reads TLCOURSE_SEED"
    literal = [line.strip() for line in code.splitlines() if LITERAL_SEED.search(line)]
    assert not literal, f"literal seeds (use cfg.seed or cfg.seeds(n)): {literal}"
    outputs = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "seed=" in outputs, "the committed run must print its seed (env.setup prints it)"


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: str(p.relative_to(ROOT)))
def test_chapter_and_exercises_link_each_other(path):
    chapter = ROOT / "notebooks" / path.name
    exercises_md = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")
    chapter_md = "".join("".join(c["source"]) for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "markdown")
    assert f"(../notebooks/{path.name})" in exercises_md, "the exercises must link their chapter"
    assert f"(../exercises/{path.name})" in chapter_md, "the chapter must link its exercises"


@pytest.mark.parametrize("path", CHAPTERS + SOLUTIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_frozen_progress_bars_in_committed_outputs(path):
    nb = json.loads(path.read_text())
    frozen = [o for c in nb["cells"] for o in c.get("outputs", [])
              if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
              and "%|" in "".join(o["data"].get("text/plain", ""))]
    assert not frozen, "tqdm widgets saved at 0 %: `tlcourse run --inplace` drops them (notebooks.drop_progress_widgets)"


def test_drop_progress_widgets_keeps_everything_else():
    import nbformat

    bar = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/plain": "epoch 1:   0%|          | 0/8 [00:00<?, ?it/s]"})
    slider = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "y", "version_major": 2, "version_minor": 0},
        "text/plain": "interactive(children=(FloatSlider(value=4.0),))"})
    text = nbformat.v4.new_output("stream", text="accuracy 0.95\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[bar, text, slider]), nbformat.v4.new_markdown_cell("m")]
    assert notebooks.drop_progress_widgets(nb) == 1
    assert nb.cells[0].outputs == [text, slider]

"""Immediate feedback in a notebook: ``check("q1")`` runs the public checks of one question.

It runs in the learner's own kernel against the learner's current functions, so it is
for feedback only; scores come from ``tlcourse grade``, which runs the tests elsewhere.

A pass prints one line. A question not started yet (the stub still raises
``NotImplementedError``) prints one line too, so "Run all" on a fresh exercise notebook
goes through. A real failure raises :class:`CheckFailed`, whose short message IPython
shows instead of a traceback (``_render_traceback_``; JupyterLab, Notebook and Colab all
honour it) and which makes ``pytest --nbval`` fail on a broken solution notebook.
"""

from __future__ import annotations

import importlib
import sys

from tlcourse.grading import runtime

_last_chapter: str | None = None


class CheckFailed(AssertionError):
    """A question's checks failed; the message says which expectation and why."""

    def _render_traceback_(self):  # IPython: show these lines instead of a traceback
        return str(self).splitlines()


class Checker:
    """``check = checker("00")`` then ``check("q1")``; see :func:`checker`."""

    def __init__(self, chapter: str):
        self.chapter = _normalise_chapter(chapter)

    def __call__(self, question: str, namespace: dict | None = None) -> None:
        if namespace is None:
            namespace = sys._getframe(1).f_globals  # the notebook's own namespace
        run_checks(self.chapter, question, namespace)

    def __repr__(self) -> str:
        return f"checker({self.chapter!r})"


def checker(chapter: str) -> Checker:
    """A ``check(question)`` function for one chapter's exercise notebook."""
    global _last_chapter
    result = Checker(chapter)
    _last_chapter = result.chapter
    return result


def check(question: str, chapter: str | None = None, namespace: dict | None = None) -> None:
    """Run the public checks of ``question`` against the caller's functions.

    ``chapter`` defaults to the one of the last :func:`checker` made in this kernel, or to
    the only chapter that has a question of this id.
    """
    if namespace is None:
        namespace = sys._getframe(1).f_globals
    run_checks(_normalise_chapter(chapter) if chapter else _guess_chapter(question), question, namespace)


def run_checks(chapter: str, question: str, namespace: dict) -> None:
    module = importlib.import_module(f"tlcourse.grading.checks.ch{chapter}")
    questions, tests = runtime.collect(vars(module))
    if question not in questions:
        raise CheckFailed(f"There is no question {question!r} in chapter {chapter}; "
                          f"the questions are {', '.join(questions)}.")
    title = questions[question].get("title", "")
    label = f"{question} ({title})" if title else question
    mine = [t for t in tests if t.question == question and t.visibility == "visible"]
    results = [(t, *runtime.run_test(t, namespace, module.__file__)) for t in mine]
    failed = [(t, msg) for t, ok, msg in results if not ok]
    if not failed:
        print(f"✅ {label}: all {len(results)} checks passed.")
        return
    if len(failed) == len(results) and all(m.startswith("not answered yet") for _, m in failed):
        print(f"⏳ {label}: {failed[0][1]}")
        return
    test, message = failed[0]
    passed = len(results) - len(failed)
    raise CheckFailed(
        f"❌ {label}: {passed} of {len(results)} checks passed.\n"
        f"   Check:   {test.doc}\n   Problem: {message}"
    )


def _normalise_chapter(chapter) -> str:
    text = str(chapter).strip().lower().removeprefix("ch")
    return text.zfill(2) if text.isdigit() else text


def _guess_chapter(question: str) -> str:
    if _last_chapter:
        return _last_chapter
    from importlib import resources

    found = []
    for entry in sorted(resources.files("tlcourse.grading.checks").iterdir()):
        name = entry.name
        if name.startswith("ch") and name.endswith(".py"):
            mod = importlib.import_module(f"tlcourse.grading.checks.{name[:-3]}")
            if question in getattr(mod, "QUESTIONS", {}):
                found.append(name[2:-3])
    if len(found) != 1:
        raise CheckFailed(f"Say which chapter {question!r} belongs to: "
                          f"check = checker('00'), then check({question!r}).")
    return found[0]

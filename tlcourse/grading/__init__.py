"""Exercises and automatic grading: one source of truth, immediate feedback, trusted scores.

- ``solutions/NN_*.ipynb`` hold each question's solution between ``# BEGIN SOLUTION`` /
  ``# END SOLUTION``; :mod:`tlcourse.grading.exercises` generates ``exercises/`` from them.
- Checks are plain test functions in ``tlcourse/grading/checks/chNN.py`` (format in
  :mod:`tlcourse.grading.spec`); hidden tests use the same format in a folder of their own.
- In a notebook, :func:`checker` gives immediate feedback::

      from tlcourse.grading import checker
      check = checker("00")
      check("q1")

- ``tlcourse grade`` (:mod:`tlcourse.grading.grader`) runs the tests on submitted notebooks
  in a trusted checker process (:mod:`tlcourse.grading.checker`) that never runs learner
  code; the learner's functions run in a sandboxed worker (:mod:`tlcourse.grading.worker`,
  :mod:`tlcourse.grading.isolation`) and are called through data-only proxies
  (:mod:`tlcourse.grading.wire`).

Importing this package is cheap (no torch): the checks import torch only when they run.
"""

from tlcourse.grading.feedback import CheckFailed, check, checker

__all__ = ["CheckFailed", "check", "checker"]

"""Public checks, one module per chapter (``ch00.py`` ...); format in :mod:`tlcourse.grading.spec`.

Learners run them with ``check("q1")``; ``tlcourse grade`` runs them (or a hidden-tests
folder of modules with the same names, given with ``--tests DIR``) in a sandbox.
"""

"""The ``tlcourse grade``, ``tlcourse exercises`` and ``tlcourse autograder`` commands.

``tlcourse/cli.py`` calls :func:`add_commands`; ``python -m tlcourse.grading.commands``
runs them on their own. Handlers return an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path


GRADE_HELP = """\
Grade submitted notebooks. Each question's answer cell runs in its own sandbox process
with a timeout; tests come from the package's public checks, or from --tests DIR
(hidden tests: modules ch00.py, ch01.py, ... in the same format). One bad submission
(corrupt file, endless loop, crash) costs only its own questions. --json and --csv
are rewritten after each graded notebook, so an interrupted run keeps the grades so far.

examples:
  tlcourse grade submissions/*.ipynb --csv grades.csv
  tlcourse grade submission.ipynb --tests ~/hidden-tests --json /autograder/results/results.json
"""

EXERCISES_HELP = """\
Generate exercises/NN_*.ipynb from solutions/NN_*.ipynb: code between
# BEGIN SOLUTION / # END SOLUTION becomes `raise NotImplementedError`, outputs are
cleared, cells tagged solution-only are dropped. `check` exits 1 when exercises/ is stale.
"""


def _positive(kind):
    """An argparse type: a number > 0 of ``kind`` (float seconds, int jobs), else a clear error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not 0 < value < float("inf"):  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be a number greater than 0, not {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def add_commands(subparsers) -> None:
    """Add ``grade``, ``exercises`` and ``autograder`` to an argparse subparsers object."""
    from tlcourse.grading import autograder, grader

    g = subparsers.add_parser("grade", help="grade submitted notebooks (table, JSON, CSV)",
                              description=GRADE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="submitted .ipynb files (or folders of them)")
    g.add_argument("--tests", metavar="DIR", help="folder of checks modules (chNN.py); default: the public checks")
    g.add_argument("--chapter", metavar="NN", help="chapter whose checks apply (default: notebook metadata, "
                   "else the NN_ prefix of the file name)")
    g.add_argument("--json", metavar="FILE", help="write Gradescope's results.json: one results object, also "
                   "for several notebooks (scores summed, tests named by notebook and question)")
    g.add_argument("--csv", metavar="FILE", help="write one row per submission")
    g.add_argument("--timeout", type=_positive(float), default=grader.DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds per question (default {grader.DEFAULT_TIMEOUT:g})")
    g.add_argument("--total-timeout", type=_positive(float), default=grader.DEFAULT_TOTAL_TIMEOUT, metavar="S",
                   help=f"seconds per notebook, all questions (default {grader.DEFAULT_TOTAL_TIMEOUT:g})")
    g.add_argument("--jobs", "-j", type=_positive(int), default=None, metavar="N",
                   help="notebooks graded in parallel (default: up to 4, one per core)")
    g.add_argument("--details", action=argparse.BooleanOptionalAction, default=None,
                   help="print per-test feedback (default: on for up to 5 notebooks)")
    g.set_defaults(func=grade_command)
    autograder.add_command(subparsers)

    e = subparsers.add_parser("exercises", help="generate exercises/ from solutions/",
                              description=EXERCISES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("action", choices=["build", "check"], help="build: write exercises/; check: fail if stale")
    e.add_argument("--solutions", default="solutions", metavar="DIR", help="default: %(default)s (in the current folder)")
    e.add_argument("--exercises", default="exercises", metavar="DIR", help="default: %(default)s (in the current folder)")
    e.set_defaults(func=exercises_command)


def grade_command(args) -> int:
    from tlcourse.grading import grader
    from tlcourse.grading.isolation import protect_from_same_user

    protect_from_same_user()  # at the process level the worker shares our uid: no ptrace of us

    paths = []
    for item in args.notebooks:
        p = Path(item)
        paths.extend(sorted(p.glob("*.ipynb")) if p.is_dir() else [p])
    if not paths:
        print("tlcourse grade: no notebooks to grade", file=sys.stderr)
        return 2
    for option, out in (("--json", args.json), ("--csv", args.csv)):
        problem = out and unwritable(Path(out))
        if problem:  # say so now, not after grading a whole class
            print(f"tlcourse grade: cannot write {option} {out}: {problem}. Pass a path in a folder "
                  "you can write to.", file=sys.stderr)
            return 2
    graded: list = [None] * len(paths)  # in input order, filled as notebooks finish
    lock = threading.Lock()
    done = [0]
    last = {"end": 0.0, "cost": 0.0}

    def progress(sub):
        # Called from the grading threads after each notebook: record it and rewrite the
        # output files, so a grader killed mid-class leaves the grades already known.
        with lock:
            done[0] += 1
            slot = _slot(paths, graded, sub.path)
            if slot is not None:
                graded[slot] = sub
            if len(paths) > 5:
                print(f"  graded {done[0]}/{len(paths)}: {sub.name}", file=sys.stderr, flush=True)
            # Each write holds every result so far; for a very large class, skip a write when
            # writing would take over a fifth of the time (the next notebook writes it anyway).
            if time.monotonic() - last["end"] < 4 * last["cost"]:
                return
            started = time.monotonic()
            _write_results(grader, args, [s for s in graded if s is not None],
                           [str(p) for p, s in zip(paths, graded) if s is None], final=False)
            last["end"] = time.monotonic()
            last["cost"] = last["end"] - started

    try:
        subs = grader.grade(paths, tests_dir=args.tests, chapter=args.chapter, timeout=args.timeout,
                            total_timeout=args.total_timeout, jobs=args.jobs, progress=progress)
    except grader.GradingError as exc:
        print(f"tlcourse grade: {exc}", file=sys.stderr)
        return 2
    show = args.details if args.details is not None else len(subs) <= 5
    if show:
        for sub in subs:
            print(grader.details(sub))
            print()
    print(grader.table(subs))
    from tlcourse.grading import isolation

    for level in sorted({s.isolation for s in subs if s.isolation}):
        print(f"isolation: {level}: {isolation.describe(level)}")
    with lock:  # a late progress call must not overwrite the final files
        return 0 if _write_results(grader, args, subs, [], final=True) else 1


def _slot(paths, graded, path: str) -> int | None:
    """Index of the first ungraded input that ``path`` names (the same string, else the same file)."""
    free = [i for i, s in enumerate(graded) if s is None]
    same = next((i for i in free if str(paths[i]) == path), None)
    if same is None:
        same = next((i for i in free if Path(paths[i]).resolve() == Path(path).resolve()), None)
    return same


def unwritable(path: Path) -> str | None:
    """Why an output file cannot be written at ``path`` (None when it can): checked before
    the work starts, not after it. A missing folder is fine when it can be created."""
    if path.is_dir():
        return "it is a folder"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest existing folder will hold the ones to create
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    return None


def _write_results(grader, args, subs, pending, final: bool) -> bool:
    """Write --json and --csv (atomically) with ``subs``; ``pending``: paths not graded yet.
    A failed write while grading is only a warning (the final write tries again); a failed
    final write is an error. True when every final write worked."""
    ok = True
    for option, path, write in (("--json", args.json, lambda: grader.write_json(subs, args.json, pending=pending)),
                                ("--csv", args.csv, lambda: grader.write_csv(subs, args.csv))):
        if not path:
            continue
        try:
            write()
        except (OSError if final else Exception) as exc:  # a partial write must never stop grading
            ok = False
            what = "error" if final else "warning"
            print(f"tlcourse grade: {what}: could not write {option} {path}: {exc}", file=sys.stderr)
            continue
        if final:
            print(f"wrote {path}")
    return ok


def exercises_command(args) -> int:
    from tlcourse.grading import exercises

    sol, ex = Path(args.solutions), Path(args.exercises)
    if not sorted(sol.glob("[0-9][0-9]_*.ipynb")):
        where = "does not exist" if not sol.is_dir() else "has no solution notebooks (NN_*.ipynb)"
        print(f"tlcourse exercises: {sol} {where}; pass --solutions DIR (the folder of "
              "solutions/NN_*.ipynb)", file=sys.stderr)
        return 1
    try:
        if args.action == "build":
            changed = exercises.build(sol, ex)
            print(f"exercises: {len(changed)} notebook(s) written" + "".join(f"\n  {p}" for p in changed))
            return 0
        problems = exercises.stale(sol, ex)
    except exercises.MarkerError as exc:
        print(f"tlcourse exercises: {exc}", file=sys.stderr)
        return 2
    if problems:
        print("exercises/ is out of date; run `tlcourse exercises build`:\n  " + "\n  ".join(problems))
        return 1
    print("exercises/ is up to date")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tlcourse")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

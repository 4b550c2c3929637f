"""How checks are written: plain test functions in a module, one module per chapter.

A checks module (``tlcourse/grading/checks/ch00.py``, or ``ch00.py`` in a hidden-tests
folder passed with ``tlcourse grade --tests DIR``) looks like::

    import torch
    from tlcourse.grading.spec import points, expect_tensor

    QUESTIONS = {
        "q1": {"title": "Top-k predictions", "functions": ["topk_predictions"]},
    }

    @points(2)
    def test_q1_shapes(topk_predictions):
        "returns (probabilities, indices), each of shape [N, k]"
        probs, idx = topk_predictions(torch.randn(4, 10), 3)
        ...

Rules, kept few on purpose:

- ``QUESTIONS`` maps a question id to its title and the function(s) the learner writes.
  ``functions`` also lets the grader find an answer cell whose metadata was stripped.
- A test belongs to question ``q`` when its name starts with ``test_<q>_``; it runs in
  file order. Its **parameters are filled by name** from the learner's namespace, so a
  test asks for exactly the functions it calls.
- The docstring is the expectation shown to the learner; the ``assert`` message (or the
  helpers below) says what went wrong. Points per test give partial credit (default 1).
- Use the ``expect_*`` helpers on the learner's return values: they check *exact* types,
  so an object with a rigged ``__eq__`` or ``__torch_function__`` cannot pass as a tensor.
  For losses: ``expect_loss`` (a 0-d tensor still in the autograd graph), ``close`` (two
  numbers within tolerance) and ``seeded_randn`` (reproducible inputs). For numbers,
  ``expect_int`` and ``expect_float`` take a number of the right kind whatever made it (a
  Python or NumPy scalar, a 0-d tensor; a whole float such as ``67.0`` as a count), never a
  bool, so ``check()`` and ``tlcourse grade`` accept the same answers.

This module must not import torch or numpy at import time (``import tlcourse.grading`` stays cheap).
"""

from __future__ import annotations

import sys

VISIBILITIES = ("visible", "hidden", "after_due_date", "after_published")


def points(value: float, visibility: str = "visible"):
    """Decorator: the test is worth ``value`` points; ``visibility`` is Gradescope's."""
    if value < 0:
        raise ValueError("points must be >= 0")
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {VISIBILITIES}")

    def mark(fn):
        fn.points = float(value)
        fn.visibility = visibility
        return fn

    return mark


def expect_tensor(value, what: str = "the result"):
    """``value`` as a plain detached ``torch.Tensor``; fails kindly for anything else.

    ``type(value) is torch.Tensor`` (not ``isinstance``): a subclass could override
    ``__torch_function__`` and make every comparison True.
    """
    import torch

    if type(value) is torch.nn.Parameter:
        value = value.data
    assert type(value) is torch.Tensor, (
        f"{what} should be a torch.Tensor, but it is a {_type_name(value)}"
    )
    return value.detach()


def expect_int(value, what: str = "the result") -> int:
    """``value`` as a Python int: a count is a count whatever computed it.

    Accepted: a Python ``int``; a NumPy integer (``numpy.int64``, ...); a 0-d integer tensor
    or NumPy array; and a float that is a whole number (``67.0``: a Python or NumPy float, or
    a 0-d floating tensor or array). Refused: ``True``/``False`` (of any kind), a float that
    is not whole (``66.5``, ``nan``), a tensor with more than one value, anything else.
    Types are checked exactly (a subclass is refused), by name: neither numpy nor torch is
    imported here.
    """
    kind, number = _number(value)
    if kind == "int":
        return number
    if kind == "float" and number.is_integer():  # False for nan and inf too
        return int(number)
    if kind == "float":
        raise AssertionError(f"{what} should be a whole number (a count), but it is {number!r}")
    raise AssertionError(f"{what} should be a Python int, but it is {_number_kind(value, kind)}")


def expect_float(value, what: str = "the result") -> float:
    """``value`` as a Python float.

    Accepted: a Python ``float`` or ``int``; a NumPy floating or integer scalar
    (``numpy.float32``, ``numpy.int64``, ...); a 0-d tensor or NumPy array of a floating or
    integer dtype. Refused: ``True``/``False`` (of any kind), complex numbers, a tensor with
    more than one value, anything else. Types are checked exactly (a subclass is refused),
    by name: neither numpy nor torch is imported here.
    """
    kind, number = _number(value)
    if kind in ("int", "float"):
        return float(number)
    raise AssertionError(f"{what} should be a Python float, but it is {_number_kind(value, kind)}")


def _number(value) -> tuple[str | None, int | float | None]:
    """``("int", n)`` or ``("float", x)`` for a real number of a kind the checks accept (see
    :func:`expect_int`), as a plain Python number; ``("bool", None)`` for a boolean of any
    kind, ``("shape", None)`` for a tensor or array with more than one value, ``("complex",
    None)``, or ``(None, None)``."""
    t = type(value)
    if t is int:
        return "int", value
    if t is float:
        return "float", value
    if t is bool:
        return "bool", None
    if t is complex:
        return "complex", None
    module, name = getattr(t, "__module__", ""), getattr(t, "__name__", "")
    if module == "torch" and name == "Tensor":
        torch = sys.modules.get("torch")
        if torch is None or t is not torch.Tensor:
            return None, None
        if value.ndim != 0:
            return "shape", None
        if value.dtype == torch.bool:
            return "bool", None
        if value.is_complex():
            return "complex", None
        return ("float", float(value.item())) if value.is_floating_point() else ("int", int(value.item()))
    if module == "numpy":
        np = sys.modules.get("numpy")
        if np is None or getattr(np, name, None) is not t:  # numpy's own type, not a look-alike
            return None, None
        if t is np.ndarray:
            if value.ndim != 0:
                return "shape", None
            code = value.dtype.kind
        else:
            code = getattr(np.dtype(t), "kind", "") if issubclass(t, np.generic) else ""
        if code == "b":
            return "bool", None
        if code and code in "iu":
            return "int", int(value)
        if code == "f":
            return "float", float(value)
        if code == "c":
            return "complex", None
    return None, None


def _number_kind(value, kind: str | None) -> str:
    if kind == "bool":
        return f"True/False (a {_type_name(value)}), not a number"
    if kind == "shape":
        return f"a {_type_name(value)} of shape {list(value.shape)}: return a single number"
    if kind == "complex":
        return "a complex number"
    return f"a {_type_name(value)}"


def expect_tuple(value, length: int, what: str = "the result") -> tuple:
    """``value`` as a tuple (or list) of exactly ``length`` items."""
    # isinstance: torch's (values, indices) results are tuple subclasses; the items
    # themselves are then checked with exact types.
    assert isinstance(value, (tuple, list)), (
        f"{what} should be a tuple of {length} items, but it is a {_type_name(value)}"
    )
    assert len(value) == length, f"{what} should have {length} items, but it has {len(value)}"
    return tuple(value)


def expect_shape(tensor, shape, what: str = "the result") -> None:
    got = tuple(tensor.shape)
    assert got == tuple(shape), f"{what} should have shape {list(shape)}, but it has {list(got)}"


def expect_close(actual, expected, what: str = "the result", atol: float = 1e-5, rtol: float = 1e-4):
    """``actual`` equals ``expected`` (both tensors) up to float tolerance."""
    import torch

    actual = expect_tensor(actual, what)
    expected = torch.as_tensor(expected)
    expect_shape(actual, expected.shape, what)
    if not actual.is_floating_point() and not expected.is_floating_point():
        ok = bool(torch.equal(actual, expected))
        diff = "" if ok else f" ({int((actual != expected).sum())} entries differ)"
    else:
        a, e = actual.double(), expected.double()
        ok = bool(torch.allclose(a, e, atol=atol, rtol=rtol))
        diff = "" if ok else f" (largest difference {float((a - e).abs().max()):.4g})"
    assert ok, f"{what} has the right shape but the wrong values{diff}"


def expect_loss(value, what: str = "the loss"):
    """``value`` as a 0-d ``torch.Tensor``, still attached to the autograd graph when it is
    (unlike :func:`expect_tensor`, which detaches): a loss exists to send gradients."""
    if type(value) in (float, int) or type(value).__module__ == "numpy":
        raise AssertionError(f"{what} returned a {type(value).__name__}; return the tensor itself (no .item()): "
                             "a loss must stay in the autograd graph to train anything")
    expect_tensor(value, what)
    assert value.ndim == 0, (f"{what} should be a scalar (0-d) tensor, as a loss is; it has shape "
                             f"{list(value.shape)} (sum or average it down to one number)")
    return value


def close(actual: float, expected: float, rtol: float = 1e-4, atol: float = 1e-7) -> bool:
    """Two numbers agree up to float tolerance: ``|actual - expected| <= atol + rtol * |expected|``."""
    return abs(float(actual) - float(expected)) <= atol + rtol * abs(float(expected))


def first_match(got: float, want: float, variants) -> str | None:
    """The message of the first ``(value, message)`` variant (a known mistake's value) that
    ``got`` equals while the right value ``want`` does not; ``None`` when no known mistake fits."""
    import math

    for wrong, message in variants:
        wrong = float(wrong)
        if math.isfinite(wrong) and close(got, wrong) and not close(wrong, want):
            return message
    return None


def seeded_randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0):
    """A reproducible ``randn`` tensor (its own generator; the global random state is untouched)."""
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _type_name(value) -> str:
    t = type(value)
    if t.__module__ == "tlcourse.grading.wire" and t.__name__ in ("RemoteObject", "RemoteCallable"):
        return str(value.__dict__.get("_tl_type", t.__name__))  # the learner's type, as named in the sandbox
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"

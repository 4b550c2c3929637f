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
  numbers within tolerance) and ``seeded_randn`` (reproducible inputs).

This module must not import torch at import time (``import tlcourse.grading`` stays cheap).
"""

from __future__ import annotations

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
    """``value`` as a Python int (a 0-d integer tensor is accepted and converted)."""
    import torch

    if type(value) is torch.Tensor and value.ndim == 0 and not value.is_floating_point():
        return int(value.item())
    assert type(value) is int, f"{what} should be a Python int, but it is a {_type_name(value)}"
    return value


def expect_float(value, what: str = "the result") -> float:
    """``value`` as a Python float (an int, a 0-d floating tensor or a numpy scalar is accepted)."""
    import torch

    if type(value) is torch.Tensor and value.ndim == 0 and value.is_floating_point():
        return float(value.item())
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    assert type(value) in (float, int), f"{what} should be a Python float, but it is a {_type_name(value)}"
    return float(value)


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
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"

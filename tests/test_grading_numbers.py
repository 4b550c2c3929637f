"""Numbers of the right kind (:func:`tlcourse.grading.spec.expect_int` / ``expect_float``).

A count returned as ``numpy.int64`` or ``67.0`` once graded 0 while being right. The checks now
take a number of the right kind whatever made it (Python, NumPy, a 0-d tensor), and still
refuse what is not one: a bool, a fraction where a count is asked, a tensor of many values, a
look-alike type. Both ``check()`` and ``tlcourse grade`` use these helpers, so they agree.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from tlcourse.grading import spec


class IntSub(int):
    pass


class FloatSub(float):
    pass


class NpIntSub(np.int64):
    pass


class FakeTensor:  # a look-alike by name: torch.Tensor's module and name, not its type
    __module__ = "torch"
    ndim = 0


FakeTensor.__name__ = FakeTensor.__qualname__ = "Tensor"


class FakeInt64:
    __module__ = "numpy"


FakeInt64.__name__ = FakeInt64.__qualname__ = "int64"

WHOLE = [
    67, np.int8(67), np.int16(67), np.int32(67), np.int64(67), np.uint8(67), np.uint16(67), np.uint32(67),
    np.uint64(67), np.longlong(67), np.intp(67), torch.tensor(67), torch.tensor(67, dtype=torch.int32),
    torch.tensor(67, dtype=torch.uint8), np.array(67), 67.0, np.float64(67.0), np.float32(67.0), np.float16(67.0),
    torch.tensor(67.0), torch.tensor(67.0, dtype=torch.float64), torch.tensor(67.0, requires_grad=True), np.array(67.0),
]
NOT_INTS = [
    (True, "True/False (a bool), not a number"), (np.bool_(True), "True/False"), (torch.tensor(True), "True/False"),
    (np.array(False), "True/False"), (66.5, "whole number (a count), but it is 66.5"),
    (np.float64(66.5), "whole number"), (torch.tensor(66.5), "whole number"), (float("nan"), "whole number"),
    (float("inf"), "whole number"), (1 + 0j, "complex"), (np.complex64(1), "complex"),
    (torch.tensor(1 + 0j), "complex"), (torch.tensor([67]), "of shape [1]: return a single number"),
    (np.array([67, 1]), "of shape [2]"), ("67", "a str"), (None, "a NoneType"), ([67], "a list"),
    (IntSub(67), "IntSub"), (FloatSub(67.0), "FloatSub"), (NpIntSub(67), "NpIntSub"),
    (FakeTensor(), "torch.Tensor"), (FakeInt64(), "numpy.int64"),
]
NUMBERS = [0.625, 5, np.float64(0.625), np.float32(0.625), np.float16(0.625), np.int64(5), np.uint8(5),
           torch.tensor(0.625), torch.tensor(5), torch.tensor(0.625, dtype=torch.float64), np.array(0.625), np.array(5)]
NOT_FLOATS = [
    (True, "True/False (a bool), not a number"), (np.bool_(False), "True/False"), (torch.tensor(False), "True/False"),
    (0.5j, "complex"), (torch.tensor([0.625]), "of shape [1]"), ("0.625", "a str"), (None, "NoneType"),
    (FloatSub(0.625), "FloatSub"), (NpIntSub(5), "NpIntSub"), (FakeTensor(), "torch.Tensor"),
]


def _value_id(v) -> str:
    """A test id that is the same in every process (pytest-xdist's workers must collect the same
    ids): a repr without the object's memory address."""
    return v if isinstance(v, str) else re.sub(r" (object )?at 0x[0-9a-f]+", "", repr(v))[:30]


@pytest.mark.parametrize("value", WHOLE, ids=lambda v: f"{type(v).__module__}.{type(v).__name__}")
def test_a_count_of_any_kind_is_a_count(value):
    got = spec.expect_int(value, "count_parameters(model)")
    assert type(got) is int and got == 67


@pytest.mark.parametrize("value,words", NOT_INTS, ids=_value_id)
def test_what_is_not_a_count_is_refused_kindly(value, words):
    with pytest.raises(AssertionError) as err:
        spec.expect_int(value, "count_parameters(model)")
    assert str(err.value).startswith("count_parameters(model) should be a")
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize("value", NUMBERS, ids=lambda v: f"{type(v).__module__}.{type(v).__name__}")
def test_a_number_of_any_kind_is_a_float(value):
    got = spec.expect_float(value, "accuracy(logits, labels)")
    assert type(got) is float and got in (0.625, 5.0)


@pytest.mark.parametrize("value,words", NOT_FLOATS, ids=_value_id)
def test_what_is_not_a_number_is_refused_kindly(value, words):
    with pytest.raises(AssertionError) as err:
        spec.expect_float(value, "accuracy(logits, labels)")
    assert str(err.value).startswith("accuracy(logits, labels) should be a Python float, but it is ")
    assert words in str(err.value), str(err.value)


def test_spec_imports_neither_torch_nor_numpy():
    code = ("import sys; import tlcourse.grading.spec as s; s.expect_int(3); s.expect_float(2.5)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')]\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_accepts_a_count_returned_as_numpy_int_or_whole_float():
    """The issue's case in the notebook: ``check("q2")`` passes (``tlcourse grade`` gives full marks
    too: tests/test_check_agreement.py)."""
    from tlcourse.grading import checker

    check = checker("00")
    for wrap in ("np.int64", "float", "torch.tensor"):
        ns = {"np": np, "torch": torch}
        exec("def count_parameters(model, trainable_only=False):\n"
             f"    return {wrap}(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))\n",
             ns)
        out = io.StringIO()
        with redirect_stdout(out):
            check("q2", namespace=ns)
        assert out.getvalue().startswith("✅ q2"), (wrap, out.getvalue())

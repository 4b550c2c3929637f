"""The channel between checker and worker carries data only (tlcourse.grading.wire).

These tests encode on one side and decode on the other without processes in between: what
a hostile worker could send is exactly what a test can hand to the checker's decoder.
"""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tlcourse.grading import wire


@pytest.fixture()
def sessions():
    a, b = socket.socketpair()
    checker, worker = wire.Session(a, "c", {}), wire.Session(b, "w", {})
    yield checker, worker
    a.close()
    b.close()


def _send(src, dst, value, import_classes):
    enc = wire.Encoder(src)
    node = enc(value)
    return wire.Decoder(dst, enc.blobs, import_classes=import_classes)(node)


def test_plain_values_round_trip(sessions):
    checker, worker = sessions
    value = {"a": [1, 2.5, float("nan"), float("-inf"), 3 + 4j, 2 ** 70], ("t", 1): (None, True, "x"),
             "b": b"\x00\xff", "s": {1, 2}, "sl": slice(1, None, 2), "r": range(0, 10, 3),
             "dt": torch.float16, "dev": torch.device("cpu"), "size": torch.Size([2, 3])}
    got = _send(checker, worker, value, True)
    assert got["a"][0] == 1 and got["a"][1] == 2.5 and np.isnan(got["a"][2]) and got["a"][3] == float("-inf")
    assert got["a"][4] == 3 + 4j and got["a"][5] == 2 ** 70
    assert got[("t", 1)] == (None, True, "x") and got["b"] == b"\x00\xff" and got["s"] == {1, 2}
    assert got["sl"] == slice(1, None, 2) and got["r"] == range(0, 10, 3)
    assert got["dt"] is torch.float16 and got["dev"] == torch.device("cpu") and type(got["size"]) is torch.Size


def test_tensors_and_numpy_keep_dtype_shape_and_values(sessions):
    checker, worker = sessions
    for t in (torch.randn(3, 4), torch.arange(6).reshape(2, 3), torch.tensor(2.5), torch.zeros(0, 5),
              torch.tensor([True, False]), torch.randn(2, 2).to(torch.bfloat16), torch.randn(4)[::2]):
        got = _send(checker, worker, t, True)
        assert type(got) is torch.Tensor and got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)
    for v in (np.int64(67), np.float32(0.5), np.arange(4, dtype=np.uint8)):
        got = _send(worker, checker, v, False)
        assert type(got) is type(v) and np.array_equal(got, v)


def test_modules_keep_identity_and_state_goes_back(sessions):
    """A module sent to the worker and frozen there: the checker's own object, frozen."""
    checker, worker = sessions
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    params = list(model.parameters())
    mirror = _send(checker, worker, model, True)
    assert type(mirror) is nn.Sequential and mirror is not model
    for p in mirror[0].parameters():
        p.requires_grad_(False)
    mirror[1].running_mean += 1
    mirror[2] = nn.Linear(4, 7)  # a new head, made in the worker
    mirror.eval()
    back = _send(worker, checker, mirror, False)
    assert back is model and back[0].weight is params[0]
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert torch.equal(model[1].running_mean, torch.ones(4)) and not model.training
    assert type(model[2]) is nn.Linear and model[2].out_features == 7 and model[2].weight is not params[4]


def test_in_place_changes_to_a_tensor_go_back_to_the_same_object(sessions):
    """Values and shape: a learner's ``mask.unsqueeze_(-1)`` reshapes the checker's own tensor."""
    checker, worker = sessions
    mask, weights = torch.ones(2, 5, dtype=torch.long), torch.zeros(3, requires_grad=True)
    got_mask, got_weights = _send(checker, worker, (mask, weights), True)
    got_mask.unsqueeze_(-1)
    got_mask[0, 0, 0] = 7
    with torch.no_grad():
        got_weights.add_(1.5)
    back_mask, back_weights = _send(worker, checker, (got_mask, got_weights), False)
    assert back_mask is mask and mask.shape == (2, 5, 1) and mask[0, 0, 0] == 7 and mask.sum() == 16
    assert back_weights is weights and weights.requires_grad and torch.equal(weights.detach(), torch.full((3,), 1.5))
    again = _send(checker, worker, mask, True)    # and the next call sees the new shape
    assert again is got_mask and again.shape == (2, 5, 1)


def test_a_tensor_that_grew_or_shrank_and_a_reshaped_view_leave_the_checkers_own_alone(sessions):
    """``x.resize_(0, 3)`` on the checker's input would turn a reference computed from it after the
    call into an empty tensor that an empty answer equals; a view given new storage would stop sharing
    its base's. Both come back as new tensors."""
    checker, worker = sessions
    x, base = torch.arange(6.0).reshape(2, 3), torch.arange(8.0)
    view = base[2:6]
    got_x, got_view = _send(checker, worker, (x, view), True)
    got_x.resize_(0, 3)
    got_view.unsqueeze_(0)
    back_x, back_view = _send(worker, checker, (got_x, got_view), False)
    assert back_x is not x and back_x.shape == (0, 3) and torch.equal(x, torch.arange(6.0).reshape(2, 3))
    assert back_view is not view and back_view.shape == (1, 4) and view.shape == (4,) and view._base is base


def test_a_learner_class_becomes_a_mirror_whose_forward_runs_remotely(sessions):
    checker, worker = sessions

    class TwoHeads(nn.Module):  # as if defined in a notebook cell
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Linear(2, 3), nn.Linear(2, 3)

    TwoHeads.__module__ = "__main__"
    got = _send(worker, checker, TwoHeads(), False)
    assert isinstance(got, nn.Module) and type(got).__name__ == "RemoteModule"
    assert [type(m) for m in got.children()] == [nn.Linear, nn.Linear]
    assert sum(p.numel() for p in got.parameters()) == 18


def test_the_checker_never_imports_what_a_worker_names(sessions):
    checker, _ = sessions
    assert "antigravity" not in sys.modules
    node = {"$": "mod", "id": "w1", "cls": "antigravity:Thing", "training": True, "attrs": {}, "opaque": False,
            "params": {}, "buffers": {}, "children": {}}
    got = wire.Decoder(checker, [], import_classes=False)(node)
    assert type(got).__name__ == "RemoteModule" and "antigravity" not in sys.modules
    # An allow-listed, already imported class is rebuilt as itself.
    node = dict(node, id="w2", cls="torch.nn.modules.linear:Linear")
    assert type(wire.Decoder(checker, [], import_classes=False)(node)) is nn.Linear


@pytest.mark.parametrize("node, blobs", [
    ({"$": "t", "id": "w1", "dtype": "float32", "shape": [4], "b": 0}, [b"\x00" * 15]),  # wrong size
    ({"$": "t", "id": "w1", "dtype": "object", "shape": [1], "b": 0}, [b"\x00" * 8]),  # not allowed
    ({"$": "np", "dtype": "object", "shape": [1], "b": 0}, [b"\x00" * 8]),
    ({"$": "pickle", "v": "cos\nsystem\n"}, []),  # unknown type
    ({"$": "dtype", "v": "__class__"}, []),
    ({"$": "mod", "id": "w1", "cls": "torch.nn.modules.linear:Linear", "training": True,
      "attrs": {"__class__": 1}, "params": {}, "buffers": {}, "children": {}}, []),
    ({"$": "mod", "id": "w1", "cls": "torch.nn.modules.linear:Linear", "training": True, "attrs": {},
      "params": {"weight": {"$": "t", "id": "w2", "dtype": "float32", "shape": [], "b": 0}}, "buffers": {},
      "children": {}}, [b"\x00" * 4]),  # a parameter that is not a Parameter
    ({"$": "ref", "id": "c999"}, []),
    ({"$": "t", "id": "w1", "dtype": "float32", "shape": [1], "b": 5}, []),
])
def test_malformed_data_is_refused(sessions, node, blobs):
    checker, _ = sessions
    with pytest.raises(wire.WireError):
        wire.Decoder(checker, blobs, import_classes=False)(node)


def test_deep_nesting_is_refused(sessions):
    checker, worker = sessions
    value = []
    for _ in range(wire.MAX_DEPTH + 5):
        value = [value]
    with pytest.raises(wire.WireError):
        _send(worker, checker, value, False)
    node = []
    for _ in range(wire.MAX_DEPTH + 5):
        node = [node]
    with pytest.raises(wire.WireError):
        wire.Decoder(checker, [], import_classes=False)(node)


def test_other_objects_travel_as_handles(sessions):
    checker, worker = sessions

    class Rigged(torch.Tensor):
        pass

    got = _send(worker, checker, torch.zeros(2).as_subclass(Rigged), False)
    assert type(got) is wire.RemoteObject and "Rigged" in repr(got)
    fn = _send(worker, checker, lambda x: x, False)
    assert type(fn) is wire.RemoteCallable


def test_exceptions_keep_their_family_message_and_learner_frames():
    exc = wire.rebuild_exception({"type": "MyError", "base": "ValueError", "msg": "bad k",
                                  "frames": [["<cell 4>", 3, "topk_predictions", "raise MyError('bad k')"]]})
    assert isinstance(exc, ValueError) and type(exc).__name__ == "MyError" and str(exc) == "bad k"
    assert exc.__tlcourse_frames__ == [("<cell 4>", 3, "topk_predictions", "raise MyError('bad k')")]
    stop = wire.rebuild_exception({"type": "KeyboardInterrupt", "msg": ""})
    assert isinstance(stop, Exception)  # must not stop the checker
    assert str(wire.rebuild_exception({"type": "KeyError", "base": "KeyError", "msg": "'x'"})) == "'x'"


def test_frames_that_are_not_messages_end_the_channel():
    a, b = socket.socketpair()
    try:
        a.sendall(b"\xff\xff\xff\x7f\x00\x00\x00\x00")  # a 2 GB header
        with pytest.raises(wire.WorkerGone):
            wire.recv_frame(b, None)
    finally:
        a.close()
        b.close()

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


# --- views of what the checker sent -------------------------------------------------------------

def _call_and_reply(checker, worker, args, learner, decode=True):
    """One call as the worker runs it: the checker's ``args`` decoded in the worker, ``learner`` run
    on them, the reply encoded (the state of everything received first, then the result) and decoded
    by the checker in that order. The result as the checker sees it, and the reply's nodes and blobs."""
    enc = wire.Encoder(checker)
    call = wire.Decoder(worker, enc.blobs, import_classes=True)
    got = call(enc(list(args)))
    touched = [o for o in call._memo.values() if isinstance(o, (torch.Tensor, nn.Module))]
    result = learner(*got)
    out = wire.Encoder(worker)
    state = [out(o) for o in touched]
    node = out(result)
    if not decode:
        return None, (state, node, out.blobs)
    dec = wire.Decoder(checker, out.blobs, import_classes=False)
    for n in state:
        dec(n)
    return dec(node), (state, node, out.blobs)


def test_a_view_of_a_tensor_sent_comes_back_as_a_view_of_the_checkers_own(sessions):
    """``theta[k][...]``, ``x.view(-1)``, ``x[:, ::2]``, a row of a module's weight, inside
    containers: changing the result in place changes the checker's input, as in one process; the
    learner's own in-place change to the input arrives first."""
    checker, worker = sessions
    x, model = torch.arange(12.0).reshape(3, 4), nn.Linear(4, 2)
    weight = model.weight.detach().clone()

    def learner(x, model):
        x.mul_(2)  # an in-place change to the input itself, then views of it
        row = model.weight.detach()[1]  # under no_grad, model.weight[1] would require grad: a new tensor
        return {"all": x[...], "flat": [x.view(-1)], "cols": (x[:, ::2], x.t()), "one": x[2, 3],
                "wide": x[0].expand(5, 4), "row": row, "same": x[...]}

    got, _ = _call_and_reply(checker, worker, (x, model), learner)
    assert torch.equal(x, torch.arange(12.0).reshape(3, 4) * 2)
    for name, want in (("all", x), ("flat", x.view(-1)), ("cols", x[:, ::2]), ("one", x[2, 3]),
                       ("wide", x[0].expand(5, 4)), ("row", model.weight[1])):
        t = got[name][0] if name in ("flat", "cols") else got[name]
        assert type(t) is torch.Tensor and torch.equal(t, want) and t.stride() == want.stride(), name
        assert t.untyped_storage().data_ptr() == want.untyped_storage().data_ptr(), name
        assert t.storage_offset() == want.storage_offset() and not t.requires_grad, name
    assert got["cols"][1].shape == (4, 3) and torch.equal(got["cols"][1], x.t())
    got["all"].add_(1)
    assert torch.equal(x, torch.arange(12.0).reshape(3, 4) * 2 + 1)
    got["one"].zero_()
    assert x[2, 3] == 0
    got["row"].fill_(7)
    assert torch.equal(model.weight[1].detach(), torch.full((4,), 7.0)) and torch.equal(model.weight[0], weight[0])
    assert got["same"] is not got["all"] and torch.equal(got["same"], x)  # two views there, two here


def test_a_view_stays_inside_the_tensor_sent_not_the_storage_it_shares_here(sessions):
    """The checker's tensor may itself be a view of a larger one (never sent); a view of it lands at
    the right offset, and a non-contiguous one (laid out otherwise in the worker) comes back as a
    new tensor with the right values."""
    checker, worker = sessions
    big = torch.arange(10.0)
    window, strided = big[3:7], torch.arange(8.0)[::2]
    got, _ = _call_and_reply(checker, worker, (window, strided), lambda w, s: (w[1:], s[1:]))
    assert torch.equal(got[0], torch.tensor([4.0, 5.0, 6.0]))
    got[0].fill_(-1)
    assert torch.equal(big, torch.tensor([0.0, 1, 2, 3, -1, -1, -1, 7, 8, 9]))
    assert torch.equal(got[1], torch.tensor([2.0, 4.0, 6.0]))
    got[1].fill_(-1)
    assert torch.equal(strided, torch.tensor([0.0, 2, 4, 6]))


def test_views_the_checker_did_not_send_a_base_of_in_the_call_come_back_as_new_tensors(sessions):
    """A view of a tensor the worker made, one that requires grad, one of another dtype, an
    ``nn.Parameter`` made from an input, a view of a tensor sent in an earlier call only: new
    tensors, as before."""
    checker, worker = sessions
    x, w = torch.arange(6.0), torch.ones(3, requires_grad=True)
    kept = {}

    def learner(x, w):
        kept["x"] = x
        own = torch.zeros(4)
        return own[1:], w[1:], x.view(torch.int32), nn.Parameter(x), x.clone()[2:]

    got, (_, node, _) = _call_and_reply(checker, worker, (x, w), learner)
    assert all(n["$"] == "t" for n in node["v"])
    assert torch.equal(got[0], torch.zeros(3)) and got[1].requires_grad and got[1].grad_fn is None
    assert type(got[3]) is nn.Parameter and torch.equal(got[3].detach(), x)
    for t in got:
        t.data.fill_(5)
    assert torch.equal(x, torch.arange(6.0)) and torch.equal(w.detach(), torch.ones(3))
    later, (_, node, _) = _call_and_reply(checker, worker, (), lambda: kept["x"][1:])
    assert node["$"] == "t" and torch.equal(later, torch.arange(1.0, 6.0))
    later.zero_()
    assert torch.equal(x, torch.arange(6.0))


def _hostile_view(sessions, changes):
    """The honest reply to a call that returns ``x[1]``, its view node changed by ``changes``
    (``None`` removes a field; ``"no state"`` leaves out the state that decodes the base first)."""
    checker, worker = sessions
    x, y = torch.arange(12.0).reshape(3, 4), torch.zeros(2)
    _send(checker, worker, y, True)  # sent in an earlier call only
    _, (state, node, blobs) = _call_and_reply(checker, worker, (x, lambda v: v), lambda x, fn: (x[1], fn),
                                            decode=False)
    view = node["v"][0]
    assert view["$"] == "view" and view["base"] == checker.ids[id(x)]
    for k, v in changes.items():
        if k == "no state":
            state = []
        elif v is None:
            view.pop(k)
        else:
            view[k] = v(checker, x, y) if callable(v) else v
    return checker, x, state, view, blobs


@pytest.mark.parametrize("changes", [
    {"base": "c999"},                                              # no such id
    {"base": lambda c, x, y: c.ids[id(y)]},                        # a tensor sent before, not in this call
    {"base": lambda c, x, y: next(k for k, o in c.objects.items() if callable(o) and k.startswith("c"))},
    {"base": "w1"},                                                # the worker's own id
    {"base": None}, {"base": 3},
    {"no state": True},                                            # its base not decoded in this message
    {"dtype": "float64"}, {"dtype": "object"}, {"dtype": None},
    {"offset": -1}, {"offset": 12}, {"offset": 9}, {"offset": 2 ** 62}, {"offset": 1.0}, {"offset": True},
    {"offset": "4"}, {"offset": None},
    {"size": [-1]}, {"size": [13]}, {"size": [2 ** 62]}, {"size": [0]}, {"size": [2, 2]}, {"size": [4.0]},
    {"size": [2 ** 40], "stride": [0]},                            # inside the base, but too many elements
    {"size": [1] * 65, "stride": [1] * 65},
    {"size": 4}, {"size": None},
    {"stride": [-1]}, {"stride": [3]}, {"stride": [2 ** 62]}, {"stride": [True]}, {"stride": []},
    {"id": "c1"},                                                  # an id of the checker's
    {"id": 5}, {"id": ""}, {"id": "w" * 50},
])
def test_a_malformed_or_hostile_view_is_refused(sessions, changes):
    checker, x, state, view, blobs = _hostile_view(sessions, changes)
    before = x.clone()
    dec = wire.Decoder(checker, blobs, import_classes=False)
    for n in state:
        dec(n)
    with pytest.raises(wire.WireError):
        dec(view)
    assert torch.equal(x, before)


def test_the_unchanged_hostile_view_is_accepted(sessions):
    """The reply :func:`_hostile_view` changes is itself well-formed: the refusals are the changes'."""
    checker, x, state, view, blobs = _hostile_view(sessions, {})
    dec = wire.Decoder(checker, blobs, import_classes=False)
    for n in state:
        dec(n)
    got = dec(view)
    got.fill_(3)
    assert torch.equal(x[1], torch.full((4,), 3.0)) and torch.equal(x[0], torch.arange(4.0))


def test_a_view_may_not_reach_past_its_base_into_the_storage_it_shares_here(sessions):
    """``big[3:7]`` was sent, ``big`` was not: a view node within ``big``'s storage but past the
    four elements sent is refused, though ``as_strided`` would allow it."""
    checker, worker = sessions
    big = torch.arange(10.0)
    _, (state, node, blobs) = _call_and_reply(checker, worker, (big[3:7],), lambda w: w[1:], decode=False)
    assert node["$"] == "view" and (node["offset"], node["size"], node["stride"]) == (1, [3], [1])
    for offset, size, stride in ((4, [1], [1]), (1, [4], [1]), (0, [3], [2]), (3, [2], [0])):
        dec = wire.Decoder(checker, blobs, import_classes=False)
        for n in state:
            dec(n)
        hostile = dict(node, offset=offset, size=size, stride=stride)
        if (offset, size, stride) == (3, [2], [0]):  # the last element, twice: inside, accepted
            assert torch.equal(dec(hostile), torch.tensor([6.0, 6.0]))
            continue
        with pytest.raises(wire.WireError, match="outside its base"):
            dec(hostile)
    assert torch.equal(big, torch.arange(10.0))


def test_a_view_of_an_input_that_grew_is_a_view_of_the_new_tensor_not_of_the_checkers(sessions):
    """``x.set_(...)`` to 20 elements arrives as a new tensor (the checker's own stays as it was);
    a view of the grown tensor is a view of that new one."""
    checker, worker = sessions
    x = torch.arange(12.0)

    def learner(x):
        x.set_(torch.ones(20))
        return x[14:]

    got, _ = _call_and_reply(checker, worker, (x,), learner)
    assert torch.equal(got, torch.ones(6)) and torch.equal(x, torch.arange(12.0))
    got.zero_()
    assert torch.equal(x, torch.arange(12.0))


def test_a_view_of_a_tensor_the_worker_forged_under_a_checker_id_is_refused(sessions):
    """A state node under an id the checker never gave a tensor (``c77``, or a function's) decodes
    as a new tensor; a view may not name it as a base."""
    checker, worker = sessions
    x, fn = torch.arange(3.0), (lambda v: v)
    _, (state, node, blobs) = _call_and_reply(checker, worker, (x, fn), lambda x, fn: x[1:], decode=False)
    blobs = blobs + [torch.tensor([9.0, 9.0, 9.0]).numpy().tobytes()]
    for key in ("c77", checker.ids[id(fn)]):
        dec = wire.Decoder(checker, blobs, import_classes=False)
        for n in state:
            dec(n)
        if key == "c77":
            dec({"$": "t", "id": key, "dtype": "float32", "shape": [3], "b": len(blobs) - 1})
        with pytest.raises(wire.WireError, match="not sent in this call"):
            dec(dict(node, base=key, offset=0))
    assert torch.equal(x, torch.arange(3.0))


def test_a_tensor_sent_under_the_id_of_a_function_is_refused(sessions):
    """The worker names a checker function's id in a tensor node: refused, the function stays."""
    checker, worker = sessions
    fn = lambda v: v  # noqa: E731
    _, (state, node, blobs) = _call_and_reply(checker, worker, (torch.zeros(2), fn), lambda x, fn: fn, decode=False)
    key = checker.ids[id(fn)]
    blobs = blobs + [torch.zeros(2).numpy().tobytes()]
    dec = wire.Decoder(checker, blobs, import_classes=False)
    with pytest.raises(wire.WireError, match="not a tensor"):
        dec({"$": "t", "id": key, "dtype": "float32", "shape": [2], "b": len(blobs) - 1})
    assert checker.objects[key] is fn

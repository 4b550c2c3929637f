"""The channel between the trusted checker and a sandboxed worker: data only, both ways.

The tests run in the checker; the learner's functions run in the worker. A test calls a
learner function through a proxy, and everything that crosses is *data*: framed messages of
JSON plus raw byte blobs, never pickles. Decoding builds only values of an allow-list of
types, so nothing a worker sends can run code in the checker:

- ``None``, bools, ints, floats (NaN and infinities included), complex numbers, strings,
  bytes, lists, tuples, dicts, sets, slices; ``torch.dtype``, ``torch.device``, ``torch.Size``;
- tensors and parameters (dtype from an allow-list, shape, bytes, ``requires_grad``, ``.grad``);
  NumPy arrays and scalars of numeric dtypes;
- ``nn.Module`` s as *structure and state*: class, training flag, plain-data attributes,
  parameters, buffers and children. The checker rebuilds a worker's module as its real class
  only when that class is an ``nn.Module`` from an allow-listed package that the checker has
  already imported (torch.nn, tlcourse, torchvision, timm) and the module carries no hooks
  or non-data attributes; anything else (a class the learner wrote, a patched ``forward``)
  becomes a :class:`RemoteModule`, a mirror whose ``forward`` runs in the worker;
- ``DataLoader(TensorDataset(...))`` with its batch size (what the checks hand to learners);
- a learner's exception, as its type name, message and the learner's frames.

Objects keep their identity across the boundary: every tensor, parameter and module that
crosses gets an id, and a worker that returns (or keeps) an object it was given refers to it
by that id, so ``replace_head(model) is model`` and "the backbone's parameters are in
``model.parameters()``" hold on the checker's side. After each call the worker sends back the
state of every module and tensor it was given, which the checker applies in place: in-place
behaviour (a function that freezes the model it is given, or reshapes a tensor with ``unsqueeze_``)
is judged on that state.

Gradients cross too (:class:`RemoteCall`): a call whose inputs require grad is one node of the
checker's autograd graph, whose backward asks the worker for the vector-Jacobian product; and a
tensor the checker built with a graph (a loss) reaches the worker as a node whose backward asks
the checker. Either side serves the other's requests while it waits for a reply
(:meth:`Session.request`), so these nest.

What does not cross: functions and objects of other kinds travel as handles
(:class:`RemoteCallable`, :class:`RemoteObject`); a graph freed by ``backward()`` without
``retain_graph`` in the worker is not freed in the checker.

Views: a tensor the worker returns that shares storage with a tensor the checker sent in that
call (``theta[k][...]``, ``x.view(-1)``, ``x[:2]``, a slice of a module's parameter) arrives as a
view of the checker's own tensor (a ``"view"`` node: the base's id, offset, size and stride, all
checked to lie inside the base's own elements; :meth:`Decoder.view`), so changing it in place
changes the checker's input, as in one process. Other views (of a tensor the worker made, one
that requires grad, a conjugate view, an ``nn.Parameter`` made from an input) arrive as new
tensors, as before.
"""

from __future__ import annotations

import json
import math
import select
import socket
import struct
import sys
import time

from tlcourse.grading.runtime import ProcessEnded, TestTimeout

MAX_MESSAGE = 256 << 20     # bytes of one message: the checks use tiny tensors
MAX_HEADER = 16 << 20       # bytes of its JSON part
MAX_DEPTH = 64              # nesting of containers and modules
MAX_ITEMS = 200_000         # nodes in one message
MAX_VIEW_DIMS = 64          # dimensions of a view node (torch's own limit)
MAX_VIEW_INT = 1 << 48      # any one size, stride or offset of a view node

TENSOR_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128",
                 "uint8", "int8", "int16", "int32", "int64", "bool")
NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128")
EXCEPTIONS = ("ArithmeticError", "AssertionError", "AttributeError", "BufferError", "EOFError",
              "Exception", "FloatingPointError", "ImportError", "IndexError", "KeyError", "LookupError",
              "MemoryError", "ModuleNotFoundError", "NameError", "NotImplementedError", "OSError",
              "OverflowError", "RecursionError", "RuntimeError", "StopIteration", "SystemExit",
              "TypeError", "UnboundLocalError", "UnicodeError", "ValueError", "ZeroDivisionError")
# Classes a worker may name that the checker rebuilds as themselves (if already imported there).
TRUSTED_MODULE_PREFIXES = ("torch.nn.", "tlcourse.", "torchvision.", "timm.")
UNTRUSTED_MODULE_PREFIXES = ("tlcourse.grading.wire", "tlcourse.grading.worker",
                             "tlcourse.grading.checker", "tlcourse.grading.isolation")
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"}
_MODULE_HOOKS = {"_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                 "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                 "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_is_full_backward_hook"}


class WireError(Exception):
    """A message that is not well-formed data (too large, too deep, an unknown type)."""


class WorkerGone(ProcessEnded):
    """The other side closed the channel (the worker crashed, exited or was killed), or sent
    something that is not a message: either way this question's worker is finished."""


class Timeout(TestTimeout):
    """The other side did not answer before the deadline."""


# --- framing --------------------------------------------------------------------------------

def send_frame(sock: socket.socket, header: dict, blobs: list[bytes]) -> None:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    parts = [struct.pack("<II", len(head), len(blobs)), head]
    for blob in blobs:
        parts += [struct.pack("<Q", len(blob)), blob]
    try:
        sock.sendall(b"".join(parts))
    except (BrokenPipeError, ConnectionResetError, OSError) as exc:
        raise WorkerGone(f"the channel closed ({exc})") from None


def recv_frame(sock: socket.socket, deadline: float | None) -> tuple[dict, list[bytes]]:
    head_len, n_blobs = struct.unpack("<II", _recv_exact(sock, 8, deadline))
    if head_len > MAX_HEADER or n_blobs > MAX_ITEMS:
        raise WorkerGone("the sandbox sent a message larger than allowed")
    try:
        header = json.loads(_recv_exact(sock, head_len, deadline))
    except (ValueError, RecursionError):
        raise WorkerGone("the sandbox sent a message that is not valid JSON") from None
    blobs, total = [], head_len
    for _ in range(n_blobs):
        (size,) = struct.unpack("<Q", _recv_exact(sock, 8, deadline))
        total += size
        if total > MAX_MESSAGE:
            raise WorkerGone("the sandbox sent a message larger than allowed (a result of more than 256 MB?)")
        blobs.append(_recv_exact(sock, size, deadline))
    if not isinstance(header, dict):
        raise WorkerGone("the sandbox sent a message that is not a JSON object")
    return header, blobs


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise Timeout()
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except (ConnectionResetError, OSError) as exc:
            raise WorkerGone(f"the channel closed ({exc})") from None
        if not chunk:
            raise WorkerGone("the channel closed")
        buf += chunk
    return bytes(buf)


# --- the session: ids, encoding, decoding, nested requests ----------------------------------

class Session:
    """One side of the channel. ``side`` is ``"c"`` (checker) or ``"w"`` (worker).

    ``handlers`` maps a request kind to ``fn(session, header, blobs) -> reply header``; the
    checker's handlers only ever compute on the checker's own objects (``vjp`` of its graphs).
    """

    def __init__(self, sock: socket.socket, side: str, handlers: dict, deadline=None):
        import torch  # noqa: F401 - both sides use torch; imported here, not by the grader

        self.sock, self.side, self.handlers = sock, side, handlers
        self.deadline = deadline          # callable -> absolute monotonic deadline or None
        self.objects: dict[str, object] = {}   # id -> object (own, or a mirror of the other side's)
        self.ids: dict[int, str] = {}          # id(object) -> id
        self.output: list[str] = []            # learner output carried in replies (checker side)
        self.output_read = 0                   # bytes of the worker's output file carried so far
        self.graphs: dict[str, list] = {}      # checker: tensor id -> the leaves sent with it
        self.sent_tensors: set[str] = set()     # ids of this side's own tensors it has sent (view bases)
        self._n = 0
        self._req = 0

    # ids
    def id_of(self, obj) -> str:
        key = self.ids.get(id(obj))
        if key is None:
            self._n += 1
            key = f"{self.side}{self._n}"
            self.register(key, obj)
        return key

    def register(self, key: str, obj) -> None:
        old = self.objects.get(key)
        if old is not None:
            self.ids.pop(id(old), None)
        self.objects[key] = obj
        self.ids[id(obj)] = key

    # requests
    def request(self, header: dict, blobs: list[bytes] = ()) -> tuple[dict, list[bytes]]:
        """Send a request; serve the other side's requests until its reply comes."""
        self._req += 1
        rid = f"{self.side}{self._req}"
        send_frame(self.sock, dict(header, rid=rid), list(blobs))
        while True:
            msg, got = recv_frame(self.sock, self.deadline() if self.deadline else None)
            self.take_output(msg)
            if msg.get("reply") == rid:
                return msg, got
            if "reply" in msg:
                raise WireError("a reply to a request that was not made")
            self.serve_one(msg, got)

    def take_output(self, msg: dict) -> None:
        """Checker side: keep the learner output a worker message carries."""
        if isinstance(msg.get("out"), str):
            self.output.append(msg["out"])
        if type(msg.get("out_read")) is int:
            self.output_read = msg["out_read"]

    def serve_one(self, msg: dict, blobs: list[bytes]) -> None:
        handler = self.handlers.get(msg.get("kind"))
        try:
            if handler is None:
                raise WireError(f"unknown request {str(msg.get('kind'))[:40]!r}")
            reply = handler(self, msg, blobs)
        except (WorkerGone, Timeout):
            raise
        except BaseException as exc:  # noqa: BLE001 - the error goes back to the requester
            enc = Encoder(self)
            reply = {"error": enc.exception(exc)}
            reply["_blobs"] = enc.blobs
        out_blobs = reply.pop("_blobs", [])
        new_output = getattr(self, "new_output", None)
        if new_output is not None:  # the worker: what the learner's code printed meanwhile
            reply["out"] = new_output()
            reply["out_read"] = self.output_position()
        send_frame(self.sock, dict(reply, reply=msg.get("rid")), out_blobs)


class Encoder:
    """Turns values into JSON-able nodes plus blobs, for one message."""

    def __init__(self, session: Session, graph_leaves: bool = False):
        self.s = session
        self.blobs: list[bytes] = []
        self.grad_inputs: list = []     # tensors that require grad, in the order they were met
        self.modules: list = []         # modules encoded in this message (state to send back)
        self.tensors: list = []         # tensors encoded in this message
        self.graph_leaves = graph_leaves  # checker: send the leaves under a tensor's graph too
        self._seen: set[int] = set()
        self._bases: dict[int, list] = {}  # worker: storage address -> (id, tensor) the checker sent, in this message
        self._count = 0

    def blob(self, data: bytes) -> int:
        self.blobs.append(data)
        return len(self.blobs) - 1

    def __call__(self, value, depth: int = 0):
        import numpy as np
        import torch

        self._count += 1
        if depth > MAX_DEPTH or self._count > MAX_ITEMS:
            raise WireError("the value is too deeply nested or too large to send")
        t = type(value)
        if value is None or t in (bool, str):
            return value
        if t is int:
            return value if abs(value) < 2 ** 53 else {"$": "int", "v": str(value)}
        if t is float:
            return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
        if t is complex:
            return {"$": "complex", "v": [self(value.real), self(value.imag)]}
        if t in (bytes, bytearray):
            return {"$": "bytes", "b": self.blob(bytes(value))}
        if t is torch.Size:
            return {"$": "size", "v": list(value)}
        if t is torch.dtype:
            return {"$": "dtype", "v": str(value).removeprefix("torch.")}
        if t is torch.device:
            return {"$": "device", "v": str(value)}
        if t is slice:
            return {"$": "slice", "v": [self(value.start, depth + 1), self(value.stop, depth + 1),
                                        self(value.step, depth + 1)]}
        if t in (torch.Tensor, torch.nn.Parameter):
            return self.tensor(value, depth)
        if isinstance(value, torch.nn.Module):
            return self.module(value, depth)
        if isinstance(value, (RemoteCallable, RemoteObject)):
            return {"$": "ref", "id": value._tl_id}
        if t is np.ndarray or isinstance(value, np.generic):
            return self.numpy(value)
        if isinstance(value, torch.utils.data.DataLoader):
            return self.loader(value, depth)
        if isinstance(value, torch.utils.data.TensorDataset):
            return {"$": "tds", "v": [self(x, depth + 1) for x in value.tensors]}
        if isinstance(value, BaseException):
            return self.exception(value)
        if isinstance(value, list):
            return [self(x, depth + 1) for x in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields") or t.__module__ == "torch.return_types":
            return {"$": "tuple", "v": [self(x, depth + 1) for x in value]}
        if isinstance(value, tuple):  # a namedtuple: its items
            return {"$": "tuple", "v": [self(x, depth + 1) for x in value]}
        if isinstance(value, dict):
            return {"$": "dict", "v": [[self(k, depth + 1), self(v, depth + 1)] for k, v in value.items()]}
        if isinstance(value, (set, frozenset)):
            return {"$": "set", "v": [self(x, depth + 1) for x in value]}
        if t is range:
            return {"$": "range", "v": [value.start, value.stop, value.step]}
        return self.handle(value)

    def handle(self, value):
        """Anything else stays where it is; the other side gets a handle to it."""
        kind = "fn" if callable(value) else "obj"
        return {"$": "handle", "id": self.s.id_of(value), "kind": kind, "type": _type_name(value)}

    def tensor(self, t, depth, differentiable=True):
        import torch

        fresh = id(t) not in self.s.ids  # never sent before: the other side has no object of that id
        key = self.s.id_of(t)
        if id(t) in self._seen:
            return {"$": "ref", "id": key}
        self._seen.add(id(t))
        self.tensors.append(t)
        if key.startswith(self.s.side):
            self.s.sent_tensors.add(key)
        if self.s.side == "w" and fresh and not key.startswith("c"):
            view = self.view(t, key)
            if view is not None:
                return view
        data = t.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        if data.is_conj():
            data = data.resolve_conj()
        dtype = str(data.dtype).removeprefix("torch.")
        if dtype not in TENSOR_DTYPES:
            raise WireError(f"tensors of dtype {dtype} cannot be sent")
        raw = data.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        node = {"$": "t", "id": key, "dtype": dtype, "shape": list(data.shape), "b": self.blob(raw),
                "param": type(t) is torch.nn.Parameter, "rg": bool(t.requires_grad), "leaf": bool(t.is_leaf)}
        if t.is_leaf and t.grad is not None and type(t.grad) is torch.Tensor:
            node["grad"] = self.tensor(t.grad, depth + 1, differentiable=False)
        if t.requires_grad:
            if differentiable:
                self.grad_inputs.append(t)
            if not t.is_leaf and self.graph_leaves:
                leaves = _graph_leaves(t)
                self.s.graphs[key] = leaves
                node["graph"] = [self.tensor(leaf, depth + 1, differentiable=False) for leaf in leaves]
        if self.s.side == "w" and key.startswith("c") and t.device.type == "cpu" and t.numel():
            # A tensor the checker sent, in full in this message (decoded there before what follows):
            # a base that the worker's views of it can name.
            self._bases.setdefault(t.untyped_storage().data_ptr(), []).append((key, t))
        return node

    def view(self, t, key):
        """Worker: a ``"view"`` node for ``t`` (a tensor never sent before) when it lies inside the
        elements of a tensor the checker sent, encoded earlier in this message (the call's state
        comes before its result); else None (``t`` travels as a new tensor). Only plain tensors that
        need no autograd: a view that requires grad goes through :class:`RemoteCall` as a new
        tensor, as before."""
        import torch

        if (type(t) is not torch.Tensor or t.requires_grad or t.grad is not None or t.layout != torch.strided
                or t.device.type != "cpu" or t.is_conj() or t.is_neg() or not t.numel() or not self._bases):
            return None
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in TENSOR_DTYPES:
            return None
        size, stride = list(t.shape), list(t.stride())
        for base_key, b in self._bases.get(t.untyped_storage().data_ptr(), ()):
            if b.dtype != t.dtype or not b.is_contiguous() or b.is_conj() or b.is_neg():
                continue
            offset = t.storage_offset() - b.storage_offset()
            if offset < 0 or any(s < 0 for s in stride):
                continue
            if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= b.numel():
                continue
            return {"$": "view", "id": key, "base": base_key, "dtype": dtype, "offset": offset, "size": size,
                    "stride": stride}
        return None

    def numpy(self, value):
        import numpy as np

        arr = np.asarray(value)
        if arr.dtype.name not in NUMPY_DTYPES:
            raise WireError(f"NumPy values of dtype {arr.dtype} cannot be sent")
        return {"$": "np", "dtype": arr.dtype.name, "shape": list(arr.shape),
                "scalar": isinstance(value, np.generic), "b": self.blob(np.ascontiguousarray(arr).tobytes())}

    def loader(self, value, depth):
        import torch

        ds = value.dataset
        if type(ds) is not torch.utils.data.TensorDataset or not isinstance(
                value.sampler, torch.utils.data.SequentialSampler):
            raise WireError("only DataLoader(TensorDataset(...)) without shuffling can be sent")
        return {"$": "loader", "ds": self(ds, depth + 1), "bs": value.batch_size, "drop_last": value.drop_last}

    def module(self, m, depth):
        key = self.s.id_of(m)
        if id(m) in self._seen:
            return {"$": "ref", "id": key}
        self._seen.add(id(m))
        self.modules.append(m)
        d = m.__dict__
        attrs, opaque = {}, False
        for name, value in d.items():
            if name in _MODULE_INTERNALS or name.startswith("_tl_"):
                continue
            if name in _MODULE_HOOKS:
                opaque = opaque or bool(value)
                continue
            if _is_data(value):
                attrs[name] = self(value, depth + 1)
            else:
                opaque = True
        cls = type(m)
        remote_id = m.__dict__.get("_tl_remote_id")
        node = {"$": "mod", "id": key, "cls": f"{cls.__module__}:{cls.__qualname__}",
                "training": bool(m.training), "attrs": attrs, "opaque": opaque or remote_id is not None,
                "npb": sorted(d.get("_non_persistent_buffers_set", ())),
                "params": {n: (None if p is None else self(p, depth + 1)) for n, p in d["_parameters"].items()},
                "buffers": {n: (None if b is None else self(b, depth + 1)) for n, b in d["_buffers"].items()},
                "children": {n: (None if c is None else self(c, depth + 1)) for n, c in d["_modules"].items()}}
        return node

    def exception(self, exc: BaseException) -> dict:
        import traceback

        frames = [[f.filename, f.lineno or 0, f.name, (f.line or "")[:200]]
                  for f in traceback.extract_tb(exc.__traceback__)][-20:]
        frames = getattr(exc, "__tlcourse_frames__", None) or frames
        name = type(exc).__name__
        try:
            text = str(exc)[:2000]
        except BaseException:  # noqa: BLE001 - a __str__ that raises
            text = ""
        return {"$": "exc", "type": name, "base": _builtin_base(exc), "msg": text, "frames": frames}


def _graph_leaves(t) -> list:
    """The leaf tensors that require grad under ``t``'s autograd graph (bounded walk)."""
    leaves, seen, todo = [], set(), [t.grad_fn]
    while todo and len(seen) < 100_000:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            leaves.append(var)
        todo.extend(f for f, _ in fn.next_functions)
    return leaves


def _is_data(value, depth=0) -> bool:
    import torch

    t = type(value)
    if value is None or t in (bool, int, float, str, complex, torch.dtype, torch.device, torch.Size):
        return True
    if depth > 8:
        return False
    if t in (list, tuple, set, frozenset):
        return all(_is_data(x, depth + 1) for x in value)
    if t is dict:
        return all(_is_data(k, depth + 1) and _is_data(v, depth + 1) for k, v in value.items())
    return False


def _builtin_base(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins" and cls.__name__ in EXCEPTIONS + ("KeyboardInterrupt", "BaseException"):
            return cls.__name__
    return "Exception"


def _type_name(value) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class Decoder:
    """Builds values from nodes; only allow-listed types. ``trusted_classes``: the checker
    rebuilds worker modules as real classes only from allow-listed, already imported modules;
    the worker imports what the checker names (the checker is trusted)."""

    def __init__(self, session: Session, blobs: list[bytes], import_classes: bool):
        self.s = session
        self.blobs = blobs
        self.import_classes = import_classes
        self.changed_modules: list = []
        self._count = 0
        self._memo: dict[str, object] = {}

    def __call__(self, node, depth: int = 0):
        self._count += 1
        if depth > MAX_DEPTH or self._count > MAX_ITEMS:
            raise WireError("a value too deeply nested or too large")
        if node is None or isinstance(node, (bool, str)):
            return node
        if isinstance(node, (int, float)):
            return node
        if isinstance(node, list):
            return [self(x, depth + 1) for x in node]
        if not isinstance(node, dict):
            raise WireError("malformed value")
        tag = node.get("$")
        v = node.get("v")
        if tag == "int":
            return int(str(v)[:400])
        if tag == "float":
            if v not in ("nan", "inf", "-inf"):
                raise WireError("malformed float")
            return float(v)
        if tag == "complex":
            return complex(float(self(v[0])), float(self(v[1])))
        if tag == "bytes":
            return self.blob(node)
        if tag == "tuple":
            return tuple(self(x, depth + 1) for x in _list(v))
        if tag == "dict":
            out = {}
            for item in _list(v):
                k, val = _list(item)
                k = self(k, depth + 1)
                try:
                    out[k] = self(val, depth + 1)
                except TypeError:
                    raise WireError("a dict key that cannot be hashed") from None
            return out
        if tag == "set":
            try:
                return set(self(x, depth + 1) for x in _list(v))
            except TypeError:
                raise WireError("a set item that cannot be hashed") from None
        if tag == "range":
            a, b, c = (int(x) for x in _list(v))
            return range(a, b, c)
        if tag == "slice":
            a, b, c = (self(x, depth + 1) for x in _list(v))
            return slice(a, b, c)
        if tag == "size":
            import torch

            return torch.Size([int(x) for x in _list(v)])
        if tag == "dtype":
            import torch

            if v not in TENSOR_DTYPES + ("float", "double", "long", "int", "half", "cfloat", "cdouble"):
                raise WireError("unknown dtype")
            return getattr(torch, v)
        if tag == "device":
            import torch

            return torch.device(str(v)[:40])
        if tag == "t":
            return self.tensor(node, depth)
        if tag == "view":
            return self.view(node)
        if tag == "np":
            return self.numpy(node)
        if tag == "mod":
            return self.module(node, depth)
        if tag == "ref":
            key = str(node.get("id"))
            if key in self._memo:
                return self._memo[key]
            if key not in self.s.objects:
                raise WireError("a reference to an unknown object")
            return self.s.objects[key]
        if tag == "handle":
            return self.handle(node)
        if tag == "loader":
            return self.loader(node, depth)
        if tag == "tds":
            import torch

            return torch.utils.data.TensorDataset(*[self(x, depth + 1) for x in _list(v)])
        if tag == "exc":
            return rebuild_exception(node)
        raise WireError(f"unknown value type {str(tag)[:30]!r}")

    def blob(self, node) -> bytes:
        i = node.get("b")
        if not isinstance(i, int) or not 0 <= i < len(self.blobs):
            raise WireError("malformed blob reference")
        return self.blobs[i]

    def numpy(self, node):
        import numpy as np

        dtype = node.get("dtype")
        if dtype not in NUMPY_DTYPES:
            raise WireError("unknown NumPy dtype")
        shape = [int(x) for x in _list(node.get("shape"))]
        raw = self.blob(node)
        if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
            raise WireError("NumPy data of the wrong size")
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        return arr[()] if node.get("scalar") and arr.ndim == 0 else arr

    def tensor(self, node, depth):
        import torch

        key = str(node.get("id"))
        if key in self._memo:
            return self._memo[key]
        dtype = node.get("dtype")
        if dtype not in TENSOR_DTYPES:
            raise WireError("unknown tensor dtype")
        shape = [int(x) for x in _list(node.get("shape"))]
        if any(s < 0 for s in shape):
            raise WireError("negative tensor size")
        dt = getattr(torch, dtype)
        raw = self.blob(node)
        itemsize = torch.empty((), dtype=dt).element_size()
        if len(raw) != math.prod(shape) * itemsize:
            raise WireError("tensor data of the wrong size")
        values = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape)
                  if raw else torch.empty(shape, dtype=dt))
        rg = bool(node.get("rg"))
        is_param = bool(node.get("param"))
        grad = node.get("grad")
        known = self.s.objects.get(key)
        # An in-place reshape on the other side (``mask.unsqueeze_(-1)``) reaches the same object, as
        # in the learner's own kernel; but only one that keeps every element. A tensor that grew or
        # shrank (``resize_``) would change data the checker still reads after the call (a reference
        # computed from an emptied input equals an empty answer), and a view given new storage would
        # stop sharing its base's: those arrive as new tensors and the checker's own stay as they were.
        if known is not None and not isinstance(known, torch.Tensor):
            raise WireError("a tensor sent under the id of an object that is not a tensor")
        reshaped = known is not None and tuple(known.shape) != tuple(shape)
        if known is not None and type(known) in (torch.Tensor, torch.nn.Parameter) and known.is_leaf \
                and known.dtype == dt and (type(known) is torch.nn.Parameter) == is_param \
                and (not reshaped or (known.numel() == values.numel() and known._base is None)):
            with torch.no_grad():
                if reshaped:
                    known.set_(values)
                elif not torch.equal(known, values):
                    known.copy_(values)
            if known.requires_grad != rg and (rg is False or known.is_floating_point() or known.is_complex()):
                known.requires_grad_(rg)
            self._memo[key] = known
            new_grad = self(grad, depth + 1) if grad is not None else None
            if new_grad is not None and type(new_grad) is torch.Tensor:
                if known.grad is None or not (known.grad.shape == new_grad.shape and torch.equal(known.grad, new_grad)):
                    known.grad = new_grad.to(known.dtype) if new_grad.shape == known.shape else None
            elif grad is None and known.grad is not None:
                known.grad = None
            return known
        if is_param:
            t = torch.nn.Parameter(values, requires_grad=rg and (values.is_floating_point() or values.is_complex()))
        elif rg and not node.get("leaf", True) and node.get("graph") is not None and self.s.side == "w":
            leaves = [self(x, depth + 1) for x in _list(node.get("graph"))]
            _build()
            t = globals()["Callback"].mirror(self.s, key, values, leaves)
        else:
            t = values
            if rg and (t.is_floating_point() or t.is_complex()):
                t.requires_grad_(True)
        self.s.register(key, t)
        self._memo[key] = t
        if grad is not None and t.is_leaf:
            g = self(grad, depth + 1)
            if type(g) is torch.Tensor and g.shape == t.shape:
                t.grad = g.to(t.dtype)
        return t

    def view(self, node):
        """A view the other side made of a tensor this side sent, decoded in this message (the
        call's state, applied first): this side's own tensor, viewed with the offset, size and
        stride given, relative to the base's first element. Every number is checked here, in
        Python integers, so that the view lies inside the base's own elements (never elsewhere
        in a storage the base shares with tensors that were not sent)."""
        import torch

        key, base_key, dtype = node.get("id"), node.get("base"), node.get("dtype")
        if not isinstance(key, str) or not isinstance(base_key, str) or not 0 < len(key) <= 40:
            raise WireError("malformed view")
        if key in self._memo:
            return self._memo[key]
        if key.startswith(self.s.side) or key in self.s.objects:
            raise WireError("a view under an id already in use")
        base = self._memo.get(base_key)
        if (base_key not in self.s.sent_tensors or type(base) not in (torch.Tensor, torch.nn.Parameter)
                or self.s.objects.get(base_key) is not base):
            raise WireError("a view of a tensor that was not sent in this call")
        if dtype not in TENSOR_DTYPES or dtype != str(base.dtype).removeprefix("torch."):
            raise WireError("a view of another dtype than its base's")
        size, stride, offset = node.get("size"), node.get("stride"), node.get("offset")
        if (type(size) is not list or type(stride) is not list or len(size) != len(stride)
                or len(size) > MAX_VIEW_DIMS):
            raise WireError("malformed view")
        if not all(type(x) is int and 0 <= x <= MAX_VIEW_INT for x in [offset, *size, *stride]):
            raise WireError("a view with a negative, huge or non-integer size, stride or offset")
        count = math.prod(size)
        if count == 0 or count * base.element_size() > MAX_MESSAGE:
            raise WireError("a view of no elements, or of more than a message may carry")
        if base.layout != torch.strided:
            raise WireError("a view of a tensor that is not strided")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= base.numel():
            raise WireError("a view that reaches outside its base")
        if (base.storage_offset() + base.numel()) * base.element_size() > base.untyped_storage().nbytes():
            raise WireError("a view of a tensor whose storage does not hold it")  # never, for a real tensor
        with torch.no_grad():
            if base.is_contiguous() and not base.is_conj() and not base.is_neg():
                # The base's elements are its storage's, in order, from its own offset: the
                # other side's copy of it was laid out the same way.
                # detach(): the other side's view needed no grad (a view that does travels as a new tensor)
                t = base.detach().as_strided(size, stride, base.storage_offset() + offset)
            else:  # laid out otherwise here: a new tensor with the same values, as before
                flat = base.detach().resolve_conj().resolve_neg().reshape(-1).clone()
                t = flat.as_strided(size, stride, offset).clone()
        self.s.register(key, t)
        self._memo[key] = t
        return t

    def module(self, node, depth):
        import torch

        key = str(node.get("id"))
        if key in self._memo:
            return self._memo[key]
        m = self.s.objects.get(key)
        if not isinstance(m, torch.nn.Module):
            m = self.new_module(node, key)
        self._memo[key] = m
        self.s.register(key, m)
        d = m.__dict__
        d["training"] = bool(node.get("training"))
        attrs = node.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise WireError("malformed module attributes")
        for name in [n for n in d if n not in _MODULE_INTERNALS and n not in _MODULE_HOOKS
                     and not n.startswith("_tl_") and n not in attrs and _is_data(d[n])]:
            del d[name]
        for name, value in attrs.items():
            if (not isinstance(name, str) or name.startswith(("__", "_tl_")) or name in _MODULE_INTERNALS
                    or name in _MODULE_HOOKS):
                raise WireError("a module attribute that may not be set")
            d[name] = self(value, depth + 1)
        d["_non_persistent_buffers_set"] = {str(x) for x in _list(node.get("npb") or [])}
        for field, store in (("params", "_parameters"), ("buffers", "_buffers"), ("children", "_modules")):
            items = node.get(field) or {}
            if not isinstance(items, dict):
                raise WireError("malformed module")
            new = {}
            for name, sub in items.items():
                value = None if sub is None else self(sub, depth + 1)
                if field == "params" and value is not None and type(value) is not torch.nn.Parameter:
                    raise WireError("a parameter that is not an nn.Parameter")
                if field == "buffers" and value is not None and type(value) not in (torch.Tensor, torch.nn.Parameter):
                    raise WireError("a buffer that is not a tensor")
                if field == "children" and value is not None and not isinstance(value, torch.nn.Module):
                    raise WireError("a child that is not a module")
                new[str(name)] = value
            d[store].clear()
            d[store].update(new)
        return m

    def new_module(self, node, key):
        import torch

        cls_name = str(node.get("cls", ""))
        cls = self.resolve_class(cls_name) if not node.get("opaque") or self.import_classes else None
        if cls is None:
            _build()
            RemoteModule = globals()["RemoteModule"]
            m = RemoteModule.__new__(RemoteModule)
            torch.nn.Module.__init__(m)
            m.__dict__["_tl_remote_id"] = key
            m.__dict__["_tl_session"] = self.s
            m.__dict__["_tl_cls"] = cls_name.split(":")[-1][:80]
            return m
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        return m

    def resolve_class(self, name: str):
        import importlib

        import torch

        module, _, qual = name.partition(":")
        if self.import_classes:  # the worker: the checker names its own classes
            if module == "tlcourse.grading.wire" and qual == "RemoteModule":
                raise WireError("a mirror of a worker object sent back without its id")
            try:
                obj = importlib.import_module(module)
                for part in qual.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                raise WireError(f"the class {name} cannot be rebuilt in the sandbox ({exc}): a test may only "
                                "pass modules of classes importable there (torch.nn, tlcourse)") from None
            return obj
        # The checker: only allow-listed classes that are already imported (no import runs).
        if not module.startswith(TRUSTED_MODULE_PREFIXES) or module.startswith(UNTRUSTED_MODULE_PREFIXES):
            return None
        if "<" in qual or not all(p.isidentifier() for p in qual.split(".")):
            return None
        obj = sys.modules.get(module)
        for part in qual.split("."):
            obj = getattr(obj, part, None) if obj is not None else None
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module:
            return obj
        return None

    def handle(self, node):
        key = str(node.get("id"))
        known = self.s.objects.get(key)
        if known is not None:
            return known
        cls = RemoteCallable if node.get("kind") == "fn" else RemoteObject
        obj = cls(self.s, key, str(node.get("type", "object"))[:120])
        self.s.register(key, obj)
        return obj

    def loader(self, node, depth):
        import torch

        ds = self(node.get("ds"), depth + 1)
        if type(ds) is not torch.utils.data.TensorDataset:
            raise WireError("malformed loader")
        bs = node.get("bs")
        return torch.utils.data.DataLoader(ds, batch_size=None if bs is None else int(bs),
                                           drop_last=bool(node.get("drop_last")))


def _list(v) -> list:
    if not isinstance(v, list):
        raise WireError("malformed value")
    return v


def rebuild_exception(node) -> BaseException:
    """A learner's exception as the checker sees it: a builtin class of the same family (or a
    class of the same name built here), its message, and the learner's frames."""
    import builtins

    name = str(node.get("type", "Exception"))[:80]
    base = node.get("base")
    msg = str(node.get("msg", ""))[:2000]
    if name in EXCEPTIONS:
        cls = getattr(builtins, name)
    elif name == "KeyboardInterrupt" or base == "KeyboardInterrupt":
        cls = _named("KeyboardInterrupt", Exception)  # must not stop the checker
    else:
        parent = getattr(builtins, base) if base in EXCEPTIONS else Exception
        cls = _named(name if name.isidentifier() else "Exception", parent)
    if issubclass(cls, KeyError):  # str(KeyError('x')) is "'x'" already: do not quote it twice
        cls = _named(cls.__name__, cls, {"__str__": lambda self: str(self.args[0]) if self.args else ""})
    try:
        exc = cls(msg)
    except Exception:  # noqa: BLE001
        exc = RuntimeError(msg)
    frames = []
    for f in (node.get("frames") or [])[:20]:
        if isinstance(f, list) and len(f) == 4:
            frames.append((str(f[0])[:200], int(f[1]) if isinstance(f[1], int) else 0, str(f[2])[:100],
                           str(f[3])[:200]))
    exc.__tlcourse_frames__ = frames
    return exc


_NAMED: dict = {}


def _named(name: str, parent, body=None):
    key = (name, parent, bool(body))
    if key not in _NAMED:
        _NAMED[key] = type(name, (parent,), {"__module__": "learner", **(body or {})})
    return _NAMED[key]


# --- proxies ----------------------------------------------------------------------------------

class RemoteCallable:
    """A learner's function or class, called in the worker."""

    def __init__(self, session, key, type_name="function", name=None):
        self._tl_session, self._tl_id, self._tl_type = session, key, type_name
        self.__name__ = name or key

    def __call__(self, *args, **kwargs):
        return remote_call(self._tl_session, {"fn": self._tl_id}, args, kwargs)

    def __repr__(self):
        return f"<{self._tl_type} in the sandbox>"


class RemoteObject(RemoteCallable):
    """Any other object the learner's code returned: attributes and calls go to the worker."""

    def __getattr__(self, name):
        if name.startswith("_tl_") or name.startswith("__"):
            raise AttributeError(name)
        return remote_call(self._tl_session, {"attr": self._tl_id, "name": name}, (), {})

    def __repr__(self):
        return f"<{self._tl_type} object in the sandbox>"


def _remote_module_class():
    import torch

    class RemoteModule(torch.nn.Module):
        """A mirror of a module whose class lives in the worker: its parameters, buffers,
        children and flags are here (tests inspect and train them); ``forward`` runs there."""

        def forward(self, *args, **kwargs):
            return remote_call(self.__dict__["_tl_session"], {"method": self, "name": "forward"}, args, kwargs)

        def extra_repr(self):
            return f"{self.__dict__.get('_tl_cls', '?')} in the sandbox"

        def __deepcopy__(self, memo):  # an independent copy, made where the class lives
            return remote_call(self.__dict__["_tl_session"], {"copy": self}, (), {})

    RemoteModule.__module__ = __name__
    return RemoteModule


def __getattr__(name):  # RemoteModule and the autograd functions need torch: built on first use
    if name in ("RemoteModule", "RemoteCall", "Callback"):
        _build()
        return globals()[name]
    raise AttributeError(name)


def _build():
    import torch

    g = globals()
    if "RemoteModule" in g:
        return
    g["RemoteModule"] = _remote_module_class()

    class RemoteCall(torch.autograd.Function):
        """One call into the worker as one node of the checker's graph: backward asks the
        worker for the vector-Jacobian product of that call's outputs."""

        @staticmethod
        def forward(ctx, session, header, enc, box, *grad_inputs):
            result, outputs, call_id = _send_call(session, header, enc)
            box["result"], box["call"] = result, call_id
            ctx.session, ctx.call_id, ctx.n_in = session, call_id, len(grad_inputs)
            ctx.in_meta = [(t.shape, t.dtype) for t in grad_inputs]
            box["outputs"] = outputs
            return tuple(o.detach().clone() for o in outputs)

        @staticmethod
        def backward(ctx, *grads):
            enc = Encoder(ctx.session)
            head = {"kind": "vjp", "call": ctx.call_id,
                    "grads": [None if g is None else enc(g.detach()) for g in grads]}
            reply, blobs = ctx.session.request(head, enc.blobs)
            if "error" in reply:
                raise rebuild_exception(reply["error"])
            dec = Decoder(ctx.session, blobs, import_classes=False)
            got = [None if g is None else dec(g) for g in _list(reply.get("grads"))]
            if len(got) != ctx.n_in:
                raise WireError("a gradient list of the wrong length")
            out = []
            for g, (shape, dtype) in zip(got, ctx.in_meta):
                if g is not None and (type(g) is not torch.Tensor or g.shape != shape):
                    raise WireError("a gradient of the wrong shape")
                out.append(None if g is None else g.to(dtype))
            return (None, None, None, None, *out)

    class Callback(torch.autograd.Function):
        """In the worker: a tensor the checker built with a graph (a loss). Its backward asks
        the checker for the vector-Jacobian product with respect to that graph's leaves."""

        @staticmethod
        def forward(ctx, session, key, values, *leaves):
            ctx.session, ctx.key, ctx.n = session, key, len(leaves)
            ctx.meta = [(t.shape, t.dtype) for t in leaves]
            ctx.save_for_backward(values)  # freed by a backward without retain_graph: see freed_graphs
            return values.clone()

        @staticmethod
        def backward(ctx, grad):
            ctx.saved_tensors  # noqa: B018 - raises, as in one process, if this graph was freed before
            done = ctx.session.__dict__.setdefault("backwarded", [])
            if not any(c is ctx for c, _ in done):
                done.append((ctx, ctx.key))
            enc = Encoder(ctx.session)
            reply, blobs = ctx.session.request({"kind": "vjp_back", "tensor": ctx.key, "grad": enc(grad.detach()),
                                                "free": freed_graphs(ctx.session, but=ctx)}, enc.blobs)
            if "error" in reply:
                raise rebuild_exception(reply["error"])
            dec = Decoder(ctx.session, blobs, import_classes=True)
            got = [None if g is None else dec(g) for g in _list(reply.get("grads"))]
            return (None, None, None, *got[:ctx.n], *([None] * (ctx.n - len(got))))

        @staticmethod
        def mirror(session, key, values, leaves):
            return Callback.apply(session, key, values, *leaves)

    g["RemoteCall"] = RemoteCall
    g["Callback"] = Callback


def remote_call(session, target: dict, args, kwargs):
    """Call ``target`` in the worker with ``args``; the result, decoded. Inputs that require
    grad make the call a node of the checker's autograd graph (:class:`RemoteCall`)."""
    import torch

    _build()
    enc = Encoder(session, graph_leaves=True)
    header = {"kind": "call"}
    for k, v in target.items():
        header[k] = enc(v) if k in ("method", "copy") else v
    header["args"] = enc(list(args))
    header["kwargs"] = enc(dict(kwargs))
    header["rng"] = enc(rng_states())
    # Every module this side sent before, whether or not it is an argument now: the learner's
    # code may keep one where the wire cannot see it (a plain list), and one process would
    # share its state and gradients all the same.
    header["sync"] = [enc(m) for key, m in list(session.objects.items())
                      if key.startswith(session.side) and isinstance(m, torch.nn.Module)]
    header["grad"] = torch.is_grad_enabled()
    grad_inputs = list({id(t): t for t in enc.grad_inputs}.values())
    header["gin"] = [session.ids[id(t)] for t in grad_inputs]
    if torch.is_grad_enabled() and grad_inputs:
        box = {}
        outs = globals()["RemoteCall"].apply(session, header, enc, box, *grad_inputs)
        result = box["result"]
        return _swap(result, dict(zip((id(o) for o in box["outputs"]), outs)))
    result, _outputs, _ = _send_call(session, header, enc)
    return result


def _send_call(session, header, enc):
    import torch

    with torch.no_grad():
        reply, blobs = session.request(header, enc.blobs)
        free_graphs(session, reply.get("free"))
        dec = Decoder(session, blobs, import_classes=False)
        for node in _list(reply.get("state") or []):
            dec(node)
        if reply.get("rng") is not None:
            set_rng_states(dec(reply["rng"]))
        if "error" in reply:
            raise rebuild_exception(reply["error"])
        outputs = [dec(x) for x in _list(reply.get("outputs") or [])]
        result = dec(reply.get("result"))
    if any(type(o) is not torch.Tensor for o in outputs):
        raise WireError("malformed outputs")
    return result, outputs, reply.get("call")


def _swap(value, table, depth=0):
    """``value`` with the tensors in ``table`` (by id) replaced: outputs of RemoteCall."""
    import torch

    if depth > MAX_DEPTH:
        return value
    if type(value) is torch.Tensor:
        return table.get(id(value), value)
    if type(value) is list:
        return [_swap(x, table, depth + 1) for x in value]
    if type(value) is tuple:
        return tuple(_swap(x, table, depth + 1) for x in value)
    if type(value) is dict:
        return {k: _swap(v, table, depth + 1) for k, v in value.items()}
    return value


def rng_states() -> dict:
    """The global random states the learner's code may read or change (torch, random, NumPy):
    sent with every call and taken back after it, so "leaves the global random state alone"
    is judged as in one process."""
    import random

    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(states) -> None:
    """Apply :func:`rng_states` received from the other side, after checking their shapes."""
    import random

    import numpy as np
    import torch

    if not isinstance(states, dict):
        raise WireError("malformed random states")
    t = states.get("torch")
    if type(t) is torch.Tensor and t.dtype == torch.uint8 and t.ndim == 1:
        if not torch.equal(t, torch.get_rng_state()):
            try:
                torch.set_rng_state(t)
            except (RuntimeError, ValueError):
                raise WireError("malformed torch random state") from None
    r = states.get("random")
    if isinstance(r, tuple) and len(r) == 3 and isinstance(r[1], tuple) and all(type(x) is int for x in r[1]):
        if r != random.getstate():
            try:
                random.setstate(r)
            except (TypeError, ValueError, OverflowError):
                raise WireError("malformed random state") from None
    n = states.get("numpy")
    if isinstance(n, tuple) and len(n) == 5 and n[0] == "MT19937" and isinstance(n[1], np.ndarray):
        try:
            np.random.set_state(n)
        except (TypeError, ValueError):
            raise WireError("malformed NumPy random state") from None


def freed_graphs(session, but=None) -> list[str]:
    """Worker: the checker tensors whose mirrored graph a ``backward()`` without
    ``retain_graph`` has freed here since the last report. The checker then frees its own
    graph of them too, so a second backward through a shared part fails as in one process."""
    out, keep = [], []
    for ctx, key in session.__dict__.get("backwarded", []):
        if ctx is but:
            keep.append((ctx, key))
            continue
        try:
            ctx.saved_tensors  # noqa: B018
            keep.append((ctx, key))
        except RuntimeError:
            out.append(key)
    session.__dict__["backwarded"] = keep
    return out


def free_graphs(session, keys) -> None:
    """Checker: free the graphs of ``keys`` (see :func:`freed_graphs`)."""
    import torch

    for key in keys if isinstance(keys, list) else []:
        t, leaves = session.objects.get(str(key)), session.graphs.get(str(key))
        if type(t) is torch.Tensor and t.grad_fn is not None and leaves:
            try:
                with torch.enable_grad():
                    torch.autograd.grad(t, leaves, torch.zeros_like(t), retain_graph=False, allow_unused=True)
            except RuntimeError:
                pass  # freed already

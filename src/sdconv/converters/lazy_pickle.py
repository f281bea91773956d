"""A torch zip checkpoint's `data.pkl` read into references to its tensors, without a byte of any
storage, and without torch: what a checkpoint read by byte ranges (remote_zip.py) is made of.
`torch.load` cannot serve there: it reads every record's local header when it maps a file.

The pickle is first walked by pickle_scan with pickles.ALLOWED_GLOBALS, as a local file's is: an
import outside it, by any opcode, or a call of anything but an allowed import, is exit 4, and
every persistent id must be a storage reference made of constants. Then `_RefUnpickler` unpickles
it; its `find_class` resolves the same names, one by one, to things that only record what they
are given (a second line: any other name is refused), and nothing is imported:

- `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` -> a `TensorRef`: (storage, offset,
  shape, stride), the storage being the `StorageRef` the scan found for the persistent id;
- `_rebuild_parameter`, `_rebuild_parameter_with_state`, `torch._tensor._rebuild_from_type_v2`
  -> the TensorRef of their data, with the names of any attributes their state would set;
- `torch.<T>Storage`, `torch.Tensor`, `torch.nn.parameter.Parameter` -> markers that only name
  themselves; `torch.Size` -> a tuple; `torch.device` -> its string; `_codecs.encode` -> the
  latin-1 bytes of a string (how protocol 2 writes bytes); `collections.OrderedDict`;
- the inert Lightning / numpy stand-ins of pickles.py (INERT_GLOBALS).

Each callable is handed out as a fresh wrapper (a fresh subclass for a class), and references
refuse BUILD, so a pickle can neither change shared state nor a reference once it is made.
`{"state_dict": ...}` nesting is unwrapped as PickleSource does, string keys with tensor values
kept, and each reference is checked as tensorcheck.checked_tensor checks a tensor: no attributes,
its view inside its storage without two elements sharing bytes. (Its bytes, once read, pass
checked_tensor itself.)
"""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict

from ..errors import InputError, SdconvError, UnsafeInputError
from . import dtypes
from .pickle_scan import DAMAGED_HINT, STORAGE_SIZES, UNSAFE_HINT, StorageRef, scan_pickle
from .pickles import ALLOWED_GLOBALS, INERT_GLOBALS
from .tensorcheck import PLAIN_HINT, view_problem

# a storage class's element type, as a dtype code (torch.save writes the legacy typed names)
STORAGE_CODES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                 "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                 "ByteStorage": "U8", "BoolStorage": "BOOL", "UntypedStorage": "U8"}

_REBUILD = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor")


class _Frozen:
    """Set once, then never: BUILD (`__setstate__`) is refused."""
    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __setstate__(self, state):
        raise ValueError("it changes a tensor or storage after making it")

    def _init(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)


class Marker(_Frozen):
    """Stands for an imported type that is only named, never called (torch.FloatStorage, torch.Tensor)."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self._init(name=name)


class Storage(_Frozen):
    """A storage the pickle names: the record `data/<key>`, of `numel` elements of its type."""
    __slots__ = ("key", "type_name", "numel")

    def __init__(self, ref: StorageRef):
        self._init(key=ref.key, type_name=ref.type_name, numel=ref.numel)

    @property
    def nbytes(self) -> int:
        return self.numel * STORAGE_SIZES[self.type_name]


class TensorRef(_Frozen):
    """A tensor the pickle describes: a view (offset, shape, stride, in elements) of a storage."""
    __slots__ = ("storage", "offset", "shape", "stride", "attributes")

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple, attributes: tuple = ()):
        self._init(storage=storage, offset=offset, shape=shape, stride=stride, attributes=attributes)

    @property
    def code(self) -> str:
        return STORAGE_CODES[self.storage.type_name]

    def with_attributes(self, state) -> "TensorRef":
        names = _attribute_names(state)
        return TensorRef(self.storage, self.offset, self.shape, self.stride, self.attributes + names)


def _attribute_names(state) -> tuple:
    """The attribute names a tensor's pickled state would set (torch._utils._set_obj_state)."""
    if state is None:
        return ()
    parts = state if isinstance(state, tuple) else (state,)
    names = []
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict):
            raise ValueError(f"a tensor's state is a {type(part).__name__}")
        names += [str(k) for k in part]
    return tuple(names)


def _ints(v, what: str, minimum=None) -> tuple:
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(f"a tensor's {what} is not a tuple of integers ({str(v)[:60]})")
    if minimum is not None and any(i < minimum for i in v):
        raise ValueError(f"a tensor's {what} is negative ({str(v)[:60]})")
    return tuple(v)


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path, storages: dict):
        super().__init__(io.BytesIO(data))
        self._path, self._storages = path, storages
        self._rebuilders: list = []
        self._made: dict = {}           # storage key -> Storage

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full not in ALLOWED_GLOBALS:
            raise UnsafeInputError(f"{self._path}: refused to unpickle: it imports {full[:120]}, which could run "
                                   "code", UNSAFE_HINT)
        if full in _REBUILD:
            fn = _fresh(self._rebuild_tensor)
            self._rebuilders.append(fn)
            return fn
        if full == "torch._utils._rebuild_parameter":
            return _fresh(lambda data, requires_grad=False, hooks=None: self._tensor(data))
        if full == "torch._utils._rebuild_parameter_with_state":
            return _fresh(lambda data, requires_grad, hooks, state: self._tensor(data).with_attributes(state))
        if full == "torch._tensor._rebuild_from_type_v2":
            return _fresh(self._rebuild_from_type)
        if full == "collections.OrderedDict":
            return type("OrderedDict", (OrderedDict,), {})
        if full == "torch.Size":
            return _fresh(lambda sizes=(): _ints(sizes, "size", 0))
        if full == "torch.device":
            return _fresh(lambda *args: ":".join(map(str, args)))
        if full == "_codecs.encode":
            return _fresh(_latin1)
        if full in INERT_GLOBALS:
            stand_in = INERT_GLOBALS[full]
            return type(stand_in.__name__, (stand_in,), {}) if isinstance(stand_in, type) else _fresh(stand_in)
        return Marker(full)         # storage classes, torch.Tensor, Parameter: named, never called

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], Marker)
                and isinstance(pid[2], str)):
            raise InputError(f"{self._path}: data.pkl holds an unexpected persistent id {str(pid)[:80]}", DAMAGED_HINT)
        ref = self._storages.get(pid[2])
        if ref is None or f"torch.{ref.type_name}" != pid[1].name or ref.numel != pid[4]:
            raise InputError(f"{self._path}: storage {pid[2]} is named two ways in data.pkl", DAMAGED_HINT)
        return self._made.setdefault(ref.key, Storage(ref))

    def _tensor(self, t) -> TensorRef:
        if not isinstance(t, TensorRef):
            raise InputError(f"{self._path}: data.pkl makes a parameter of a {type(t).__name__}", DAMAGED_HINT)
        return t

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, Storage):
            raise InputError(f"{self._path}: a tensor in data.pkl has no storage", DAMAGED_HINT)
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise InputError(f"{self._path}: a tensor in data.pkl has a bad offset {str(offset)[:40]}", DAMAGED_HINT)
        return TensorRef(storage, offset, _ints(size, "size", 0), _ints(stride, "stride"))

    def _rebuild_from_type(self, func, new_type, args, state):
        if not any(func is f for f in self._rebuilders) or not isinstance(args, tuple):
            raise InputError(f"{self._path}: data.pkl rebuilds a tensor by other means than torch's", DAMAGED_HINT)
        if not (isinstance(new_type, Marker) and new_type.name in ("torch.Tensor", "torch.nn.parameter.Parameter")):
            raise InputError(f"{self._path}: data.pkl makes a tensor of type {str(new_type)[:60]}", PLAIN_HINT)
        return self._tensor(func(*args)).with_attributes(state)


def _fresh(fn):
    """A new function calling `fn`: whatever a pickle does to it (BUILD) stays with this one."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)
    return call


def _latin1(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise ValueError(f"it encodes a {type(text).__name__} as {str(encoding)[:20]}")
    return text.encode("latin-1")


def scan_state_dict(data: bytes, path):
    """data.pkl walked by pickle_scan (every import and call checked): its Scan, storages named."""
    return scan_pickle(io.BytesIO(data), path, "data.pkl", ALLOWED_GLOBALS)


def read_state_dict(data: bytes, path, storages: dict) -> dict:
    """`{key: TensorRef}` of the state dict data.pkl holds (`storages`: the scan's, checked
    against the archive's records), each reference checked as a tensor would be."""
    try:
        obj = _RefUnpickler(data, path, storages).load()
    except SdconvError:
        raise
    except (Exception, RecursionError) as e:        # a malformed pickle fails in many ways
        first = (str(e).splitlines() or [""])[0][:160]
        raise InputError(f"{path}: not a readable torch checkpoint (data.pkl: {type(e).__name__}: {first})",
                         DAMAGED_HINT) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]         # Lightning / CompVis .ckpt nesting
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, TensorRef)}
    for key, ref in out.items():
        if ref.attributes:
            raise InputError(f"{path}: tensor {key} carries attributes ({', '.join(ref.attributes[:3])}); sdconv "
                             "reads plain tensors only", PLAIN_HINT)
        problem = view_problem(ref.shape, ref.stride, ref.offset, dtypes.size(ref.code), ref.storage.nbytes)
        if problem:
            raise InputError(f"{path}: tensor {key} {problem}", PLAIN_HINT)
    return out

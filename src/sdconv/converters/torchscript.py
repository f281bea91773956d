"""Read the tensors of a TorchScript archive (OpenAI's released CLIP `.pt` files) without running it.

A TorchScript archive is a zip: `<root>/data.pkl` (the module tree, pickled), `<root>/data/<n>`
(raw storage bytes), `<root>/code/...` (the model's code), `<root>/constants.pkl`, version files.
`torch.jit.load` compiles and runs the code, and `torch.load(weights_only=True)` refuses these
archives, so sdconv reads them itself:

- `data.pkl` and `constants.pkl` are first walked opcode by opcode (pickle_scan): any import
  outside TORCHSCRIPT_GLOBALS, by any opcode, is refused (`UnsafeInputError`) before anything is
  unpickled. Then only `data.pkl` is unpickled, by `_Unpickler`, whose `find_class` resolves the same
  short list to inert stand-ins and refuses every other global (the second line). Nothing from the
  archive is ever imported, compiled or called; `constants.pkl` is never unpickled.
- storages are the bytes of `<root>/data/<key>` (decompressed if need be, sizes checked against the
  pickle before reading) viewed with the dtype their type name gives.
- the module tree is walked, joining attribute names with dots, which gives the keys of
  `torch.jit.load(path).state_dict()` (parameters and buffers, in the same order). data.pkl does not
  say which tensor attributes are parameters or buffers (a scripted module may hold plain tensor
  attributes, which state_dict() leaves out), so the `__parameters__ = [...]` / `__buffers__ = [...]`
  lines of `code/` are matched as text with a regular expression; a class without them keeps all
  its tensors (traced archives, OpenAI's included, have no plain tensor attributes).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

from ..errors import InputError, SdconvError, UnsafeInputError
from .pickle_scan import DAMAGED_HINT, STORAGE_SIZES, UNSAFE_HINT, scan_pickle
from .tensorcheck import pickle_record, storage_records, unique_names


class _TorchScriptNames:
    """What a TorchScript pickle may import: its module classes (`__torch__.*`, replaced by inert
    stand-ins) and what rebuilds tensors."""
    NAMES = frozenset({"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor",
                       "torch._utils._rebuild_parameter", "collections.OrderedDict", "torch.device",
                       *(f"torch.{s}" for s in STORAGE_SIZES if s != "UntypedStorage")})

    def __contains__(self, name) -> bool:
        return name.startswith("__torch__.") or name in self.NAMES


TORCHSCRIPT_GLOBALS = _TorchScriptNames()


def _storage_dtypes() -> dict:
    """Legacy typed-storage class names (as a TorchScript data.pkl spells them) -> dtype."""
    import torch
    return {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
            "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
            "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
            "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
            "ComplexDoubleStorage": torch.complex128}


# the header TorchScript writes for each module class in code/<module path>.py
_DECL = re.compile(r'^class (\w+)\(Module\):\n  __parameters__ = \[([^\]\n]*)\]\n  __buffers__ = \[([^\]\n]*)\]',
                   re.M)


def _declared(zf: zipfile.ZipFile, root: str, names) -> dict:
    """`{"__torch__.pkg.mod.Class": {parameter and buffer names}}` from the code/ files, read as
    text only (never compiled), for telling parameters and buffers from plain tensor attributes."""
    out: dict = {}
    for n in names:
        if not ((n.startswith(f"{root}code/__torch__/") or n == f"{root}code/__torch__.py") and n.endswith(".py")):
            continue
        if zf.getinfo(n).file_size > 50_000_000:
            continue
        module = n[len(f"{root}code/"):-3].replace("/", ".")
        text = zf.read(n).decode("utf-8", "replace")
        for cls, params, bufs in _DECL.findall(text):
            out[f"{module}.{cls}"] = set(re.findall(r'"([^"]*)"', params + bufs))
    return out


def _roots(names) -> set[str]:
    return {n.split("/", 1)[0] + "/" for n in names if "/" in n}


def is_torchscript(path) -> bool:
    """A zip with `<root>/constants.pkl` or `<root>/code/...` entries (names only; nothing unpickled)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return has_torchscript_names(names)


def has_torchscript_names(names) -> bool:
    """Do a zip's record names make it a TorchScript archive (a constants.pkl or code/ at the top)?"""
    for n in names:
        parts = n.split("/")
        if len(parts) == 2 and parts[1] == "constants.pkl":
            return True
        if len(parts) >= 3 and parts[1] == "code":
            return True
    return False


class _ScriptObject:
    """Stands in for every `__torch__.*` class (scripted modules, their submodules). It has no
    behaviour: the unpickler only creates it (NEWOBJ) and hands it its attribute dict (BUILD)."""
    __slots__ = ("state",)

    def __init__(self, *args, **kwargs):     # pickle may call the class directly (REDUCE); ignore args
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    """Marker for `torch.FloatStorage` & co: only carries a dtype (no __dict__, not callable)."""
    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class _Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` never imports anything.

    Every callable it hands out is either a bound method of this instance or a class with no side
    effects, so a pickle can call it (REDUCE) or BUILD on it without touching any shared state."""

    def __init__(self, file, zf: zipfile.ZipFile, root: str, path):
        super().__init__(file)
        self._zf, self._root, self._path = zf, root, path
        self._storages: dict = {}
        self._dtypes = _storage_dtypes()
        self._classes: dict = {}

    def find_class(self, module, name):
        import torch
        if module == "__torch__" or module.startswith("__torch__."):
            # TorchScript class of a module: replaced by an inert subclass of _ScriptObject
            # (one per name, created here, so nothing from the archive's code/ is used)
            qual = f"{module}.{name}"
            cls = self._classes.get(qual)
            if cls is None:
                cls = type("ScriptObject", (_ScriptObject,), {"__slots__": (), "qualname": qual})
                self._classes[qual] = cls
            return cls
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor_v2     # a view over bytes we already hold
        if module == "torch._utils" and name == "_rebuild_tensor":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter     # a Parameter is stored as its data tensor
        if module == "collections" and name == "OrderedDict":
            return OrderedDict                 # a plain container (tensor metadata, backward hooks)
        if module == "torch" and name in self._dtypes:
            return _StorageType(name, self._dtypes[name])   # only names a dtype
        if module == "torch" and name == "device":
            return torch.device                # a value type: building one only parses "cpu"/"cuda:0"
        raise UnsafeInputError(f"{self._path}: refused to unpickle: it imports {module}.{name}, "
                               f"which could run code", UNSAFE_HINT)

    def persistent_load(self, pid):
        # ('storage', StorageType, key, location, numel): the bytes of <root>/data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise InputError(f"{self._path}: unexpected persistent id {str(pid)[:80]!r} in data.pkl",
                             DAMAGED_HINT)
        _, stype, key, _location, numel = pid
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        import torch
        data = bytearray(self._zf.read(f"{self._root}data/{key}"))
        size = torch.empty((), dtype=stype.dtype).element_size()
        if not isinstance(numel, int) or len(data) != numel * size:
            raise InputError(f"{self._path}: storage {key} holds {len(data)} bytes, expected {numel} x {size}",
                             DAMAGED_HINT)
        t = torch.frombuffer(data, dtype=stype.dtype) if data else torch.empty(0, dtype=stype.dtype)
        self._storages[key] = t
        return t

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        import torch
        if not isinstance(storage, torch.Tensor):
            raise InputError(f"{self._path}: a tensor in data.pkl has no storage", DAMAGED_HINT)
        # as_strided checks that the view stays inside the storage
        return torch.as_strided(storage, tuple(size), tuple(stride), storage_offset)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data


def _walk(obj, prefix: str, out: dict, declared: dict, depth: int = 0):
    """Parameters and buffers reachable through the attribute dicts of the inert module objects,
    with dotted names."""
    import torch
    if depth > 200:
        raise ValueError("module tree nested more than 200 deep")     # a cycle; reported with the path
    state = getattr(obj, "state", None)     # unset when NEWOBJ had no BUILD
    if not isinstance(state, dict):
        return
    keep = declared.get(getattr(obj, "qualname", None))
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            if keep is None or name in keep:
                out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _walk(value, f"{prefix}{name}.", out, declared, depth + 1)


def read_torchscript(path) -> dict:
    """`{name: tensor}` of a TorchScript archive, as `torch.jit.load(path).state_dict()` gives it
    (same names, order, dtypes, shapes, strides and values), without executing anything."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            roots = sorted(r for r in _roots(names) if f"{r}data.pkl" in names)
            if len(roots) != 1:
                raise InputError(f"{path}: not a TorchScript archive ({len(roots)} data.pkl records at the top)",
                                 DAMAGED_HINT)
            root = roots[0]
            if f"{root}byteorder" in names and zf.read(f"{root}byteorder").strip() != b"little":
                raise InputError(f"{path}: a big-endian TorchScript archive, which sdconv does not read")
            unique_names(zf)
            for name in ("data.pkl", "constants.pkl"):     # every import checked before anything is unpickled
                if name == "data.pkl" or f"{root}{name}" in names:
                    pickle_record(zf, f"{root}{name}")
                    with zf.open(f"{root}{name}") as f:
                        scan = scan_pickle(f, path, name, TORCHSCRIPT_GLOBALS)
                    if name == "data.pkl":
                        list(storage_records(zf, root, scan.storages, path))
            with zf.open(f"{root}data.pkl") as f:
                top = _Unpickler(f, zf, root, path).load()
            if not isinstance(top, _ScriptObject):
                raise InputError(f"{path}: data.pkl holds a {type(top).__name__}, not a TorchScript module",
                                 DAMAGED_HINT)
            out: dict = {}
            _walk(top, "", out, _declared(zf, root, names))
    except SdconvError:
        raise
    except Exception as e:  # malformed zip or pickle: every failure is a damaged input here
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{path}: not a readable TorchScript archive ({type(e).__name__}: {reason})",
                         DAMAGED_HINT) from None
    return out

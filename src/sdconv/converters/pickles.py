"""Safe torch pickles: the reader of .ckpt/.pt/.pth/.bin files, and the inert globals of real
Stable Diffusion .ckpt files, as stand-ins.

Before torch reads a file, its pickle(s) are walked without unpickling (pickle_scan.py): any
import outside ALLOWED_GLOBALS, by any opcode, is refused (exit 4), and the storages the pickle
names are checked against the file (tensorcheck.py). Then zip checkpoints are read with
`torch.load(weights_only=True, mmap=True)`, so tensors stay on disk until read (mmap=False where a
record is compressed or big-endian, so that the bytes are the decompressed ones); torch's own
refusals are a second line of defence. `{"state_dict": ...}` nesting is unwrapped; OpenAI's
TorchScript archives go to torchscript.py's restricted unpickler. Every tensor, from either
reader, passes tensorcheck.checked_tensors before use. Nothing is ever executed.

Real SD1.x checkpoints were saved by PyTorch Lightning and carry, beside the state dict, a
ModelCheckpoint callback's state and numpy scalars (global_step, best score). torch's
weights_only unpickler refuses those globals, which is why other tools fall back to unsafe
loading. Here each one is mapped by *name* to a harmless stand-in that only stores the data it
is given: nothing of pytorch_lightning or numpy is imported or run. Any global not listed is
refused (no flag turns unsafe loading on). This list is reviewed code, not user data.
"""
from __future__ import annotations

import os
import struct
import tarfile
import zipfile
from pathlib import Path

from ..errors import InputError, SdconvError, UnsafeInputError
from . import dtypes, leases
from .pickle_scan import TENSOR_GLOBALS, UNSAFE_HINT, Scan, scan_pickle
from .sources import MAPPED_SOURCES, Source, TensorInfo
from .tensorcheck import (check_legacy_sizes, check_zip_records, checked_tensors, pickle_record, unique_names,
                          zip_root)
from .torchscript import is_torchscript, read_torchscript


class Inert:
    """Stands in for an object whose state is never used (callbacks, hyper-parameter dicts)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):       # dict subclasses (AttributeDict) are rebuilt by items
        self.__dict__.setdefault("items", {})[key] = value


class Dtype(Inert):
    """numpy.dtype('i8', False, True): keeps the type code, e.g. 'i8' or 'f8'."""

    @property
    def code(self) -> str:
        return str(self.args[0]) if self.args else "f8"




def scalar(dtype, data=b""):
    """numpy.core.multiarray.scalar(dtype, bytes) -> a Python number, decoded with struct."""
    code = dtype.code if isinstance(dtype, Dtype) else "f8"
    fmt = dtypes.STRUCT_BY_NUMPY.get(code.lstrip("<>|="))
    if fmt is None or not isinstance(data, (bytes, bytearray)) or len(data) != struct.calcsize(fmt):
        return Inert(code, data)
    return struct.unpack("<" + fmt, data)[0]


def _lightning(names):
    # Lightning 1.x (pytorch_lightning) and 2.x (lightning.pytorch) spellings
    return [f"{root}.{n}" for root in ("pytorch_lightning", "lightning.pytorch") for n in names]


INERT_GLOBALS = {
    **{name: Inert for name in _lightning([
        "callbacks.model_checkpoint.ModelCheckpoint", "callbacks.early_stopping.EarlyStopping",
        "callbacks.lr_monitor.LearningRateMonitor", "utilities.parsing.AttributeDict",
        "trainer.states.TrainerFn", "trainer.states.RunningStage"])},
    # numpy 1.x pickles say numpy.core..., numpy 2.x numpy._core...
    "numpy.core.multiarray.scalar": scalar,
    "numpy._core.multiarray.scalar": scalar,
    "numpy.dtype": Dtype,
    "numpy.core.multiarray._reconstruct": Inert,
    "numpy._core.multiarray._reconstruct": Inert,
    "numpy.ndarray": Inert,
}


# inert by construction, so offered to every load (legacy pickles cannot be listed up front)
_STAND_INS = [(fn, name) for name, fn in INERT_GLOBALS.items()]
# every name a torch pickle may import: tensors and their containers, and the stand-ins
ALLOWED_GLOBALS = TENSOR_GLOBALS | frozenset(INERT_GLOBALS)
# a legacy file is five pickles: magic number, protocol, system info, the object, storage keys
_LEGACY_PICKLES = ("its magic number", "its protocol", "its system info", "its pickle", "its storage keys")


def _reason(e: BaseException) -> str:
    """The informative line of an exception from torch (it wraps its own in boilerplate)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch")
    lines = [ln.strip() for ln in str(e).split("WeightsUnpickler error:")[-1].splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(boiler)]
    return f"{type(e).__name__}: {(useful[0] if useful else '')[:200]}"


def scan_torch_file(path: Path) -> tuple[bool, bool]:
    """Walk the pickle(s) of a torch file without unpickling them (pickle_scan: every import
    and call checked, every storage found), and check its storages against the file.
    (is a zip, can be memory-mapped). Raises UnsafeInputError / InputError."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            unique_names(zf)
            name = f"{zip_root(zf)}data.pkl"
            pickle_record(zf, name)
            with zf.open(name) as f:
                scan = scan_pickle(f, path, "data.pkl", ALLOWED_GLOBALS)
        return True, check_zip_records(path, scan.storages)
    if tarfile.is_tarfile(path):
        raise InputError(f"{path}: a tar-format torch file (before torch 0.4), which sdconv does not read",
                         "load and re-save it with a current torch, or convert it to .safetensors")
    scan = Scan()
    with open(path, "rb") as f:
        for what in _LEGACY_PICKLES:
            scan_pickle(f, path, what, ALLOWED_GLOBALS, scan)
        check_legacy_sizes(path, scan.storages, f.tell())
    return False, False


def _torch_load(path: Path, mmap: bool):
    """torch.load(weights_only=True) of a file scan_torch_file accepted: the second line of
    defence. Every import was checked before, so whatever torch refuses or fails on here is a
    damaged file (exit 3), whatever the exception."""
    import torch
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
    except Exception:       # torch's own list is a second opinion; the scan above is the rule
        named = []
    unknown = [n for n in named if n not in ALLOWED_GLOBALS]
    if unknown:
        raise UnsafeInputError(f"{path}: refused to unpickle: it imports {', '.join(unknown[:3])}"
                               f"{' and more' if len(unknown) > 3 else ''}, which could run code", UNSAFE_HINT)
    try:
        # the Lightning / numpy objects of real SD checkpoints become inert stand-ins
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except SdconvError:
        raise
    except (Exception, RecursionError) as e:     # damaged archives fail in many ways inside torch
        raise InputError(f"{path}: not a readable torch checkpoint ({_reason(e)})",
                         "the file may be truncated or not a checkpoint at all") from None


class PickleSource(Source):
    container = "torch pickle"
    _size: int | None = None         # the file's size when its tensors were mapped

    def __init__(self, path: Path):
        import torch
        self.path = path
        if is_torchscript(path):
            # OpenAI's .pt releases: read by a restricted unpickler, never torch.jit.load (no code runs)
            self._set(read_torchscript(path))
            return
        is_zip, mmap = scan_torch_file(path)
        if mmap:        # opened before torch maps it: load() re-checks its size before handing out a view
            self._fd = os.open(path, os.O_RDONLY)
            self._size = os.fstat(self._fd).st_size
            leases.hold(self._fd, path)     # a truncation or write now stops sdconv (exit 3), not SIGBUS
        obj = _torch_load(path, mmap)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]     # Lightning / CompVis .ckpt nesting
        if not isinstance(obj, dict):
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        self._set({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)})
        if mmap:        # torch's map of the whole file: unchanged tensors are copied file to file
            self._span = _whole_file_map(path, self._t.values())
            if self._span is not None:
                MAPPED_SOURCES.add(self)

    def _set(self, tensors: dict):
        self._t = checked_tensors(self.path, tensors)      # every tensor, whichever reader made it
        self._info = {k: TensorInfo(tuple(v.shape), dtypes.code_of(v.dtype)) for k, v in self._t.items()}

    def keys(self):
        return list(self._info)

    def info(self, key):
        return self._info[key]

    def load(self, key):
        if self._size is not None and os.fstat(self._fd).st_size < self._size:
            # reading a mapped page past the new end would kill the process (SIGBUS)
            raise InputError(f"{self.path}: the file shrank while it was being read",
                             "do not change a checkpoint while it is converted")
        return self._t[key]


def _whole_file_map(path: Path, tensors) -> tuple[int, int] | None:
    """(start, end) of the map of the whole file that torch.load(mmap=True) made, if every tensor
    lies in it (each storage is the slice of that map at its zip record's offset, so a tensor's
    file offset is its address minus the start). From /proc/self/maps: Linux only, else None."""
    try:
        st = os.stat(path)
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    spans = []
    for line in lines:     # start-end perms offset dev inode path
        parts = line.split(None, 5)
        if len(parts) == 6 and int(parts[4]) == st.st_ino and int(parts[2], 16) == 0:
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            if os.makedev(major, minor) == st.st_dev:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if end - start >= st.st_size:
                    spans.append((start, start + st.st_size))
    ptrs = [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if t.numel()]
    inside = [s for s in spans if all(s[0] <= p and p + n <= s[1] for p, n in ptrs)]
    return inside[0] if len(inside) == 1 and ptrs else None

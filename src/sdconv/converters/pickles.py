"""Safe torch pickles: the reader of .ckpt/.pt/.pth/.bin files, and the inert globals of real
Stable Diffusion .ckpt files, as stand-ins.

Zip checkpoints are read with `torch.load(weights_only=True, mmap=True)`, so tensors stay on disk
until read; `{"state_dict": ...}` nesting is unwrapped; OpenAI's TorchScript archives go to
torchscript.py's restricted unpickler. Nothing is ever executed.

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
import zipfile
from pathlib import Path

from ..errors import InputError, UnsafeInputError
from . import dtypes
from .sources import MAPPED_SOURCES, Source, TensorInfo
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

_UNSAFE_HINT = ("sdconv never runs code from a checkpoint; convert the file to .safetensors with a tool you "
                "trust")


def _unpickling_reason(msg: str) -> str:
    """The informative line of torch's weights_only error (it wraps it in boilerplate)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in msg.split("WeightsUnpickler error:")[-1].splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(boiler)]
    return (useful[0] if useful else msg.splitlines()[0] if msg else "unknown error")[:200]


class PickleSource(Source):
    container = "torch pickle"
    def __init__(self, path: Path):
        import pickle

        import torch
        self.path = path
        if is_torchscript(path):
            # OpenAI's .pt releases: read by a restricted unpickler, never torch.jit.load (no code runs)
            self._t = read_torchscript(path)
            self._info = {k: TensorInfo(tuple(v.shape), dtypes.code_of(v.dtype)) for k, v in self._t.items()}
            return
        # legacy (pre-1.6) torch pickles cannot be memory-mapped; weights_only still applies
        kwargs = {"mmap": zipfile.is_zipfile(path)}
        try:    # name the globals the pickle would import, without running anything
            named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:       # damaged or legacy archives: torch.load below reports what it refuses
            named = []
        unknown = [n for n in named if n not in INERT_GLOBALS]
        if unknown:
            raise UnsafeInputError(f"{path}: refused to unpickle: it imports {', '.join(unknown[:3])}"
                                   f"{' and more' if len(unknown) > 3 else ''}, which could run code", _UNSAFE_HINT)
        try:
            # the Lightning / numpy objects of real SD checkpoints become inert stand-ins
            with torch.serialization.safe_globals(_STAND_INS):
                obj = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            reason = _unpickling_reason(str(e))
            # a refused global is unsafe; anything else is a damaged or foreign file
            if "global" in reason.lower():
                raise UnsafeInputError(f"{path}: refused to unpickle: {reason}", _UNSAFE_HINT)
            raise InputError(f"{path}: not a readable torch checkpoint ({reason})",
                             "the file may be truncated, or not a checkpoint at all")
        except (UnsafeInputError, InputError):
            raise
        except (Exception, RecursionError) as e:     # damaged archives fail in many ways inside torch
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise InputError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first})",
                             "the file may be truncated or not a checkpoint at all")
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]     # Lightning / CompVis .ckpt nesting
        if not isinstance(obj, dict):
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        self._t = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        self._info = {k: TensorInfo(tuple(v.shape), dtypes.code_of(v.dtype)) for k, v in self._t.items()}
        if kwargs["mmap"]:      # torch's map of the whole file
            span = _whole_file_map(path, self._t.values())
            if span is not None:
                self._fd, self._span = os.open(path, os.O_RDONLY), span
                MAPPED_SOURCES.add(self)

    def keys(self):
        return list(self._info)

    def info(self, key):
        return self._info[key]

    def load(self, key):
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

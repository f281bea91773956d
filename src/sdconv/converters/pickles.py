"""Safe torch pickles: the inert globals of real Stable Diffusion .ckpt files, as stand-ins.

Real SD1.x checkpoints were saved by PyTorch Lightning and carry, beside the state dict, a
ModelCheckpoint callback's state and numpy scalars (global_step, best score). torch's
weights_only unpickler refuses those globals, which is why other tools fall back to unsafe
loading. Here each one is mapped by *name* to a harmless stand-in that only stores the data it
is given: nothing of pytorch_lightning or numpy is imported or run. Any global not listed is
refused (no flag turns unsafe loading on). This list is reviewed code, not user data.
"""
from __future__ import annotations

import struct


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


_STRUCT = {"i8": "q", "i4": "i", "i2": "h", "i1": "b", "u8": "Q", "u4": "I", "u2": "H", "u1": "B",
           "f8": "d", "f4": "f", "f2": "e", "b1": "?"}


def scalar(dtype, data=b""):
    """numpy.core.multiarray.scalar(dtype, bytes) -> a Python number, decoded with struct."""
    code = dtype.code if isinstance(dtype, Dtype) else "f8"
    fmt = _STRUCT.get(code.lstrip("<>|="))
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

"""A Lightning-style .ckpt made without Lightning: the state dict under "state_dict", a
pytorch_lightning ModelCheckpoint callback, numpy scalars in the numpy 2 spelling (np.int64,
np.float64) and one in the numpy 1 spelling (numpy.core.multiarray.scalar), as real SD
checkpoints hold them. Used by tests/test_pickles.py and bench/bench.py.

It registers fake modules in sys.modules so that pickle writes those classes by name: call it
only in a process of its own."""
import struct
import sys
import types


def save_lightning_ckpt(state_dict: dict, path, zip_format: bool = True):
    import numpy as np
    import torch
    for m in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        sys.modules[m] = types.ModuleType(m)

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path, self.monitor, self.save_top_k = "last.ckpt", "val/loss_simple_ema", -1
    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    np1 = types.ModuleType("numpy.core.multiarray")      # numpy 1's spelling of the scalar rebuilder

    def scalar(dtype, data):
        raise AssertionError("never called while saving")
    scalar.__module__, scalar.__qualname__ = "numpy.core.multiarray", "scalar"
    np1.scalar = scalar
    sys.modules["numpy.core.multiarray"] = np1

    class Np1Scalar:
        def __reduce__(self):
            return (scalar, (np.dtype("int64"), struct.pack("<q", 470000)))

    torch.save({"state_dict": state_dict, "global_step": Np1Scalar(), "epoch": np.int64(6),
                "best_model_score": np.float64(0.25), "callbacks": {"ModelCheckpoint": ModelCheckpoint()}},
               path, _use_new_zipfile_serialization=zip_format)

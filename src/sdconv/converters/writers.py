"""Writing tensors: safetensors streamed (the header from the plan, then each tensor as it is
made), or a torch .pt state dict. A tensor that is an unchanged region of a mapped input is
copied file to file by the kernel; any other is written from memory. Files are written where
they are told; atomic placement is atomic.py's job."""
from __future__ import annotations

import errno
import json
import os
import struct
import sys
from pathlib import Path

from ..errors import InputError, OutputError
from . import dtypes
from .hashing import LateValue
from .sources import MAPPED_SOURCES, PICKLE_EXT, tensor_bytes
from .stream import TensorStream


def format_for(output: Path, fmt: str | None) -> str:
    """--format wins; otherwise the output's suffix decides; safetensors by default."""
    if fmt:
        return fmt
    return "pt" if Path(output).suffix in PICKLE_EXT else "safetensors"


# whether the kernel copies file to file here; cleared at the first refusal (then plain writes)
COPY_FILE_RANGE = {"works": hasattr(os, "copy_file_range")}


def copy_from_input(f, t) -> bool:
    """Write t by copying its bytes file to file in the kernel, if t is an unchanged region of a
    mapped input (most tensors are only renamed; split q/k/v and the parts of a fused one are
    such regions too). The bytes then never pass through this process, which halves the cost
    of writing. False: write t's memory instead (t made here, or no copy_file_range)."""
    n = t.numel() * t.element_size()
    if not n or not COPY_FILE_RANGE["works"]:
        return False
    found = next(((source, r) for source in list(MAPPED_SOURCES) if (r := source.region(t.data_ptr(), n))), None)
    if found is None:
        return False
    source, (fd, src) = found
    f.flush()
    start = dst = f.tell()
    try:
        while dst < start + n:
            copied = os.copy_file_range(fd, f.fileno(), start + n - dst, src, dst)
            if copied == 0:
                raise InputError(f"{source.path}: the file shrank while it was being read",
                                 "do not change a checkpoint while it is converted")
            src, dst = src + copied, dst + copied
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
            raise
        COPY_FILE_RANGE["works"] = False     # e.g. across file systems on old kernels: plain writes
        f.seek(start)
        return False
    f.seek(dst)
    return True


def write_safetensors(tensors, path: Path, metadata: dict | None = None):
    """Write the safetensors format directly: an 8-byte little-endian header length, a JSON
    header (tensor offsets, `__metadata__`), then each tensor's bytes. `tensors` is a dict or a
    TensorStream: the header comes from the stream's plan, and each tensor is written as soon
    as it is made, then dropped. (safetensors' own save_file needs numpy, which sdconv does not
    depend on, and builds the whole file in memory.)"""
    if sys.byteorder != "little":   # pragma: no cover
        raise OutputError("writing safetensors needs a little-endian machine")
    stream = tensors if isinstance(tensors, TensorStream) else TensorStream.from_dict(tensors)
    header: dict = {}
    late = {k: v for k, v in (metadata or {}).items() if isinstance(v, LateValue)}
    if metadata:
        header["__metadata__"] = {str(k): (v.placeholder() if k in late else str(v)) for k, v in metadata.items()}
    offset = 0
    for e in stream.entries:
        n = dtypes.size(e.dtype)
        for d in e.shape:
            n *= d
        header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)          # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, parts in stream.pieces():      # a fused q|k|v: its parts, one after another
            for t in parts:
                t = t.contiguous()
                if not copy_from_input(f, t):
                    f.write(tensor_bytes(t))
        if late:                            # values computed meanwhile (the source's sha256)
            for k, v in late.items():
                header["__metadata__"][k] = v.result()
            final = json.dumps(header, separators=(",", ":")).encode()
            final += b" " * (len(raw) - len(final))
            if len(final) != len(raw):
                raise RuntimeError("internal error: the header changed size")
            f.seek(8)
            f.write(final)


def save_tensors(tensors, path: Path, fmt: str, metadata: dict | None = None):
    """Write a dict or TensorStream as safetensors (streamed) or a torch .pt state dict."""
    import torch
    if fmt == "safetensors":
        write_safetensors(tensors, path, metadata)
    else:
        d = tensors.to_dict() if isinstance(tensors, TensorStream) else tensors
        try:
            torch.save({k: v.contiguous() for k, v in d.items()}, str(path))
        except RuntimeError as e:   # torch's zip writer reports a failed write (a full disk) this way
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise OSError(errno.EIO, f"torch.save: {first}") from e     # the caller names the output

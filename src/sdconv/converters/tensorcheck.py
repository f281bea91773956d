"""Trusting the tensors of a torch archive: the archive's records checked against its pickle
before torch reads them, and every tensor checked before sdconv uses it.

- `check_zip_records`: each storage the pickle names (pickle_scan.StorageRef) is a record
  `<root>/data/<key>` that exists once, holds exactly the bytes the pickle says, and lies inside
  the file where torch's own zip reader finds it. A memory-mapped read takes a record's raw bytes,
  so it is used only when every record is stored uncompressed and little-endian; otherwise the
  archive is read through torch's decompressing reader (checked sizes and CRCs), which gives the
  bytes `torch.load(mmap=False)` gives.
- `check_legacy_sizes`: a legacy pickle's storages fit in the bytes its file has left.
- `checked_tensors`: the one check every tensor from a pickle or a TorchScript archive passes
  (pickles.PickleSource calls it for both): a plain, dense CPU tensor (no meta, sparse, quantized or
  nested tensor, no subclass, no attributes) whose view lies inside its storage without two
  elements sharing bytes, so that what is read and written is at most the bytes that exist.
"""
from __future__ import annotations

import os
import struct
import zipfile

from ..errors import InputError
from . import dtypes
from .pickle_scan import DAMAGED_HINT

_LOCAL_HEADER = struct.Struct("<4s22xHH")     # signature, ..., name length, extra length
# deflate expands at most ~1032x; a record claiming more than this lies about its size
_MAX_DEFLATE_RATIO = 1100


def zip_root(zf: zipfile.ZipFile) -> str:
    """The archive's folder, as torch's reader takes it: the first record's first path part."""
    names = zf.namelist()
    if not names or "/" not in names[0]:
        raise InputError(f"{zf.filename}: not a torch archive (no records in a folder)", DAMAGED_HINT)
    return names[0].split("/", 1)[0] + "/"


def unique_names(zf: zipfile.ZipFile):
    names = zf.namelist()
    if len(set(names)) != len(names):
        raise InputError(f"{zf.filename}: the archive names a record twice", DAMAGED_HINT)


def data_offset(f, info: zipfile.ZipInfo, size: int) -> int:
    """Where a record's bytes start, from its local header; they must end inside the file."""
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(head)[0] != b"PK\x03\x04":
        raise InputError(f"{f.name}: record {info.filename} has no valid header", DAMAGED_HINT)
    _, n, m = _LOCAL_HEADER.unpack(head)
    start = info.header_offset + _LOCAL_HEADER.size + n + m
    if start + info.compress_size > size:
        raise InputError(f"{f.name}: record {info.filename} runs past the end of the file",
                         "the file is truncated; download it again")
    return start


# a pickle larger than this is not a state dict (real ones are well under a megabyte); the
# opcode scan keeps a model of the pickle's stack, which must stay small
MAX_PICKLE_BYTES = 64 << 20


def pickle_record(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """The record of a pickle (data.pkl, constants.pkl), within the size sdconv reads."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise InputError(f"{zf.filename}: not a torch archive (it has no {name})", DAMAGED_HINT) from None
    if info.file_size > MAX_PICKLE_BYTES:
        raise InputError(f"{zf.filename}: {name} is {info.file_size} bytes, more than a state dict's pickle",
                         DAMAGED_HINT)
    return info


def storage_records(zf: zipfile.ZipFile, root: str, storages: dict, path):
    """(StorageRef, ZipInfo) of each storage the pickle names: the record exists and holds
    exactly the bytes the pickle says (after decompression, if compressed)."""
    for ref in storages.values():
        try:
            info = zf.getinfo(f"{root}data/{ref.key}")
        except KeyError:
            raise InputError(f"{path}: the pickle names storage {ref.key}, which the archive lacks",
                             DAMAGED_HINT) from None
        if info.file_size != ref.nbytes:
            raise InputError(f"{path}: record data/{ref.key} holds {info.file_size} bytes, its pickle says "
                             f"{ref.nbytes}", "the file is damaged, or was repacked wrongly; download it again")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise InputError(f"{path}: record data/{ref.key} claims more bytes than it can hold", DAMAGED_HINT)
        yield ref, info


def check_zip_records(path, storages: dict) -> bool:
    """Every storage of a torch zip checked against its record; True if all can be memory-mapped
    (stored uncompressed, little-endian, where torch's reader finds them), False if torch must read
    them through its decompressing reader instead."""
    import torch
    size = os.path.getsize(path)
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        unique_names(zf)
        root = zip_root(zf)
        mappable = True
        if f"{root}byteorder" in zf.namelist() and zf.read(f"{root}byteorder").strip() != b"little":
            mappable = False         # torch byte-swaps such storages in memory
        reader = None
        for ref, info in storage_records(zf, root, storages, path):
            start = data_offset(f, info, size)
            if info.compress_type != zipfile.ZIP_STORED:
                mappable = False
                continue
            if info.compress_size != info.file_size:
                raise InputError(f"{path}: record data/{ref.key} is stored with two sizes", DAMAGED_HINT)
            reader = reader or torch._C.PyTorchFileReader(str(path))
            if reader.get_record_offset(f"data/{ref.key}") != start:
                raise InputError(f"{path}: torch and the zip directory disagree on where data/{ref.key} is",
                                 DAMAGED_HINT)
    return mappable


def check_legacy_sizes(path, storages: dict, data_start: int):
    """The storages of a legacy (pre-zip) pickle fit in the file after its pickles."""
    left = os.path.getsize(path) - data_start
    need = sum(ref.nbytes for ref in storages.values())
    if need > left:
        raise InputError(f"{path}: its pickle names {need} bytes of storages, the file has {left} left",
                         "the file is truncated; download it again")


PLAIN_HINT = "save the state dict with plain dense CPU tensors"


def view_problem(size, stride, offset: int, elem: int, have: int) -> str | None:
    """Why a strided view (`size`, `stride`, `offset` in elements of `elem` bytes) is not a plain
    view into a storage of `have` bytes, or None: it must lie inside it, and no two of its
    elements may share bytes."""
    if any(s < 0 for s in stride) or offset < 0:
        return "has negative strides or offset"
    if any(n == 0 for n in size):
        return None
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if (last + 1) * elem > have:
        return f"has a view ending at byte {(last + 1) * elem} of a storage of {have} bytes"
    span, numel = 1, 1
    for n in size:
        numel *= n
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda ns: ns[1]):
        if s < span:
            return (f"has overlapping elements (stride {s} over a dimension of {n}): it claims {numel * elem} "
                    f"bytes over a storage of {have}")
        span = s * n
    return None


def _view_problem(t) -> str | None:
    return view_problem(tuple(t.shape), t.stride(), t.storage_offset(), t.element_size(),
                        t.untyped_storage().nbytes())


def checked_tensor(path, key: str, t):
    """`t` as a plain tensor, or InputError saying why it cannot be used."""
    import torch

    def refuse(why):
        raise InputError(f"{path}: tensor {key} {why}", PLAIN_HINT)
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        refuse(f"is a {type(t).__name__}, a tensor subclass; sdconv reads plain tensors only")
    if t.__dict__:
        refuse(f"carries attributes ({', '.join(map(str, list(t.__dict__)[:3]))}); sdconv reads plain tensors only")
    if t.layout != torch.strided or t.is_sparse or t.is_quantized or t.is_nested:
        refuse(f"is a {str(t.layout).replace('torch.', '')} tensor, not a dense one")
    if t.device.type != "cpu":
        refuse("is a meta-device tensor: it holds no data" if t.is_meta else f"is on the {t.device} device")
    if dtypes.code_of(t.dtype) not in dtypes.BY_CODE:
        refuse(f"has dtype {t.dtype}, which sdconv does not read")
    problem = _view_problem(t)
    if problem:
        refuse(problem)
    return t.detach() if type(t) is not torch.Tensor else t


def checked_tensors(path, tensors: dict) -> dict:
    """Every tensor of a pickle or TorchScript archive, checked (see checked_tensor)."""
    return {k: checked_tensor(path, k, v) for k, v in tensors.items()}

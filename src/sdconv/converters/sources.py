"""Sources: a lazy tensor view `key -> (shape, dtype)` over one input, loading a tensor's bytes
only when asked. This module holds the base class and the safetensors reader.

A .safetensors header is parsed here (no torch needed); tensors are read-only views of a memory
map of the file (no copy; the pages are dropped from the process every so often, so memory does
not grow with what was read). A source whose file is mapped whole registers itself in
MAPPED_SOURCES, so that a writer can copy a tensor that is an unchanged region of it file to file
(see `Source.region`). Torch pickles are read in pickles.py, folders and shard indexes in
folders.py.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MalformedInputError
from . import dtypes, leases, untrusted
from .hashing import late_sha256, sha256_of

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
# bytes of tensors handed out by a safetensors source between two drops of its mapped pages
TRIM_BYTES = 64 << 20
# sources whose file is mapped whole: a tensor written unchanged is copied file to file
MAPPED_SOURCES: "weakref.WeakSet[Source]" = weakref.WeakSet()


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: str                  # safetensors code: F32, F16, BF16, I64, ...

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtypes.size(self.dtype)

    @property
    def is_float(self) -> bool:
        return dtypes.is_float(self.dtype)


def tensor_bytes(t):
    """A contiguous CPU tensor's bytes as a zero-copy buffer (no numpy needed). The buffer does
    not keep `t` alive: the caller holds `t` while it uses the buffer."""
    import ctypes
    n = t.numel() * t.element_size()
    return (ctypes.c_char * n).from_address(t.data_ptr()) if n else b""


class Source:
    """A lazy tensor view over one file or folder."""
    path: Path
    is_folder = False
    container = "?"
    _fd: int | None = None                    # the file, opened for reads
    costly_reads = False                      # a remote input: inspect reads no weights
    _span: tuple[int, int] | None = None      # addresses of a map of the whole file, if any

    def keys(self) -> list[str]: ...
    def info(self, key: str) -> TensorInfo: ...
    def load(self, key: str): ...

    def metadata(self, folder: str = "") -> dict:
        """The container's own metadata (safetensors __metadata__; of `folder`'s weights in a folder)."""
        return {}

    def raw(self, key: str) -> bytes:
        """A tensor's bytes (little-endian, row-major), for small tensors such as position_ids."""
        t = self.load(key).contiguous()     # held while its bytes are copied (a temporary would be freed first)
        return bytes(tensor_bytes(t))

    def kind(self) -> str:
        return self.container

    def read_json(self, rel: str) -> "untrusted.Value | None":
        """A JSON file of the input (a folder's config.json), bounded and typed; None if absent."""
        return None

    def files(self) -> list[Path]:
        return [self.path]

    def sha256(self) -> str:
        """The input's sha256, for provenance: of its files, in order (cached on disk by hashing.py)."""
        if getattr(self, "_sha256", None) is None:
            self._sha256 = sha256_of(self.files())
        return self._sha256

    def late_sha256(self):
        """sha256(), or a LateValue computing it while a conversion runs (unless it is cached)."""
        return late_sha256(self.files())

    def provenance(self) -> dict:
        """Metadata on where the input came from besides its name and sha256 (a URL's address, ETag)."""
        return {}

    def parts(self) -> list["Source"]:
        """The sources this one is made of (a folder's weight files, an index's shards)."""
        return []

    def size_bytes(self) -> int:
        """The input's size: its files' (a remote file's as its server states it)."""
        return sum(p.stat().st_size for p in self.files())

    def prefetch(self, keys) -> None:
        """Make the tensors of `keys` quick to load: a remote source fetches their bytes at once."""

    def region(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """(file descriptor, offset) of `nbytes` at `address` if they lie in this source's map of
        its file, which tensors are never written through (so a writer can copy them file to
        file); None otherwise."""
        if self._span is not None and self._span[0] <= address and address + nbytes <= self._span[1]:
            return self._fd, address - self._span[0]
        return None

    def __del__(self):
        # a map stays valid while tensors use it; the descriptor is not needed for that
        if self._fd is not None:
            leases.release(self._fd)
            os.close(self._fd)


def _header_entry(key, v) -> tuple:
    """(TensorInfo, (start, end)) of one header entry, or ValueError saying what is wrong."""
    if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
        raise ValueError(f"{key!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if dtype not in dtypes.BY_CODE:
        raise ValueError(f"{key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{key!r} has a bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise ValueError(f"{key!r} has bad data_offsets {offsets!r}")
    info = TensorInfo(tuple(shape), dtype)
    if offsets[1] - offsets[0] != info.nbytes:
        raise ValueError(f"{key!r} spans {offsets[1] - offsets[0]} bytes, its shape and dtype need {info.nbytes}")
    return info, tuple(offsets)


def _check_extents(path, offsets: dict, data_size: int):
    """Every tensor inside the file, none overlapping another."""
    end_seen, last = 0, None
    for key, (start, end) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if end > data_size:
            raise InputError(f"{path}: {key} ends at byte {end} of the data, which has {data_size}",
                             "the file is truncated; download it again")
        if start < end_seen:
            raise InputError(f"{path}: {key} overlaps {last} in the file", "the file is damaged")
        end_seen, last = max(end_seen, end), key


class SafetensorsSource(Source):
    container = "safetensors"
    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self._parse_header(lambda n, at: os.pread(f.fileno(), n, at), os.fstat(f.fileno()).st_size)

    def _parse_header(self, pread, size: int):
        """Read and check the header through `pread(n, offset)`, of a file of `size` bytes."""
        path = self.path
        head = pread(8, 0) if size >= 8 else b""
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (only {size} bytes)",
                             "the file is empty or truncated; download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > untrusted.HEADER.bytes:
            raise InputError(f"{path}: not a safetensors file (header length {n} does not fit in {size} bytes)",
                             "the file is truncated, or is not a checkpoint (an HTML page or a git-lfs pointer?)")
        raw = pread(n, 8)
        try:
            header = untrusted.parse_json(raw, f"{path} header", untrusted.HEADER).obj()
            meta = header.get("__metadata__")
            # safetensors' own rule: metadata maps strings to strings
            self._meta = {} if meta is None else {k: v.text(most=untrusted.HEADER.bytes) for k, v in meta.items()}
            self._info, self._offsets = {}, {}
            for k, v in header.raw.items():
                if k != "__metadata__":
                    self._info[k], self._offsets[k] = _header_entry(k, v)
        except MalformedInputError as e:
            raise InputError(f"{path}: not a safetensors file (invalid header: {e.detail})",
                             "the file is damaged or is not a checkpoint")
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: not a safetensors file (invalid header: {e})",
                             "the file is damaged or is not a checkpoint")
        self._data_start = 8 + n
        self._map, self._view, self._handed_out = None, None, 0
        _check_extents(path, self._offsets, size - self._data_start)

    def keys(self):
        return list(self._info)

    def info(self, key):
        return self._info[key]

    def load(self, key):
        """A view of the tensor's bytes in a read-only memory map of the file: no copy, and the
        input cannot be written through it. Every TRIM_BYTES handed out, the map's pages are
        dropped from the process (MADV_DONTNEED): tensors still in use read them back from the
        page cache when touched, so memory follows the layer being worked on, not the file."""
        import torch
        info = self._info[key]
        dt = dtypes.torch_dtype(info.dtype)
        start, end = self._offsets[key]
        if end == start:
            return torch.empty(info.shape, dtype=dt)
        view = self._mapped()[self._data_start + start:self._data_start + end]
        self._handed_out += end - start
        if self._handed_out > TRIM_BYTES:
            self._trim()
        if (self._data_start + start) % dtypes.size(info.dtype):    # misaligned for its dtype: copy
            return torch.frombuffer(bytearray(view), dtype=dt).reshape(info.shape)
        with warnings.catch_warnings():     # torch warns that it cannot write to a read-only buffer: we never do
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=dt).reshape(info.shape)

    def _mapped(self) -> memoryview:
        if self._map is None:
            import torch
            self._map = mmap.mmap(self._descriptor(), 0, access=mmap.ACCESS_READ)
            leases.hold(self._fd, self.path)        # a truncation now stops sdconv, not SIGBUS
            self._view = memoryview(self._map)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                start = torch.frombuffer(self._view[:1], dtype=torch.uint8).data_ptr()
            self._span = (start, start + len(self._map))
            MAPPED_SOURCES.add(self)
        return self._view

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _trim(self):
        self._handed_out = 0
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def metadata(self, folder: str = ""):
        return dict(self._meta)

    def raw(self, key):
        """Straight from the file: no torch needed."""
        start, end = self._offsets[key]
        data = os.pread(self._descriptor(), end - start, self._data_start + start)
        if len(data) != end - start:
            raise InputError(f"{self.path}: {key} runs past the end of the file", "the file is truncated")
        return data

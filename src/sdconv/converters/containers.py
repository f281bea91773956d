"""Containers: how tensors are stored. Each source gives a lazy view `key -> (shape, dtype)`
and loads a tensor's bytes only when asked; writers are atomic.

- .safetensors: the header is parsed here (no torch needed); tensors are read-only views of a
  memory map of the file (no copy; the pages are dropped from the process every so often, so
  memory does not grow with what was read).
- .ckpt/.pt/.pth/.bin: torch zip pickles through `torch.load(weights_only=True, mmap=True)`,
  so tensors stay on disk until read; `{"state_dict": ...}` nesting is unwrapped.
- writing: a tensor that is an unchanged region of a mapped input (`Source.region`) is copied
  file to file by the kernel; any other is written from memory.
- folders: every weight file at the root and one level down (diffusers components), keys of a
  sub-folder prefixed with `<sub>/`; JSON files (config.json) are readable too.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import struct
import tempfile
import warnings
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, OutputError, UnsafeInputError
from .hashing import LateValue, sha256_of  # noqa: F401  (sha256_of: re-exported)

SAFETENSORS_EXT = (".safetensors",)
# bytes of tensors handed out by a safetensors source between two drops of its mapped pages
TRIM_BYTES = 64 << 20
# sources whose file is mapped whole: a tensor written unchanged is copied file to file
_MAPPED: "weakref.WeakSet[Source]" = weakref.WeakSet()
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
# bytes per element for safetensors dtype codes
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Weight files a folder may hold, in order of preference (variants such as model.fp16.* last).
FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: str                  # safetensors code: F32, F16, BF16, I64, ...

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPE_SIZE.get(self.dtype, 4)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def torch_dtype_code(dt) -> str:
    import torch
    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}.get(dt, str(dt))


class Source:
    """A lazy tensor view over one file or folder."""
    path: Path
    is_folder = False
    container = "?"
    _fd: int | None = None                    # the file, opened for reads
    _span: tuple[int, int] | None = None      # addresses of a map of the whole file, if any

    def keys(self) -> list[str]: ...
    def info(self, key: str) -> TensorInfo: ...
    def load(self, key: str): ...

    def metadata(self, folder: str = "") -> dict:
        """The container's own metadata (safetensors __metadata__; of `folder`'s weights in a folder)."""
        return {}

    def raw(self, key: str) -> bytes:
        """A tensor's bytes (little-endian, row-major), for small tensors such as position_ids."""
        return bytes(_raw_bytes(self.load(key).contiguous()))

    def kind(self) -> str:
        return self.container

    def read_json(self, rel: str) -> dict | None:
        return None

    def files(self) -> list[Path]:
        return [self.path]

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
            os.close(self._fd)


def _header_entry(key, v) -> tuple:
    """(TensorInfo, (start, end)) of one header entry, or ValueError saying what is wrong."""
    if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
        raise ValueError(f"{key!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if dtype not in DTYPE_SIZE:
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
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes)",
                                 "the file is empty or truncated; download it again")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise InputError(f"{path}: not a safetensors file (header length {n} does not fit in {size} bytes)",
                                 "the file is truncated, or is not a checkpoint (an HTML page or a git-lfs pointer?)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict):
                raise ValueError("__metadata__ is not an object")
            self._meta = {str(k): str(v) for k, v in meta.items()}
            self._info, self._offsets = {}, {}
            for k, v in header.items():
                self._info[k], self._offsets[k] = _header_entry(k, v)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
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
        dt = getattr(torch, _TORCH_DTYPES[info.dtype])
        start, end = self._offsets[key]
        if end == start:
            return torch.empty(info.shape, dtype=dt)
        view = self._mapped()[self._data_start + start:self._data_start + end]
        self._handed_out += end - start
        if self._handed_out > TRIM_BYTES:
            self._trim()
        if (self._data_start + start) % DTYPE_SIZE[info.dtype]:    # misaligned for its dtype: copy
            return torch.frombuffer(bytearray(view), dtype=dt).reshape(info.shape)
        with warnings.catch_warnings():     # torch warns that it cannot write to a read-only buffer: we never do
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=dt).reshape(info.shape)

    def _mapped(self) -> memoryview:
        if self._map is None:
            import torch
            self._map = mmap.mmap(self._descriptor(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                start = torch.frombuffer(self._view[:1], dtype=torch.uint8).data_ptr()
            self._span = (start, start + len(self._map))
            _MAPPED.add(self)
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


from .pickles import INERT_GLOBALS  # noqa: E402

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
        from .torchscript import is_torchscript, read_torchscript
        if is_torchscript(path):
            # OpenAI's .pt releases: read by a restricted unpickler, never torch.jit.load (no code runs)
            self._t = read_torchscript(path)
            self._info = {k: TensorInfo(tuple(v.shape), torch_dtype_code(v.dtype)) for k, v in self._t.items()}
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
        self._info = {k: TensorInfo(tuple(v.shape), torch_dtype_code(v.dtype)) for k, v in self._t.items()}
        if kwargs["mmap"]:      # torch's map of the whole file
            span = _whole_file_map(path, self._t.values())
            if span is not None:
                self._fd, self._span = os.open(path, os.O_RDONLY), span
                _MAPPED.add(self)

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


class ShardedSource(Source):
    """A transformers *.index.json: keys spread over several files."""
    container = "sharded"

    def __init__(self, index: Path):
        self.path = index
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, OSError) as e:
            raise InputError(f"{index}: unreadable shard index ({e})")
        self._shards = {f: open_file(index.parent / f) for f in sorted(set(wm.values()))}
        self._where = {k: self._shards[f] for k, f in wm.items()}

    def keys(self):
        return list(self._where)

    def info(self, key):
        return self._where[key].info(key)

    def load(self, key):
        return self._where[key].load(key)

    def raw(self, key):
        return self._where[key].raw(key)

    def files(self):
        return [p for s in self._shards.values() for p in s.files()]


def _weights_in(d: Path) -> Path | None:
    for name in FOLDER_WEIGHTS:
        if (d / name).is_file():
            return d / name
    found = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in SAFETENSORS_EXT + PICKLE_EXT)
    return found[0] if len(found) == 1 else None


class FolderSource(Source):
    is_folder = True
    container = "folder"

    def __init__(self, path: Path):
        self.path = path
        self._parts: dict[str, Source] = {}
        root = _weights_in(path)
        if root is not None:
            self._parts[""] = open_file(root)
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            w = _weights_in(sub)
            if w is not None:
                self._parts[sub.name + "/"] = open_file(w)
        if not self._parts:
            raise InputError(f"{path}: a folder with no weight files",
                             f"expected one of {', '.join(FOLDER_WEIGHTS[:3])} in it or in a sub-folder")
        self._where = {}
        for pre, src in self._parts.items():
            for k in src.keys():
                self._where[pre + k] = (src, k)

    @property
    def has_root_weights(self) -> bool:
        return "" in self._parts

    def keys(self):
        return list(self._where)

    def info(self, key):
        src, k = self._where[key]
        return src.info(k)

    def load(self, key):
        src, k = self._where[key]
        return src.load(k)

    def raw(self, key):
        src, k = self._where[key]
        return src.raw(k)

    def metadata(self, folder: str = ""):
        part = self._parts.get(folder)
        return part.metadata() if part is not None else {}

    def read_json(self, rel):
        p = self.path / rel
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (ValueError, OSError) as e:
            raise InputError(f"{p}: unreadable JSON ({e})")

    def files(self):
        return [p for s in self._parts.values() for p in s.files()]


def open_file(path: Path) -> Source:
    try:
        if path.suffix in SAFETENSORS_EXT:
            return SafetensorsSource(path)
        if path.suffix in PICKLE_EXT or path.suffix.endswith(".json"):
            if path.name.endswith(".index.json"):
                return ShardedSource(path)
            return PickleSource(path)
    except (InputError, UnsafeInputError):
        raise
    except (Exception, RecursionError) as e:     # a damaged file can fail anywhere below (zipfile, torch)
        first = (str(e).splitlines() or [""])[0][:200]
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})",
                         "the file is damaged or is not a checkpoint")
    raise InputError(f"{path}: unknown file type {path.suffix!r}",
                     f"sdconv reads {', '.join(SAFETENSORS_EXT + PICKLE_EXT)} files and model folders")


def open_source(path) -> Source:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderSource(path)
    return open_file(path)


# ---------------------------------------------------------------- writing

def format_for(output: Path, fmt: str | None) -> str:
    """--format wins; otherwise the output's suffix decides; safetensors by default."""
    if fmt:
        return fmt
    return "pt" if Path(output).suffix in PICKLE_EXT else "safetensors"


def _raw_bytes(t):
    """A contiguous CPU tensor's bytes as a zero-copy buffer (no numpy needed)."""
    import ctypes
    n = t.numel() * t.element_size()
    return (ctypes.c_char * n).from_address(t.data_ptr()) if n else b""


_COPY_FILE_RANGE = {"works": hasattr(os, "copy_file_range")}


def _copy_from_input(f, t) -> bool:
    """Write t by copying its bytes file to file in the kernel, if t is an unchanged region of a
    mapped input (most tensors are only renamed; split q/k/v and the parts of a fused one are
    such regions too). The bytes then never pass through this process, which halves the cost
    of writing. False: write t's memory instead (t made here, or no copy_file_range)."""
    n = t.numel() * t.element_size()
    if not n or not _COPY_FILE_RANGE["works"]:
        return False
    found = next(((source, r) for source in list(_MAPPED) if (r := source.region(t.data_ptr(), n))), None)
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
        _COPY_FILE_RANGE["works"] = False     # e.g. across file systems on old kernels: plain writes
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
    import sys

    from .stream import TensorStream
    if sys.byteorder != "little":   # pragma: no cover
        raise OutputError("writing safetensors needs a little-endian machine")
    stream = tensors if isinstance(tensors, TensorStream) else TensorStream.from_dict(tensors)
    header: dict = {}
    late = {k: v for k, v in (metadata or {}).items() if isinstance(v, LateValue)}
    if metadata:
        header["__metadata__"] = {str(k): (v.placeholder() if k in late else str(v)) for k, v in metadata.items()}
    offset = 0
    for e in stream.entries:
        n = DTYPE_SIZE[e.dtype]
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
                if not _copy_from_input(f, t):
                    f.write(_raw_bytes(t))
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

    from .stream import TensorStream
    if fmt == "safetensors":
        write_safetensors(tensors, path, metadata)
    else:
        d = tensors.to_dict() if isinstance(tensors, TensorStream) else tensors
        torch.save({k: v.contiguous() for k, v in d.items()}, str(path))


def _ordinary_permissions(path: Path):
    """Temporary files are private (0600/0700); the output gets what a plain open() would."""
    mask = os.umask(0)
    os.umask(mask)
    paths = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


class AtomicOutput:
    """Build an output (file or folder) under a temporary name beside it, then rename it into
    place; on any failure the temporary is removed and an existing output is left untouched."""

    def __init__(self, final: Path, folder: bool, force: bool):
        self.final, self.folder, self.force = Path(final), folder, force
        if self.final.exists() and not force:
            raise OutputError(f"{self.final} already exists", "pass --force to replace it")
        parent = self.final.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: the output's folder does not exist", "create it first")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{parent}: cannot write there (not writable)", "choose a writable output folder")

    def __enter__(self) -> Path:
        try:
            d = tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".sdconv-tmp", dir=self.final.parent)
        except OSError as e:
            raise OutputError(f"{self.final.parent}: cannot write there ({e.strerror or e})",
                              "choose a writable output folder")
        self._tmpdir = Path(d)
        self.tmp = self._tmpdir / "out" if self.folder else self._tmpdir / self.final.name
        if self.folder:
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                _ordinary_permissions(self.tmp)
                if not self.force:
                    place_new(self.tmp, self.final)
                else:
                    if self.final.is_dir() and not self.final.is_symlink():
                        os.replace(self.final, self._tmpdir / "old")   # removed with the temporary
                    elif self.folder and self.final.exists():
                        self.final.unlink()
                    os.replace(self.tmp, self.final)
        finally:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        return False


def place_new(tmp: Path, final: Path):
    """Rename tmp to final only if final does not exist, atomically: it was checked up front,
    but another run may have made it since. A file goes in as a hard link (which fails if the
    name exists) and its temporary name is dropped; a folder by rename (which fails over a
    non-empty folder or a file). Without hard links (some network and FAT file systems), the
    check and the rename are separate steps."""
    clash = OutputError(f"{final} appeared while this conversion ran (another run writing it?); it was left as it is",
                        "pass --force to replace it")
    if tmp.is_dir():
        if final.exists() and not final.is_dir():
            raise clash
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise clash from None
            raise
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise clash from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        if final.exists():
            raise clash from None
        os.rename(tmp, final)
    else:
        tmp.unlink()

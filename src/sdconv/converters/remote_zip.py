"""A torch zip checkpoint (torch.save's format since torch 1.6) on an HTTP server, read by byte
ranges: its directory, its pickle, then only the storage records of the tensors asked for.

- the end of the file (the end-of-central-directory record, a comment's room, the zip64 locator
  and record: 64 KiB + 98 bytes, one request), then the central directory if it lies before
  that: `zipfile` reads them through `RangeReader`, a file object over the mirror that fetches
  what it lacks. The archive's records are checked as a local file's are (tensorcheck: names
  unique, the archive's folder, data.pkl's size).
- `data.pkl`, its record fetched whole, is walked by pickle_scan and read into tensor
  references (lazy_pickle.py): a hostile pickle is refused before any storage is fetched. Each
  storage it names is checked against its record (present, exactly its bytes, a plausible
  compression ratio; tensorcheck.storage_records), and `byteorder` is read.
- a record's bytes start after its *local* header (30 bytes, the name, the local extra field,
  which torch pads to align the data to 64 bytes, so it differs from the central one), so a
  storage is fetched as [its local header, the next record's local header): the header is then
  parsed from the mirror (signature, the same name, the data inside that span). `fetch(keys)`
  asks for every record the keys need at once; RemoteFile.ensure merges them into few requests.
- a tensor is a view of the mirror's memory map (no copy) when its record is stored uncompressed
  and little-endian; a deflated record is decompressed by zipfile (sizes and CRC checked), a
  big-endian one byte-swapped, as torch.load does. Either way it passes
  tensorcheck.checked_tensor, the gate every tensor from a pickle passes.

Legacy (pre-zip) pickles and TorchScript archives are not read here (`whole_file_reason`): they
need the whole file (remote_sources: --download).
"""
from __future__ import annotations

import mmap
import struct
import warnings
import zipfile

from ..errors import InputError, SdconvError
from . import dtypes
from .lazy_pickle import read_state_dict, scan_state_dict
from .pickle_scan import DAMAGED_HINT
from .remote import RemoteFile
from .sources import TRIM_BYTES
from .tensorcheck import checked_tensor, data_offset, pickle_record, storage_records, unique_names, zip_root
from .torchscript import has_torchscript_names

TAIL_BYTES = (64 << 10) + 22 + 20 + 56      # end record + the largest comment, zip64 locator and record
_LOCAL = struct.Struct("<4s22xHH")          # signature, ..., name length, extra length


class RangeReader:
    """A read-only file object over a RemoteFile, for zipfile: what a read lacks is fetched first."""

    def __init__(self, remote: RemoteFile):
        self.remote, self.name, self._pos = remote, remote.name, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = max(0, offset + (0, self._pos, self.remote.size)[whence])
        return self._pos

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.remote.size - self._pos)
        n = left if n is None or n < 0 else min(n, left)
        data = self.remote.pread(n, self._pos) if n else b""
        self._pos += len(data)
        return data

    def close(self):
        pass


def whole_file_reason(remote: RemoteFile) -> str | None:
    """None for a torch zip checkpoint (read by ranges); else what the file is, which only the
    whole file can be read as. From its first bytes, and for a zip its names (nothing unpickled)."""
    head = remote.pread(min(remote.size, 512), 0)
    if head.startswith(b"PK\x03\x04"):
        return "a TorchScript archive" if has_torchscript_names(_open(remote).namelist()) else None
    if head[257:262] == b"ustar":
        raise InputError(f"{remote.name}: a tar-format torch file (before torch 0.4), which sdconv does not read",
                         "load and re-save it with a current torch, or convert it to .safetensors")
    if head[:1] == b"\x80":             # a pickle's PROTO opcode: the legacy format's first pickle
        return "a legacy (pre-zip) torch pickle"
    raise InputError(f"{remote.name}: not a torch checkpoint (neither a zip archive nor a pickle)",
                     "the URL may name an HTML page or a git-lfs pointer; check it")


def _open(remote: RemoteFile) -> zipfile.ZipFile:
    remote.ensure([(max(0, remote.size - TAIL_BYTES), remote.size)])
    try:
        return zipfile.ZipFile(RangeReader(remote))
    except SdconvError:                 # the network, or the file changing on the server
        raise
    except Exception as e:              # zipfile fails in many ways on a damaged directory
        raise InputError(f"{remote.name}: not a readable torch checkpoint (its zip directory: {type(e).__name__}: "
                         f"{str(e)[:160]})", "the file may be truncated or damaged; download it again") from None


def _readable(info: zipfile.ZipInfo, name: str):
    """A record torch's reader reads too: stored or deflated, not encrypted."""
    if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InputError(f"{name}: record {info.filename} is encrypted or compressed by a method torch does not "
                         f"read (method {info.compress_type})", DAMAGED_HINT)


class RemoteZip:
    """The directory, pickle and storages of a remote torch zip checkpoint."""

    def __init__(self, remote: RemoteFile):
        self.remote, self.name = remote, remote.name
        self.zf = zf = _open(remote)
        unique_names(zf)
        root = zip_root(zf)
        pkl = pickle_record(zf, f"{root}data.pkl")
        _readable(pkl, self.name)
        # a record runs to the next one's local header (or the directory): its fetched span
        starts = sorted({i.header_offset for i in zf.infolist()} | {zf.start_dir, remote.size})
        self._span_end = {o: e for o, e in zip(starts, starts[1:])}
        data = self._read(pkl)
        scan = scan_state_dict(data, self.name)              # every import checked: nothing fetched yet
        self.records = dict((ref.key, info) for ref, info in storage_records(zf, root, scan.storages, self.name))
        for info in self.records.values():
            _readable(info, self.name)
        order = f"{root}byteorder"
        self.big_endian = order in zf.NameToInfo and self._read(zf.getinfo(order)).strip() != b"little"
        self.tensors = read_state_dict(data, self.name, scan.storages)     # key -> TensorRef
        self._starts: dict = {}
        self._map = self._view = None
        self.span: tuple | None = None                      # addresses of the mirror's map, once made
        self._handed_out = 0

    # ------------------------------------------------------------------ records

    def _range(self, info: zipfile.ZipInfo) -> tuple[int, int]:
        end = self._span_end.get(info.header_offset)
        if end is None or info.header_offset >= self.remote.size:
            raise InputError(f"{self.name}: record {info.filename} lies outside the file", DAMAGED_HINT)
        return info.header_offset, end

    def _read(self, info: zipfile.ZipInfo) -> bytes:
        """A record's bytes through zipfile (decompressed; local header, sizes and CRC checked)."""
        self.remote.ensure([self._range(info)])
        try:
            with self.zf.open(info) as f:
                return f.read()
        except SdconvError:
            raise
        except Exception as e:          # a bad local header, CRC, deflate stream, compression method
            raise InputError(f"{self.name}: record {info.filename} is unreadable ({type(e).__name__}: {str(e)[:160]})",
                             DAMAGED_HINT) from None

    def fetch(self, keys) -> None:
        """Fetch the storage records of the tensors `keys`, all at once."""
        infos = {self.tensors[k].storage.key: self.records[self.tensors[k].storage.key] for k in keys}
        self.remote.ensure([self._range(i) for i in infos.values()])

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a record's bytes start: after its local header, parsed from the mirror."""
        start = self._starts.get(info.filename)
        if start is None:
            begin, end = self._range(info)
            reader = RangeReader(self.remote)
            start = data_offset(reader, info, self.remote.size)    # signature; inside the file
            _, n, _ = _LOCAL.unpack(self.remote.pread(_LOCAL.size, begin))
            if self.remote.pread(n, begin + _LOCAL.size) != info.filename.encode() or start + info.compress_size > end:
                raise InputError(f"{self.name}: record {info.filename}'s local header disagrees with the directory",
                                 DAMAGED_HINT)
            self._starts[info.filename] = start
        return start

    # ------------------------------------------------------------------ tensors

    def tensor(self, key: str):
        """The tensor `key`, its record fetched if need be, checked (tensorcheck.checked_tensor)."""
        import torch
        ref = self.tensors[key]
        self.fetch([key])
        storage = self._storage(ref.storage.key, ref.code)
        t = torch.as_strided(storage, ref.shape, ref.stride, ref.offset) if storage.numel() else \
            torch.empty(ref.shape, dtype=storage.dtype)
        return checked_tensor(self.name, key, t)

    def _storage(self, key: str, code: str):
        """The storage `key` as a flat tensor of its type, over exactly its record's bytes."""
        import torch
        info, dt = self.records[key], dtypes.torch_dtype(code)
        if info.file_size == 0:
            return torch.empty(0, dtype=dt)
        if info.compress_type == zipfile.ZIP_STORED and not self.big_endian:
            if info.compress_size != info.file_size:
                raise InputError(f"{self.name}: record data/{key} is stored with two sizes", DAMAGED_HINT)
            start = self._data_start(info)
            view = self._mapped()[start:start + info.file_size]
            self._handed_out += info.file_size
            if self._handed_out > TRIM_BYTES:
                self._trim()
            if start % dtypes.size(code):       # misaligned for its dtype: copied
                return torch.frombuffer(bytearray(view), dtype=dt)
            with warnings.catch_warnings():     # a read-only buffer: never written through
                warnings.simplefilter("ignore", UserWarning)
                return torch.frombuffer(view, dtype=dt)
        self._data_start(info)
        data = bytearray(self._read(info))
        if len(data) != info.file_size:
            raise InputError(f"{self.name}: record data/{key} holds {len(data)} bytes, not {info.file_size}",
                             DAMAGED_HINT)
        if self.big_endian and dtypes.size(code) > 1:       # as torch.load does for a big-endian archive
            raw = torch.frombuffer(data, dtype=torch.uint8).view(-1, dtypes.size(code)).flip(1).contiguous()
            return raw.view(-1).view(dt)
        return torch.frombuffer(data, dtype=dt)

    def _mapped(self) -> memoryview:
        """A read-only map of the whole mirror: its fetched ranges hold the file's bytes."""
        if self._map is None:
            import torch
            self._map = mmap.mmap(self.remote.fd, 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                start = torch.frombuffer(self._view[:1], dtype=torch.uint8).data_ptr()
            self.span = (start, start + len(self._map))
        return self._view

    def _trim(self):
        """Drop the map's pages from the process (tensors in use read them back from the page cache)."""
        self._handed_out = 0
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

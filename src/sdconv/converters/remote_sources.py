"""Inputs named by URL (`https://…`, `http://…`) or on the Hugging Face Hub (`hf://ORG/REPO[@REV]/PATH`):
a safetensors file or a torch zip checkpoint read by byte ranges. Its header (a zip's directory
and pickle) is read first; each tensor's bytes are fetched when a reader asks for it, or ahead,
all at once, when a plan knows what it will read (`prefetch`). Legacy pickles and TorchScript
archives are fetched whole, with --download. How transfers behave (timeouts, retries,
--download) is set once per run with `configure`."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from ..errors import UsageError
from . import metakeys as K
from .hashing import LateValue
from .remote import RemoteFile, RemoteName, Transfer, is_remote, public_url
from . import untrusted
from .folders import STAND_INS, FolderSource, open_source
from .pickles import PickleSource
from .remote_zip import RemoteZip, whole_file_reason
from .sources import MAPPED_SOURCES, PICKLE_EXT, SAFETENSORS_EXT, SafetensorsSource, Source, TensorInfo

_SETTINGS = {"transfer": Transfer()}
# the text files of a remote folder copied into its skeleton (configs, shard indexes, tokenizers)
SMALL_FILES = (".json", ".txt")
SMALL_BYTES = 4 << 20


def configure(**fields) -> None:
    """How this run's remote inputs are fetched: Transfer fields (the command line's --timeout,
    --retries, --download; a progress bar on a terminal)."""
    _SETTINGS["transfer"] = Transfer(**{**_SETTINGS["transfer"].__dict__, **fields})


class RemoteInput:
    """What every remote source answers the same way: no local files (nothing to protect,
    snapshot or hash), its size as the server states it, and its provenance."""
    remote: RemoteFile
    origin: dict                        # url, etag, and the sha256 the server states, if it does
    costly_reads = True                 # inspect reads the header and scalars only

    def files(self):
        return []

    def size_bytes(self) -> int:
        return self.remote.size

    def sha256(self) -> str:
        """The sha256 the server states for the file (the Hub's, of an LFS file), else that of the
        bytes read so far (provenance() says which)."""
        return self.remote.stated_sha256 or self.remote.sha256_of_received()

    def late_sha256(self):
        """Asked once the plans' tensors are fetched: the bytes read are hashed while the output
        is written (a stated sha256 needs no hashing)."""
        if self.remote.stated_sha256:
            return self.remote.stated_sha256
        self.remote.freeze_received()
        return LateValue(64, self.remote.sha256_of_received)

    def provenance(self) -> dict:
        if self.remote.stated_sha256:
            covers = "the file (as the server states it)"
        elif self.remote.received_ranges() == f"0-{self.remote.size}":
            covers = "the file (all of it was read)"
        else:
            covers = "the bytes read, not the whole file: " + self.remote.received_ranges()
        out = {K.SOURCE_URL: self.origin["url"], K.SOURCE_SHA256_OF: covers}
        if self.origin.get("etag"):
            out[K.SOURCE_ETAG] = self.origin["etag"]
        return out


class RemoteSafetensorsSource(RemoteInput, SafetensorsSource):
    """A remote .safetensors file: the local reader over a mirror filled on demand."""

    def __init__(self, remote: RemoteFile, origin: dict):
        self.remote, self.origin = remote, origin
        self.path = RemoteName(remote.name)
        self._parse_header(remote.pread, remote.size)

    def byte_range(self, key: str) -> tuple[int, int]:
        start, end = self._offsets[key]
        return self._data_start + start, self._data_start + end

    def prefetch(self, keys) -> None:
        self.remote.ensure([self.byte_range(k) for k in keys])

    def load(self, key):
        self.prefetch([key])
        return super().load(key)

    def raw(self, key):
        self.prefetch([key])
        return super().raw(key)

    def _descriptor(self) -> int:
        self._fd = self.remote.fd
        return self._fd

    def __del__(self):
        pass                                # the RemoteFile owns (and closes) the mirror's descriptor


class RemoteZipSource(RemoteInput, Source):
    """A remote torch zip checkpoint: its directory and pickle read first, then only the storage
    records of the tensors read (remote_zip.py); torch.load is not used."""
    container = "torch pickle"

    def __init__(self, remote: RemoteFile, origin: dict):
        self.remote, self.origin = remote, origin
        self.path = RemoteName(remote.name)
        self._zip = RemoteZip(remote)
        self._info = {k: TensorInfo(r.shape, r.code) for k, r in self._zip.tensors.items()}
        MAPPED_SOURCES.add(self)            # tensors of stored records are views of the mirror's map

    def keys(self):
        return list(self._info)

    def info(self, key):
        return self._info[key]

    def prefetch(self, keys) -> None:
        self._zip.fetch(keys)

    def load(self, key):
        return self._zip.tensor(key)

    def region(self, address: int, nbytes: int):
        span = self._zip.span
        if span is not None and span[0] <= address and address + nbytes <= span[1]:
            return self.remote.fd, address - span[0]
        return None

    def __del__(self):
        pass                                # the RemoteFile owns (and closes) the mirror's descriptor


class RemotePickleSource(RemoteInput, PickleSource):
    """A remote legacy torch pickle or TorchScript archive, fetched whole (--download) and read
    by the local reader."""

    def __init__(self, remote: RemoteFile, origin: dict):
        remote.ensure([(0, remote.size)])
        super().__init__(Path(f"/proc/self/fd/{remote.fd}"))
        self.remote, self.origin = remote, origin
        self.path = RemoteName(remote.name)


class RemoteFolderSource(RemoteInput, FolderSource):
    """A folder of a Hub repository (a diffusers pipeline, its text_encoder/, a transformers
    model): a local skeleton of it, made in a temporary folder removed at exit, holds its small
    text files (configs, shard indexes) and an empty stand-in for each weights file, which opens
    as a remote source. Only headers and the tensors read travel, as for one file."""

    def __init__(self, name: str, transfer: Transfer):
        from .hub import folder
        recorded, files, headers = folder(name)
        transfer = Transfer(**{**transfer.__dict__, "headers": {**transfer.headers, **headers}})
        root = Path(tempfile.mkdtemp(prefix="sdconv-remote-"))
        atexit.register(shutil.rmtree, root, True)
        self._parts_remote: list = []
        with_safetensors = {_parent(rel) for rel, *_ in files if rel.endswith(SAFETENSORS_EXT)}
        for rel, url, size, sha in files:
            local = untrusted.within(root, rel)
            if local is None:
                continue
            weights = rel.endswith(SAFETENSORS_EXT + PICKLE_EXT)
            if rel.endswith(PICKLE_EXT) and _parent(rel) in with_safetensors:
                continue            # pickles beside safetensors: never opened
            if not weights and (not rel.endswith(SMALL_FILES) or size > SMALL_BYTES):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            if weights:
                local.touch()
                STAND_INS[str(local)] = self._opener(url, f"{name.rstrip('/')}/{rel}", transfer, sha)
            else:
                local.write_bytes(RemoteFile(url, transfer, name=f"{name.rstrip('/')}/{rel}").pread(size, 0)
                                  if size else b"")
        self.remote = None
        self.origin = {"url": recorded}
        super().__init__(root)
        self.root, self.path = root, RemoteName(name)

    def _opener(self, url, display, transfer, sha):
        def open_it():
            remote = RemoteFile(url, transfer, name=display, stated_sha256=sha)
            self._parts_remote.append(remote)
            origin = {"url": display, "etag": remote.validators[0]}
            if display.endswith(SAFETENSORS_EXT):
                return RemoteSafetensorsSource(remote, origin)
            return remote_pickle(remote, origin, download=True)     # a repository's own pickle: whole if need be
        return open_it

    def read_json(self, rel):
        p = self.root / rel
        return untrusted.read_json(p) if p.is_file() else None

    def prefetch(self, keys) -> None:
        by_part: dict = {}
        for k in keys:
            src, key = self._where[k]
            by_part.setdefault(id(src), (src, []))[1].append(key)
        for src, ks in by_part.values():
            src.prefetch(ks)

    def size_bytes(self) -> int:
        return sum(p.size_bytes() for p in self._parts.values())

    def _rel(self, part) -> str:
        """A weight file's path in the folder (text_encoder_2/model.safetensors)."""
        return str(part.path)[len(str(self.path).rstrip("/")) + 1:]

    def _files_read(self) -> list:
        """The remote weight files opened, in name order (a shard index's shards included)."""
        out, todo = [], list(self._parts.values())
        while todo:
            p = todo.pop(0)
            out += [p] if isinstance(p, RemoteInput) else []
            todo += p.parts()
        return sorted(out, key=lambda p: str(p.path))

    def late_sha256(self):
        return self.sha256()

    def sha256(self) -> str:
        """Of the weight files read: a line `NAME SHA256` for each (provenance() says what each covers)."""
        import hashlib
        lines = "".join(f"{self._rel(p)} {p.sha256()}\n" for p in self._files_read())
        return hashlib.sha256(lines.encode()).hexdigest()

    def provenance(self) -> dict:
        each = "; ".join(f"{self._rel(p)}: {p.provenance()[K.SOURCE_SHA256_OF]}" for p in self._files_read())
        return {K.SOURCE_URL: self.origin["url"],
                K.SOURCE_SHA256_OF: f"the lines 'NAME SHA256' of the weight files read, each sha256 of {each}"}


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def remote_pickle(remote: RemoteFile, origin: dict, download: bool):
    """A torch zip checkpoint by byte ranges; a legacy pickle or a TorchScript archive whole,
    with --download only."""
    why = whole_file_reason(remote)
    if why is None:
        return RemoteZipSource(remote, origin)
    if not download:
        raise UsageError(f"{remote.name}: {why}, which is not read by byte ranges",
                         "pass --download to fetch the whole file to a temporary file first")
    return RemotePickleSource(remote, origin)


def open_input(name):
    """The Source of any input: a URL or hf:// name, or a local file or folder."""
    return open_remote(name) if is_remote(name) else open_source(name)


def open_remote(name: str):
    """The Source of a URL or hf:// name."""
    if not is_remote(name):
        raise UsageError(f"{name}: not a URL")
    transfer = _SETTINGS["transfer"]
    if name.lower().startswith("hf://") and not name.split("?", 1)[0].rstrip("/").endswith(
            SAFETENSORS_EXT + PICKLE_EXT):
        return RemoteFolderSource(name, transfer)
    if name.lower().startswith("hf://"):
        from .hub import resolve
        url, headers, origin, display = resolve(name)
        transfer = Transfer(**{**transfer.__dict__, "headers": {**transfer.headers, **headers}})
    else:
        url, display = name, public_url(name)
        origin = {"url": display}
    path = display.split("?", 1)[0].rstrip("/")
    if path.endswith(SAFETENSORS_EXT):
        remote = RemoteFile(url, transfer, name=display, stated_sha256=origin.get("sha256"))
        origin.setdefault("etag", remote.validators[0])
        return RemoteSafetensorsSource(remote, origin)
    if path.endswith(PICKLE_EXT):
        remote = RemoteFile(url, transfer, name=display, stated_sha256=origin.get("sha256"))
        origin.setdefault("etag", remote.validators[0])
        return remote_pickle(remote, origin, transfer.download)
    raise UsageError(f"{display}: sdconv reads .safetensors files from URLs",
                     "name the weights file itself (folders on the Hub: name their model.safetensors)")

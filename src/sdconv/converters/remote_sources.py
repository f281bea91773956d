"""Inputs named by URL (`https://…`, `http://…`) or on the Hugging Face Hub (`hf://ORG/REPO[@REV]/PATH`):
a safetensors file read by byte ranges. Its header is read first; each tensor's bytes are
fetched when a reader asks for it, or ahead, all at once, when a plan knows what it will read
(`prefetch`). How transfers behave (timeouts, retries, --download) is set once per run with
`configure`."""
from __future__ import annotations

from ..errors import UsageError
from .remote import RemoteFile, Transfer, is_remote, public_url
from .sources import PICKLE_EXT, SAFETENSORS_EXT, SafetensorsSource

_SETTINGS = {"transfer": Transfer()}


def configure(transfer: Transfer) -> None:
    """How this run's remote inputs are fetched (the command line's --timeout, --download, progress)."""
    _SETTINGS["transfer"] = transfer


class RemoteSafetensorsSource(SafetensorsSource):
    """A remote .safetensors file: the local reader over a mirror filled on demand."""

    def __init__(self, remote: RemoteFile, origin: dict):
        self.remote = remote
        self.path = remote.name
        self.origin = origin                # url, etag, and the sha256 the server states, if it does
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

    def files(self):
        return []                           # nothing local to protect, snapshot or hash

    def size_bytes(self) -> int:
        return self.remote.size

    def __del__(self):
        pass                                # the RemoteFile owns (and closes) the mirror's descriptor


def open_remote(name: str):
    """The Source of a URL or hf:// name."""
    if not is_remote(name):
        raise UsageError(f"{name}: not a URL")
    transfer = _SETTINGS["transfer"]
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
        raise UsageError(f"{display}: torch pickles are not read over the network yet",
                         "download the file, then convert it (or use a .safetensors release)")
    raise UsageError(f"{display}: sdconv reads .safetensors files from URLs",
                     "name the weights file itself (folders on the Hub: name their model.safetensors)")

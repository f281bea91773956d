"""A file on an HTTP(S) server, read by byte ranges: only the bytes a conversion asks for travel.

The bytes fetched land in a local mirror: a sparse temporary file, unlinked as soon as it is
made (nothing is left behind, even after a kill), of the remote file's size. Readers then use
it like any local file (a memory map, copy_file_range), asking `ensure(ranges)` first: the
ranges not yet here are merged (small gaps bridged, and small pieces already here fetched again
rather than splitting a request) into few requests, and streamed in.

Transfers are robust: connection errors, 429 and 5xx are retried with backoff, and a range
that broke is resumed where it broke; every response must describe the same file as the
first (ETag, Last-Modified, size), or the run stops (exit 3) with nothing written; a server
that ignores Range is refused unless `download` is set, which takes the whole file once.
The HTTP client is httpx2 (the one huggingface_hub uses), imported on first use.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError, RemoteError, UsageError

PROBE_BYTES = 64 << 10          # the first request: the size, validators, and a header's start
GAP_BYTES = 1 << 20             # ranges closer than this are fetched as one (fewer requests)
REFETCH_BYTES = 64 << 10        # bytes already here, between two missing pieces, fetched again (one request)
CHUNK = 1 << 20


def warm_torch() -> None:
    """Import torch in the background (once): a remote conversion waits on the network first."""
    import sys
    import threading
    if "torch" not in sys.modules and not _WARMING:
        _WARMING.append(threading.Thread(target=lambda: __import__("torch"), daemon=True))
        _WARMING[0].start()


_WARMING: list = []


def is_remote(name) -> bool:
    return isinstance(name, str) and name.split("://", 1)[0].lower() in ("http", "https", "hf")


class RemoteName(str):
    """A URL or hf:// name where an input's Path would stand: its name, stem and suffix are those
    of the file it names (batch outputs are named after them)."""

    @property
    def name(self) -> str:
        return public_url(self).rstrip("/").rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else self.name

    @property
    def suffix(self) -> str:
        return "." + self.name.rsplit(".", 1)[1] if "." in self.name else ""


def public_url(url: str) -> str:
    """The URL without credentials or query (signed URLs carry secrets there), for messages and records."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass
class Transfer:
    """How transfers behave (RemoteOptions of the command line)."""
    timeout: float = 30.0           # seconds to connect, and between two reads
    retries: int = 5                # attempts after the first, per range
    backoff: float = 0.5            # seconds before the first retry; doubled each time, at most 30
    download: bool = False          # a server without Range support: take the whole file
    headers: dict = field(default_factory=dict)     # e.g. Authorization, for the Hub
    progress: object = None         # a tqdm-like bar: update(bytes)
    show_progress: bool = False     # without `progress`: a bar of bytes fetched, per file (on a terminal)


def _merge(ranges, gap: int) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


class RemoteFile:
    """One remote file, mirrored locally range by range."""

    def __init__(self, url: str, transfer: Transfer | None = None, *, name: str | None = None,
                 stated_sha256: str | None = None):
        self.url = url
        self.name = name or public_url(url)
        self.transfer = transfer or Transfer()
        self.stated_sha256 = stated_sha256      # what the server says the file's sha256 is (the Hub, for LFS files)
        self.bytes_received = 0
        self.requests = 0
        self._have: list[list[int]] = []
        self._frozen = None
        self._bar = None
        self._client = None
        self.fd = None
        self.size, self.validators = self._probe()

    # ------------------------------------------------------------------ the file

    def _mirror(self, size: int):
        fd, path = tempfile.mkstemp(prefix="sdconv-remote-")
        os.unlink(path)             # only this process holds it: gone when it exits, however it exits
        os.ftruncate(fd, size)
        self.fd = fd

    def _probe(self):
        """The first range: the file's size and validators, and its first bytes (a header's start)."""
        r = self._request(0, PROBE_BYTES, first=True)
        try:
            if r.status_code == 200:
                size = _int(r.headers.get("content-length"))
                if not self.transfer.download:
                    raise RemoteError(f"{self.name}: the server does not serve byte ranges",
                                      "pass --download to fetch the whole file to a temporary file first")
                if size is None:
                    raise RemoteError(f"{self.name}: the server states no size", "download it, then convert the file")
            else:
                size = _total(r.headers.get("content-range"))
                if size is None:
                    raise RemoteError(f"{self.name}: the server's range answer has no size "
                                      f"(Content-Range: {r.headers.get('content-range')!r})")
            validators = _validators(r, size)
            self._mirror(size)
            self._receive(r, 0, size if r.status_code == 200 else min(PROBE_BYTES, size))
        finally:
            r.close()
        return size, validators

    def ensure(self, ranges) -> None:
        """Fetch what of `ranges` ([(start, end)], end exclusive) is not here yet."""
        for start, end in _merge(ranges, GAP_BYTES):
            for s, e in _merge(self._missing(start, min(end, self.size)), REFETCH_BYTES):
                self._fetch(s, e)

    def freeze_received(self) -> list:
        """Fix the ranges that sha256_of_received and received_ranges describe to those fetched
        now (the hash may then be computed while later reads go on)."""
        if self._frozen is None:
            self._frozen = [tuple(r) for r in self._have]
        return self._frozen

    def sha256_of_received(self) -> str:
        """The sha256 of the bytes fetched (up to freeze_received), range after range in file order."""
        import hashlib
        h = hashlib.sha256()
        for start, end in self.freeze_received():
            for at in range(start, end, CHUNK):
                h.update(os.pread(self.fd, min(CHUNK, end - at), at))
        return h.hexdigest()

    def received_ranges(self) -> str:
        """The byte ranges fetched (up to freeze_received), as `start-end` (end exclusive), comma-separated."""
        return ",".join(f"{s}-{e}" for s, e in self.freeze_received())

    def pread(self, n: int, offset: int) -> bytes:
        self.ensure([(offset, offset + n)])
        return os.pread(self.fd, n, offset)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:       # pragma: no cover - interpreter shutdown
            pass

    def _missing(self, start: int, end: int):
        pos = start
        for s, e in self._have:
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                yield pos, s
            pos = max(pos, e)
        if pos < end:
            yield pos, end

    def _mark(self, start: int, end: int):
        self._have = _merge([*map(tuple, self._have), (start, end)], 0)

    # ------------------------------------------------------------------ HTTP

    def _http(self):
        if self._client is None:
            httpx2 = _httpx()
            t = self.transfer.timeout
            self._client = httpx2.Client(follow_redirects=True, timeout=httpx2.Timeout(t, connect=t),
                                         headers={"Accept-Encoding": "identity", **self.transfer.headers})
        return self._client

    def _request(self, start: int, end: int, first: bool = False):
        """A streamed GET of bytes [start, end), retried on connection errors, 429 and 5xx."""
        httpx2 = _httpx()
        attempt = 0
        while True:
            self.requests += 1
            try:
                req = self._http().build_request("GET", self.url, headers={"Range": f"bytes={start}-{end - 1}"})
                r = self._http().send(req, stream=True)
            except httpx2.TransportError as e:
                attempt = self._wait(attempt, f"{type(e).__name__}: {e}")
                continue
            if r.status_code in (429, 500, 502, 503, 504):
                r.close()
                attempt = self._wait(attempt, f"HTTP {r.status_code}", r.headers.get("retry-after"))
                continue
            if r.status_code in (200, 206):
                return r
            r.close()
            raise _refusal(self.name, r.status_code, first)

    def _wait(self, attempt: int, why: str, retry_after=None) -> int:
        if attempt >= self.transfer.retries:
            raise RemoteError(f"{self.name}: {why}, {attempt + 1} times", "check the network and the URL, then run again")
        delay = min(self.transfer.backoff * (2 ** attempt), 30.0)
        if retry_after is not None and (s := _int(retry_after)) is not None:
            delay = min(max(delay, s), 60.0)
        time.sleep(delay)
        return attempt + 1

    def _fetch(self, start: int, end: int):
        """Bytes [start, end) into the mirror; a transfer that breaks resumes where it broke."""
        httpx2 = _httpx()
        pos, attempt = start, 0
        while pos < end:
            r = self._request(pos, end)
            try:
                if r.status_code != 206:
                    raise InputError(f"{self.name}: the server stopped serving byte ranges during the run",
                                     "the file may have changed; run again (or pass --download)")
                got = _validators(r, _total(r.headers.get("content-range")))
                if got != self.validators:
                    raise InputError(f"{self.name}: the file changed on the server during the run "
                                     f"({_what_changed(self.validators, got)})", "run again once it is stable")
                if not (r.headers.get("content-range") or "").startswith(f"bytes {pos}-"):
                    raise RemoteError(f"{self.name}: asked for bytes from {pos}, the server sent "
                                      f"{r.headers.get('content-range')!r}")
                try:
                    pos = self._receive(r, pos, end)
                except (httpx2.TransportError, httpx2.StreamError) as e:
                    pos = self._received_to
                    attempt = self._wait(attempt, f"the transfer broke at byte {pos} ({type(e).__name__})")
            finally:
                r.close()

    def _progress(self, n: int):
        bar = self.transfer.progress
        if bar is None and self.transfer.show_progress:
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(unit="B", unit_scale=True, desc=f"fetching {self.name.rsplit('/', 1)[-1]}",
                                 leave=False, delay=1.0)
            bar = self._bar
        if bar is not None:
            bar.update(n)

    def _receive(self, r, start: int, end: int) -> int:
        """Stream a response body into the mirror at `start`; the position reached."""
        pos = self._received_to = start
        for chunk in r.iter_bytes(CHUNK):
            chunk = chunk[:end - pos]
            if not chunk:
                break
            os.pwrite(self.fd, chunk, pos)
            self._mark(pos, pos + len(chunk))
            pos = self._received_to = pos + len(chunk)
            self.bytes_received += len(chunk)
            self._progress(len(chunk))
        if pos < end:
            raise _short(pos)
        return pos


def _httpx():
    try:
        import httpx2
    except ImportError:
        raise UsageError("reading URLs needs the remote extra", "pip install 'sdconv[remote]'") from None
    return httpx2


def _short(pos):
    return _httpx().RemoteProtocolError(f"the body ended at byte {pos}")


def _int(v) -> int | None:
    try:
        n = int(str(v).strip())
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def _total(content_range) -> int | None:
    """The size in `Content-Range: bytes a-b/SIZE`."""
    if not content_range or "/" not in content_range:
        return None
    return _int(content_range.rsplit("/", 1)[1])


def _validators(r, size) -> tuple:
    """What identifies this version of the file: (ETag, Last-Modified, size)."""
    etag = r.headers.get("x-linked-etag") or r.headers.get("etag")
    if etag and etag.startswith("W/"):
        etag = etag[2:]
    return (etag, r.headers.get("last-modified"), size)


def _what_changed(old: tuple, new: tuple) -> str:
    names = ("ETag", "Last-Modified", "size")
    return ", ".join(f"{n} {a} -> {b}" for n, a, b in zip(names, old, new) if a != b)


def _refusal(name: str, status: int, first: bool) -> RemoteError:
    hints = {401: ("the server asks for credentials (401)", "for the Hub, set HF_TOKEN to a token that can read it"),
             403: ("access denied (403)", "for the Hub, accept the model's terms and set HF_TOKEN; a signed URL may have expired"),
             404: ("no such file on the server (404)", "check the URL (for hf://: the repository, revision and path)"),
             410: ("the file is gone (410)", "check the URL"),
             416: ("the server refused the byte range (416)", "the file is shorter than it was; run again")}
    what, hint = hints.get(status, (f"the server answered HTTP {status}", "check the URL"))
    return RemoteError(f"{name}: {what}", hint)

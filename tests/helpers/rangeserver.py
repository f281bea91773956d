"""A real HTTP server on 127.0.0.1 for the tests of remote sources (issue 15).

Serves the files under a folder with HTTP Range support, counts the body bytes it sends, injects
faults on demand, and emulates enough of the Hugging Face Hub for huggingface_hub 2.4.0 (see
`tests/helpers/rangeserver_hub.py`). Standard library only; nothing leaves 127.0.0.1.

    with RangeServer(tmp_path) as srv:              # srv.url == "http://127.0.0.1:PORT"
        url = srv.url_for("sd1.safetensors")         # "http://127.0.0.1:PORT/sd1.safetensors"
        ...                                          # the code under test fetches url
        assert srv.stats.bytes_for("/sd1.safetensors") < 300_000_000
        srv.faults.drop("/sd1.safetensors", after_bytes=4096)     # the next GET dies after 4 KiB
        srv.reset_stats()

Two listening sockets share one state: `srv.url` (the "main" origin: files, the Hub's /api and
/resolve routes) and `srv.cdn_url` (the "cdn" origin, another port, so another origin for HTTP
clients: where the Hub's LFS redirects and `faults.redirect(..., cdn=True)` send clients, and
where clients must not forward an Authorization header). Both serve every route; a record's
`origin` says which one was asked.

Files (GET, HEAD; HTTP/1.1 keep-alive; no directory listing; no path outside the root, symlinks
included): `ETag` is a quoted sha1 of size, mtime_ns and inode (it changes when the file is
replaced), `Last-Modified`, `Content-Length`, `Accept-Ranges: bytes`. `Range: bytes=a-b`,
`bytes=a-`, `bytes=-n` -> 206 with `Content-Range` (an end past the file is clamped);
unsatisfiable (a >= size, or -0, or any range of an empty file) -> 416 with
`Content-Range: bytes */SIZE`. A Range header that does not parse, or that asks for several
ranges (`bytes=0-9,20-29`), is ignored: 200 with the whole body (RFC 9110 lets a server ignore
Range; the record keeps the header, so a test can see it). `If-Range` with the current ETag (or
the exact Last-Modified date) -> the range; anything else -> 200 with the whole body. HEAD
answers with the headers the same GET would get (206 for a ranged HEAD), without a body.
A file is opened before its headers are sent, so a response started before a replacement
carries the old content to its end.

Signed storage: `/_storage/<name>?X-Amz-Signature=...` serves `<name>` under the root, but only
with a signature the server issued (`srv.signed_url_for(name)`, or a `faults.redirect`),
else 403 (S3's AccessDenied). With `srv.storage_rejects_auth = True` a request there that
carries an Authorization header gets 400, as S3 answers one with two authentications.

Stats: `srv.stats` is a snapshot (a `Stats`); `Stats.requests` lists a `Request` per request,
whose first four fields are (method, path, range, status), `Stats.calls` those 4-tuples. `sent`
counts body bytes only, counted just before each write (so a client that has its bytes sees
them counted; a write the client never reads still counts). `path` is the URL path,
percent-decoded, without the query (kept in `query`). `srv.wait_idle()` waits until no request
is in flight.

Faults (`srv.faults`, settable at any time, each returns its `Rule`, whose `hits` counts the
requests it changed; `times=None` means every matching request; see `Faults`):
    status(match, code, times=1, retry_after=None, headers=None)    any status, e.g. 500
    unavailable(match, times=1, retry_after=None)                   503
    too_many_requests(match, times=1, retry_after=None)             429
    deny(match, code=403, times=None)                               401 / 403 / 404
    drop(match, after_bytes, times=1, reset=False)                  cut a GET body longer than K
                                                                    after K bytes (FIN, or RST)
    ignore_range(match="*", times=None)                             200 + whole body, no Accept-Ranges
    redirect(match, to=None, code=302, times=None, cdn=False)       to= a URL, a path, or None: a
                                                                    signed /_storage/ URL of the file
    slow(match="*", before_headers=0, per_chunk=0, chunk_size=65536, times=None)
    replace(file, content, after=1)    the first `after` requests that serve `file` (by any URL;
                                       a Hub LFS redirect to it counts) get the old file; then
                                       it is replaced (new inode, mtime +2 s, so ETag,
                                       Last-Modified and maybe size change)
`match` is a glob (fnmatch) on the URL path ("/sd1.safetensors", "*/resolve/*", "*.json"; a
pattern without a leading "/" or "*" gets a "/"), or a callable taking the path. Per request,
the first live rule of each kind applies, in the order: slow, status, redirect, then the
route (ignore_range, drop, replace act while serving a file). Redirect rules never apply to
/_storage/ and /_lfs/ (no loops).

Bandwidth: `RangeServer(root, bandwidth=B)` or `srv.bandwidth = B` (bytes/s) caps all file
bodies together, like one link; `response_bandwidth` caps each file body on its own (as a CDN's
per-connection limit). Both settable while running. Small replies (JSON, errors) are not paced.

Shutdown: `close()` (or leaving the `with`) stops both listeners, cuts kept-alive and in-flight
connections and interrupts sleeps, and joins every thread it started. An exception raised
inside a handler is kept in `srv.errors` and raised by `close()` (unless the `with` block
already raises), so a server bug cannot hide behind a client's retry.

Pointing huggingface_hub (2.4.0) at the server, within one test: the module reads HF_ENDPOINT
and HF_HUB_OFFLINE when first imported (constants.ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE,
HF_HUB_OFFLINE) and the module-level `huggingface_hub.hf_api.api` (behind
`huggingface_hub.model_info` and the other module functions) keeps the endpoint it was made
with; `make test` sets HF_HUB_OFFLINE=1, and tests/conftest.py does too. So setting the
environment is not enough once anything imported huggingface_hub: use

    use_hub(monkeypatch, srv)               # or use_hub(monkeypatch, srv, token="hf_x")

which unsets the offline variables and the token variables, sets HF_ENDPOINT (for
subprocesses) and patches those constants and `hf_api.api.endpoint` (monkeypatch undoes it
all). Then `hf_hub_url`, `get_hf_file_metadata`, `hf_hub_download(..., cache_dir=tmp)`,
`HfApi()` made after the call, and `HfFileSystem(skip_instance_cache=True)` reach the server.
Passing `endpoint=srv.url` to each call is not enough by itself: HF_HUB_OFFLINE still blocks
every request. A subprocess (the CLI) needs only HF_ENDPOINT=srv.url and HF_HUB_OFFLINE and
TRANSFORMERS_OFFLINE unset in its environment, which a subprocess started after use_hub
inherits. Give hf_hub_download a `cache_dir` under tmp_path (or set HF_HUB_CACHE for a
subprocess).
"""
from __future__ import annotations

import email.utils
import fnmatch
import hashlib
import itertools
import mimetypes
import os
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .rangeserver_hub import DEFAULT_TOKEN, Hub, use_hub

__all__ = ["RangeServer", "Faults", "Rule", "Stats", "Request", "parse_range", "use_hub", "DEFAULT_TOKEN", "Hub"]

CHUNK = 64 * 1024
UNSATISFIABLE = "unsatisfiable"
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


# ---------------------------------------------------------------- stats

class Request(NamedTuple):
    """One request as the server saw it; the first four fields are (method, path, range, status)."""
    method: str
    path: str                    # URL path, percent-decoded, no query
    range: str | None            # the Range header as sent
    status: int                  # 0 if the connection ended before a status was sent
    sent: int = 0                # body bytes written
    query: str = ""
    origin: str = "main"         # "main" (srv.url) or "cdn" (srv.cdn_url)
    file: str | None = None      # the real path of the local file served, if any
    if_range: str | None = None
    authorization: str | None = None
    aborted: bool = False        # the body was cut (drop fault, client gone, server closing)


class _Record:
    __slots__ = Request._fields

    def __init__(self, **kw):
        for f in Request._fields:
            setattr(self, f, kw.get(f, Request._field_defaults.get(f)))

    def snapshot(self) -> Request:
        return Request(*(getattr(self, f) for f in Request._fields))


class Stats:
    """What the server did up to the moment `srv.stats` was read (later requests do not change it)."""

    def __init__(self, requests):
        self.requests: tuple[Request, ...] = tuple(requests)

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    @property
    def total_bytes(self) -> int:
        return sum(r.sent for r in self.requests)

    @property
    def calls(self) -> list[tuple]:
        """[(method, path, range, status)] in the order the requests arrived."""
        return [tuple(r[:4]) for r in self.requests]

    @property
    def bytes_by_path(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.requests:
            out[r.path] = out.get(r.path, 0) + r.sent
        return out

    @property
    def bytes_by_file(self) -> dict[str, int]:
        """{real path of a local file: body bytes sent from it}, whatever URL served it."""
        out: dict[str, int] = {}
        for r in self.requests:
            if r.file is not None:
                out[r.file] = out.get(r.file, 0) + r.sent
        return out

    def select(self, path=None, *, method=None, status=None, origin=None) -> list[Request]:
        """The requests whose path matches `path` (a glob, as for faults) and the other fields given."""
        m = _matcher(path)
        return [r for r in self.requests if m(r.path) and (method is None or r.method == method)
                and (status is None or r.status == status) and (origin is None or r.origin == origin)]

    def count(self, path=None, **kw) -> int:
        return len(self.select(path, **kw))

    def bytes_for(self, path=None, **kw) -> int:
        return sum(r.sent for r in self.select(path, **kw))

    def file_bytes(self, file) -> int:
        """Body bytes sent from the local file `file` (any URL: static, /_storage, Hub, CDN)."""
        return self.bytes_by_file.get(os.path.realpath(file), 0)

    def __repr__(self):
        return f"Stats({self.n_requests} requests, {self.total_bytes} body bytes)"


# ---------------------------------------------------------------- faults

def _matcher(match) -> Callable[[str], bool]:
    if match is None:
        return lambda p: True
    if callable(match):
        return match
    pat = match if match.startswith(("/", "*")) else "/" + match
    return lambda p: fnmatch.fnmatchcase(p, pat)


@dataclass(eq=False)
class Rule:
    """One fault. `hits` counts the requests it changed; it is spent after `times` of them."""
    kind: str
    match: object
    times: int | None
    opts: dict = field(default_factory=dict)
    methods: frozenset | None = None
    hits: int = 0

    def __post_init__(self):
        self._m = _matcher(self.match)

    @property
    def spent(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def applies(self, method: str, path: str) -> bool:
        return not self.spent and (self.methods is None or method in self.methods) and self._m(path)


class Faults:
    """The fault knobs of a RangeServer (`srv.faults`). Thread-safe; rules apply in the order added."""

    def __init__(self, server: RangeServer):
        self._server = server
        self._lock = threading.Lock()
        self._rules: list[Rule] = []

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def _add(self, kind, match, times, methods=None, **opts) -> Rule:
        if times is not None and times < 0:
            raise ValueError("times must be None or >= 0")
        rule = Rule(kind, match, times, opts, frozenset(m.upper() for m in methods) if methods else None)
        with self._lock:
            self._rules.append(rule)
        return rule

    def status(self, match, code: int, *, times: int | None = 1, retry_after=None, headers=None,
               body: bytes | None = None, methods=None) -> Rule:
        """Answer `code` (with `Retry-After: retry_after` if given) instead of serving."""
        hdrs = dict(headers or {})
        if retry_after is not None:
            hdrs["Retry-After"] = str(retry_after)
        return self._add("status", match, times, methods, code=code, headers=hdrs, body=body)

    def unavailable(self, match="*", *, times: int | None = 1, retry_after=None, **kw) -> Rule:
        return self.status(match, 503, times=times, retry_after=retry_after, **kw)

    def too_many_requests(self, match="*", *, times: int | None = 1, retry_after=None, **kw) -> Rule:
        return self.status(match, 429, times=times, retry_after=retry_after, **kw)

    def deny(self, match, code: int = 403, *, times: int | None = None, **kw) -> Rule:
        """401, 403 or 404 (any code, really) for the matching paths, every time unless `times`."""
        if code == 401:
            kw.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="rangeserver"'})
        return self.status(match, code, times=times, **kw)

    def drop(self, match, after_bytes: int, *, times: int | None = 1, reset: bool = False) -> Rule:
        """Send the headers and `after_bytes` bytes of the body, then cut the connection: a FIN
        (the client sees a short body), or with `reset` a TCP RST (connection reset by peer).
        GET only, 200 or 206, and only a body longer than `after_bytes` (a shorter one is sent
        whole and does not use the rule up)."""
        return self._add("drop", match, times, ("GET",), after_bytes=int(after_bytes), reset=reset)

    def ignore_range(self, match="*", *, times: int | None = None) -> Rule:
        """Serve files as a server without Range support: always 200 and the whole body, no Accept-Ranges."""
        return self._add("ignore_range", match, times)

    def redirect(self, match, to: str | None = None, *, code: int = 302, times: int | None = None,
                 cdn: bool = False, methods=None) -> Rule:
        """Answer `code` with Location `to`: a URL, a path (on the main origin, or the cdn one if
        `cdn`), or None: a freshly signed /_storage/ URL of the same file, as a storage
        service's presigned URL."""
        return self._add("redirect", match, times, methods, to=to, code=code, cdn=cdn)

    def slow(self, match="*", *, before_headers: float = 0.0, per_chunk: float = 0.0,
             chunk_size: int = CHUNK, times: int | None = None) -> Rule:
        """Sleep `before_headers` seconds before answering (any reply), and `per_chunk` before
        each `chunk_size` bytes of a file body (to test timeouts). Interrupted by close()."""
        return self._add("slow", match, times, before_headers=before_headers, per_chunk=per_chunk,
                         chunk_size=max(1, int(chunk_size)))

    def replace(self, file, content, *, after: int = 1) -> Rule:
        """After `after` requests have been served from `file` (a name under the root, or a
        path), replace it with `content` (bytes, or a path to copy) before serving the next
        one. HEAD requests count. One-shot."""
        real = os.path.realpath(self._server._root_path(file))
        return self._add("replace", None, 1, file=real, content=content, after=int(after), seen=0)

    # internal: the first live rule of a kind for a request, counted as a hit
    def _take(self, kind: str, method: str, path: str, pred=None) -> Rule | None:
        with self._lock:
            for r in self._rules:
                if r.kind == kind and r.applies(method, path) and (pred is None or pred(r)):
                    r.hits += 1
                    return r
        return None

    def _replace_due(self, real: str):
        """The content to put in place of `real` before serving this request, if a rule says so."""
        with self._lock:
            for r in self._rules:
                if r.kind == "replace" and not r.spent and r.opts["file"] == real:
                    r.opts["seen"] += 1
                    if r.opts["seen"] > r.opts["after"]:
                        r.hits += 1
                        return r.opts["content"]
        return None


# ---------------------------------------------------------------- ranges

def parse_range(header: str, size: int):
    """(start, stop) with stop exclusive; UNSATISFIABLE; or None: ignore the header (serve 200)."""
    if "," in header:
        return None                                   # several ranges: ignored (documented)
    m = _RANGE.match(header)
    if not m or m.group(1) == m.group(2) == "":
        return None
    a, b = m.groups()
    if a == "":                                       # bytes=-n: the last n bytes
        n = int(b)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - n), size
    first = int(a)
    last = int(b) if b else size - 1
    if b and last < first:
        return None                                   # invalid: ignored
    if first >= size:
        return UNSATISFIABLE
    return first, min(last, size - 1) + 1


def file_etag(st: os.stat_result) -> str:
    return '"' + hashlib.sha1(f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}".encode()).hexdigest() + '"'


class _Pacer:
    """A token bucket without burst: reserve(n) returns when n more bytes may leave."""

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def reserve(self, n: int) -> float:
        with self.lock:
            start = max(time.monotonic(), self.next)
            self.next = start + n / self.rate
            return self.next


class _Stop(Exception):
    """The server is closing: abandon this response."""


# ---------------------------------------------------------------- the handler

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rangeserver/1.0"
    timeout = 30                      # an idle kept-alive connection ends after this

    def setup(self):
        super().setup()
        # no Nagle: headers and body leave in separate writes, which with delayed ACKs costs 40 ms a request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):   # quiet
        pass

    def do_GET(self):
        self.owner: RangeServer = self.server.owner
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, split.query
        self.url_path = unquote(self.raw_path)
        self.rec = _Record(method=self.command, path=self.url_path, range=self.headers.get("Range"), status=0,
                           sent=0, query=self.query, origin=self.server.origin,
                           if_range=self.headers.get("If-Range"), authorization=self.headers.get("Authorization"),
                           aborted=False)
        self.owner._begin(self.rec)
        self.headers_sent = False
        try:
            n = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(n) if n > 0 else b""
            self._dispatch()
        except _Stop:
            self.rec.aborted = True
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.rec.aborted = True
            self.close_connection = True
        except Exception:
            if self.owner._stop.is_set() and isinstance(sys.exc_info()[1], OSError):
                self.rec.aborted = True          # a socket cut by close()
                self.close_connection = True
                return
            self.owner._error(f"{self.command} {self.path}: {traceback.format_exc()}")
            self.close_connection = True
            if not self.headers_sent:
                try:
                    self.reply(500, b"rangeserver: internal error\n")
                except OSError:
                    pass
        finally:
            self.owner._end(self.rec)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def handle_one_request(self):
        self.rec = None                           # a request that does not parse is answered (400) unrecorded
        super().handle_one_request()

    def send_response(self, code, message=None):
        if self.rec is not None:
            self.rec.status = code
        super().send_response(code, message)

    def end_headers(self):
        super().end_headers()
        self.headers_sent = True

    # -- small replies
    def reply(self, code: int, body: bytes = b"", headers=None, content_type="text/plain; charset=utf-8"):
        """A whole response with a small body (none for HEAD)."""
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.write(body)

    def write(self, data: bytes) -> None:
        self.rec.sent += len(data)              # before the write: the client cannot see bytes not yet counted
        self.wfile.write(data)

    def origin_url(self, cdn: bool) -> str:
        return self.owner.cdn_url if cdn else self.owner.url

    # -- routing
    def _dispatch(self):
        srv, method, path = self.owner, self.command, self.url_path
        self.slow = srv.faults._take("slow", method, path)
        if self.slow and self.slow.opts["before_headers"]:
            srv._sleep(self.slow.opts["before_headers"])
        rule = srv.faults._take("status", method, path)
        if rule:
            body = rule.opts["body"]
            return self.reply(rule.opts["code"], f"rangeserver fault: {rule.opts['code']}\n".encode()
                              if body is None else body, rule.opts["headers"])
        internal = path.startswith(("/_storage/", "/_lfs/"))
        rule = None if internal else srv.faults._take("redirect", method, path)
        if rule:
            to = rule.opts["to"]
            if to is None:
                to = srv._sign(self.origin_url(rule.opts["cdn"]) + "/_storage" + quote(path))
            elif to.startswith("/"):
                to = self.origin_url(rule.opts["cdn"]) + to
            return self.reply(rule.opts["code"], b"", {"Location": to})
        if method not in ("GET", "HEAD") and not srv.hub.handles(self.raw_path):
            return self.reply(405, b"method not allowed\n", {"Allow": "GET, HEAD"})
        if path.startswith("/_storage/"):
            return self._storage()
        if srv.hub.handles(self.raw_path):
            return srv.hub.handle(self)
        local = srv._local(srv.root, path) if srv.root is not None else None
        if local is None:
            return self.reply(404, b"not found\n")
        return self.serve_file(local)

    def _storage(self):
        srv = self.owner
        if not srv._check_signed(self):
            return
        local = srv._local(srv.root, self.url_path[len("/_storage"):]) if srv.root is not None else None
        if local is None:
            return self.reply(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
        name = os.path.basename(local)
        return self.serve_file(local, headers={"Content-Disposition": f"attachment; filename=\"{name}\""})

    # -- files
    def serve_file(self, local: str, *, etag=None, headers=None, check=None):
        """Serve a local file: Range, If-Range, faults, bandwidth. `etag` (a string, or a function
        of the open file's stat and file object) replaces the stat-based ETag; `check(stat, file)`
        may refuse the file just opened (False: 404 NoSuchKey)."""
        srv, method, path = self.owner, self.command, self.url_path
        srv._serving(local)
        try:
            f = open(local, "rb")
        except OSError:
            return self.reply(404, b"not found\n")
        with f:
            st = os.fstat(f.fileno())
            if check is not None and not check(st, f):
                return self.reply(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
            size = st.st_size
            tag = etag(st, f) if callable(etag) else (etag or file_etag(st))
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            ignore = srv.faults._take("ignore_range", method, path)
            hdrs = {"ETag": tag, "Last-Modified": last_modified}
            if not ignore:
                hdrs["Accept-Ranges"] = "bytes"
            hdrs.update(headers or {})
            start, stop, status = 0, size, 200
            rng = self.headers.get("Range")
            if rng and not ignore and self._if_range_holds(tag, last_modified):
                parsed = parse_range(rng, size)
                if parsed == UNSATISFIABLE:
                    return self.reply(416, b"range not satisfiable\n", dict(hdrs, **{"Content-Range": f"bytes */{size}"}))
                if parsed is not None:
                    (start, stop), status = parsed, 206
                    hdrs["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
            drop = srv.faults._take("drop", method, path, lambda r: r.opts["after_bytes"] < stop - start)
            self.rec.file = local                 # from here on, body bytes are the file's
            self.send_response(status)
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("Content-Type", mimetypes.guess_type(local)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(stop - start))
            self.end_headers()                    # a drop is not announced (no Connection: close)
            if method == "HEAD":
                return
            f.seek(start)
            self._send_body(f, stop - start, drop)

    def _if_range_holds(self, etag: str, last_modified: str) -> bool:
        v = self.headers.get("If-Range")
        if v is None:
            return True
        v = v.strip()
        if v.startswith("W/"):
            return False                                  # weak validators never match
        return v == etag if v.startswith('"') else v == last_modified

    def _send_body(self, f, length: int, drop: Rule | None):
        srv = self.owner
        limit = length if drop is None else min(length, drop.opts["after_bytes"])
        chunk = CHUNK
        if self.slow and self.slow.opts["per_chunk"]:
            chunk = self.slow.opts["chunk_size"]
        local_pacer = _Pacer(srv.response_bandwidth) if srv.response_bandwidth else None
        for rate in (srv.bandwidth, srv.response_bandwidth):
            if rate:
                chunk = min(chunk, max(1024, int(rate) // 50))
        left = limit
        while left > 0:
            if self.slow and self.slow.opts["per_chunk"]:
                srv._sleep(self.slow.opts["per_chunk"])
            data = f.read(min(chunk, left))
            if not data:                          # truncated in place while served: cut, as a real server would
                self.rec.aborted = True
                self.close_connection = True
                self._shut_write()
                return
            deadline = 0.0
            if srv._pacer is not None:
                deadline = srv._pacer.reserve(len(data))
            if local_pacer is not None:
                deadline = max(deadline, local_pacer.reserve(len(data)))
            if deadline:
                srv._sleep(deadline - time.monotonic())
            self.write(data)
            left -= len(data)
        if drop is not None and limit < length:
            self.rec.aborted = True
            self.close_connection = True
            self.wfile.flush()
            if drop.opts["reset"]:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                srv._reset.add(self.connection)
            else:
                self._shut_write()


    def _shut_write(self):
        """End the body here; a client that has already gone (ENOTCONN) is no server error."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _Listener(ThreadingHTTPServer):
    """One listening socket; its connections are tracked so that close() can cut them and join their threads."""
    daemon_threads = True

    def __init__(self, owner: RangeServer, origin: str):
        self.owner, self.origin = owner, origin
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)      # not HTTPServer's: its getfqdn() may wait on DNS
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def process_request(self, request, client_address):
        t = threading.Thread(target=self._run, args=(request, client_address), daemon=True,
                             name=f"rangeserver-{self.origin}-conn-{next(self.owner._ids)}")
        with self.owner._lock:
            self.owner._threads.add(t)
            self.owner._conns.add(request)
        t.start()

    def _run(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.owner._lock:
                self.owner._threads.discard(threading.current_thread())
                self.owner._conns.discard(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):   # a client that went away
            self.owner._error(traceback.format_exc())

    def shutdown_request(self, request):
        if request in self.owner._reset:             # a RST: close without the FIN of shutdown()
            self.owner._reset.discard(request)
            request.close()
        else:
            super().shutdown_request(request)


# ---------------------------------------------------------------- the server

class RangeServer:
    """An HTTP server on 127.0.0.1 (two ports: `url` and `cdn_url`) serving the files under `root`
    and any Hub repositories added with `add_repo`. Use as a context manager, or start()/close()."""

    def __init__(self, root=None, *, bandwidth: float | None = None, response_bandwidth: float | None = None):
        self.root = os.path.realpath(root) if root is not None else None
        self.faults = Faults(self)
        self.hub = Hub(self)
        self.errors: list[str] = []
        self.storage_rejects_auth = False
        self.response_bandwidth = response_bandwidth
        self._pacer = None
        self.bandwidth = bandwidth
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._records: list[_Record] = []
        self._in_flight = 0
        self._threads: set[threading.Thread] = set()
        self._conns: set = set()
        self._reset: set = set()
        self._signatures: set[str] = set()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._listeners: list[_Listener] = []
        self._loops: list[threading.Thread] = []
        self.url = self.cdn_url = None

    # -- life
    def start(self) -> RangeServer:
        if self._listeners or self._stop.is_set():
            raise RuntimeError("a RangeServer starts once")
        self._listeners = [_Listener(self, "main"), _Listener(self, "cdn")]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._listeners)
        for s in self._listeners:
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True,
                                 name=f"rangeserver-{s.origin}")
            t.start()
            self._loops.append(t)
        return self

    def close(self, *, raise_errors: bool = True) -> None:
        """Stop, cut every connection, join every thread; then raise if a handler failed. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        stoppers = [threading.Thread(target=s.shutdown, name="rangeserver-stop") for s in self._listeners]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(10)
        for s in self._listeners:
            s.server_close()
        for t in self._loops:
            t.join(10)
        stuck = [t.name for t in threads + self._loops if t.is_alive()]
        self._listeners, self._loops = [], []
        if stuck:
            raise RuntimeError(f"rangeserver threads did not stop: {stuck}")
        if raise_errors and self.errors:
            raise AssertionError("rangeserver handler errors:\n" + "\n".join(self.errors))

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.close(raise_errors=exc_type is None)

    # -- settings
    @property
    def bandwidth(self) -> float | None:
        return self._pacer.rate if self._pacer else None

    @bandwidth.setter
    def bandwidth(self, rate: float | None) -> None:
        self._pacer = _Pacer(rate) if rate else None

    # -- URLs
    def url_for(self, name: str, *, cdn: bool = False) -> str:
        """The URL of `name` (a path under the root, "/" separated)."""
        return (self.cdn_url if cdn else self.url) + "/" + quote(name.lstrip("/"))

    def signed_url_for(self, name: str, *, cdn: bool = False) -> str:
        """A presigned-storage-like URL of `name`: /_storage/<name>?X-Amz-...&X-Amz-Signature=..."""
        return self._sign((self.cdn_url if cdn else self.url) + "/_storage/" + quote(name.lstrip("/")))

    def _sign(self, url: str) -> str:
        sig = hashlib.sha256(f"{url}#{next(self._ids)}".encode()).hexdigest()
        with self._lock:
            self._signatures.add(sig)
        return (f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=rangeserver&X-Amz-Expires=3600"
                f"&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}")

    def revoke_signatures(self) -> None:
        """Every signed URL issued so far now gets 403, as an expired presigned URL."""
        with self._lock:
            self._signatures.clear()

    # -- the Hub
    def add_repo(self, repo_id: str, folder, **kw) -> str:
        """Serve `folder` as the Hub model repository `repo_id`; returns its commit. See Hub.add_repo."""
        return self.hub.add_repo(repo_id, folder, **kw)

    def hub_url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        """What huggingface_hub.hf_hub_url gives with HF_ENDPOINT=srv.url."""
        return f"{self.url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    # -- files
    def _root_path(self, file) -> str:
        p = Path(file)
        if p.is_absolute():
            return str(p)
        if self.root is None:
            raise ValueError(f"{file!r} is relative and the server has no root")
        return os.path.join(self.root, *str(file).split("/"))

    def replace_file(self, file, content) -> None:
        """Replace `file` (under the root, or a path) now, as a new upload would: a new inode and
        an mtime 2 s later than the old one, so its ETag and Last-Modified change."""
        path = self._root_path(file)
        data = Path(content).read_bytes() if isinstance(content, (str, os.PathLike)) else bytes(content)
        old = os.stat(path).st_mtime_ns
        tmp = f"{path}.rangeserver-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        new = max(time.time_ns(), old + 2_000_000_000)
        os.utime(tmp, ns=(new, new))
        os.replace(tmp, path)

    @staticmethod
    def _local(base: str, rel: str) -> str | None:
        """The real path of the regular file `rel` under `base`, or None (missing, a folder, outside)."""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if not parts or any(p == ".." or "\\" in p or "\0" in p for p in parts):
            return None
        real = os.path.realpath(os.path.join(base, *parts))
        if not real.startswith(base.rstrip(os.sep) + os.sep) or not os.path.isfile(real):
            return None
        return real

    # -- stats
    @property
    def stats(self) -> Stats:
        with self._lock:
            return Stats(r.snapshot() for r in self._records)

    def reset_stats(self) -> None:
        """Forget the requests so far (one still in flight is forgotten too, with the bytes it sends later)."""
        with self._lock:
            self._records = []

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is in flight; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _begin(self, rec: _Record) -> None:
        with self._lock:
            self._records.append(rec)
            self._in_flight += 1

    def _end(self, rec: _Record) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def _serving(self, real: str) -> None:
        """A request is about to serve (or redirect to) the local file `real`: a due replace fault acts now."""
        new = self.faults._replace_due(real)
        if new is not None:
            self.replace_file(real, new)

    def _check_signed(self, h) -> bool:
        """A /_storage/ or /_lfs/ request: True if its signature is one issued; else the error is sent."""
        sig = parse_qs(h.query).get("X-Amz-Signature", [""])[0]
        with self._lock:
            known = sig in self._signatures
        if not known:
            h.reply(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired or the signature "
                    b"does not match</Message></Error>", content_type="application/xml")
            return False
        if self.storage_rejects_auth and h.headers.get("Authorization"):
            h.reply(400, b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed"
                    b"</Message></Error>", content_type="application/xml")
            return False
        return True

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._stop.wait(seconds):
            raise _Stop()

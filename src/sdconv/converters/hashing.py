"""sha256 of input files for provenance, without making a conversion wait for it.

Hashing a 7 GB checkpoint takes seconds, while the text encoder is a small part of it. So:
- a cache keyed by (real path, size, mtime, inode) under $XDG_CACHE_HOME/sdconv (best effort:
  an unwritable cache only means hashing again), as A1111's cache.json does for model hashes;
- on a miss, the hash runs in a background thread (hashlib and file reads release the GIL)
  while the conversion runs; the digest, always 64 characters, is written into the output's
  header at the end (see LateValue).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from ..errors import MalformedInputError
from . import untrusted

# the cache: a few thousand entries of ~200 bytes; anything much larger is not sdconv's
CACHE_LIMITS = untrusted.Limits(8 << 20, 4, 200_000)


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sdconv" / "sha256.json"


def _identity(paths) -> str:
    parts = []
    for p in paths:
        st = os.stat(p)
        parts.append(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}")
    return "\n".join(parts)


def _read_cache() -> dict:
    """The cache's entries: {identity: 64 hex digits}. A cache that cannot be read, is too large,
    or holds anything else (a list, wrong types, bad digests) is ignored, and rewritten by the
    next hash; entries that are not what sdconv writes are dropped one by one."""
    try:
        doc = untrusted.read_json(_cache_file(), CACHE_LIMITS)
        if not doc.is_object():
            return {}
    except (OSError, MalformedInputError):
        return {}
    return {k: v for k, v in doc.raw.items() if "\0" not in k and isinstance(v, str) and len(v) == 64
            and all(c in "0123456789abcdef" for c in v)}


def _write_cache(key: str, digest: str):
    try:
        f = _cache_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        # entries of files that are gone are dropped, so the cache does not grow without end
        data = {k: v for k, v in _read_cache().items() if all(os.path.exists(ln.split("|")[0]) for ln in k.split("\n"))}
        data[key] = digest
        tmp = f.with_name(f".{f.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, f)
    except OSError:
        pass


def _compute(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_of(paths) -> str:
    """The files' sha256 (one digest over all of them, in order), from the cache if it knows them."""
    paths = [Path(p) for p in paths]
    key = _identity(paths)
    digest = _read_cache().get(key)
    if digest is None:
        digest = _compute(paths)
        _write_cache(key, digest)
    return digest


class LateValue:
    """A metadata value that is computed while the output is written: a fixed-width placeholder
    goes into the header first, the real value replaces it at the end."""

    def __init__(self, width: int, compute):
        self.width = width
        self._result = None
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(compute,), daemon=True)
        self._thread.start()

    def _run(self, compute):
        try:
            self._result = compute()
        except BaseException as e:       # re-raised in the caller's thread
            self._error = e

    def placeholder(self) -> str:
        return "0" * self.width

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if len(self._result) != self.width:
            raise RuntimeError(f"internal error: late value {self._result!r} is not {self.width} wide")
        return self._result


def late_sha256(paths) -> LateValue | str:
    """sha256_of, now if cached, else as a LateValue computed in the background."""
    paths = [Path(p) for p in paths]
    digest = _read_cache().get(_identity(paths))
    return digest if digest is not None else LateValue(64, lambda: sha256_of(paths))

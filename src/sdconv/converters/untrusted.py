"""Untrusted text, read one way: bounded, then typed.

Every document sdconv reads that it did not just write itself goes through here: an input's
config.json and shard index, safetensors headers and their metadata, sdconv's own records in
inputs and outputs (`sdconv.*` metadata, the ledger, sidecars), the hash cache. Mapping YAML
uses the same file reader and limits (yamlload.py).

- `read_file` reads only a regular file (a FIFO, device or socket is refused before it is
  opened, and again on the descriptor, which is opened without blocking), of at most a size;
- `parse_json` parses within limits of size, nesting depth and number of values; only finite
  numbers (1e400 is refused, not read as inf), no NaN/Infinity, no duplicate keys;
- `Value` hands out what a reader expects (an object, a whole number in a range, a string of a
  set...) or raises MalformedInputError: one line naming the file and the field.

sdconv's own optional records (old metadata, ledgers, the cache) are read with `ignoring`, which
turns a malformed record into a warning: the record is recomputed, the input still converts.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

from ..errors import MalformedInputError

T = TypeVar("T")


class Limits(NamedTuple):
    bytes: int
    depth: int = 32
    values: int = 1_000_000


SMALL = Limits(16 << 20)                    # configs, shard indexes, sidecars, metadata values, the cache
HEADER = Limits(100_000_000, 32, 10_000_000)    # a safetensors header: the format's own size limit
MAX_LAYERS = 1024                           # no CLIP has more blocks; bounds counts read from records
MAX_HEADS = 1 << 16


class NotRegular(OSError):
    """A path that is not a regular file (FIFO, device, socket, folder): never read."""


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path) -> os.stat_result:
    """The file's status if it is a regular file (through symlinks); NotRegular otherwise. Call
    it before opening anything an input names: opening a FIFO blocks, opening a device can act."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegular(f"{path} is {file_kind(st.st_mode)}, not a regular file")
    return st


def read_file(path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. OSError (NotRegular for a FIFO,
    device, socket or folder) or MalformedInputError (too large)."""
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)               # what was opened, in case the name changed since
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"{path} is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise MalformedInputError(f"{path}: {st.st_size:,} bytes, more than the {limit:,} such a file may hold",
                                      "it is not what its name says")
        chunks, got = [], 0
        while got <= limit:
            b = os.read(fd, min(1 << 20, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:                 # grew while read
            raise MalformedInputError(f"{path}: more than the {limit:,} bytes such a file may hold")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range (only finite numbers)")
    return v


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number (only finite numbers)")


def _unique(pairs) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {_show(dup)}")
    return out


def parse_json(data: bytes | str, where: str, limits: Limits = SMALL) -> "Value":
    """A JSON document within `limits`, as a Value; MalformedInputError naming `where` otherwise."""
    if len(data) > limits.bytes:
        raise MalformedInputError(f"{where}: {len(data):,} bytes of JSON, more than the {limits.bytes:,} allowed",
                                  detail="too large")
    try:
        raw = json.loads(data, parse_float=_finite, parse_constant=_no_constant, object_pairs_hook=_unique)
    except RecursionError:
        raise MalformedInputError(f"{where}: JSON nested too deeply", detail="nested too deeply")
    except ValueError as e:          # JSONDecodeError, UnicodeDecodeError, ours; int digits beyond Python's limit
        first = (str(e).splitlines() or [""])[0][:160]
        raise MalformedInputError(f"{where}: invalid JSON ({first})", detail=first)
    _check_size(raw, where, limits)
    return Value(raw, where)


def read_json(path, limits: Limits = SMALL) -> "Value":
    """A JSON file: read_file, then parse_json. OSError if it cannot be read at all."""
    return parse_json(read_file(path, limits.bytes), str(path), limits)


def _check_size(raw, where: str, limits: Limits):
    """Depth and number of values, walked without recursion."""
    count, stack = 0, [(raw, 1)]
    while stack:
        v, depth = stack.pop()
        count += 1
        if count > limits.values:
            raise MalformedInputError(f"{where}: more than {limits.values:,} JSON values", detail="too many values")
        if isinstance(v, (dict, list)):
            if depth > limits.depth:
                raise MalformedInputError(f"{where}: JSON nested deeper than {limits.depth} levels",
                                          detail="nested too deeply")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


def _show(v) -> str:
    """A value as a message shows it: short, ASCII."""
    if isinstance(v, dict):
        return f"an object of {len(v)} field(s)"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    if v is None:
        return "null"
    s = json.dumps(v, ensure_ascii=True)
    return s if len(s) <= 60 else s[:57] + "..."


def _field(parent: str, key) -> str:
    k = str(key)
    name = k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)[:60]
    return f"{parent}.{name}" if parent else name


class Value:
    """A value of an untrusted document, with where it is (file, field). The accessors check
    and return plain values, or raise MalformedInputError naming the file and field."""
    __slots__ = ("raw", "where", "field")

    def __init__(self, raw, where: str, field: str = ""):
        self.raw, self.where, self.field = raw, where, field

    def fail(self, expected: str, hint: str | None = None):
        what = self.field or "the document"
        raise MalformedInputError(f"{self.where}: {what} must be {expected}, found {_show(self.raw)}", hint,
                                  detail=f"{what} must be {expected}")

    def is_object(self) -> bool:
        return isinstance(self.raw, dict)

    def obj(self) -> "Value":
        if not isinstance(self.raw, dict):
            self.fail("an object ({...})")
        return self

    def get(self, key) -> "Value | None":
        """A field of an object; None if absent or null."""
        v = self.obj().raw.get(key)
        return None if v is None else Value(v, self.where, _field(self.field, key))

    def __getitem__(self, key) -> "Value":
        v = self.get(key)
        if v is None:
            raise MalformedInputError(f"{self.where}: {self.field or 'the document'} lacks {_field('', key)}",
                                      detail=f"lacks {_field('', key)}")
        return v

    def size(self) -> int:
        """Fields of an object, items of a list; 0 for anything else."""
        return len(self.raw) if isinstance(self.raw, (dict, list)) else 0

    def items(self):
        for k, v in self.obj().raw.items():
            yield k, Value(v, self.where, _field(self.field, k))

    def array(self) -> list["Value"]:
        if not isinstance(self.raw, list):
            self.fail("a list")
        return [Value(v, self.where, f"{self.field}[{i}]") for i, v in enumerate(self.raw)]

    def whole(self, least: int | None = None, most: int | None = None) -> int:
        v = self.raw
        if isinstance(v, bool) or not isinstance(v, int) or (least is not None and v < least) \
                or (most is not None and v > most):
            rng = (f" from {least} to {most}" if least is not None and most is not None
                   else f" of at least {least}" if least is not None else "")
            self.fail(f"a whole number{rng}")
        return v

    def number(self, least: float | None = None, most: float | None = None) -> float:
        v = self.raw
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (least is not None and v < least) \
                or (most is not None and v > most):
            self.fail("a number" + (f" from {least} to {most}" if least is not None and most is not None else ""))
        return v

    def text(self, choices=None, most: int = 4096) -> str:
        v = self.raw
        if not isinstance(v, str) or len(v) > most:
            self.fail(f"a string of at most {most} characters")
        if choices is not None and v not in choices:
            self.fail("one of " + ", ".join(map(str, choices)))
        return v

    def flag(self) -> bool:
        if not isinstance(self.raw, bool):
            self.fail("true or false")
        return self.raw

    def strings(self, most: int = 4096) -> list[str]:
        return [x.text(most=most) for x in self.array()]


def ignoring(warnings: list, what: str, read: Callable[[], T]) -> T | None:
    """Read one of sdconv's own optional records: read()'s value, or None, with a warning in
    `warnings`, when the record is malformed (it is then recomputed, never trusted)."""
    try:
        return read()
    except MalformedInputError as e:
        warnings.append(f"{e.message}; {what} ignored (sdconv's own record, not needed)")
        return None


def within(folder: Path, name: str) -> Path | None:
    """`folder / name` if `name` is a plain relative path that stays inside `folder` (no `..`,
    not absolute), else None."""
    p = Path(name)
    if not name or p.is_absolute() or p.drive or "\0" in name or "\\" in name \
            or any(part in ("..", "") for part in p.parts):
        return None
    return folder / p

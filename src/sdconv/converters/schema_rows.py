"""Schema rows: each field of a mapping-file object is declared once, on its dataclass field, as
one row (YAML name, check, default), and `parse_object` derives the rest from the rows: which
keys are allowed (with the nearest one for a typo), which are required, how each value is
checked and converted, and what an absent one becomes.

A check is a function (value, At) -> converted value that raises MappingError; the helpers below
build checks for strings, numbers, lists, closed vocabularies, nested objects and named maps.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MappingError
from .yamlload import LineDict

REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class At:
    """Where a value is (file and line) and what messages call it."""
    path: object
    line: int
    what: str

    def error(self, message: str, hint: str | None = None) -> MappingError:
        return MappingError(self.path, self.line, message, hint)

    def to(self, line, what: str) -> "At":
        return At(self.path, line or self.line, what)


@dataclass(frozen=True)
class Row:
    check: Callable
    yaml: str | None            # the YAML name if not the field's; dotted: inside a sub-mapping
    required: bool


def row(check: Callable, *, default=REQUIRED, yaml: str | None = None):
    """A dataclass field that is one schema row; without a default its YAML key is required."""
    meta = {"row": Row(check, yaml, default is REQUIRED)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Parsed:
    """An object read from a mapping file; `lines` says where each of its fields was written, so
    that checks made later (against another file) can name the line."""
    lines: dict = field(default_factory=dict, compare=False, repr=False, kw_only=True)


def rows(cls) -> list[tuple[str, list[str], Row]]:
    return [(f.name, (f.metadata["row"].yaml or f.name).split("."), f.metadata["row"])
            for f in dataclasses.fields(cls) if "row" in f.metadata]


def as_dict(obj) -> dict:
    """The rows of an object that were given, as a plain dict."""
    return {name: getattr(obj, name) for name, _, _ in rows(type(obj)) if getattr(obj, name) is not None}


# ---------------------------------------------------------------- the parser

def parse_object(cls, d, at: At, *, header: dict | None = None, require=(), **given):
    """Build `cls` from the YAML mapping `d` by its rows. `given`: fields that do not come from
    `d` (a name from the parent's key, the file's path); `header`: keys checked, not kept (name
    -> check); `require`: rows that this use of `cls` requires although they have a default."""
    mine = [(n, keys, r) for n, keys, r in rows(cls) if n not in given]
    tree: dict = {k: [True, None] for k in header or ()}      # key -> [required, sub-tree or None]
    for name, keys, r in mine:
        node = tree
        for i, k in enumerate(keys):
            entry = node.setdefault(k, [False, {} if i < len(keys) - 1 else None])
            entry[0] = entry[0] or r.required or name in require
            node = entry[1]
    _check_keys(d, tree, at, top=header is not None)
    for k, check in (header or {}).items():
        check(d[k], at.to(d.line_of(k), k))
    values, lines = dict(given), {}
    for name, keys, r in mine:
        sub = d
        for k in keys[:-1]:
            sub = sub.get(k) or {}
        v = sub.get(keys[-1])
        if v is None and not (r.required or name in require):
            continue                # absent (or null): the dataclass default
        lines[name] = sub.line_of(keys[-1])
        dotted = ".".join(keys)
        values[name] = r.check(v, at.to(lines[name], dotted if header is not None else f"{at.what} {dotted}"))
    names = {f.name for f in dataclasses.fields(cls)}
    if "line" in names and "line" not in values:
        values["line"] = at.line
    if "lines" in names:
        values["lines"] = lines
    return cls(**values)


def check_fields(d, allowed: dict, at: At):
    """Unknown and missing keys of a mapping whose fields are known only at run time
    (allowed: name -> required)."""
    _check_keys(d, {k: [required, None] for k, required in allowed.items()}, at, top=False)


def guarded(parse):
    """A structure the checks did not foresee (a list where a mapping belongs, a number where a
    name belongs) is still a MappingError naming the file, never a traceback."""
    import functools

    @functools.wraps(parse)
    def wrapper(path, *args):
        try:
            return parse(path, *args)
        except MappingError:
            raise
        except (TypeError, AttributeError, KeyError, ValueError, IndexError, RecursionError) as e:
            raise MappingError(path, 0, f"malformed {parse.__name__.replace('parse_', '')} file "
                                        f"({type(e).__name__}: {e})",
                               "compare it with a built-in mapping file, or run `sdconv layouts`")
    return wrapper


def _check_keys(d, tree: dict, at: At, top: bool, trail=()):
    """Unknown keys (suggesting the nearest), then missing required ones, level by level."""
    dotted = ".".join(trail)
    where = (dotted if top else f"{at.what} {dotted}") if trail else at.what
    if not isinstance(d, dict):
        raise MappingError(at.path, getattr(d, "line", 0) or at.line, f"{where} must be a mapping")
    for k in d:
        if k not in tree:
            near = difflib.get_close_matches(str(k), list(tree), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"allowed: {', '.join(tree)}"
            raise MappingError(at.path, d.line_of(k), f"unknown field {k!r} in {where}", hint)
    for k, (required, sub) in tree.items():
        if required and k not in d:
            raise MappingError(at.path, d.line, f"{where} lacks the required field {k!r}")
        if sub is not None and (required or d.get(k) is not None):
            _check_keys(d[k], sub, at.to(d.line_of(k), at.what), top, (*trail, k))


# ---------------------------------------------------------------- checks

def text(v, at: At) -> str:
    if not isinstance(v, str):
        raise at.error(f"{at.what} must be a string, found {v!r}")
    return v


def flag(v, at: At) -> bool:
    if not isinstance(v, bool):
        raise at.error(f"{at.what} must be true or false, found {v!r}")
    return v


def whole(least: int | None = 0) -> Callable:
    def check(v, at: At) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or (least is not None and v < least):
            bound = f" of at least {least}" if least is not None else ""
            raise at.error(f"{at.what} must be a whole number{bound}, found {v!r}")
        return v
    return check


def number(v, at: At) -> float:
    # finite: YAML's .inf and .nan would reach arithmetic and tensors
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise at.error(f"{at.what} must be a number (finite), found {v!r}")
    return v


def strings(v, at: At) -> tuple[str, ...]:
    # a bare string is refused, not read as a list of its characters
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise at.error(f"{at.what} must be a list of strings, found {v!r}")
    return tuple(v)


def string_set(v, at: At) -> frozenset:
    return frozenset(strings(v, at))


def one_of(choices, noun: str | None = None, *, here: str = "", elsewhere=(), there: str = "") -> Callable:
    """A closed vocabulary. With a noun: "unknown <noun> 'x'" and the nearest valid word; a word
    of the vocabulary `elsewhere` (that serves `there`, not `here`) is named as such."""
    def check(v, at: At):
        if isinstance(v, str) and v in choices:
            return v
        if noun is None:
            raise at.error(f"{at.what} must be {' or '.join(map(repr, choices))}, found {v!r}")
        known = f"{here} takes {', '.join(choices)}" if here else f"known: {', '.join(choices)}"
        if isinstance(v, str) and v in elsewhere:
            raise at.error(f"{noun} {v!r} serves {there}, not {here}", known)
        near = difflib.get_close_matches(str(v), list(choices), n=1)
        raise at.error(f"unknown {noun} {v!r}", (f"did you mean {near[0]!r}? " if near else "") + known)
    return check


def listed(check: Callable) -> Callable:
    """A YAML list, each item checked: a tuple."""
    def run(v, at: At) -> tuple:
        if not isinstance(v, list):
            raise at.error(f"{at.what} must be a list, found {v!r}")
        return tuple(check(x, at.to(getattr(x, "line", 0), at.what)) for x in v)
    return run


def obj(cls, what: str | None = None, **options) -> Callable:
    """A nested object, parsed by its own rows; `what` names it in messages."""
    return lambda v, at: parse_object(cls, v, at.to(getattr(v, "line", 0), what or at.what), **options)


def then(check: Callable, convert: Callable) -> Callable:
    return lambda v, at: convert(check(v, at))


def named(cls, what: str, *, key: Callable = text, shorthand: tuple | None = None, into=dict,
          given: Callable = lambda k: {"name": k}) -> Callable:
    """A YAML mapping name -> object of `cls` (`what` formats the name for messages). `key`
    checks each name; `shorthand` (type, field): a bare value of that type is that one field."""
    def check(v, at: At):
        out = {}
        for k, item in _names(v, at).items():
            iat = at.to(v.line_of(k), what.format(k))
            key(k, iat)
            if shorthand and isinstance(item, shorthand[0]):
                item = LineDict({shorthand[1]: item})
                item.line, item.key_lines = iat.line, {shorthand[1]: iat.line}
            out[k] = parse_object(cls, item, iat, **given(k))
        return into(out.values()) if into is not dict else out
    return check


def mapping(value: Callable) -> Callable:
    """A YAML mapping of names to values that `value` checks: a dict."""
    return lambda v, at: {k: value(x, at.to(v.line_of(k), f"{at.what} {k}")) for k, x in _names(v, at).items()}


def _names(v, at: At) -> dict:
    if not isinstance(v, dict):
        raise at.error(f"{at.what} must be a mapping")
    for k in v:
        if not isinstance(k, str):
            raise MappingError(at.path, v.line_of(k), f"{at.what}: {k!r} is not a name (a string)")
    return v

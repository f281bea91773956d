"""Strict, safe YAML loading with line numbers.

Only YAML's safe subset is constructed (no tags that build Python objects). Duplicate keys are
an error, and every mapping remembers the line of each key so that schema errors can name it.
The file is bounded like every untrusted text (untrusted.py): its size, and the values and depth
it expands to through aliases (no billion laughs).
"""
from __future__ import annotations

import yaml

from ..errors import MalformedInputError, MappingError
from . import untrusted

MAX_BYTES = 1 << 20             # the built-in files are a few kB
MAX_VALUES = 20_000             # after aliases are expanded; the largest built-in file has a few hundred
MAX_DEPTH = untrusted.SMALL.depth

try:  # the C loader is faster; both are "safe"
    _Base = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Base = yaml.SafeLoader


class LineDict(dict):
    """A dict that knows the source line of each key (1-based) and of itself."""
    line: int = 0
    key_lines: dict

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):
    line: int = 0


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap"}


def _build(node, path, loader):
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        raise MappingError(path, node.start_mark.line + 1, f"unsupported YAML tag {node.tag!r}",
                           "mapping files hold plain mappings, lists, strings and numbers")
    if isinstance(node, yaml.MappingNode):
        out = LineDict()
        out.line, out.key_lines = node.start_mark.line + 1, {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                raise MappingError(path, knode.start_mark.line + 1, "YAML merge keys (<<) are not allowed")
            key = _build(knode, path, loader)
            if not isinstance(key, (str, int)):
                raise MappingError(path, knode.start_mark.line + 1, f"mapping keys must be strings, found {key!r}")
            if key in out:
                raise MappingError(path, knode.start_mark.line + 1,
                                   f"duplicate key {key!r} (first at line {out.key_lines[key]})")
            out[key] = _build(vnode, path, loader)
            out.key_lines[key] = knode.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = LineList(_build(v, path, loader) for v in node.value)
        out.line = node.start_mark.line + 1
        return out
    # scalars: let the safe constructor resolve ints, floats, bools, null, strings (one loader
    # serves the whole file: making one per scalar would cost more than the file)
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        raise MappingError(path, node.start_mark.line + 1, f"unsupported YAML value: {getattr(e, 'problem', e)}")


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else ()


def _check_expansion(root, path):
    """Aliases are allowed (a built-in layout shares a list with `&v5` / `*v5`), but what they
    expand to is bounded: at most MAX_VALUES values and MAX_DEPTH levels once every alias is
    written out, and no alias inside what it names. Counted on the node graph, each node once,
    so a billion-laughs file is refused in microseconds instead of expanded."""
    done: dict = {}             # id(node) -> (values, depth) of its expansion
    open_: set = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = [done[id(k)] for k in _children(node)]
            values, depth = 1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0)
            done[key] = (values, depth)
            open_.discard(key)
            line = node.start_mark.line + 1
            if values > MAX_VALUES:
                raise MappingError(path, line, f"this YAML expands to more than {MAX_VALUES:,} values (through "
                                               "aliases?)", "a mapping file is small; write shared parts out")
            if depth > MAX_DEPTH:
                raise MappingError(path, line, f"invalid YAML: nested deeper than {MAX_DEPTH} levels")
            continue
        if key in done:
            continue
        if key in open_:
            raise MappingError(path, node.start_mark.line + 1, "a YAML alias inside the value it names (recursive)")
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in done)


def load_yaml(path) -> LineDict:
    """A mapping file: at most MAX_BYTES of UTF-8, a regular file (a FIFO is never opened), its
    aliases' expansion bounded (MAX_VALUES values, MAX_DEPTH levels); MappingError with the
    file and line otherwise."""
    try:
        text = untrusted.read_file(path, MAX_BYTES).decode("utf-8")
    except MalformedInputError:
        raise MappingError(path, 0, f"larger than {MAX_BYTES:,} bytes: not a mapping file")
    except (OSError, UnicodeDecodeError) as e:
        raise MappingError(path, 0, f"cannot read mapping file: {e}")
    try:
        node = yaml.compose(text, Loader=_Base)
    except RecursionError:
        raise MappingError(path, 0, "invalid YAML: nested too deeply")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise MappingError(path, mark.line + 1 if mark else 0, f"invalid YAML: {e.problem}")
    except yaml.YAMLError as e:
        raise MappingError(path, 0, f"invalid YAML: {e}")
    if node is None or not isinstance(node, yaml.MappingNode):
        raise MappingError(path, 1, "a mapping file must be a YAML mapping (key: value lines)")
    _check_expansion(node, path)
    loader = _Base("")
    try:
        return _build(node, path, loader)
    except RecursionError:
        raise MappingError(path, 0, "invalid YAML: nested too deeply")
    finally:
        loader.dispose()

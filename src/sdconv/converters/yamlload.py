"""Strict, safe YAML loading with line numbers.

Only YAML's safe subset is constructed (no tags that build Python objects). Duplicate keys are
an error, and every mapping remembers the line of each key so that schema errors can name it.
"""
from __future__ import annotations

import yaml

from ..errors import MappingError

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


def _build(node, path):
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        raise MappingError(path, node.start_mark.line + 1, f"unsupported YAML tag {node.tag!r}",
                           "mapping files hold plain mappings, lists, strings and numbers")
    if isinstance(node, yaml.MappingNode):
        out = LineDict()
        out.line, out.key_lines = node.start_mark.line + 1, {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                raise MappingError(path, knode.start_mark.line + 1, "YAML merge keys (<<) are not allowed")
            key = _build(knode, path)
            if not isinstance(key, (str, int)):
                raise MappingError(path, knode.start_mark.line + 1, f"mapping keys must be strings, found {key!r}")
            if key in out:
                raise MappingError(path, knode.start_mark.line + 1,
                                   f"duplicate key {key!r} (first at line {out.key_lines[key]})")
            out[key] = _build(vnode, path)
            out.key_lines[key] = knode.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = LineList(_build(v, path) for v in node.value)
        out.line = node.start_mark.line + 1
        return out
    # scalars: let the safe constructor resolve ints, floats, bools, null, strings
    loader = _Base("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        raise MappingError(path, node.start_mark.line + 1, f"unsupported YAML value: {getattr(e, 'problem', e)}")
    finally:
        loader.dispose()


def load_yaml(path) -> LineDict:
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise MappingError(path, 0, f"cannot read mapping file: {e}")
    try:
        node = yaml.compose(text, Loader=_Base)
    except RecursionError:
        raise MappingError(path, 0, "invalid YAML: nested too deeply")
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 0
        raise MappingError(path, line, f"invalid YAML: {e.problem}")
    except yaml.YAMLError as e:
        raise MappingError(path, 0, f"invalid YAML: {e}")
    if node is None or not isinstance(node, yaml.MappingNode):
        raise MappingError(path, 1, "a mapping file must be a YAML mapping (key: value lines)")
    try:
        return _build(node, path)
    except RecursionError:
        raise MappingError(path, 0, "invalid YAML: nested too deeply")

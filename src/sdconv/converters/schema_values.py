"""Checks of the values particular to sdconv's mapping files: templates, shapes, file and folder
names, and the closed vocabularies (transforms, activations, config formats). Each is a
function (value, At) -> converted value that raises MappingError (see schema_rows.py)."""
from __future__ import annotations

import re
from pathlib import Path

from .configs import ACTIVATIONS, CLIP_FORMATS, SLOT_FORMATS
from .preprocessing import PROCESSOR_FORMATS, TOKENIZER_FORMATS
from .schema_rows import At, one_of, strings, text
from .transforms import TRANSFORMS

LAYER = "<layer>"
_PLACEHOLDER = re.compile(r"<[^>]*>|\{[^}]*\}")


def template(s: str, at: At, what: str) -> str:
    for m in _PLACEHOLDER.findall(s):
        if m != LAYER:
            raise at.error(f"bad template {s!r} in {what}: unknown placeholder {m}", "the only placeholder is <layer>")
    if s.count(LAYER) > 1:
        raise at.error(f"bad template {s!r} in {what}: <layer> appears twice")
    return s


def key_template(v, at: At) -> str:
    return template(text(v, at), at, "key")


def canonicals(v, at: At) -> tuple[str, ...]:
    names = [v] if isinstance(v, str) else strings(v, at)
    return tuple(template(c, at, "canonical name") for c in names)


def shape(v, at: At) -> tuple:
    if not isinstance(v, list) or not all(isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)
                                                                   and x >= 1) for x in v):
        raise at.error(f"{at.what}: a shape is a list of symbols or sizes of at least 1, found {v!r}")
    return tuple(v)


def sizes(v, at: At) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise at.error(f"{at.what}: a shape here is a list of sizes (whole numbers), found {v!r}")
    return tuple(v)


def plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\")


def file_in_folder(*suffixes: str):
    """A file that sdconv writes in an output folder and reads back: a plain name (with the
    suffix its format is read by)."""
    def check(v, at: At) -> str:
        if not plain_name(text(v, at)) or (suffixes and not v.endswith(suffixes)):
            raise at.error(f"{at.what} must be a file name" + (f" ending in {' or '.join(suffixes)}" if suffixes else "")
                           + f", found {v!r}", "a plain name: the file sits beside the weights, in the output folder")
        return v
    return check


def prefix(v, at: At) -> str:
    if "/" in text(v, at) and not plain_name(v.rsplit("/", 1)[0]):
        raise at.error(f"{at.what} {v!r}: only one plain folder name may come before '/'",
                       "sdconv writes and reads a folder's weights at its root or one folder down")
    return v


def file_name(v, at: At) -> str:
    """The `name` of a mapping file: a plain word, and the file's own name."""
    name = text(v, at)
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
        raise at.error(f"bad name {name!r}", "use lower-case letters, digits, _ and -")
    stem = Path(at.path).stem
    if stem != name:
        raise at.error(f"name {name!r} differs from the file name {stem!r}")
    return name


def equals(want, message: str, hint: str | None = None):
    def check(v, at: At):
        if v != want:
            raise at.error(message.format(v), hint)
    return check


transform = one_of(TRANSFORMS, "transform")
activation = one_of(ACTIVATIONS, "activation")


SLOT_WHAT, CLIP_WHAT = "an encoder slot", "a whole CLIP (vision: config)"
slot_format = one_of(SLOT_FORMATS, "config format", here=SLOT_WHAT, elsewhere=CLIP_FORMATS, there=CLIP_WHAT)
clip_format = one_of(CLIP_FORMATS, "config format", here=CLIP_WHAT, elsewhere=SLOT_FORMATS, there=SLOT_WHAT)
tokenizer_format = one_of(TOKENIZER_FORMATS, "tokenizer format")
processor_format = one_of(PROCESSOR_FORMATS, "image processor format")


def folder(v, at: At) -> str:
    """A folder of an output, from its root: '' (the root) or one plain name and '/'."""
    if text(v, at) and not (v.endswith("/") and plain_name(v[:-1])):
        raise at.error(f"{at.what} {v!r} must be '' (the output's root) or one plain folder name ending in '/'",
                       "e.g. tokenizer/")
    return v

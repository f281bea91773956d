"""Opening an input: a file by its suffix, a model folder (every weight file at the root and one
level down, as diffusers components are, keys of a sub-folder prefixed with `<sub>/`; its JSON
files, such as config.json, readable too), or a transformers shard index (*.index.json)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, UnsafeInputError
from . import untrusted
from .pickles import PickleSource
from .remote import is_remote
from .sources import PICKLE_EXT, SAFETENSORS_EXT, SafetensorsSource, Source

# Weight files a folder may hold, in order of preference (variants such as model.fp16.* last).
FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class ShardedSource(Source):
    """A transformers *.index.json: keys spread over several files, each a regular file in the
    index's own folder (a name with `..`, an absolute path, a symlink leading out of the folder,
    a FIFO or a device is refused, never opened), each holding the keys the index gives it."""
    container = "sharded"

    def __init__(self, index: Path):
        self.path = index
        try:
            doc = untrusted.read_json(index)
        except OSError as e:
            raise InputError(f"{index}: unreadable shard index ({e.strerror or e})")
        wm = doc.obj()["weight_map"]
        names = {k: v.text() for k, v in wm.items()}
        self._shards = {f: open_file(shard_path(index, f)) for f in sorted(set(names.values()))}
        self._where = {k: self._shards[f] for k, f in names.items()}
        held = {f: set(src.keys()) for f, src in self._shards.items()}
        for k, f in names.items():
            if k not in held[f]:
                raise InputError(f"{index}: names {k!r} in {f}, which does not hold it",
                                 "the index and its shards are from different downloads; fetch them again")

    def keys(self):
        return list(self._where)

    def info(self, key):
        return self._where[key].info(key)

    def load(self, key):
        return self._where[key].load(key)

    def raw(self, key):
        return self._where[key].raw(key)

    def parts(self):
        return list(self._shards.values())

    def prefetch(self, keys) -> None:
        by_shard: dict = {}
        for k in keys:
            by_shard.setdefault(id(self._where[k]), (self._where[k], []))[1].append(k)
        for shard, ks in by_shard.values():
            shard.prefetch(ks)

    def files(self):
        return [p for s in self._shards.values() for p in s.files()]


def shard_path(index: Path, name: str) -> Path:
    """The shard an index names, if it is a regular file inside the index's folder (or, for an
    index that is itself a symlink, as in the Hugging Face cache, inside the folder it resolves
    to). Checked before anything is opened."""
    p = untrusted.within(index.parent, name)
    if p is None or name.endswith(".index.json"):
        raise InputError(f"{index}: names the shard {name!r}, which is not a weights file in its folder",
                         "an index names weight files beside it: no '..', no absolute paths, no other index")
    real = p.resolve()
    if not any(real.is_relative_to(d) for d in {index.parent.resolve(), index.resolve().parent}):
        raise InputError(f"{index}: the shard {name!r} leads out of the index's folder (to {real})",
                         "a shard must be a file beside its index, not a symlink to elsewhere")
    return p


def _weights_in(d: Path) -> Path | None:
    """The weights file of a model folder, by name; only regular files count (a FIFO or device
    named model.safetensors is never opened: open_file refuses it)."""
    for name in FOLDER_WEIGHTS:
        if (d / name).exists() and not (d / name).is_dir():
            return d / name
    found = sorted(p for p in d.iterdir() if not p.is_dir() and p.suffix in SAFETENSORS_EXT + PICKLE_EXT)
    return found[0] if len(found) == 1 else None


class FolderSource(Source):
    is_folder = True
    container = "folder"

    def __init__(self, path: Path):
        self.path = path
        self._parts: dict[str, Source] = {}
        root = _weights_in(path)
        if root is not None:
            self._parts[""] = open_file(root)
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            w = _weights_in(sub)
            if w is not None:
                self._parts[sub.name + "/"] = open_file(w)
        if not self._parts:
            raise InputError(f"{path}: a folder with no weight files",
                             f"expected one of {', '.join(FOLDER_WEIGHTS[:3])} in it or in a sub-folder")
        self._where = {}
        for pre, src in self._parts.items():
            for k in src.keys():
                self._where[pre + k] = (src, k)

    @property
    def has_root_weights(self) -> bool:
        return "" in self._parts

    def keys(self):
        return list(self._where)

    def info(self, key):
        src, k = self._where[key]
        return src.info(k)

    def load(self, key):
        src, k = self._where[key]
        return src.load(k)

    def raw(self, key):
        src, k = self._where[key]
        return src.raw(k)

    def metadata(self, folder: str = ""):
        part = self._parts.get(folder)
        return part.metadata() if part is not None else {}

    def read_json(self, rel):
        p = self.path / rel
        if not p.exists():
            return None
        try:
            return untrusted.read_json(p)
        except OSError as e:
            raise InputError(f"{p}: unreadable ({e.strerror or e})")

    def files(self):
        return [p for s in self._parts.values() for p in s.files()]

    def parts(self):
        return list(self._parts.values())


# files that stand for remote ones (a Hub folder's local skeleton): path -> opener of their Source
STAND_INS: dict = {}


def open_file(path: Path) -> Source:
    """The Source of one file, by its suffix. Only a regular file is opened: a FIFO would block,
    a device could act."""
    stand_in = STAND_INS.get(str(path))
    if stand_in is not None:
        return stand_in()
    try:
        untrusted.check_regular(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})" if not isinstance(e, untrusted.NotRegular)
                         else str(e), "sdconv reads checkpoint files and model folders")
    try:
        if path.suffix in SAFETENSORS_EXT:
            return SafetensorsSource(path)
        if path.suffix in PICKLE_EXT or path.suffix.endswith(".json"):
            if path.name.endswith(".index.json"):
                return ShardedSource(path)
            return PickleSource(path)
    except (InputError, UnsafeInputError):
        raise
    except (Exception, RecursionError) as e:     # a damaged file can fail anywhere below (zipfile, torch)
        first = (str(e).splitlines() or [""])[0][:200]
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})",
                         "the file is damaged or is not a checkpoint")
    raise InputError(f"{path}: unknown file type {path.suffix!r}",
                     f"sdconv reads {', '.join(SAFETENSORS_EXT + PICKLE_EXT)} files and model folders")


def open_source(path) -> Source:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderSource(path)
    return open_file(path)


def is_input(source: Source, path) -> bool:
    """Does `path` name the input `source` was opened from: the same path, or the same files by
    another name (a symlink, a hard link, a folder and its weights file)? A file is compared
    without being opened; a folder or shard index is opened (headers only). A URL is the input
    if the input was opened from the same URL."""
    if is_remote(path) or is_remote(source.path):
        return str(path) == str(source.path)
    path = Path(path)
    if not path.exists():
        return False
    if path.resolve() == Path(source.path).resolve():
        return True
    theirs = open_source(path).files() if path.is_dir() or path.name.endswith(".index.json") else [path]
    mine = source.files()
    return len(theirs) == len(mine) and all(any(os.path.samefile(t, m) for m in mine) for t in theirs)

"""Inputs that change while they are read.

A mapped input that another process truncates would kill sdconv with SIGBUS the next time a
mapped page past the new end is touched: no message, and the temporary output left behind. Two
mechanisms close that:

- a read lease (Linux `F_SETLEASE`) on each input file sdconv reads through a map: a process
  that opens the file for writing or truncates it is held by the kernel while sdconv is told
  (SIGIO); sdconv then releases the lease and stops with an InputError (exit 3), so the change
  happens only after sdconv has stopped reading. Best effort: where a lease cannot be taken
  (another OS, a network file system, a file already open for writing, not the main thread),
  sdconv reads without one;
- `Snapshot`: the identity (inode, size, mtime) of every input file, taken when the conversion
  starts and compared before the output is put in place, which catches every other change
  (a file replaced by a rename, written in place) with exit 3.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from ..errors import InputError

_HINT = "do not change a checkpoint while it is converted; run again when the change is done"
_LEASED: dict[int, Path] = {}      # descriptor -> path, for the files under a read lease
_installed = False


def _on_break(signum, frame):
    import fcntl
    broken = []
    for fd, path in list(_LEASED.items()):
        try:
            if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                broken.append(path)
        except OSError:
            broken.append(path)
    if not broken:
        return
    for fd in list(_LEASED):     # let the other process go on; this run reads nothing more
        release(fd)
    raise InputError(f"{broken[0]}: the file is being changed (written or truncated) while it is converted; "
                     "nothing was written", _HINT)


def hold(fd: int, path: Path) -> bool:
    """Take a read lease on an open descriptor, if this platform and file allow it."""
    global _installed
    try:
        import fcntl
        if not hasattr(fcntl, "F_SETLEASE") or threading.current_thread() is not threading.main_thread():
            return False
        if not _installed:
            signal.signal(signal.SIGIO, _on_break)
            _installed = True
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except (OSError, ValueError, ImportError):
        return False
    _LEASED[fd] = Path(path)
    return True


def release(fd: int):
    """Give the lease back (before the descriptor is closed, or when the file is being changed)."""
    if _LEASED.pop(fd, None) is None:
        return
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def release_all():
    """Give back every lease: a run that has finished reading holds none (a lease left held would
    make the next process that writes the file wait, and interrupt this one)."""
    for fd in list(_LEASED):
        release(fd)


def _identity(path: Path):
    st = os.stat(path)
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


class Snapshot:
    """The identity of input files now, to check later that none of them changed."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths if Path(p).is_file()]
        self._ids = {p: _identity(p) for p in self.paths}

    def check(self):
        for p in self.paths:
            try:
                now = _identity(p)
            except OSError:
                now = None
            if now != self._ids[p]:
                what = "is gone" if now is None else "was replaced" if now[:2] != self._ids[p][:2] else "changed"
                raise InputError(f"{p} {what} while it was converted; nothing was written", _HINT)

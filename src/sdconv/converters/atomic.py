"""Atomic outputs: an output (file or folder) is built under a temporary name beside it and
renamed into place when complete; on any failure, or Ctrl-C, the temporary is removed and an
existing output is left untouched. Without --force nothing is ever replaced, even an output
another run made meanwhile."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import OutputError
from .untrusted import file_kind


def _ordinary_permissions(path: Path):
    """Temporary files are private (0600/0700); the output gets what a plain open() would."""
    mask = os.umask(0)
    os.umask(mask)
    paths = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def refuse_overlap(target: Path, protected, replaces: bool = True) -> None:
    """Refuse, with or without --force, to write `target` if it is, contains, or lies inside any
    protected path (the inputs and references of this run), through symlinks and hard links:
    replacing it would modify or delete an input. `replaces=False`: a folder written into, never
    replaced (a batch's -o), may contain inputs."""
    target = Path(target)
    t = _real(target)
    for p in protected:
        p = Path(p)
        r = _real(p)
        if t == r or (target.exists() and p.exists() and os.path.samefile(target, p)):
            raise OutputError(f"{target} is the input" + ("" if target == p else f" {p}"),
                              "choose another output path; sdconv never writes over its input")
        if r in t.parents:
            raise OutputError(f"{target} is inside the input folder {p}", "write the output somewhere else")
        if replaces and t in r.parents:
            raise OutputError(f"{target} contains the input {p}; writing it would replace the input",
                              "write the output somewhere else")


TMP_SUFFIX = ".sdconv-tmp"
OWNER = "owner"             # in each temporary folder: the pid and boot of the run that made it
STALE_AFTER = 60            # seconds: a temporary without an owner file older than this is stale


def _boot() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return os.uname().nodename


def _owner() -> str:
    return f"{os.getpid()} {_boot()}"


def _alive(owner: str) -> bool:
    try:
        pid, boot = owner.split()
        pid = int(pid)
    except ValueError:
        return False
    if boot != _boot():
        return False            # made before a reboot (a power loss)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: Path, keep: Path | None = None) -> list[Path]:
    """Remove what a killed run (SIGKILL, power loss) left while writing `final`: temporary
    folders beside it whose owning process is gone. A live run's temporary is left alone."""
    import re
    import time
    pattern = re.compile(re.escape(f".{final.name}.") + r"[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX))
    removed = []
    try:
        candidates = [p for p in final.parent.iterdir() if pattern.fullmatch(p.name) and p != keep]
    except OSError:
        return removed
    for p in candidates:
        try:
            owner = (p / OWNER).read_text() if (p / OWNER).is_file() else None
            stale = (not _alive(owner)) if owner is not None else time.time() - p.lstat().st_mtime > STALE_AFTER
        except OSError:
            continue
        if stale and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def refuse_special(path: Path) -> None:
    """A device, FIFO or socket is never replaced (nor opened for writing)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{path} is {file_kind(mode)}, not a regular file or folder",
                          "sdconv never replaces one; choose another output path")


class AtomicOutput:
    """Build an output (file or folder) under a temporary name beside it, then rename it into
    place; on any failure the temporary is removed and an existing output is left untouched.
    `companions`: files that go beside the output (a .pt file's JSON sidecar), built in the same
    temporary folder (`companion(path)`) and placed by the same rules, right after it.
    `protect`: the run's inputs and references, which the output may not be, contain or lie in."""

    def __init__(self, final: Path, folder: bool, force: bool, companions=(), protect=()):
        self.final, self.folder, self.force = Path(final), folder, force
        self.companions = [Path(c) for c in companions]
        for path in [self.final, *self.companions]:
            refuse_overlap(path, protect)
            refuse_special(path)
            if path.exists() and not force:
                raise OutputError(f"{path} already exists", "pass --force to replace it")
        parent = self.final.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: the output's folder does not exist", "create it first")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{parent}: cannot write there (not writable)", "choose a writable output folder")

    def __enter__(self) -> Path:
        try:
            d = tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=TMP_SUFFIX, dir=self.final.parent)
            (Path(d) / OWNER).write_text(_owner())
        except OSError as e:
            raise OutputError(f"{self.final.parent}: cannot write there ({e.strerror or e})",
                              "choose a writable output folder")
        self._tmpdir = Path(d)
        remove_stale_temporaries(self.final, keep=self._tmpdir)
        self.tmp = self._tmpdir / "out" if self.folder else self._tmpdir / self.final.name
        if self.folder:
            self.tmp.mkdir()
        return self.tmp

    def companion(self, final: Path) -> Path:
        """Where to write the companion `final` (one of `companions`) until it is placed."""
        if Path(final) not in self.companions:
            raise ValueError(f"internal error: {final} is not a companion of {self.final}")
        return self._tmpdir / f"companion.{Path(final).name}"

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._place(self.tmp, self.final)
                for c in self.companions:
                    tmp = self.companion(c)
                    if tmp.exists():
                        self._place(tmp, c)
        except OSError as e:        # placing failed: said like a failed write
            exc = e
        finally:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if isinstance(exc, OSError):
            # disk full, folder gone or made read-only, torch.save's failed write: one line, exit 6,
            # and the temporary is gone
            raise OutputError(f"{self.final}: writing failed ({exc.strerror or exc})",
                              "check the free space and permissions of the output folder") from exc
        return False

    def _place(self, tmp: Path, final: Path):
        _ordinary_permissions(tmp)
        if not self.force:
            place_new(tmp, final)
            return
        if final.is_dir() and not final.is_symlink():
            os.replace(final, self._tmpdir / f"old.{final.name}")   # removed with the temporary
        elif tmp.is_dir() and final.exists():
            final.unlink()
        os.replace(tmp, final)


def place_new(tmp: Path, final: Path):
    """Rename tmp to final only if final does not exist, atomically: it was checked up front,
    but another run may have made it since. A file goes in as a hard link (which fails if the
    name exists) and its temporary name is dropped; a folder by rename (which fails over a
    non-empty folder or a file). Without hard links (some network and FAT file systems), the
    check and the rename are separate steps."""
    clash = OutputError(f"{final} appeared while this conversion ran (another run writing it?); it was left as it is",
                        "pass --force to replace it")
    if tmp.is_dir():
        if final.exists() and not final.is_dir():
            raise clash
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise clash from None
            raise
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise clash from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        if final.exists():
            raise clash from None
        os.rename(tmp, final)
    else:
        tmp.unlink()

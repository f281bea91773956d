"""Checks many tests share: a refused command's one line, and a tiny disk to fill."""
import contextlib
import subprocess


def assert_one_line_error(code, text, want_code, *needles):
    """Exit `want_code`, exactly one line `sdconv: error: ...`, no traceback, each needle said."""
    assert code == want_code, text
    lines = [ln for ln in text.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("sdconv: error: "), text
    assert "Traceback" not in text
    for n in needles:
        assert n in text, (n, text)


@contextlib.contextmanager
def tiny_disk(folder):
    """A 64 KiB tmpfs mounted at `folder` where this user may mount (root here and in CI);
    yields whether it was mounted (if not, the caller makes writes fail another way)."""
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)])

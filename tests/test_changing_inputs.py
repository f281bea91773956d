"""Inputs that change while sdconv converts them (issue 13): truncated, grown, replaced. Each
gives exit 3 with one line and leaves nothing — never a signal death (SIGBUS from a mapped page
past a new end of file). The run is paused inside the conversion (SIGSTOP, or a hook that waits)
while another process changes the input."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers.fixtures import distinct_canonical, write_multi

# the conversion announces that it has started reading tensors, then waits for the test
HOOK = """
import sys, time
from sdconv.converters import execute
real = execute._finite
state = {"n": 0}
def finite(t):
    state["n"] += 1
    if state["n"] == 3:
        print("reading", flush=True)
        sys.stdin.readline()          # the test changes the file, then lets the run go on
    return real(t)
execute._finite = finite
NO_LEASE = NO_LEASE_VALUE
if NO_LEASE:
    from sdconv.converters import leases
    leases.hold = lambda fd, path: False
sys.argv = ["sdconv"] + sys.argv[1:]
from sdconv.cli import run
run()
"""


def _start(src, out, no_lease=False):
    code = HOOK.replace("NO_LEASE_VALUE", str(no_lease))
    p = subprocess.Popen([sys.executable, "-c", code, "convert", str(src), "-o", str(out), "--to", "hf",
                          "--dtype", "fp16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "reading"
    return p


def _go_on(p):
    p.stdin.write("\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=60)
    return p.returncode, err


def _clean_exit_3(code, err, tmp_path, *needles):
    assert code == 3, (code, err)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("sdconv: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert not [p for p in tmp_path.rglob("*") if "sdconv-tmp" in p.name]


@pytest.fixture
def src(tmp_path):
    return write_multi(tmp_path / "sd.safetensors", "ldm", {"clip_l": distinct_canonical(vocab=1000, layers=3)})


def test_truncated_while_paused_with_sigstop(src, tmp_path):
    """SIGSTOP the run while it reads, truncate the input from another process (the kernel holds
    the truncation while sdconv's read lease is given back), SIGCONT: exit 3, one line, nothing
    left; the truncation then completes."""
    out = tmp_path / "o"
    p = _start(src, out)
    p.send_signal(signal.SIGSTOP)
    done = {}
    t = threading.Thread(target=lambda: (os.truncate(src, 100), done.setdefault("t", time.time())))
    t.start()
    time.sleep(0.5)
    assert "t" not in done                        # held while sdconv holds its lease
    p.send_signal(signal.SIGCONT)
    code, err = _go_on(p)
    t.join(timeout=60)
    _clean_exit_3(code, err, tmp_path, "being changed")
    assert not out.exists() and os.path.getsize(src) == 100


def test_without_the_lease_the_same_truncation_is_a_signal_death(src, tmp_path):
    """Negative control: what the lease prevents. Without it, the truncated map kills the run."""
    p = _start(src, tmp_path / "o", no_lease=True)
    os.truncate(src, 100)
    code, err = _go_on(p)
    assert code == -signal.SIGBUS, (code, err)


def test_grown_while_converting(src, tmp_path):
    p = _start(src, tmp_path / "o")
    with open(src, "ab") as f:                    # opening it for writing breaks the lease
        f.write(b"\0" * 4096)
    code, err = _go_on(p)
    _clean_exit_3(code, err, tmp_path, "being changed")


def test_replaced_while_converting(src, tmp_path):
    """A new file renamed over the input: sdconv still reads the old one, consistently, but the
    output would not be what the path now holds: exit 3, nothing placed."""
    other = write_multi(tmp_path / "new.safetensors", "ldm", {"clip_l": distinct_canonical(vocab=1000, layers=3,
                                                                                             seed=5)})
    p = _start(src, tmp_path / "o")
    os.replace(other, src)
    code, err = _go_on(p)
    _clean_exit_3(code, err, tmp_path, "was replaced")
    assert not (tmp_path / "o").exists()


def test_truncated_torch_zip_while_paused(src, tmp_path):
    """The same for a torch zip checkpoint, which torch.load maps: exit 3, not SIGBUS."""
    import torch

    from tests.helpers.fixtures import read_all
    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": read_all(src)}, ckpt)
    p = _start(ckpt, tmp_path / "o")
    p.send_signal(signal.SIGSTOP)
    t = threading.Thread(target=lambda: os.truncate(ckpt, 100))
    t.start()
    time.sleep(0.5)
    p.send_signal(signal.SIGCONT)
    code, err = _go_on(p)
    t.join(timeout=60)
    _clean_exit_3(code, err, tmp_path)
    assert os.path.getsize(ckpt) == 100

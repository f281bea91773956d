"""Outputs never touch inputs (issue 13): whatever sdconv writes or replaces (an output file or
folder, a sidecar, --report, an --into result, a batch's outputs) is refused, with or without
--force, when it is, contains or lies inside an input or a reference — through symlinks and
hard links — and a device or FIFO is never replaced. Each case: exit 6, one line, no
traceback, the inputs unchanged, nothing left behind."""
import hashlib
import os
import shutil

import pytest
from click.testing import CliRunner

from sdconv.cli import main
from tests.helpers.checks import assert_one_line_error, tiny_disk
from tests.helpers.fixtures import distinct_canonical, write_layout, write_multi


def _sd1(path):
    return write_multi(path, "ldm", {"clip_l": distinct_canonical(vocab=1000)})


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder):
    return [str(p) for p in folder.rglob("*") if "sdconv-tmp" in p.name]


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _refused(code, text, *needles, exit_code=6):
    assert_one_line_error(code, text, exit_code, *needles)


@pytest.fixture
def models(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    _sd1(d / "sd.safetensors")
    _sd1(d / "other.safetensors")
    return d


def test_a_folder_output_that_holds_the_input_is_refused_even_with_force(models, tmp_path):
    """The worst case of the issue: `-o models --to hf --force` used to replace the folder that
    holds the input, deleting it and its neighbours."""
    before = _hashes(models)
    code, text = _run("convert", models / "sd.safetensors", "-o", models, "--to", "hf", "--force")
    _refused(code, text, "contains the input")
    assert _hashes(models) == before and not _leftovers(tmp_path)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_symlink_to_the_input_is_refused(models, tmp_path, force):
    link = tmp_path / "link.safetensors"
    link.symlink_to(models / "sd.safetensors")
    before = _hashes(models)
    code, text = _run("convert", models / "sd.safetensors", "-o", link, "--to", "openai", *force)
    _refused(code, text, "is the input")
    assert _hashes(models) == before and link.is_symlink() and not _leftovers(tmp_path)


def test_a_hard_link_of_the_input_is_refused_with_force(models, tmp_path):
    twin = tmp_path / "twin.safetensors"
    os.link(models / "sd.safetensors", twin)
    before = _hashes(models)
    code, text = _run("convert", models / "sd.safetensors", "-o", twin, "--to", "openai", "--force")
    _refused(code, text, "is the input")
    assert _hashes(models) == before and os.path.samefile(twin, models / "sd.safetensors")


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    hf = tmp_path / "hf"
    write_layout(distinct_canonical(vocab=1000), hf, "hf")
    before = _hashes(hf)
    code, text = _run("convert", hf, "-o", hf / "sub" / "x.safetensors", "--to", "openai", "--force")
    assert code == 6 and "inside the input folder" in text, text
    code, text = _run("convert", hf, "-o", hf / "model.safetensors", "--to", "openai", "--force")
    _refused(code, text)
    assert _hashes(hf) == before


def test_a_reference_is_protected_like_the_input(models, tmp_path):
    ref = tmp_path / "ref.safetensors"
    write_layout(distinct_canonical(vocab=1000), ref, "openai")
    before = hashlib.sha256(ref.read_bytes()).hexdigest()
    code, text = _run("convert", models / "sd.safetensors", "-o", ref, "--to", "openai", "--projection", ref,
                      "--force")
    _refused(code, text, "is the input")
    assert hashlib.sha256(ref.read_bytes()).hexdigest() == before


def test_the_into_checkpoint_is_protected(models, tmp_path):
    enc = tmp_path / "enc.safetensors"
    assert _run("convert", models / "sd.safetensors", "-o", enc, "--to", "openai")[0] == 0
    twin = tmp_path / "twin.safetensors"
    os.link(models / "other.safetensors", twin)
    before = _hashes(models)
    code, text = _run("convert", enc, "--to", "ldm", "--into", models / "other.safetensors", "-o", twin, "--force")
    _refused(code, text, "is the input")
    assert _hashes(models) == before


def test_a_fifo_is_never_replaced_or_opened(models, tmp_path):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    code, text = _run("convert", models / "sd.safetensors", "-o", fifo, "--to", "openai", "--force")
    _refused(code, text, "FIFO")
    assert fifo.exists() and not fifo.is_file()


def test_a_report_that_names_an_input_or_a_foreign_file_is_refused_before_converting(models, tmp_path):
    """`--report models/*.safetensors` after shell expansion points --report at a checkpoint:
    it used to be truncated. It is refused, with or without --force, before anything is
    converted; a file that is not an sdconv report needs --force."""
    out = tmp_path / "out"
    before = _hashes(models)
    code, text = _run("convert", models / "other.safetensors", models / "sd.safetensors", "-o", str(out) + "/",
                      "--to", "hf", "--report", models / "sd.safetensors", "--force")
    _refused(code, text, "is the input")
    assert _hashes(models) == before and not out.exists()
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    code, text = _run("convert", models / "sd.safetensors", models / "other.safetensors", "-o", str(out) + "/",
                      "--to", "hf", "--report", foreign)
    _refused(code, text, "not an sdconv report", "--force")
    assert foreign.read_text() == "my notes\n" and not out.exists()
    # an earlier report is replaced without --force; the new one is complete
    report = tmp_path / "r.jsonl"
    assert _run("convert", models / "sd.safetensors", models / "other.safetensors", "-o", str(out) + "/",
                "--to", "hf", "--report", report)[0] == 0
    assert _run("convert", models / "sd.safetensors", models / "other.safetensors", "-o", str(out) + "/",
                "--to", "hf", "--report", report)[0] == 0
    assert len(report.read_text().splitlines()) == 2 and not _leftovers(tmp_path)


def test_a_batch_output_that_is_a_file_is_one_line(models, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, text = _run("convert", models / "sd.safetensors", models / "other.safetensors", "-o", f, "--to", "hf")
    _refused(code, text, "is a file")
    assert f.read_text() == "x"


def test_a_batch_output_may_not_be_its_input(tmp_path):
    """A batch into the inputs' own folder, in the inputs' own format: each output would be its
    input. Refused before anything converts, with or without --force."""
    d = tmp_path / "m"
    d.mkdir()
    _sd1(d / "a.safetensors")
    _sd1(d / "b.safetensors")
    before = _hashes(d)
    code, text = _run("convert", d / "a.safetensors", d / "b.safetensors", "-o", str(d) + "/", "--to", "ldm",
                      "--force")
    _refused(code, text, "is the input")
    assert _hashes(d) == before and not _leftovers(tmp_path)


def test_a_cast_that_overflows_is_caught_and_names_the_tensor(tmp_path):
    """--dtype fp16 on a tensor with values beyond 65504 used to write Inf with exit 0: the
    NaN/Inf check ran before the cast. It runs on what is written."""
    canon = distinct_canonical(vocab=1000)
    canon["blk.1.ffn_up.weight"][0, 0] = 1e6
    src = write_layout(canon, tmp_path / "big.safetensors", "openai")
    code, text = _run("convert", src, "-o", tmp_path / "o.safetensors", "--to", "hf", "--dtype", "fp16")
    _refused(code, text, "do not fit in fp16", "mlp.c_fc.weight", exit_code=2)
    assert not (tmp_path / "o.safetensors").exists() and not _leftovers(tmp_path)
    # bf16 holds it; and without a cast nothing changes
    assert _run("convert", src, "-o", tmp_path / "b", "--to", "hf", "--dtype", "bf16")[0] == 0
    assert _run("convert", src, "-o", tmp_path / "k", "--to", "hf")[0] == 0


def test_a_full_disk_during_torch_save_is_exit_6(tmp_path, monkeypatch):
    """A .pt output on a full disk: torch's zip writer fails with a RuntimeError; it is exit 6,
    one line, and nothing is left (a real 64 KiB tmpfs where mounting is allowed)."""
    src = _sd1(tmp_path / "sd.safetensors")
    small = tmp_path / "small"
    with tiny_disk(small) as mounted:
        if not mounted:
            import torch

            def full(*a, **k):
                raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
            monkeypatch.setattr(torch, "save", full)
        code, text = _run("convert", src, "-o", small / "o.pt", "--to", "openai")
        _refused(code, text, "writing failed")
        assert os.listdir(small) == []


def test_a_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    """SIGKILL mid-conversion cannot clean up; the next run to the same output recognises the
    dead run's temporary (its owner file names a process that is gone) and removes it, while a
    live run's temporary is left alone."""
    import signal
    import subprocess
    import sys
    import time
    src = _sd1(tmp_path / "sd.safetensors")
    out = tmp_path / "o.safetensors"
    # a run that stops (SIGSTOP-like pause) inside the write, then is killed
    script = ("import sys, time\nfrom sdconv.converters import writers\nreal = writers.copy_from_input\n"
              "def slow(f, t):\n    print('writing', flush=True)\n    time.sleep(60)\n    return real(f, t)\n"
              "writers.copy_from_input = slow\nsys.argv = ['sdconv'] + sys.argv[1:]\n"
              "from sdconv.cli import run\nrun()\n")
    p = subprocess.Popen([sys.executable, "-c", script, "convert", str(src), "-o", str(out), "--to", "openai"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    stale = [q for q in tmp_path.iterdir() if q.name.endswith(".sdconv-tmp")]
    assert len(stale) == 1
    # a live run's temporary is not touched by another run to the same output
    from sdconv.converters.atomic import remove_stale_temporaries
    assert remove_stale_temporaries(out) == [] and stale[0].exists()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert stale[0].exists() and not out.exists()           # what SIGKILL leaves
    code, text = _run("convert", src, "-o", out, "--to", "openai")
    assert code == 0, text
    assert not stale[0].exists() and out.is_file() and not _leftovers(tmp_path)


def test_a_fifo_as_report_is_refused_without_being_opened(models, tmp_path):
    fifo = tmp_path / "report.jsonl"
    os.mkfifo(fifo)
    code, text = _run("convert", models / "sd.safetensors", models / "other.safetensors", "-o",
                      str(tmp_path / "out") + "/", "--to", "hf", "--report", fifo)
    _refused(code, text, "FIFO")
    assert not (tmp_path / "out").exists()

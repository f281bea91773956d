"""The command line: help, listing, dry runs, and bad input (one line, exit code, nothing left)."""
import hashlib
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from tests.helpers.fixtures import ALL_LAYOUTS, distinct_canonical, write_layout
from sdconv.cli import main
from tests.helpers.checks import assert_one_line_error


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1")
    p = d / "sd1.safetensors"
    code, out = run("sample", p)
    assert code == 0, out
    return p


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if "sdconv-tmp" in p.name]


def test_help_everywhere_has_examples():
    for cmd in ([], ["convert"], ["layouts"], ["sample"]):
        code, out = run(*cmd, "--help")
        assert code == 0 and "Example" in out, cmd
    assert "Exit codes" in run("--help")[1]


def test_layouts_one_line_each():
    code, out = run("layouts")
    lines = out.strip().splitlines()
    assert code == 0 and [ln.split()[0] for ln in lines] == ALL_LAYOUTS


def test_dry_run_prints_plan_and_writes_nothing(sd1, tmp_path):
    out = tmp_path / "x"
    code, text = run("convert", sd1, "-o", out, "--to", "openai", "--dry-run")
    assert code == 0, text
    for needle in ("layout:  ldm (detected)", "rejected hf", "width 128, layers 2", "heads = 2",
                   "act = quick_gelu", "transformer.resblocks.0.attn.in_proj_weight [inverse of split_qkv]",
                   "bytes: read", "no text_proj.weight; none written", "nothing written"):
        assert needle in text, needle
    assert not out.exists()


def test_convert_says_what_it_did(sd1, tmp_path):
    code, text = run("convert", sd1, "-o", tmp_path / "o.safetensors", "--to", "openai")
    assert code == 0 and "ldm (detected)" in text and "wrote" in text
    assert "no text_proj.weight" in text     # SD1 has no projection, and the user is told


def test_python_dash_m_works(sd1, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdconv", "convert", str(sd1), "-o", str(tmp_path / "h"), "--to", "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h" / "config.json").is_file() and (tmp_path / "h" / "model.safetensors").is_file()


def test_program_skips_teardown_but_keeps_output_and_exit_codes(sd1, tmp_path):
    """The program leaves with os._exit after a command (torch's teardown took ~0.4 s): what it
    printed, wrote and the exit code must be exactly what the command produced."""
    prog = [sys.executable, "-m", "sdconv"]
    r = subprocess.run(prog + ["inspect", str(sd1), "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == run("inspect", sd1, "--json")[1], r.stderr   # all of stdout
    out = tmp_path / "o.safetensors"
    r = subprocess.run(prog + ["convert", str(sd1), "-o", str(out), "--to", "openai"], capture_output=True, text=True)
    assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    code, _ = run("verify", out, sd1)
    assert code == 0                                           # the output is complete
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]
    r = subprocess.run(prog + ["convert", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "n"), "--to", "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 3 and r.stderr.startswith("sdconv: error: "), r.stderr
    r = subprocess.run(prog + ["convert", "--to", "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2 and "Usage" in r.stderr
    # a bug still leaves through Python, with its traceback
    crash = "import sdconv.cli.app as c\ndef boom():\n    raise ZeroDivisionError('bug')\nc.main = boom\nc.run()"
    r = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError: bug" in r.stderr


_assert_clean_error = assert_one_line_error


def test_unknown_layout_suggests(sd1, tmp_path):
    code, text = run("convert", sd1, "-o", tmp_path / "o", "--to", "opneai")
    _assert_clean_error(code, text, 2, "unknown layout 'opneai'", "did you mean 'openai'")
    code, text = run("convert", sd1, "-o", tmp_path / "o", "--to", "hf", "--from", "ldn")
    _assert_clean_error(code, text, 2, "did you mean 'ldm'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"", b"<!DOCTYPE html><html>404</html>" * 3,
                                     b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"])
def test_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    code, text = run("convert", bad, "-o", tmp_path / "o.safetensors", "--to", "openai")
    _assert_clean_error(code, text, 3, "not a safetensors file")
    assert not (tmp_path / "o.safetensors").exists() and not _leftovers(tmp_path)


def test_garbage_ckpt(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x00garbage" * 100)
    code, text = run("convert", bad, "-o", tmp_path / "o.safetensors", "--to", "openai")
    _assert_clean_error(code, text, 3, "not a readable torch checkpoint")


def test_checkpoint_without_text_encoder(tmp_path):
    p = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(p))
    code, text = run("convert", p, "-o", tmp_path / "o.safetensors", "--to", "openai")
    _assert_clean_error(code, text, 5, "no CLIP text encoder found", "--from")
    assert not (tmp_path / "o.safetensors").exists()


def test_from_does_not_match(sd1, tmp_path):
    code, text = run("convert", sd1, "-o", tmp_path / "o.safetensors", "--to", "hf", "--from", "openai")
    _assert_clean_error(code, text, 5, "--from openai", "it looks like ldm")
    assert not (tmp_path / "o.safetensors").exists()


def test_output_equal_to_input_is_refused(tmp_path):
    src = write_layout(distinct_canonical(), tmp_path / "clip.safetensors", "openai")
    before = _sha(src)
    code, text = run("convert", src, "-o", src, "--to", "open_clip", "--force")
    _assert_clean_error(code, text, 6, "is the input")
    assert _sha(src) == before


def test_existing_output_needs_force(sd1, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    code, text = run("convert", sd1, "-o", out, "--to", "openai")
    _assert_clean_error(code, text, 6, "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    code, text = run("convert", sd1, "-o", out, "--to", "openai", "--force")
    assert code == 0 and out.read_bytes() != b"keep me" and not _leftovers(tmp_path)


def test_existing_folder_output_replaced_with_force(sd1, tmp_path):
    out = tmp_path / "h"
    assert run("convert", sd1, "-o", out, "--to", "hf")[0] == 0
    (out / "stale.txt").write_text("old")
    assert run("convert", sd1, "-o", out, "--to", "hf")[0] == 6
    assert run("convert", sd1, "-o", out, "--to", "hf", "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "sdconv.json",
                                                   "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("to,folder", [("openai", False), ("hf", True)])
def test_output_made_meanwhile_by_another_run_is_not_replaced(sd1, tmp_path, monkeypatch, to, folder):
    """Two runs writing one output without --force: the output is checked up front, but
    another process may make it while this one converts. The output is put in place without
    replacing (a hard link for a file, a rename for a folder), so the later run refuses with
    exit 6 and leaves the other's output as it was; with --force it is replaced."""
    from sdconv.converters import engine
    out = tmp_path / "o"
    real = engine.write_layout

    def racing(*a, **k):                  # "another run" finishes first
        if folder:
            out.mkdir()
            (out / "model.safetensors").write_bytes(b"the other run's")
        else:
            out.write_bytes(b"the other run's")
        return real(*a, **k)
    monkeypatch.setattr(engine, "write_layout", racing)
    code, text = run("convert", sd1, "-o", out, "--to", to)
    _assert_clean_error(code, text, 6, "appeared while", "--force")
    assert (out / "model.safetensors" if folder else out).read_bytes() == b"the other run's"
    assert not _leftovers(tmp_path)
    if folder:
        shutil.rmtree(out)
    else:
        out.unlink()
    code, text = run("convert", sd1, "-o", out, "--to", to, "--force")
    assert code == 0, text
    assert (out / "model.safetensors" if folder else out).read_bytes() != b"the other run's"
    assert not _leftovers(tmp_path)


def test_output_race_without_hard_links(sd1, tmp_path, monkeypatch):
    """A file system without hard links (EPERM): the output is still not replaced."""
    import errno
    import os

    from sdconv.converters import engine

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "o.safetensors"
    assert run("convert", sd1, "-o", out, "--to", "openai")[0] == 0        # the fallback places it
    real = engine.write_layout
    other = tmp_path / "p.safetensors"
    monkeypatch.setattr(engine, "write_layout", lambda *a, **k: (other.write_bytes(b"x"), real(*a, **k))[1])
    code, text = run("convert", sd1, "-o", other, "--to", "openai")
    _assert_clean_error(code, text, 6, "appeared while")
    assert other.read_bytes() == b"x" and not _leftovers(tmp_path)


def test_input_never_modified(sd1, tmp_path):
    before = _sha(sd1)
    for to in ("openai", "hf", "ldm"):
        assert run("convert", sd1, "-o", tmp_path / to, "--to", to)[0] == 0
    assert _sha(sd1) == before


def test_bad_param(sd1, tmp_path):
    code, text = run("convert", sd1, "-o", tmp_path / "o", "--to", "hf", "--param", "act=relu")
    _assert_clean_error(code, text, 2, "unknown activation 'relu'")
    code, text = run("convert", sd1, "-o", tmp_path / "o", "--to", "hf", "--param", "heads=3")
    _assert_clean_error(code, text, 2, "does not divide width 128")
    code, text = run("convert", sd1, "-o", tmp_path / "o", "--to", "hf", "--param", "heads")
    assert code == 2 and "NAME=VALUE" in text
    assert not (tmp_path / "o").exists()


def test_param_reaches_config(sd1, tmp_path):
    import json
    code, text = run("convert", sd1, "-o", tmp_path / "h", "--to", "hf", "--param", "act=gelu", "--param", "heads=4")
    assert code == 0, text
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["hidden_act"] == "gelu" and cfg["num_attention_heads"] == 4
    assert cfg["architectures"] == ["CLIPTextModel"] and cfg["eos_token_id"] == 2 and "projection_dim" not in cfg


def test_hf_config_and_metadata(tmp_path):
    import json

    from safetensors import safe_open
    src = write_layout(distinct_canonical(), tmp_path / "clip.safetensors", "openai")
    assert run("convert", src, "-o", tmp_path / "h", "--to", "hf")[0] == 0
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPTextModelWithProjection"] and cfg["projection_dim"] == 128
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (128, 2, 512)
    with safe_open(str(tmp_path / "h" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "pt" and meta["sdconv.from"] in ("openai", "open_clip") and meta["sdconv.to"] == "hf"
    assert meta["sdconv.source"] == "clip.safetensors" and meta["sdconv.source_sha256"] == _sha(src)
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.ckpt"
    canon = write_layout(distinct_canonical(), tmp_path / "clip.safetensors", "ldm")
    from tests.helpers.fixtures import read_all
    torch.save({"state_dict": read_all(canon), "callback": _Payload(marker)}, evil)
    code, text = run("convert", evil, "-o", tmp_path / "o.safetensors", "--to", "openai")
    _assert_clean_error(code, text, 4, "refused to unpickle", "system")
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_ckpt_state_dict_nesting_and_extras(tmp_path):
    from tests.helpers.fixtures import read_all
    canon = write_layout(distinct_canonical(), tmp_path / "clip.safetensors", "ldm")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": read_all(canon), "global_step": 840000, "epoch": 6}, ckpt)
    code, text = run("convert", ckpt, "-o", tmp_path / "o.safetensors", "--to", "openai")
    assert code == 0 and "ldm (detected)" in text, text


def test_outputs_get_ordinary_permissions(sd1, tmp_path):
    import os
    import stat
    mask = os.umask(0o022)
    try:
        assert run("convert", sd1, "-o", tmp_path / "o.safetensors", "--to", "openai")[0] == 0
        assert run("convert", sd1, "-o", tmp_path / "h", "--to", "hf")[0] == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "o.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "h" / "model.safetensors").stat().st_mode) == 0o644


def test_progress_protocol(sd1, tmp_path):
    from sdconv import convert

    class Bar:
        total, n = None, 0

        def reset(self, total):
            self.total = total

        def update(self, n):
            self.n += n
    bar = Bar()
    r = convert(sd1, tmp_path / "o.safetensors", to="openai", progress=bar)
    assert bar.total == r.plan.bytes_to_write and 0 < bar.n <= bar.total


def test_own_safetensors_writer_matches_the_library(tmp_path):
    """Our writer (no numpy needed) gives files the safetensors library reads back exactly."""
    from safetensors.torch import load_file

    from sdconv.converters.writers import write_safetensors
    ts = {"b": torch.randn(3, 5).half(), "a": torch.arange(7), "c": torch.randn(2, 2).to(torch.bfloat16),
          "s": torch.tensor(4.5), "e": torch.zeros(0, 4)}
    write_safetensors(ts, tmp_path / "x.safetensors", {"format": "pt", "k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) and back[k].dtype == ts[k].dtype for k in ts)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_runs_without_numpy(tmp_path):
    """numpy is not a run-time dependency: a conversion must work with it blocked."""
    code = f"""
import sys
sys.modules['numpy'] = None          # import numpy -> ImportError
from sdconv.cli import main
sys.argv = ['sdconv', 'sample', '{tmp_path / 's.safetensors'}']
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
sys.argv = ['sdconv', 'convert', '{tmp_path / 's.safetensors'}', '-o', '{tmp_path / 'h'}', '--to', 'hf']
main()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "h" / "model.safetensors").is_file()


def test_source_hash_is_right_cached_and_refreshed(tmp_path, monkeypatch):
    """The provenance sha256 is computed in the background, cached by (path, size, mtime,
    inode), and recomputed when the file changes."""
    import os

    from safetensors import safe_open

    from sdconv.converters import hashing
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = write_layout(distinct_canonical(vocab=1000), tmp_path / "clip.safetensors", "openai")

    def meta_sha(out):
        with safe_open(str(out), "pt") as f:
            return f.metadata()["sdconv.source_sha256"]
    assert run("convert", src, "-o", tmp_path / "a.safetensors", "--to", "hf")[0] == 0
    assert meta_sha(tmp_path / "a.safetensors" / "model.safetensors") == _sha(src)       # computed meanwhile
    assert (tmp_path / "cache" / "sdconv" / "sha256.json").is_file()
    calls = []
    monkeypatch.setattr(hashing, "_compute", lambda paths: calls.append(paths) or "f" * 64)
    assert run("convert", src, "-o", tmp_path / "b.safetensors", "--to", "open_clip")[0] == 0
    assert calls == [] and meta_sha(tmp_path / "b.safetensors") == _sha(src)           # from the cache
    os.utime(src, ns=(1, 1))                                                             # "changed"
    assert run("convert", src, "-o", tmp_path / "c.safetensors", "--to", "open_clip")[0] == 0
    assert len(calls) == 1 and meta_sha(tmp_path / "c.safetensors") == "f" * 64


def test_help_and_layouts_do_not_import_torch():
    for args in (["--help"], ["convert", "--help"], ["layouts"], ["layouts", "show", "ldm"]):
        code = f"""
import sys
from sdconv.cli import main
try:
    main({args!r})
except SystemExit as e:
    assert not e.code, e.code
assert 'torch' not in sys.modules, 'torch was imported'
"""
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, (args, r.stderr[-1500:])


def test_no_garbage_collection_during_a_command(sd1, tmp_path):
    """A command runs with the cyclic collector off: with torch loaded, each full collection
    took ~0.07 s, a tenth of a small conversion. Collections are counted with gc.callbacks
    around the engine's convert (which imports torch) in a fresh process; the control, the
    same with the collector turned back on inside, shows that the count sees them."""
    code = """
import gc, sys
seen, span = [], []
gc.callbacks.append(lambda phase, info: seen.append(info["generation"]) if phase == "start" else None)
import sdconv.converters.engine as engine
convert = engine.convert
def counted(*a, **k):
    if CONTROL:
        gc.enable()
    span.append(len(seen))
    try:
        return convert(*a, **k)
    finally:
        span.append(len(seen))
engine.convert = counted
from sdconv.cli import main
try:
    main(sys.argv[2:])
except SystemExit as e:
    assert not e.code, e.code
print(span[1] - span[0], gc.isenabled())
""".replace("CONTROL", "sys.argv[1] == 'control'")
    for mode in ("plain", "control"):
        out = tmp_path / f"{mode}.safetensors"
        r = subprocess.run([sys.executable, "-c", code, mode, "convert", str(sd1), "-o", str(out), "--to", "openai", "-q"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-1500:]
        n, enabled = r.stdout.split()
        assert enabled == "True"                                       # on again after the command
        assert (int(n) == 0) if mode == "plain" else (int(n) > 0), (mode, n)


def test_in_process_commands_restore_the_collector(sd1, tmp_path):
    import gc
    assert gc.isenabled()
    assert run("convert", sd1, "-o", tmp_path / "o.safetensors", "--to", "openai")[0] == 0
    assert run("convert", tmp_path / "missing.safetensors", "-o", tmp_path / "m", "--to", "hf")[0] == 3
    assert gc.isenabled()
    gc.disable()
    try:
        run("layouts")
        assert not gc.isenabled()                       # a caller's choice is kept too
    finally:
        gc.enable()


def test_library_warnings_stay_off_the_terminal_unless_debug(sd1, tmp_path):
    """torch warns "Failed to initialize NumPy" where numpy is missing (as the README installs
    sdconv): not on the user's terminal; --debug shows it (the control that the warning happens)."""
    script = ("import sys\nsys.modules['numpy'] = None\nsys.argv = ['sdconv'] + sys.argv[1:]\n"
              "from sdconv.cli import run\nrun()\n")
    args = ["convert", str(sd1), "-o", str(tmp_path / "o.safetensors"), "--to", "openai", "-q", "--force"]
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = subprocess.run([sys.executable, "-c", script, "--debug", *args], capture_output=True, text=True)
    assert r.returncode == 0 and "Failed to initialize NumPy" in r.stderr, r.stderr

"""Hostile torch pickles and archives (issue 13, items 2-4): every import found by any opcode and
refused before anything is unpickled (exit 4, from the error's type); every tensor checked before
use (exit 3); deflated archives read decompressed, exactly. Each hostile case gives its documented
exit code and one line, leaves no output or temporary, leaves the input unchanged, runs nothing."""
import collections
import hashlib
import io
import os
import pickle
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sdconv.cli import main
from sdconv.converters.tensorcheck import checked_tensor
from sdconv.errors import InputError
from tests.helpers.fixtures import distinct_canonical, read_all, write_multi

MARKER = "PAYLOAD_RAN"
PID = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("hp")
    return read_all(write_multi(d / "sd1.safetensors", "ldm", {"clip_l": distinct_canonical(vocab=1000)}))


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


class MyTensor(torch.Tensor):
    """A tensor subclass: torch.save names this class, which sdconv will not import."""


class _View:
    """A tensor rebuilt from `storage` with a view of our choosing (what a hand-edited pickle holds)."""

    def __init__(self, t, offset, size, stride):
        self.t, self.offset, self.size, self.stride = t, offset, size, stride

    def __reduce__(self):
        ts = torch.storage.TypedStorage(wrap_storage=self.t.untyped_storage(), dtype=self.t.dtype, _internal=True)
        return (torch._utils._rebuild_tensor_v2,
                (ts, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def _rezip(src: Path, dst: Path, change=lambda name, data: data, compression=zipfile.ZIP_STORED) -> Path:
    """The archive rewritten record by record (`change` may return None to drop one)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", compression) as zo:
        for info in zi.infolist():
            data = change(info.filename, zi.read(info.filename))
            if data is not None:
                zo.writestr(info.filename, data)
    return dst


def _with_pickle(d: Path, sd1, data_pkl: bytes) -> Path:
    """A real torch zip of the SD1 state dict whose data.pkl is replaced."""
    torch.save({"state_dict": sd1}, d / "base.ckpt")
    out = _rezip(d / "base.ckpt", d / "x.ckpt", lambda n, b: data_pkl if n.endswith("/data.pkl") else b)
    (d / "base.ckpt").unlink()
    return out


def _touch(d: Path) -> str:
    return f"touch {d / MARKER}"


def _stack_global_memoized(cmd: str) -> bytes:
    """protocol 4: 'posix' and 'system' memoized, popped, fetched back by BINGET, STACK_GLOBAL."""
    def s(x):
        b = x.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return (b"\x80\x04" + s("posix") + b"\x94" + s("system") + b"\x94" + b"00" + b"h\x00h\x01\x93"
            + b"X" + len(cmd).to_bytes(4, "little") + cmd.encode() + b"\x85R.")


def _legacy_with(main_pickle: bytes) -> bytes:
    """A legacy (pre-zip) torch file whose object pickle is `main_pickle`."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    f = io.BytesIO(buf.getvalue())
    heads = []
    import pickletools
    for _ in range(3):      # magic number, protocol, system info
        start = f.tell()
        list(pickletools.genops(f))
        heads.append(buf.getvalue()[start:f.tell()])
    return b"".join(heads) + main_pickle + pickle.dumps([], protocol=2)


def _torchscript(d: Path, data_pkl: bytes, constants_pkl: bytes, records: dict | None = None) -> Path:
    with zipfile.ZipFile(d / "x.pt", "w", zipfile.ZIP_STORED) as z:
        z.writestr("m/data.pkl", data_pkl)
        z.writestr("m/constants.pkl", constants_pkl)
        z.writestr("m/code/__torch__/m.py", f"import os\nos.system('{_touch(d)}')\n")
        for name, data in (records or {}).items():
            z.writestr(f"m/data/{name}", data)
    return d / "x.pt"


def _torchscript_module_pickle(attrs: dict, storages: dict) -> bytes:
    """data.pkl of a TorchScript module `__torch__.M` holding `attrs`; `storages`: object -> key."""
    fake = types.ModuleType("__torch__")
    M = type("M", (), {"__module__": "__torch__"})
    fake.M = M
    obj = M()
    obj.__dict__.update(attrs)

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.storage.TypedStorage):
                return ("storage", torch.FloatStorage, storages[o.data_ptr()], "cpu", o.size())
            return None
    buf = io.BytesIO()
    saved = sys.modules.get("__torch__")
    sys.modules["__torch__"] = fake
    try:
        P(buf, protocol=2).dump(obj)
    finally:
        if saved is None:
            del sys.modules["__torch__"]
        else:
            sys.modules["__torch__"] = saved
    return buf.getvalue()


def _make(kind: str, d: Path, sd1) -> tuple[Path, int, str]:
    """(input, expected exit code, a phrase of the message)."""
    cmd = _touch(d)
    if kind == "inst_os_system":
        return _with_pickle(d, sd1, f"(S'{cmd}'\nios\nsystem\n.".encode()), 4, "imports os.system"
    if kind == "stack_global_memoized":
        return _with_pickle(d, sd1, _stack_global_memoized(cmd)), 4, "imports posix.system"
    if kind in ("reduce_eval", "reduce_exec"):
        import builtins
        fn = builtins.eval if kind == "reduce_eval" else builtins.exec
        torch.save({"state_dict": sd1, "x": _Payload(fn, f"open({str(d / MARKER)!r}, 'w').close()")}, d / "x.ckpt")
        return d / "x.ckpt", 4, f"{fn.__name__} in data.pkl"     # protocol 2 spells it __builtin__
    if kind == "obj_os_system":
        return _with_pickle(d, sd1, f"(cos\nsystem\nS'{cmd}'\no.".encode()), 4, "imports os.system"
    if kind == "call_of_built_object":      # only allowed imports, but the result of a call is called
        return _with_pickle(d, sd1, b"\x80\x02ccollections\nOrderedDict\n)R)R."), 4, "calls an object it built"
    if kind == "extension_registry":
        return _with_pickle(d, sd1, b"\x80\x02\x82\x01)R."), 4, "extension registry"
    if kind == "torch_function":            # torch itself is not blanket-allowed
        return _with_pickle(d, sd1, f"ctorch\nload\n(S'{d / 'x'}'\ntR.".encode()), 4, "imports torch.load"
    if kind == "meta_position_ids":
        torch.save({"state_dict": {**sd1, PID: torch.empty(1, 77, dtype=torch.int64, device="meta")}}, d / "x.ckpt")
        return d / "x.ckpt", 3, "meta-device tensor"
    if kind == "sparse_tensor":
        torch.save({"state_dict": {**sd1, "extra": torch.eye(3).to_sparse()}}, d / "x.ckpt")
        return d / "x.ckpt", 3, "sparse tensor"
    if kind == "tensor_subclass":
        torch.save({"state_dict": {**sd1, "extra": torch.ones(2).as_subclass(MyTensor)}}, d / "x.ckpt")
        return d / "x.ckpt", 4, "MyTensor"
    if kind == "tensor_with_attributes":
        t = torch.ones(2)
        t.hook = "anything"
        torch.save({"state_dict": {**sd1, "extra": t}}, d / "x.ckpt")
        return d / "x.ckpt", 3, "carries attributes (hook)"
    if kind == "short_record":
        torch.save({"state_dict": sd1}, d / "base.ckpt")
        _rezip(d / "base.ckpt", d / "x.ckpt", lambda n, b: b[:-16] if n.endswith("/data/3") else b)
        return d / "x.ckpt", 3, "holds"
    if kind == "missing_record":
        torch.save({"state_dict": sd1}, d / "base.ckpt")
        _rezip(d / "base.ckpt", d / "x.ckpt", lambda n, b: None if n.endswith("/data/3") else b)
        return d / "x.ckpt", 3, "which the archive lacks"
    if kind == "storage_smaller_than_view":
        torch.save({"state_dict": {**sd1, "extra": _View(torch.arange(6.0), 4, (2, 3), (3, 1))}}, d / "x.ckpt")
        return d / "x.ckpt", 3, "not a readable torch checkpoint"
    if kind == "stride0_huge":
        torch.save({"state_dict": {**sd1, "extra": _View(torch.arange(1.0), 0, (1 << 31,), (0,))}}, d / "x.ckpt")
        return d / "x.ckpt", 3, "overlapping elements"
    if kind == "legacy_inst":
        (d / "x.ckpt").write_bytes(_legacy_with(f"(S'{cmd}'\nios\nsystem\n.".encode()))
        return d / "x.ckpt", 4, "imports os.system"
    if kind == "legacy_reduce":
        import os as os_mod
        torch.save({"state_dict": sd1, "x": _Payload(os_mod.system, cmd)}, d / "x.ckpt",
                   _use_new_zipfile_serialization=False)
        return d / "x.ckpt", 4, "system"
    if kind == "torchscript_constants_global":
        return (_torchscript(d, _torchscript_module_pickle({}, {}), f"(S'{cmd}'\nios\nsystem\n.".encode()), 4,
                "imports os.system in constants.pkl")
    if kind == "torchscript_data_stack_global":
        return _torchscript(d, _stack_global_memoized(cmd), pickle.dumps(())), 4, "imports posix.system in data.pkl"
    if kind == "torchscript_stride0_huge":
        base = torch.zeros(1)
        view = _View(base, 0, (1 << 28,), (0,))
        pkl = _torchscript_module_pickle({"w": view}, {base.data_ptr(): "0"})
        return _torchscript(d, pkl, pickle.dumps(()), {"0": b"\0" * 4}), 3, "overlapping elements"
    raise KeyError(kind)


KINDS = ["inst_os_system", "stack_global_memoized", "reduce_eval", "reduce_exec", "obj_os_system",
         "call_of_built_object", "extension_registry", "torch_function", "meta_position_ids", "sparse_tensor",
         "tensor_subclass", "tensor_with_attributes", "short_record", "missing_record", "storage_smaller_than_view",
         "stride0_huge", "legacy_inst", "legacy_reduce", "torchscript_constants_global",
         "torchscript_data_stack_global", "torchscript_stride0_huge"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_hostile(tmp_path, monkeypatch, sd1, kind):
    d = tmp_path / "in"
    d.mkdir()
    monkeypatch.chdir(tmp_path)
    path, code, phrase = _make(kind, d, sd1)
    before = _sha(path)
    out = tmp_path / "out"
    out.mkdir()
    for args in (["convert", str(path), "-o", str(out / "o.safetensors"), "--to", "openai"], ["inspect", str(path)]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == code, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("sdconv: error: ") and "Traceback" not in r.output, r.output
        assert phrase in r.output, r.output
    assert list(out.iterdir()) == []                                   # no output, no temporary
    assert _sha(path) == before                                        # the input unchanged
    assert not (d / MARKER).exists() and not (tmp_path / MARKER).exists()  # nothing ran


def test_deflated_archive_reads_the_decompressed_bytes(tmp_path, sd1):
    """`zip -r` repacks with deflate: the mapped read would take compressed bytes; sdconv reads
    such an archive through torch's decompressing reader and converts exactly what it holds."""
    torch.save({"state_dict": sd1}, tmp_path / "plain.ckpt")
    packed = _rezip(tmp_path / "plain.ckpt", tmp_path / "deflated.ckpt", compression=zipfile.ZIP_DEFLATED)
    assert any(i.compress_type == zipfile.ZIP_DEFLATED and "/data/" in i.filename
               for i in zipfile.ZipFile(packed).infolist())
    for name in ("plain", "deflated"):
        r = CliRunner().invoke(main, ["convert", str(tmp_path / f"{name}.ckpt"), "-o",
                                      str(tmp_path / f"{name}.safetensors"), "--to", "openai"])
        assert r.exit_code == 0, r.output
    got, want = read_all(tmp_path / "deflated.safetensors"), read_all(tmp_path / "plain.safetensors")
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    truth = torch.load(packed, weights_only=True, mmap=False)["state_dict"]
    from sdconv.converters.folders import open_file
    src = open_file(packed)
    assert all(torch.equal(src.load(k), truth[k]) for k in truth)


def test_truncated_while_read_is_an_error_not_sigbus(tmp_path, sd1):
    """The file shrinks after its tensors were mapped: exit 3's error, never a SIGBUS."""
    torch.save({"state_dict": sd1}, tmp_path / "x.ckpt")
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from sdconv.converters.folders import open_file
        from sdconv.errors import InputError
        src = open_file(Path({str(tmp_path / 'x.ckpt')!r}))
        try:        # the read lease stops the truncation itself (leases.py); else load() sees the size
            os.truncate({str(tmp_path / 'x.ckpt')!r}, 4096)
            for k in src.keys():
                float(src.load(k).double().sum())
        except InputError as e:
            print("InputError", e.exit_code, e)
            sys.exit(0)
        sys.exit("read a truncated file without an error")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "InputError 3" in r.stdout and ("shrank" in r.stdout or "being changed" in r.stdout)


def test_checked_tensor_is_the_one_gate():
    """What every reader's tensors pass: plain, dense, CPU, a view inside its storage, no overlap."""
    ok = torch.arange(12.0).reshape(3, 4)
    assert checked_tensor("f", "k", ok) is ok
    assert type(checked_tensor("f", "k", torch.nn.Parameter(ok.clone()))) is torch.Tensor
    assert checked_tensor("f", "k", ok.t()).shape == (4, 3)                        # transposed views are fine
    assert checked_tensor("f", "k", torch.arange(77).expand(1, 77)).shape == (1, 77)  # size-1 stride 0 too
    bad = {"meta-device": torch.empty(3, device="meta"), "sparse": torch.eye(2).to_sparse(),
           "subclass": torch.ones(2).as_subclass(MyTensor), "overlapping": torch.zeros(1).expand(1 << 20),
           "overlapping ": torch.arange(6.0).as_strided((3, 3), (1, 1))}
    a = torch.ones(2)
    a.x = 1
    bad["attributes"] = a
    for why, t in bad.items():
        with pytest.raises(InputError):
            checked_tensor("f", why, t)

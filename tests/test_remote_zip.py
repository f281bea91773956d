"""Torch zip checkpoints (.ckpt/.pt/.pth/.bin saved by torch.save) read from URLs by byte ranges,
against tests/helpers/rangeserver.py: the end of the file and the zip directory, data.pkl, then
only the storage records of the encoder's tensors. Outputs hold exactly the tensors of the same
local file's; hostile pickles are refused as locally, before any storage is fetched; legacy
pickles and TorchScript archives need --download."""
import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from sdconv import convert, inspect
from sdconv.cli import main
from sdconv.converters import metakeys as K
from sdconv.converters.remote import PROBE_BYTES
from sdconv.converters.remote_zip import TAIL_BYTES
from tests.helpers.fixtures import distinct_canonical, read_all, write_layout, write_multi
from tests.helpers.rangeserver import RangeServer, use_hub
from tests.test_hostile_pickles import MARKER, _make, _rezip

ROOT = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model.input_blocks.0.0.weight"
ENCODER = "cond_stage_model."
SLACK = PROBE_BYTES + TAIL_BYTES        # the first request, and the end of the file: read whole


pytestmark = pytest.mark.usefixtures("quick_retries")     # tests/conftest.py


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _swap(name: str, data: bytes, sizes: dict) -> bytes:
    """A record of a little-endian archive as a big-endian archive holds it."""
    if name.endswith("/byteorder"):
        return b"big"
    e = sizes.get(name.rsplit("/", 1)[1]) if "/data/" in name else None
    return b"".join(data[i:i + e][::-1] for i in range(0, len(data), e)) if e else data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """sd1.ckpt: an SD1.x state dict with 20 MiB of UNet stand-ins after its encoder (torch.save,
    {"state_dict": ...}); its Lightning, legacy, deflated, big-endian and hostile variants."""
    d = tmp_path_factory.mktemp("zips")
    t = load_file(str(write_layout(distinct_canonical(vocab=1000), d / "base.safetensors", "ldm")))
    g = torch.Generator().manual_seed(3)
    t[UNET] = torch.randn(2048, 2048, generator=g)
    t["model.diffusion_model.out.2.weight"] = torch.randn(1024, 1024, generator=g)
    torch.save({"state_dict": t}, d / "sd1.ckpt")
    torch.save({"state_dict": t, "global_step": 3}, d / "legacy.ckpt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": t, "x": _Payload(d / MARKER)}, d / "evil.ckpt")
    _rezip(d / "sd1.ckpt", d / "deflated.ckpt", compression=zipfile.ZIP_DEFLATED)
    sizes = {k: v for k, v in _storage_elements(d / "sd1.ckpt").items()}
    _rezip(d / "sd1.ckpt", d / "big.ckpt", lambda n, b: _swap(n, b, sizes))
    torch.save(t, d / "plain.pt")
    code = ("import sys, torch\nfrom tests.helpers.lightning_ckpt import save_lightning_ckpt\n"
            "save_lightning_ckpt(torch.load(sys.argv[1]), sys.argv[2])\n")
    r = subprocess.run([sys.executable, "-c", code, str(d / "plain.pt"), str(d / "lightning.ckpt")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (d / "plain.pt").unlink()
    return d


@pytest.fixture
def srv(files):
    with RangeServer(files) as s:
        yield s


class _Storages(pickle.Unpickler):
    """The test's own reading of its own (trusted) files: each tensor's storage key and element size."""

    def persistent_load(self, pid):
        return pid[2], pid[1]

    def find_class(self, module, name):
        if name == "_rebuild_tensor_v2":
            return lambda storage, *args: storage
        if module == "torch" and name.endswith("Storage"):
            return torch.empty(0, dtype=getattr(torch, name).dtype).element_size()
        if module in ("collections", "_codecs"):
            return super().find_class(module, name)
        return type(name, (), {"__init__": lambda self, *a, **k: None, "__setstate__": lambda self, s: None,
                               "__setitem__": lambda self, k, v: None})      # Lightning, numpy: not needed here


def _state(path) -> dict:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return _Storages(z.open(name)).load()["state_dict"]


def _storage_elements(path) -> dict:
    return {key: size for key, size in _state(path).values()}


def _spans(path) -> dict:
    """{record name: (local header offset, next record's local header offset)} and the directory's span."""
    with zipfile.ZipFile(path) as z:
        infos = sorted(z.infolist(), key=lambda i: i.header_offset)
        ends = [i.header_offset for i in infos[1:]] + [z.start_dir]
        out = {i.filename: (i.header_offset, e) for i, e in zip(infos, ends)}
        out["directory"] = (z.start_dir, os.path.getsize(path))
        return out


def _needed(path, prefix=ENCODER) -> int:
    """The bytes a reader by ranges must fetch: directory, data.pkl, and the records of `prefix`'s tensors."""
    spans = _spans(path)
    root = next(iter(spans)).split("/", 1)[0]
    keys = {f"{root}/data/{k}" for name, (k, _) in _state(path).items() if name.startswith(prefix)}
    return sum(e - s for name, (s, e) in spans.items() if name in keys | {"directory", f"{root}/data.pkl"})


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _tensors(path):
    """{file:key: (dtype, bytes)} of an output (a file, or a folder's safetensors files)."""
    path, out = Path(path), {}
    for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[f"{f.relative_to(path) if path.is_dir() else ''}:{k}"] = (t.dtype, tuple(t.shape), t.numpy().tobytes())
    return out


@pytest.mark.parametrize("to", ["openai", "hf"])
def test_a_zip_ckpt_by_url_gives_the_local_tensors_and_only_its_encoders_records_travel(files, srv, tmp_path, to):
    suffix = ".safetensors" if to == "openai" else ""
    local, remote = tmp_path / f"local{suffix}", tmp_path / f"remote{suffix}"
    convert(files / "sd1.ckpt", local, to=to)
    r = convert(srv.url_for("sd1.ckpt"), remote, to=to)
    assert _tensors(local) == _tensors(remote) and _tensors(remote)
    sent, need, size = srv.stats.bytes_for("/sd1.ckpt"), _needed(files / "sd1.ckpt"), (files / "sd1.ckpt").stat().st_size
    assert sent <= 1.05 * need + SLACK, (sent, need)
    assert sent < size / 5, (sent, size)
    assert srv.stats.count("/sd1.ckpt") <= 6, srv.stats.calls     # probe, end, 3 small tensors, the encoder at once
    meta = safe_open(str(r.files[0] if suffix else next(remote.rglob("*.safetensors"))), "pt").metadata()
    assert meta[K.SOURCE_URL] == srv.url_for("sd1.ckpt") and meta[K.SOURCE_ETAG]
    assert meta[K.SOURCE_SHA256_OF].startswith("the bytes read, not the whole file: 0-")
    assert r.plan.source.kind() == "torch pickle"


def test_a_lightning_ckpt_by_url(files, srv, tmp_path):
    convert(files / "lightning.ckpt", tmp_path / "local.safetensors", to="openai")
    convert(srv.url_for("lightning.ckpt"), tmp_path / "remote.safetensors", to="openai")
    assert _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / "remote.safetensors")
    assert srv.stats.bytes_for("/lightning.ckpt") <= 1.05 * _needed(files / "lightning.ckpt") + SLACK


@pytest.mark.parametrize("name", ["deflated.ckpt", "big.ckpt"])
def test_deflated_and_big_endian_archives_by_url_read_as_torch_reads_them(files, srv, tmp_path, name):
    convert(files / name, tmp_path / "local.safetensors", to="openai")
    convert(srv.url_for(name), tmp_path / "remote.safetensors", to="openai")
    convert(files / "sd1.ckpt", tmp_path / "plain.safetensors", to="openai")
    got = _tensors(tmp_path / "remote.safetensors")
    assert got == _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / "plain.safetensors")
    assert srv.stats.bytes_for(f"/{name}") < (files / name).stat().st_size / 3


def test_a_hostile_pickle_by_url_is_refused_before_any_storage_is_fetched(files, srv, tmp_path):
    for args in (["convert", srv.url_for("evil.ckpt"), "-o", tmp_path / "o.safetensors", "--to", "openai"],
                 ["inspect", srv.url_for("evil.ckpt")]):
        srv.reset_stats()
        code, out = _cli(*args)
        assert code == 4 and "refused to unpickle" in out and "system" in out, out
        pkl = next(s for n, s in _spans(files / "evil.ckpt").items() if n.endswith("/data.pkl"))
        assert pkl[1] <= PROBE_BYTES                            # the pickle came with the first request
        assert [r.range for r in srv.stats.select("/evil.ckpt")] == [
            f"bytes=0-{PROBE_BYTES - 1}", f"bytes={(files / 'evil.ckpt').stat().st_size - TAIL_BYTES}-"
                                          f"{(files / 'evil.ckpt').stat().st_size - 1}"], srv.stats.calls
    assert list(tmp_path.iterdir()) == [] and not (files / MARKER).exists()


ZIP_KINDS = {"inst_os_system": None, "stack_global_memoized": None, "reduce_eval": None, "reduce_exec": None,
             "obj_os_system": None,
             "call_of_built_object": None, "extension_registry": None, "torch_function": None,
             "meta_position_ids": None, "sparse_tensor": None, "tensor_subclass": None,
             "tensor_with_attributes": None, "short_record": None, "missing_record": None,
             "storage_smaller_than_view": "has a view ending at byte", "stride0_huge": None}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("hz")
    return read_all(write_multi(d / "sd1.safetensors", "ldm", {"clip_l": distinct_canonical(vocab=1000)}))


@pytest.mark.parametrize("kind", list(ZIP_KINDS))
def test_hostile_archives_by_url_get_the_local_exit_code(tmp_path, monkeypatch, sd1, kind):
    """tests/test_hostile_pickles.py's hostile torch zips, served: each refused with the exit code it
    gets as a local file, one line, nothing written, nothing run."""
    d = tmp_path / "in"
    d.mkdir()
    monkeypatch.chdir(tmp_path)
    path, code, phrase = _make(kind, d, sd1)
    assert path == d / "x.ckpt"
    (tmp_path / "out").mkdir()
    with RangeServer(d) as s:
        for args in (["convert", s.url_for("x.ckpt"), "-o", tmp_path / "out" / "o.safetensors", "--to", "openai"],
                     ["inspect", s.url_for("x.ckpt")]):
            got, out = _cli(*args)
            lines = [ln for ln in out.splitlines() if ln.strip()]
            assert got == code and len(lines) == 1 and (ZIP_KINDS[kind] or phrase) in out, out
    assert list((tmp_path / "out").iterdir()) == []
    assert not (d / MARKER).exists() and not (tmp_path / MARKER).exists()


def test_a_legacy_pickle_by_url_needs_download(files, srv, tmp_path):
    code, out = _cli("convert", srv.url_for("legacy.ckpt"), "-o", tmp_path / "o.safetensors", "--to", "openai")
    assert code == 2 and "legacy (pre-zip) torch pickle" in out and "--download" in out, out
    assert srv.stats.bytes_for("/legacy.ckpt") <= PROBE_BYTES
    code, out = _cli("convert", srv.url_for("legacy.ckpt"), "-o", tmp_path / "o.safetensors", "--to", "openai",
                     "--download")
    assert code == 0, out
    convert(files / "legacy.ckpt", tmp_path / "local.safetensors", to="openai")
    assert _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / "o.safetensors")


def test_a_torchscript_archive_by_url_needs_download(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "m.pt")
    with RangeServer(tmp_path) as s:
        code, out = _cli("inspect", s.url_for("m.pt"))
    assert code == 2 and "TorchScript archive" in out and "--download" in out, out


def test_not_a_checkpoint_by_url_is_exit_3(tmp_path):
    (tmp_path / "page.ckpt").write_text("<html>not found</html>")
    with RangeServer(tmp_path) as s:
        code, out = _cli("inspect", s.url_for("page.ckpt"))
    assert code == 3 and "not a torch checkpoint" in out, out


def test_a_zip_replaced_during_the_run_is_exit_3_with_nothing_left(files, srv, tmp_path):
    content = (files / "sd1.ckpt").read_bytes()
    srv.faults.replace("sd1.ckpt", content[:-1024] + b"\0" * 1024, after=2)      # after the probe and the end
    try:
        code, out = _cli("convert", srv.url_for("sd1.ckpt"), "-o", tmp_path / "o.safetensors", "--to", "openai")
    finally:
        (files / "sd1.ckpt").write_bytes(content)
    assert code == 3 and "changed on the server during the run" in out, out
    assert list(tmp_path.iterdir()) == []


def test_inspect_of_a_zip_by_url_reads_no_storage_but_small_scalars(files, srv):
    report = inspect(srv.url_for("sd1.ckpt"))
    assert [e["encoder"] for e in report["encoders"]] == ["clip_l"]
    size = (files / "sd1.ckpt").stat().st_size
    small = {n: s for n, s in _spans(files / "sd1.ckpt").items() if s[1] - s[0] <= 4096}
    for r in srv.stats.select("/sd1.ckpt"):
        a, b = (int(x) for x in r.range.split("=")[1].split("-"))
        if (a, b + 1) in ((0, PROBE_BYTES), (size - TAIL_BYTES, size)):
            continue
        assert any(s <= a and b < e for s, e in small.values()), (r.range, srv.stats.calls)   # one small record
    assert srv.stats.bytes_for("/sd1.ckpt") <= SLACK + 3 * 4096


def test_hf_ckpt_with_the_hubs_sha256(files, srv, monkeypatch, tmp_path_factory, tmp_path):
    import hashlib
    repo = tmp_path_factory.mktemp("ckrepo")
    (repo / "sd1.ckpt").write_bytes((files / "sd1.ckpt").read_bytes())
    srv.add_repo("org/ck", repo)
    use_hub(monkeypatch, srv)
    convert(files / "sd1.ckpt", tmp_path / "local.safetensors", to="openai")
    convert("hf://org/ck/sd1.ckpt", tmp_path / "hub.safetensors", to="openai")
    assert _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / "hub.safetensors")
    meta = safe_open(str(tmp_path / "hub.safetensors"), "pt").metadata()
    assert meta[K.SOURCE_SHA256] == hashlib.sha256((files / "sd1.ckpt").read_bytes()).hexdigest()
    assert srv.stats.total_bytes <= 1.05 * _needed(files / "sd1.ckpt") + SLACK + (64 << 10)    # + the Hub's JSON


_STORAGE = object()


class _Rebuilt:
    """A tensor whose pickle changes it after it is made (REDUCE, then BUILD with a new shape)."""

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_STORAGE, 0, (1,), (1,), False, collections.OrderedDict()),
                {"shape": (1 << 40,)})


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 1) if obj is _STORAGE else None


def test_a_pickle_that_changes_a_tensor_after_making_it_is_refused(tmp_path):
    buf = io.BytesIO()
    _StoragePickler(buf, protocol=2).dump({"w": _Rebuilt()})
    with zipfile.ZipFile(tmp_path / "x.ckpt", "w") as z:
        z.writestr("x/data.pkl", buf.getvalue())
        z.writestr("x/byteorder", "little")
        z.writestr("x/data/0", b"\0\0\x80\x3f")
    with RangeServer(tmp_path) as s:
        code, out = _cli("inspect", s.url_for("x.ckpt"))
    assert code == 3 and "changes a tensor or storage after making it" in out, out


def test_damaged_directories_and_pickles_by_url_give_the_tensors_or_one_line(files, tmp_path):
    """Bytes of the zip directory, data.pkl and the records changed at random: a conversion by
    URL exits 0 with exactly the tensors the local reader gives (or, where the local reader is
    stricter about directory fields, those of the undamaged file), or 3 or 4 with one line."""
    import random
    base = (files / "sd1.ckpt").read_bytes()
    with zipfile.ZipFile(files / "sd1.ckpt") as z:
        pkl = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
        regions = [(0, pkl.header_offset + 128 + pkl.compress_size), (z.start_dir, len(base)), (0, 2 << 20)]
    convert(files / "sd1.ckpt", tmp_path / "ref.safetensors", to="openai")
    d = tmp_path / "served"
    d.mkdir()
    rng = random.Random(7)
    with RangeServer(d) as s:
        for i in range(24):
            b = bytearray(base)
            lo, hi = regions[i % 3]
            for _ in range(rng.choice([1, 2, 4])):
                b[rng.randrange(lo, hi)] = rng.randrange(256)
            (d / "m.ckpt").write_bytes(bytes(b))
            code, out = _cli("convert", s.url_for("m.ckpt"), "-o", tmp_path / "o.safetensors", "--to", "openai",
                             "--force")
            local, _ = _cli("convert", d / "m.ckpt", "-o", tmp_path / "l.safetensors", "--to", "openai", "--force")
            if code:
                lines = [ln for ln in out.splitlines() if ln.strip()]
                assert code in (3, 4) and len(lines) == 1 and lines[0].startswith("sdconv: error: "), (i, out)
            else:
                want = tmp_path / ("l.safetensors" if local == 0 else "ref.safetensors")
                assert _tensors(tmp_path / "o.safetensors") == _tensors(want), i


def test_every_storage_class_has_a_dtype_of_its_element_size():
    from sdconv.converters import dtypes
    from sdconv.converters.lazy_pickle import STORAGE_CODES
    from sdconv.converters.pickle_scan import STORAGE_SIZES
    assert set(STORAGE_CODES) == set(STORAGE_SIZES)
    for name, size in STORAGE_SIZES.items():
        assert dtypes.size(STORAGE_CODES[name]) == size, name
        if name != "UntypedStorage":
            assert dtypes.torch_dtype(STORAGE_CODES[name]) == getattr(torch, name).dtype, name

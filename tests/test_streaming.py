"""How tensors move: safetensors inputs are read through a read-only memory map whose pages are
dropped as the conversion goes, and tensors written unchanged are copied file to file by the
kernel (copy_file_range), with plain writes as the fallback. Each path gives the same bytes."""
import errno
import os

import pytest
import torch
from click.testing import CliRunner

from tests.helpers.fixtures import distinct_canonical, read_all, write_layout
from sdconv.cli import main
from sdconv.converters import sources, writers
from tests.helpers.checks import tiny_disk
from sdconv.converters.pickles import PickleSource
from sdconv.converters.sources import SafetensorsSource
from sdconv.converters.writers import write_safetensors
from sdconv.converters.engine import convert


@pytest.fixture()
def sd1(tmp_path):
    return write_layout(distinct_canonical(vocab=1000, layers=3), tmp_path / "sd1.safetensors", "ldm")


def _count_copies(monkeypatch):
    """Wrap os.copy_file_range; returns the list of byte counts it copied."""
    copied, real = [], os.copy_file_range

    def counting(*a, **k):
        n = real(*a, **k)
        copied.append(n)
        return n
    monkeypatch.setattr(os, "copy_file_range", counting)
    return copied


def test_unchanged_tensors_are_copied_file_to_file(sd1, tmp_path, monkeypatch):
    """ldm -> hf only renames: every tensor from the input goes through copy_file_range."""
    copied = _count_copies(monkeypatch)
    out = tmp_path / "hf"
    convert(sd1, out, to="hf")
    src = SafetensorsSource(sd1)
    from_input = sum(src.info(k).nbytes for k in src.keys() if not k.endswith("position_ids"))
    assert sum(copied) >= from_input > 0
    assert read_all(_weights(out)).keys() <= {k.replace("cond_stage_model.transformer.", "") for k in src.keys()}


def test_fused_qkv_is_written_as_its_parts_copied_file_to_file(sd1, tmp_path, monkeypatch):
    """ldm -> openai fuses q|k|v: the three input tensors are written one after another (the
    bytes of torch.cat along rows), each copied by the kernel, never joined in memory."""
    from safetensors.torch import load_file
    copied = _count_copies(monkeypatch)
    joins = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: joins.append(1) or real_cat(*a, **k))
    out = tmp_path / "o.safetensors"
    convert(sd1, out, to="openai")
    src = SafetensorsSource(sd1)
    from_input = sum(src.info(k).nbytes for k in src.keys() if not k.endswith("position_ids"))
    assert sum(copied) >= from_input and joins == []
    monkeypatch.setattr(torch, "cat", real_cat)
    got, ref = load_file(str(out)), load_file(str(sd1))
    p = "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn."
    for kind in ("weight", "bias"):
        want = torch.cat([ref[f"{p}{x}_proj.{kind}"] for x in "qkv"])
        assert torch.equal(got[f"transformer.resblocks.1.attn.in_proj_{kind}"], want)


@pytest.mark.parametrize("to", ["hf", "openai", "open_clip", "sgm"])
def test_same_bytes_with_and_without_copy_file_range(sd1, tmp_path, monkeypatch, to):
    """The kernel copy and the plain write give byte-identical outputs."""
    a = tmp_path / "a.safetensors"
    convert(sd1, a, to=to)
    monkeypatch.setitem(writers.COPY_FILE_RANGE, "works", False)
    b = tmp_path / "b.safetensors"
    convert(sd1, b, to=to)
    assert _payload(a) == _payload(b)


def _weights(p):
    return p / "model.safetensors" if p.is_dir() else p


def _payload(p):
    """The weights file less its __metadata__ (it names the output file)."""
    import json
    import struct
    raw = _weights(p).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n:]


def test_falls_back_to_plain_writes_where_the_kernel_cannot_copy(sd1, tmp_path, monkeypatch):
    """EXDEV (two file systems, old kernels) and friends: the tensor is written from memory instead,
    and later tensors do not try again."""
    ref = tmp_path / "ref"
    monkeypatch.setitem(writers.COPY_FILE_RANGE, "works", False)
    convert(sd1, ref, to="hf")
    monkeypatch.setitem(writers.COPY_FILE_RANGE, "works", True)
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "out"
    convert(sd1, out, to="hf")
    assert len(calls) == 1 and writers.COPY_FILE_RANGE["works"] is False
    assert _payload(out) == _payload(ref)


@pytest.mark.parametrize("copy", [True, False], ids=["copy_file_range", "write"])
def test_full_disk_is_exit_6_and_leaves_nothing(sd1, tmp_path, monkeypatch, copy):
    """A tiny tmpfs as the output folder (or, without mount rights, the copy/write failing with
    ENOSPC): a one-line error, exit 6, no output, no temporary."""
    monkeypatch.setitem(writers.COPY_FILE_RANGE, "works", copy)
    small = tmp_path / "small"
    with tiny_disk(small) as mounted:
        if not mounted:
            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(os, "copy_file_range", full)
            monkeypatch.setattr(writers, "tensor_bytes", lambda t: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        r = CliRunner().invoke(main, ["convert", str(sd1), "-o", str(small / "o.safetensors"), "--to", "hf"])
        assert r.exit_code == 6, r.output
        assert "writing failed" in r.output and "No space left" in r.output and len(r.output.strip().splitlines()) == 1
        assert os.listdir(small) == []


def _rss_file_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "negative-control"])
@pytest.mark.fullsize
def test_mapped_pages_are_dropped_as_tensors_are_read(tmp_path, monkeypatch, trim):
    """Reading 128 MiB of tensors through the map leaves only about TRIM_BYTES of it resident;
    with trimming off, all of it stays (the control shows the measure can see it)."""
    p = tmp_path / "big.safetensors"
    write_safetensors({f"t{i}": torch.full((1 << 20,), float(i)) for i in range(32)}, p)   # 32 x 4 MiB
    monkeypatch.setattr(sources, "TRIM_BYTES", (8 << 20) if trim else (1 << 62))
    src = SafetensorsSource(p)
    before = _rss_file_kib()
    total = 0.0
    for k in src.keys():
        t = src.load(k)
        total += float(t.sum())         # touches every page
    grew_mib = (_rss_file_kib() - before) / 1024
    assert total == sum(float(i) * (1 << 20) for i in range(32))
    if trim:
        assert grew_mib < 32, grew_mib
    else:
        assert grew_mib > 100, grew_mib


def test_loaded_tensors_are_views_of_the_file_and_match_the_library(tmp_path):
    """Values equal safetensors' own loader, including a tensor whose offset is not aligned to its
    dtype (copied rather than viewed), and empty tensors."""
    from safetensors.torch import load_file
    p = tmp_path / "odd.safetensors"
    ts = {"d": torch.arange(4), "a": torch.randn(3).half(), "b": torch.randn(5), "c": torch.zeros(0, 2)}
    write_safetensors(ts, p)          # b starts at byte 38: not aligned for float32
    src = SafetensorsSource(p)
    ref = load_file(str(p))
    for k in ts:
        got = src.load(k)
        assert got.dtype == ref[k].dtype and torch.equal(got, ref[k]), k
    assert src.region(src.load("d").data_ptr(), 32) is not None      # a view into the map
    assert src.region(src.load("b").data_ptr(), 20) is None           # the misaligned one is a copy


def test_input_file_is_never_modified_through_the_map(sd1, tmp_path):
    before = sd1.read_bytes()
    convert(sd1, tmp_path / "o.safetensors", to="openai", dtype="fp16")
    convert(sd1, tmp_path / "h", to="hf")
    assert sd1.read_bytes() == before


def test_torch_zip_checkpoints_are_copied_file_to_file_too(tmp_path, monkeypatch):
    """torch.load(mmap=True) maps a zip checkpoint whole; its tensors are found in that map (from
    /proc/self/maps) and copied file to file, with the same result as plain writes."""
    ckpt = write_layout(distinct_canonical(vocab=1000, layers=3), tmp_path / "sd1.ckpt", "ldm", fmt="pt")
    assert PickleSource(ckpt).region(0, 1) is None          # an address outside the map
    src = PickleSource(ckpt)
    some = src.load(src.keys()[0])
    fd, offset = src.region(some.data_ptr(), some.numel() * some.element_size())
    assert os.pread(fd, 16, offset) == bytes(sources.tensor_bytes(some.contiguous()))[:16]
    copied = _count_copies(monkeypatch)
    a = tmp_path / "a.safetensors"
    convert(ckpt, a, to="sgm")
    assert sum(copied) > 0.9 * sum(src.info(k).nbytes for k in src.keys())
    monkeypatch.setitem(writers.COPY_FILE_RANGE, "works", False)
    b = tmp_path / "b.safetensors"
    convert(ckpt, b, to="sgm")
    assert _payload(a) == _payload(b)


def test_legacy_pickles_are_not_mapped_and_take_plain_writes(tmp_path, monkeypatch):
    """Pre-zip torch files cannot be mapped: no region, plain writes, correct output."""
    canon = distinct_canonical(vocab=1000, layers=2)
    sd = read_all(write_layout(canon, tmp_path / "z.safetensors", "ldm"))
    legacy = tmp_path / "legacy.ckpt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    src = PickleSource(legacy)
    t = src.load(src.keys()[0])
    assert src.region(t.data_ptr(), 4) is None
    copied = _count_copies(monkeypatch)
    convert(legacy, tmp_path / "o.safetensors", to="sgm")
    assert copied == []
    convert(tmp_path / "z.safetensors", tmp_path / "ref.safetensors", to="sgm")
    assert _payload(tmp_path / "o.safetensors") == _payload(tmp_path / "ref.safetensors")

"""TorchScript archives (OpenAI's released CLIP .pt files) read without executing anything.

torch.jit.load is used here only as the oracle, on the archive the test itself traced; sdconv's own
reads run with torch.jit.load, torch's IR importers and torch.load patched to fail.
"""
import pickle
import warnings
import zipfile

import pytest
import torch

from sdconv import InputError, UnsafeInputError, convert, make_plan
from sdconv.converters.torchscript import is_torchscript, read_torchscript

MARKER = "MARKER"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A tiny OpenAI CLIP, mixed fp16/fp32 as released, traced on encode_text and saved."""
    import clip.model
    torch.manual_seed(0)
    m = clip.model.CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                        context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                        transformer_layers=2)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    clip.model.convert_weights(m)
    m.eval()
    ids = torch.randint(0, 49408, (1, 77))
    path = tmp_path_factory.mktemp("ts") / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # torch.jit is deprecated in 2.13
        torch.jit.trace_module(m, {"encode_text": ids}, check_trace=False).save(str(path))
        oracle = torch.jit.load(str(path)).state_dict()
    return path, oracle


@pytest.fixture
def no_jit(monkeypatch):
    """Anything that could compile or unpickle the archive the unsafe way fails the test."""
    def boom(*a, **k):
        raise AssertionError("sdconv called a code-executing loader")
    monkeypatch.setattr(torch.jit, "load", boom)
    monkeypatch.setattr(torch._C, "import_ir_module", boom)
    monkeypatch.setattr(torch._C, "import_ir_module_from_buffer", boom)
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


def bits(t):
    return t.reshape(-1).view(torch.uint8)


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        assert (g.dtype, g.shape, g.stride()) == (w.dtype, w.shape, w.stride()), k
        assert torch.equal(bits(g), bits(w)), k


def rewrite(src, dst, change):
    """Copy a zip entry by entry, uncompressed like torch writes it; change(name, data) -> data,
    or None to leave the entry out."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


@pytest.mark.oracle
def test_reads_like_jit(archive, no_jit):
    path, oracle = archive
    assert is_torchscript(path)
    got = read_torchscript(path)
    assert_same(got, oracle)
    # OpenAI's mix: matrices fp16, embeddings / LayerNorms / logit_scale fp32
    assert got["text_projection"].dtype == torch.float16
    assert got["transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert got["token_embedding.weight"].dtype == torch.float32
    assert got["ln_final.weight"].dtype == torch.float32


@pytest.mark.oracle
def test_plain_checkpoints_are_not_torchscript(tmp_path, archive):
    p = tmp_path / "sd.pt"
    torch.save(archive[1], p)
    assert not is_torchscript(p)
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    assert not is_torchscript(tmp_path / "x.pt")


@pytest.mark.oracle
def test_whole_tool(archive, tmp_path, no_jit):
    path, oracle = archive
    plan = make_plan(path, to="hf")
    assert plan.read.layout.name in ("openai", "open_clip")
    arch = plan.encoders[0].arch
    assert (arch["width"], arch["layers"]) == (128, 2)

    out = tmp_path / "text.safetensors"
    convert(path, out, to="openai")
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    text = {k: v for k, v in oracle.items() if not k.startswith("visual.")}
    assert set(written) == set(text)
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "text_projection", "logit_scale", "transformer.resblocks.1.attn.in_proj_weight"} <= set(written)
    for k, w in text.items():
        assert written[k].dtype == w.dtype and written[k].shape == w.shape, k
        assert torch.equal(bits(written[k].contiguous()), bits(w.contiguous())), k


HOSTILE_CODE = (f'import os\nos.system("touch {MARKER}")\n__import__("subprocess").call(["touch", "{MARKER}"])\n'
                f'exec("open(\'{MARKER}\', \'w\')")\n')
HOSTILE_PICKLE = f"cos\nsystem\n(S'touch {MARKER}'\ntR.".encode()


@pytest.mark.parametrize("mode", ["prepend", "replace"])
@pytest.mark.oracle
def test_hostile_code_is_never_run(archive, tmp_path, monkeypatch, no_jit, mode):
    """code/ rewritten to run a command (prepended to the real code, or instead of it), and the
    debug side files (*.debug_pkl, never read) swapped for os.system pickles: the tensors still
    read, and nothing runs. constants.pkl swapped for one is refused (its imports are checked like
    data.pkl's, though it is never unpickled), and nothing runs either."""
    path, oracle = archive
    monkeypatch.chdir(tmp_path)

    def change(name, data):
        if "/code/" in name and name.endswith(".py"):
            return HOSTILE_CODE.encode() + (data if mode == "prepend" else b"")
        if name.endswith(".debug_pkl"):
            return HOSTILE_PICKLE
        return data
    bad = rewrite(path, tmp_path / "hostile.pt", change)
    assert is_torchscript(bad)
    assert_same(read_torchscript(bad), oracle)
    convert(bad, tmp_path / "out.safetensors", to="openai")
    assert not (tmp_path / MARKER).exists()
    worse = rewrite(bad, tmp_path / "hostile-constants.pt",
                    lambda name, data: HOSTILE_PICKLE if name.endswith("/constants.pkl") else data)
    with pytest.raises(UnsafeInputError, match="imports os.system in constants.pkl"):
        convert(worse, tmp_path / "out2.safetensors", to="openai")
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "out2.safetensors").exists()


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _os_system_p4():
    import os
    return pickle.dumps(_Payload(os.system, f"touch {MARKER}"), protocol=4)   # STACK_GLOBAL posix system


def _eval_p3():
    return pickle.dumps(_Payload(eval, f"open('{MARKER}', 'w')"), protocol=3)  # GLOBAL builtins eval


@pytest.mark.parametrize("payload, named", [
    (lambda data: HOSTILE_PICKLE, "os.system"),
    (lambda data: _os_system_p4(), "posix.system"),
    (lambda data: _eval_p3(), "builtins.eval"),
    (lambda data: f"c__builtin__\neval\n(S'open(\"{MARKER}\", \"w\")'\ntR.".encode(), "__builtin__.eval"),
    # inside the real module tree: every tensor rebuild goes through os.system instead
    (lambda data: data.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"cos\nsystem\n"), "os.system"),
    # a __torch__ class is inert, but what it is given still cannot import anything
    (lambda data: data.replace(b"ccollections\nOrderedDict\n", b"cbuiltins\nexec\n"), "builtins.exec"),
])
@pytest.mark.oracle
def test_hostile_globals_are_refused(archive, tmp_path, monkeypatch, no_jit, payload, named):
    path, _ = archive
    monkeypatch.chdir(tmp_path)
    bad = rewrite(path, tmp_path / "hostile.pt",
                  lambda name, data: payload(data) if name.endswith("/data.pkl") else data)
    with pytest.raises(UnsafeInputError, match=f"refused to unpickle: it imports {named}"):
        read_torchscript(bad)
    with pytest.raises(UnsafeInputError):
        make_plan(bad, to="hf")
    assert not (tmp_path / MARKER).exists()


def _cut(path, tmp_path):
    data = path.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _flip(path, tmp_path):
    """Flip bytes inside a stored storage entry: the zip's CRC no longer matches."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{path.stem}/data/0")
    import struct
    data = bytearray(path.read_bytes())
    n_name, n_extra = struct.unpack_from("<HH", data, info.header_offset + 26)   # the local header's
    at = info.header_offset + 30 + n_name + n_extra + 8
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    return bad


DAMAGE = {
    "truncated file": _cut,
    "flipped bytes": _flip,
    "short storage": lambda p, t: rewrite(p, t / "short.pt", lambda n, d: d[:-2] if n.endswith("/data/1") else d),
    "missing storage": lambda p, t: rewrite(p, t / "missing.pt", lambda n, d: None if n.endswith("/data/1") else d),
    "cut data.pkl": lambda p, t: rewrite(p, t / "cutpkl.pt", lambda n, d: d[:len(d) // 2] if n.endswith("/data.pkl")
                                         else d),
    "no data.pkl": lambda p, t: rewrite(p, t / "nopkl.pt", lambda n, d: None if n.endswith("/data.pkl") else d),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.oracle
def test_damaged_archives(archive, tmp_path, monkeypatch, damage):
    path, _ = archive
    bad = DAMAGE[damage](path, tmp_path)

    def boom(*a, **k):
        raise AssertionError("sdconv called a code-executing loader")
    monkeypatch.setattr(torch.jit, "load", boom)
    monkeypatch.setattr(torch._C, "import_ir_module", boom)
    with pytest.raises(InputError) as e:
        read_torchscript(bad)
    assert "\n" not in e.value.message and str(bad) in e.value.message
    # through the tool too (a file cut in half is no longer a zip: torch.load's safe path reports it)
    with pytest.raises(InputError):
        make_plan(bad, to="hf")


class _Scripted(torch.nn.Module):
    """Parameters, a buffer, a non-persistent buffer, a plain tensor attribute and an int."""
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("buf", torch.ones(3, dtype=torch.float16))
        self.register_buffer("np", torch.zeros(2), persistent=False)
        self.plain = torch.arange(4)
        self.empty = torch.nn.Parameter(torch.empty(0, 5))
        self.n = 5

    def forward(self, x):
        return self.lin(x) + self.plain[:2] + self.np + self.n


def test_scripted_module_matches_jit(tmp_path, monkeypatch):
    """data.pkl alone cannot tell a plain tensor attribute (not in state_dict) from a buffer: the
    code/ class headers are read as text for that; empty storages read too."""
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_Scripted()).save(str(path))
        oracle = torch.jit.load(str(path)).state_dict()
    assert "plain" not in oracle
    monkeypatch.setattr(torch.jit, "load", None)
    assert_same(read_torchscript(path), oracle)

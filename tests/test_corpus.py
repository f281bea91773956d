"""A corpus of broken and hostile inputs. Each gives its documented exit code and a one-line
message, leaves no output (and no temporary), leaves the input unchanged, and runs nothing."""
import hashlib
import json
import os
import struct
import subprocess
import zipfile

import pytest
import torch
from click.testing import CliRunner

from fixtures import distinct_canonical, read_all, write_layout, write_multi
from sdconv.cli import main
from sdconv.converters.writers import write_safetensors

MARKER = "PAYLOAD_RAN"


def _st(header: dict, data: bytes = b"", pad_to=None) -> bytes:
    raw = json.dumps(header).encode()
    n = len(raw) if pad_to is None else pad_to
    return struct.pack("<Q", n) + raw + data


class _Payload:
    def __init__(self, kind, marker):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        import builtins
        import subprocess as sp
        code = f"open({self.marker!r}, 'w').close()"
        return {"system": (os.system, (f"touch {self.marker}",)), "eval": (builtins.eval, (code,)),
                "exec": (builtins.exec, (code,)), "subprocess": (sp.call, (["touch", self.marker],))}[self.kind]


def _sd1(d):
    return write_multi(d / "good.safetensors", "ldm", {"clip_l": distinct_canonical(vocab=1000, layers=3)})


def _sd1_with(d, name, edit):
    sd = read_all(_sd1(d))
    edit(sd)
    p = d / name
    write_safetensors(sd, p)
    return p


PID = "cond_stage_model.transformer.text_model.embeddings.position_ids"
L1 = "cond_stage_model.transformer.text_model.encoder.layers.1."


def _make(kind, d):
    """(input path, extra CLI args, expected exit code, a phrase the message must hold)."""
    good_hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if kind == "empty":
        (d / "x.safetensors").write_bytes(b"")
        return d / "x.safetensors", [], 3, "only 0 bytes"
    if kind == "truncated_safetensors":
        b = _sd1(d).read_bytes()
        (d / "x.safetensors").write_bytes(b[: len(b) // 2])
        return d / "x.safetensors", [], 3, "truncated"
    if kind == "header_longer_than_file":
        (d / "x.safetensors").write_bytes(_st(good_hdr, b"\0" * 8, pad_to=10 ** 6))
        return d / "x.safetensors", [], 3, "does not fit"
    if kind == "invalid_header_json":
        (d / "x.safetensors").write_bytes(struct.pack("<Q", 9) + b"{not json" + b"\0" * 8)
        return d / "x.safetensors", [], 3, "invalid header"
    if kind == "overlapping_offsets":
        h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
        (d / "x.safetensors").write_bytes(_st(h, b"\0" * 12))
        return d / "x.safetensors", [], 3, "overlaps"
    if kind == "out_of_range_offsets":
        h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [100, 116]}}
        (d / "x.safetensors").write_bytes(_st(h, b"\0" * 16))
        return d / "x.safetensors", [], 3, "truncated"
    if kind == "offsets_disagree_with_shape":
        h = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
        (d / "x.safetensors").write_bytes(_st(h, b"\0" * 8))
        return d / "x.safetensors", [], 3, "need 12"
    if kind == "unknown_dtype":
        h = {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}
        (d / "x.safetensors").write_bytes(_st(h, b"\0" * 8))
        return d / "x.safetensors", [], 3, "unknown dtype"
    if kind == "git_lfs_pointer":
        (d / "x.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 2132625894\n")
        return d / "x.safetensors", [], 3, "git-lfs pointer"
    if kind == "html_page":
        (d / "x.safetensors").write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n" * 4)
        return d / "x.safetensors", [], 3, "HTML page"
    if kind == "truncated_zip":
        torch.save({"state_dict": read_all(_sd1(d))}, d / "full.ckpt")
        b = (d / "full.ckpt").read_bytes()
        (d / "x.ckpt").write_bytes(b[: len(b) // 3])
        (d / "full.ckpt").unlink()
        return d / "x.ckpt", [], 3, "not a readable torch checkpoint"
    if kind.startswith("pickle_"):
        torch.save({"state_dict": read_all(_sd1(d)), "cb": _Payload(kind[7:], d / MARKER)}, d / "x.ckpt")
        return d / "x.ckpt", [], 4, "refused to unpickle"
    if kind == "nan_tensor":
        def nan(sd):
            sd[L1 + "mlp.fc1.weight"][0, 0] = float("nan")
        return _sd1_with(d, "x.safetensors", nan), [], 3, "NaN"
    if kind == "missing_middle_layer":
        def cut(sd):
            for k in [k for k in sd if k.startswith(L1)]:
                del sd[k]
        return _sd1_with(d, "x.safetensors", cut), [], 3, "missing layer 1"
    if kind == "inconsistent_widths":
        def widen(sd):
            sd[L1 + "layer_norm2.weight"] = torch.zeros(64)
        return _sd1_with(d, "x.safetensors", widen), [], 3, "width = 64"
    if kind == "integer_weights":
        def to_int(sd):
            sd[L1 + "mlp.fc1.weight"] = sd[L1 + "mlp.fc1.weight"].to(torch.int32)
        return _sd1_with(d, "x.safetensors", to_int), [], 3, "floating point"
    if kind == "drifted_position_ids_strict":
        def drift(sd):
            sd[PID] = torch.arange(77, dtype=torch.float32)[None] - 0.0001
        return _sd1_with(d, "x.safetensors", drift), ["--strict"], 3, "drifted"
    if kind == "corrupt_position_ids":
        def corrupt(sd):
            sd[PID] = torch.arange(77, dtype=torch.float32)[None] * 0.583
        return _sd1_with(d, "x.safetensors", corrupt), [], 3, "--fix-position-ids"
    if kind == "wrong_from":
        return _sd1(d), ["--from", "sgm"], 5, "--from sgm"
    if kind == "no_text_encoder":
        write_safetensors({"model.diffusion_model.x": torch.zeros(4)}, d / "x.safetensors")
        return d / "x.safetensors", [], 5, "no CLIP text encoder"
    if kind == "unknown_layout":
        return _sd1(d), ["--to", "opneai"], 2, "did you mean 'openai'"
    if kind == "torchscript_with_bad_global":
        import io
        import pickle
        buf = io.BytesIO()
        pickle.dump(_Payload("system", d / MARKER), buf, protocol=2)
        with zipfile.ZipFile(d / "x.pt", "w", zipfile.ZIP_STORED) as z:
            z.writestr("m/data.pkl", buf.getvalue())
            z.writestr("m/constants.pkl", pickle.dumps(()))
            z.writestr("m/code/__torch__/m.py", "import os\nos.system('touch PAYLOAD_RAN')\n")
        return d / "x.pt", [], 4, "refused to unpickle"
    raise KeyError(kind)


KINDS = ["empty", "truncated_safetensors", "header_longer_than_file", "invalid_header_json", "overlapping_offsets",
         "out_of_range_offsets", "offsets_disagree_with_shape", "unknown_dtype", "git_lfs_pointer", "html_page",
         "truncated_zip", "pickle_system", "pickle_eval", "pickle_exec", "pickle_subprocess", "nan_tensor",
         "missing_middle_layer", "inconsistent_widths", "integer_weights", "drifted_position_ids_strict", "corrupt_position_ids",
         "wrong_from", "no_text_encoder", "unknown_layout", "torchscript_with_bad_global"]


def _hash(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_broken_input(tmp_path, kind):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    path, extra, code, phrase = _make(kind, src_dir)
    before = _hash(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["convert", str(path), "-o", str(out_dir / "o.safetensors"), "--to", "openai", *extra]
    if "--to" in extra:
        args = ["convert", str(path), "-o", str(out_dir / "o.safetensors"), *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdconv: error: ") and "Traceback" not in r.output, r.output
    assert phrase in r.output, r.output
    assert list(out_dir.iterdir()) == []                       # no output, no temporary
    assert _hash(path) == before                               # the input is unchanged
    assert not (src_dir / MARKER).exists() and not (tmp_path / MARKER).exists() and not os.path.exists(MARKER)


def test_output_equal_to_input(tmp_path):
    src = _sd1(tmp_path)
    before = _hash(src)
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(src), "--to", "ldm", "--force"])
    assert r.exit_code == 6 and "is the input" in r.output and _hash(src) == before


def test_read_only_output_folder(tmp_path):
    src = _sd1(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro}", shell=True,
                             capture_output=True).returncode == 0
    target = ro if mounted else __import__("pathlib").Path("/sys")        # sysfs: nobody creates files there
    try:
        r = CliRunner().invoke(main, ["convert", str(src), "-o", str(target / "o.safetensors"), "--to", "openai"])
        assert r.exit_code == 6 and "cannot write there" in r.output, r.output
        assert not (target / "o.safetensors").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which sdconv turns into the same) in the middle of writing."""
    from sdconv.converters import stream as stream_mod
    src = _sd1(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    real_pieces = stream_mod.TensorStream.pieces      # what the safetensors writer takes

    def interrupted(self):
        for i, item in enumerate(real_pieces(self)):
            if i == 5:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(stream_mod.TensorStream, "pieces", interrupted)
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out / "o.safetensors"), "--to", "openai"])
    assert r.exit_code == 130 and "interrupted" in r.output
    assert list(out.iterdir()) == []

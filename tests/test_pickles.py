"""Old .ckpt files: Lightning and numpy objects load as inert stand-ins without those packages;
legacy pickles load; anything else a pickle imports is refused and never runs."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.helpers.fixtures import distinct_canonical, read_all, write_multi
from sdconv.cli import main


@pytest.fixture(scope="module")
def sd1_tensors(tmp_path_factory):
    d = tmp_path_factory.mktemp("pk")
    return read_all(write_multi(d / "sd1.safetensors", "ldm", {"clip_l": distinct_canonical(vocab=1000)}))


ROOT = Path(__file__).resolve().parents[1]
# run from the repository root (cwd=ROOT), where `python -c` finds the tests package
MAKE_LIGHTNING = """
import sys, torch
from tests.helpers.lightning_ckpt import save_lightning_ckpt
save_lightning_ckpt(torch.load(sys.argv[1]), sys.argv[2], zip_format=sys.argv[3] == "zip")
"""


def _make_lightning(tmp_path, sd1_tensors, fmt):
    plain = tmp_path / "plain.pt"
    torch.save(sd1_tensors, plain)
    out = tmp_path / f"lightning-{fmt}.ckpt"
    r = subprocess.run([sys.executable, "-c", MAKE_LIGHTNING, str(plain), str(out), fmt], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_lightning_numpy1_ckpt_loads_without_lightning_or_numpy(tmp_path, sd1_tensors, fmt):
    ckpt = _make_lightning(tmp_path, sd1_tensors, fmt)
    if fmt == "zip":
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt)))
        assert {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "numpy.core.multiarray.scalar",
                "numpy.dtype", "numpy._core.multiarray.scalar"} <= names
    code = textwrap.dedent(f"""
        import sys
        sys.modules["numpy"] = None                  # numpy blocked; pytorch_lightning not installed
        from sdconv.cli import main
        sys.argv = ["sdconv", "convert", {str(ckpt)!r}, "-o", {str(tmp_path / 'out.safetensors')!r}, "--to", "openai"]
        main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ldm (detected)" in r.stdout
    out = read_all(tmp_path / "out.safetensors")
    assert "token_embedding.weight" in out


def test_numpy_scalar_stand_in_decodes():
    from sdconv.converters.pickles import Dtype, scalar
    import struct
    assert scalar(Dtype("i8", False, True), struct.pack("<q", 470000)) == 470000
    assert scalar(Dtype("f8", False, True), struct.pack("<d", 0.25)) == 0.25


class _Payload:
    def __init__(self, kind, marker):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        import builtins
        import subprocess as sp
        cmd = f"open({self.marker!r}, 'w').close()"
        return {"system": (os.system, (f"touch {self.marker}",)),
                "eval": (builtins.eval, (cmd,)),
                "exec": (builtins.exec, (cmd,)),
                "popen": (sp.Popen, (["touch", self.marker],)),
                "import": (builtins.__import__, ("os",))}[self.kind]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("kind", ["system", "eval", "exec", "popen", "import"])
def test_malicious_pickles_refused_and_never_run(tmp_path, sd1_tensors, kind, fmt):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd1_tensors, "x": _Payload(kind, marker)}, evil,
               _use_new_zipfile_serialization=fmt == "zip")
    r = CliRunner().invoke(main, ["convert", str(evil), "-o", str(tmp_path / "o.safetensors"), "--to", "openai"])
    assert r.exit_code == 4, r.output
    assert "refused to unpickle" in r.output
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_payload_beside_lightning_objects_still_refused(tmp_path, sd1_tensors):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd1_tensors, "global_step": 1, "x": _Payload("system", marker)}, evil)
    r = CliRunner().invoke(main, ["inspect", str(evil)])
    assert r.exit_code == 4 and "posix.system" in r.output and not marker.exists()


def test_legacy_pickle_loads(tmp_path, sd1_tensors):
    p = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd1_tensors, "global_step": 3}, p, _use_new_zipfile_serialization=False)
    r = CliRunner().invoke(main, ["convert", str(p), "-o", str(tmp_path / "o.safetensors"), "--to", "openai"])
    assert r.exit_code == 0, r.output

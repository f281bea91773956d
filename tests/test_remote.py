"""URL and hf:// inputs (issue 15), against a real HTTP server on 127.0.0.1 (tests/helpers/rangeserver.py)
that serves byte ranges, counts the bytes it sends, injects faults and stands in for the Hub.

Outputs from a URL hold exactly the tensors of outputs from the same local file; only the
provenance differs. Only the header and the encoder's bytes travel."""
import json
import struct
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdconv import convert, inspect
from sdconv.cli import main
from sdconv.converters import metakeys as K
from tests.helpers.fixtures import distinct_canonical, write_layout, write_multi
from tests.helpers.rangeserver import RangeServer, use_hub

PROVENANCE = {K.SOURCE_SHA256, K.SOURCE_URL, K.SOURCE_ETAG, K.SOURCE_SHA256_OF}
UNET = "model.diffusion_model.input_blocks.0.0.weight"
SLACK = 64 << 10          # the first request's 64 KiB, at most


pytestmark = pytest.mark.usefixtures("quick_retries")     # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An SD1.x checkpoint with 16 MB of UNet around its encoder (so that reading only the encoder
    shows), an SDXL one, and the SD1.x one as a torch zip."""
    d = tmp_path_factory.mktemp("served")
    sd1 = write_layout(distinct_canonical(vocab=1000), d / "base.safetensors", "ldm")
    t = load_file(str(sd1))
    g = torch.Generator().manual_seed(3)
    t[UNET] = torch.randn(2048, 2048, generator=g)                      # 16 MiB before the encoder's keys
    t["model.diffusion_model.out.2.weight"] = torch.randn(1024, 1024, generator=g)
    save_file(t, str(d / "sd1.safetensors"))
    torch.save({"state_dict": t}, d / "sd1.ckpt")
    write_multi(d / "sdxl.safetensors", "sgm", {"clip_l": distinct_canonical(vocab=1000, seed=1),
                                                 "clip_g": distinct_canonical(vocab=1000, seed=2)})
    return d


@pytest.fixture
def srv(files):
    with RangeServer(files) as s:
        yield s


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _tensors(path):
    """{key: (dtype, shape, bytes)} of every safetensors file of an output, by relative name."""
    from pathlib import Path
    path = Path(path)
    out = {}
    for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[f"{f.relative_to(path) if path.is_dir() else ''}:{k}"] = (t.dtype, tuple(t.shape), t.numpy().tobytes())
    return out


def _metadata(path):
    with safe_open(str(path), "pt") as h:
        return h.metadata()


def _encoder_bytes(path, prefixes) -> int:
    """The header's and the encoder tensors' bytes of a local safetensors file."""
    raw = open(path, "rb").read(8)
    (n,) = struct.unpack("<Q", raw)
    header = json.loads(open(path, "rb").read(8 + n)[8:])
    enc = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
              if k != "__metadata__" and k.startswith(prefixes))
    return 8 + n + enc


@pytest.mark.parametrize("to", ["openai", "hf", "diffusers"])
def test_a_url_gives_the_tensors_of_the_local_file_and_only_its_encoders_bytes_travel(files, srv, tmp_path, to):
    local, remote = tmp_path / "local", tmp_path / "remote"
    suffix = "" if to in ("hf", "diffusers") else ".safetensors"
    convert(files / "sd1.safetensors", f"{local}{suffix}", to=to)
    r = convert(srv.url_for("sd1.safetensors"), f"{remote}{suffix}", to=to)
    assert _tensors(f"{local}{suffix}") == _tensors(f"{remote}{suffix}")
    sent = srv.stats.bytes_for("/sd1.safetensors")
    need = _encoder_bytes(files / "sd1.safetensors", ("cond_stage_model.",))
    assert sent <= 1.05 * need + SLACK, (sent, need)
    assert sent < (files / "sd1.safetensors").stat().st_size / 3
    assert srv.stats.count("/sd1.safetensors") <= 6, srv.stats.calls      # coalesced: few requests
    weights = r.files[0] if suffix else next(p for p in r.files if p.suffix == ".safetensors")
    meta = _metadata(weights)
    assert meta[K.SOURCE_URL] == srv.url_for("sd1.safetensors") and meta[K.SOURCE_ETAG]
    assert meta[K.SOURCE_SHA256_OF].startswith("the bytes read, not the whole file: 0-")
    local_meta = _metadata(next(p for p in (local.rglob("*.safetensors") if not suffix else [f"{local}{suffix}"])))
    differ = {k for k in set(meta) | set(local_meta) if meta.get(k) != local_meta.get(k)}
    assert differ <= PROVENANCE, differ


def test_inspect_reads_the_header_alone(files, srv):
    report = inspect(srv.url_for("sdxl.safetensors"))
    assert [e["encoder"] for e in report["encoders"]] == ["clip_l", "clip_g"]
    assert report["size_bytes"] == (files / "sdxl.safetensors").stat().st_size
    (n,) = struct.unpack("<Q", (files / "sdxl.safetensors").read_bytes()[:8])
    assert srv.stats.bytes_for("/sdxl.safetensors") <= max(8 + n, SLACK) + 4096    # + position_ids
    code, out = _cli("inspect", srv.url_for("sdxl.safetensors"))
    assert code == 0 and out.startswith(srv.url_for("sdxl.safetensors") + ": safetensors")


def test_a_dropped_connection_resumes_where_it_broke(files, srv, tmp_path):
    convert(files / "sd1.safetensors", tmp_path / "local.safetensors", to="openai")
    srv.faults.drop("/sd1.safetensors", after_bytes=1 << 20, times=2)      # the probe is 64 KiB: ranges break
    srv.faults.unavailable("/sd1.safetensors", times=1, retry_after=0)
    srv.faults.too_many_requests("/sd1.safetensors", times=1)
    convert(srv.url_for("sd1.safetensors"), tmp_path / "remote.safetensors", to="openai")
    assert _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / "remote.safetensors")
    ranges = [r.range for r in srv.stats.select("/sd1.safetensors") if r.status == 206]
    assert any(not rg.startswith("bytes=0-") for rg in ranges)            # a resumed range
    need = _encoder_bytes(files / "sd1.safetensors", ("cond_stage_model.",))
    assert srv.stats.bytes_for("/sd1.safetensors") <= 1.05 * need + SLACK + 2 * (1 << 20)


def test_a_file_replaced_during_the_run_is_exit_3_with_nothing_left(files, srv, tmp_path):
    content = (files / "sd1.safetensors").read_bytes()
    srv.faults.replace("sd1.safetensors", content[:-1024] + b"\0" * 1024, after=1)     # after the first request
    try:
        code, out = _cli("convert", srv.url_for("sd1.safetensors"), "-o", tmp_path / "o.safetensors", "--to", "openai")
    finally:
        (files / "sd1.safetensors").write_bytes(content)
    assert code == 3 and "changed on the server during the run" in out, out
    assert list(tmp_path.iterdir()) == []


def test_a_server_without_ranges_is_refused_unless_download(files, srv, tmp_path):
    srv.faults.ignore_range()
    code, out = _cli("convert", srv.url_for("sd1.safetensors"), "-o", tmp_path / "o.safetensors", "--to", "openai")
    assert code == 7 and "does not serve byte ranges" in out and "--download" in out, out
    assert srv.stats.bytes_for("/sd1.safetensors") < (files / "sd1.safetensors").stat().st_size   # it stopped
    assert list(tmp_path.iterdir()) == []
    code, out = _cli("convert", srv.url_for("sd1.safetensors"), "-o", tmp_path / "o.safetensors", "--to", "openai",
                     "--download")
    assert code == 0, out
    assert _metadata(tmp_path / "o.safetensors")[K.SOURCE_SHA256_OF] == "the file (all of it was read)"


def test_a_torch_zip_reads_by_ranges_with_or_without_download(files, srv, tmp_path):
    """A torch zip is read by byte ranges (more in tests/test_remote_zip.py); --download, which
    allows taking a whole file, changes nothing where the server serves ranges."""
    convert(files / "sd1.ckpt", tmp_path / "local.safetensors", to="openai")
    for i, extra in enumerate(([], ["--download"])):
        srv.reset_stats()
        code, out = _cli("convert", srv.url_for("sd1.ckpt"), "-o", tmp_path / f"o{i}.safetensors", "--to", "openai",
                         *extra)
        assert code == 0, out
        assert _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / f"o{i}.safetensors")
        assert srv.stats.bytes_for("/sd1.ckpt") < (files / "sd1.ckpt").stat().st_size / 3


def test_redirects_to_signed_storage_are_followed_and_not_recorded(srv, tmp_path):
    srv.faults.redirect("/sd1.safetensors", cdn=True)
    convert(srv.url_for("sd1.safetensors"), tmp_path / "o.safetensors", to="openai")
    meta = _metadata(tmp_path / "o.safetensors")
    assert meta[K.SOURCE_URL] == srv.url_for("sd1.safetensors")
    assert "Signature" not in json.dumps(meta)
    signed = srv.signed_url_for("sd1.safetensors")
    convert(signed, tmp_path / "s.safetensors", to="openai")
    assert "?" not in _metadata(tmp_path / "s.safetensors")[K.SOURCE_URL]


@pytest.mark.parametrize("status, says", [(401, "credentials (401)"), (403, "access denied (403)"),
                                          (404, "no such file on the server (404)")])
def test_http_refusals_are_one_line_each(srv, tmp_path, status, says):
    srv.faults.deny("/sd1.safetensors", code=status)
    code, out = _cli("inspect", srv.url_for("sd1.safetensors"))
    lines = [ln for ln in out.splitlines() if ln]
    assert code == 7 and len(lines) == 1 and says in lines[0] and "Traceback" not in out, out


def test_a_slow_server_times_out_after_the_retries(srv, tmp_path):
    srv.faults.slow("/sd1.safetensors", before_headers=2.0)
    code, out = _cli("inspect", srv.url_for("sd1.safetensors"), "--timeout", "0.3", "--retries", "1")
    assert code == 7 and "2 times" in out, out
    srv.faults.clear()
    srv.faults.slow("/sd1.safetensors", before_headers=0.2, times=1)
    code, out = _cli("inspect", srv.url_for("sd1.safetensors"), "--timeout", "2")
    assert code == 0, out


def test_a_batch_of_urls_and_a_url_reference(files, srv, tmp_path):
    code, out = _cli("convert", srv.url_for("sd1.safetensors"), srv.url_for("sdxl.safetensors"), "-o", f"{tmp_path}/b/",
                     "--to", "openai", "--encoder", "all")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "sd1.safetensors", "sdxl.clip_g.safetensors", "sdxl.clip_l.safetensors"]
    ref = write_layout(distinct_canonical(vocab=1000), files / "ref.safetensors", "openai")
    try:
        r = convert(srv.url_for("sd1.safetensors"), tmp_path / "p.safetensors", to="openai",
                    projection=srv.url_for("ref.safetensors"))
    finally:
        ref.unlink()
    assert r.plan.encoders[0].grafts["text_proj.weight"].record()["file"] == "ref.safetensors"


def test_without_the_remote_extra_one_line_names_it(srv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx2", None)
    code, out = _cli("inspect", srv.url_for("sd1.safetensors"))
    assert code == 2 and "pip install 'sdconv[remote]'" in out, out


# ---- the Hub ------------------------------------------------------------------------------

@pytest.fixture
def hub(files, srv, monkeypatch, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for name in ("sd1.safetensors", "sdxl.safetensors"):
        (repo / name).write_bytes((files / name).read_bytes())
    pipe = tmp_path_factory.mktemp("pipe")
    convert(files / "sdxl.safetensors", pipe / "p", to="diffusers", encoder="all")
    (pipe / "p" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (pipe / "p" / "unet").mkdir()
    save_file({"conv_in.weight": torch.zeros(1024, 1024)}, str(pipe / "p" / "unet" / "diffusion_pytorch_model.safetensors"))
    srv.add_repo("org/sd", repo)
    srv.add_repo("org/pipe", pipe / "p")
    use_hub(monkeypatch, srv)
    return srv


def test_hf_file_as_a_local_one_with_the_hubs_sha256(files, hub, tmp_path):
    import hashlib
    convert(files / "sd1.safetensors", tmp_path / "local.safetensors", to="openai")
    convert("hf://org/sd/sd1.safetensors", tmp_path / "hub.safetensors", to="openai")
    assert _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / "hub.safetensors")
    meta = _metadata(tmp_path / "hub.safetensors")
    assert meta[K.SOURCE_SHA256] == hashlib.sha256((files / "sd1.safetensors").read_bytes()).hexdigest()
    assert meta[K.SOURCE_SHA256_OF] == "the file (as the server states it)"
    assert meta[K.SOURCE_URL].startswith("hf://org/sd@") and meta[K.SOURCE_URL].endswith("/sd1.safetensors")
    need = _encoder_bytes(files / "sd1.safetensors", ("cond_stage_model.",))
    assert hub.stats.total_bytes <= 1.05 * need + SLACK + (64 << 10)      # + the Hub's JSON answers


def test_inspect_hf_prints_the_encoders_from_the_header(files, hub):
    code, out = _cli("inspect", "hf://org/sd@main/sdxl.safetensors")
    assert code == 0 and "encoder clip_l" in out and "encoder clip_g" in out, out
    (n,) = struct.unpack("<Q", (files / "sdxl.safetensors").read_bytes()[:8])
    assert hub.stats.total_bytes <= max(8 + n, SLACK) + 8192


def test_hf_diffusers_repository_folder(files, hub, tmp_path):
    pipe = next(p for p in hub.hub.repos["org/pipe"].trees.values())
    convert(pipe, tmp_path / "local.safetensors", to="openai", encoder="all")
    r = convert("hf://org/pipe", tmp_path / "hub.safetensors", to="openai", encoder="all")
    assert sorted(p.name for p in r.outputs) == ["hub.clip_g.safetensors", "hub.clip_l.safetensors"]
    for e in ("clip_l", "clip_g"):
        assert _tensors(tmp_path / f"local.{e}.safetensors") == _tensors(tmp_path / f"hub.{e}.safetensors")
    meta = _metadata(tmp_path / "hub.clip_l.safetensors")
    assert meta[K.SOURCE_URL].startswith("hf://org/pipe@")
    assert hub.stats.bytes_for("/_lfs/*") if hasattr(hub.stats, "bytes_for") else True
    code, out = _cli("inspect", "hf://org/pipe/text_encoder_2")
    assert code == 0 and "clip_g" in out, out


@pytest.mark.parametrize("name, says", [("hf://org/nope/x.safetensors", "no such repository"),
                                        ("hf://org/sd@v9/sd1.safetensors", "no revision 'v9'"),
                                        ("hf://org/sd/missing.safetensors", "no file 'missing.safetensors'")])
def test_hub_errors_are_one_line_each(hub, name, says):
    code, out = _cli("inspect", name)
    assert code == 7 and says in out and len(out.strip().splitlines()) == 1, out


def test_verify_a_url_against_the_local_file(files, srv):
    code, out = _cli("verify", srv.url_for("sd1.safetensors"), files / "sd1.safetensors")
    assert code == 0 and "verdict: identical" in out, out
    assert srv.stats.count("/sd1.safetensors") <= 4          # the probe, the header, the encoder's ranges


def test_hf_sharded_transformers_repository(files, srv, monkeypatch, tmp_path):
    """A transformers model repository whose weights are shards behind model.safetensors.index.json."""
    convert(files / "sd1.safetensors", tmp_path / "hf", to="hf")
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "model.safetensors").unlink()
    keys = sorted(t)
    halves = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: t[k] for k in ks}, str(tmp_path / "hf" / name))
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    srv.add_repo("org/te", tmp_path / "hf")
    use_hub(monkeypatch, srv)
    convert(tmp_path / "hf", tmp_path / "local.safetensors", to="openai")
    convert("hf://org/te", tmp_path / "hub.safetensors", to="openai")
    assert _tensors(tmp_path / "local.safetensors") == _tensors(tmp_path / "hub.safetensors")
    shard_requests = [r for r in srv.stats.requests if "model-0000" in r.path or r.path.startswith("/_lfs/")]
    assert len(shard_requests) <= 12, srv.stats.calls     # per shard: a probe, the header, its ranges (+ redirects)

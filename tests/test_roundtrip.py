"""Every ordered pair of layouts round-trips bitwise: A -> B -> A gives back exactly A, less
what B cannot hold (a projection, logit_scale, diffusers' dropped SD2 block), and the plan
says what was lost."""
import itertools

import pytest
import torch

from fixtures import (ALL_LAYOUTS, LAYOUTS, distinct_canonical, drop_last_blocks, holdable, read_all, target_slot,
                      write_layout)
from sdconv import convert
from sdconv.converters.registry import DEFAULT

KINDS = ["clip_l", "clip_h", "clip_g"]
LAYERS = 3
ACT = {"clip_l": "quick_gelu", "clip_h": "gelu", "clip_g": "gelu"}


def _path(tmp_path, name, layout, fmt):
    if DEFAULT.layout(layout).layout.output == "folder":
        return tmp_path / name
    return tmp_path / (name + (".pt" if fmt == "pt" else ".safetensors"))


def _cases():
    for a, b in itertools.permutations(ALL_LAYOUTS, 2):
        for kind in KINDS:
            if target_slot(a, kind) is not None and target_slot(b, kind) is not None:
                yield a, b, kind, "safetensors"
    for a, b in itertools.permutations(LAYOUTS, 2):      # the .pt container, once per pair
        yield a, b, "clip_l", "pt"


@pytest.mark.parametrize("a,b,kind,fmt", list(_cases()))
def test_pair_roundtrips_bitwise(tmp_path, a, b, kind, fmt):
    canon = distinct_canonical(layers=LAYERS, vocab=1000)
    slot_a, slot_b = target_slot(a, kind), target_slot(b, kind)
    params = {"heads": 2, "act": ACT[kind], "encoder": kind}
    src_canon = holdable(canon, slot_a)
    src = write_layout(src_canon, _path(tmp_path, "src", a, fmt), a, fmt, params=params)
    mid, back = _path(tmp_path, "mid", b, fmt), _path(tmp_path, "back", a, fmt)
    r1 = convert(src, mid, to=b, from_=a, fmt=fmt, params={"encoder": kind})
    r2 = convert(mid, back, to=a, from_=b, fmt=fmt, params={"encoder": kind})
    assert r1.plan.read.layout.name == a and r2.plan.read.layout.name == b
    assert r1.plan.encoders[0].identity == kind and r2.plan.encoders[0].identity == kind

    kept = holdable(src_canon, slot_b)
    if slot_b.drop_last_layers:
        kept = drop_last_blocks(kept, slot_b.drop_last_layers, LAYERS)
    ref = write_layout(kept, _path(tmp_path, "ref", a, fmt), a, fmt, params=params)
    want, got = read_all(ref), read_all(back)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k

    # what B could not hold is said, not silently lost
    notes = " ".join(r1.plan.notes)
    for name in set(src_canon) - set(kept):
        assert name in notes or (name.startswith("blk.") and "dropped block" in notes), (name, notes)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_detection_finds_each_layout(tmp_path, layout, kind):
    slot = target_slot(layout, kind)
    if slot is None:
        return       # the layout cannot hold this kind (tested in test_layouts)
    src = write_layout(holdable(distinct_canonical(vocab=1000), slot), _path(tmp_path, "src", layout, "safetensors"),
                       layout, params={"heads": 2, "act": ACT[kind], "encoder": kind})
    r = convert(src, tmp_path / "out.safetensors", to="open_clip", params={"encoder": kind})
    # a flat OpenAI-named file reads identically as openai and open_clip; either is right
    expected = {"openai", "open_clip"} if layout in ("openai", "open_clip") else {layout}
    assert r.plan.read.layout.name in expected


def test_canonical_values_survive_every_layout(tmp_path):
    """Reading any layout gives the same canonical tensors it was written from."""
    from sdconv.converters.folders import open_source
    from sdconv.converters.detect import read_layout
    from sdconv.converters.transforms import TRANSFORMS
    canon = distinct_canonical(vocab=1000)
    for layout in ALL_LAYOUTS:
        slot = target_slot(layout, "clip_l")
        want = holdable(canon, slot)
        src = open_source(write_layout(want, _path(tmp_path, layout, layout, "safetensors"), layout,
                                       params={"heads": 2, "act": "quick_gelu", "encoder": "clip_l"}))
        (rp,) = read_layout(src, DEFAULT.layout(layout), "clip_l")
        got = {}
        for op in rp.ops:
            for c, t in zip(op.canonical, TRANSFORMS[op.transform].read([src.load(k) for k in op.keys])):
                got[c] = t
        assert set(got) == set(want), layout
        for k in want:
            assert torch.equal(got[k], want[k]), (layout, k)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_casts_floats_only(tmp_path, dtype, torch_dtype):
    canon = holdable(distinct_canonical(vocab=1000), target_slot("ldm", "clip_l"))
    src = write_layout(canon, tmp_path / "src.safetensors", "openai")
    out = tmp_path / "out.safetensors"
    convert(src, out, to="ldm", dtype=dtype)
    t = read_all(out)
    ids = [k for k in t if k.endswith("position_ids")]
    assert len(ids) == 1 and t[ids[0]].dtype == torch.int64
    assert torch.equal(t[ids[0]], torch.arange(77).reshape(1, 77))
    assert all(v.dtype == torch_dtype for k, v in t.items() if k not in ids)

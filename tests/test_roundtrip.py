"""Every ordered pair of layouts round-trips bitwise: A -> B -> A gives back A, less only
what B cannot hold (which the plan must say)."""
import itertools

import pytest
import torch

from fixtures import LAYOUTS, distinct_canonical, read_all, write_layout
from sdconv import convert
from sdconv.converters.registry import DEFAULT


def _omitted(layout):
    return next(iter(DEFAULT.layout(layout).layout.slots.values())).omit


def _expected_keys_after(a_tensors, a, b, tmp_path, fmt):
    """A's keys, less the ones holding canonical tensors that B omits (found by writing A with
    those tensors removed)."""
    omit = _omitted(b) - _omitted(a)
    if not omit:
        return set(a_tensors)
    canon = {k: v for k, v in distinct_canonical().items() if k not in omit and k not in _omitted(a)}
    ref = write_layout(canon, tmp_path / f"ref-{a}{'.pt' if fmt == 'pt' else '.safetensors'}"
                       if DEFAULT.layout(a).layout.output == "file" else tmp_path / f"ref-{a}", a, fmt)
    return set(read_all(ref))


def _path(tmp_path, name, layout, fmt):
    if DEFAULT.layout(layout).layout.output == "folder":
        return tmp_path / name
    return tmp_path / (name + (".pt" if fmt == "pt" else ".safetensors"))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("a,b", list(itertools.permutations(LAYOUTS, 2)))
def test_pair_roundtrips_bitwise(tmp_path, a, b, fmt):
    canon = {k: v for k, v in distinct_canonical().items() if k not in _omitted(a)}
    src = write_layout(canon, _path(tmp_path, "src", a, fmt), a, fmt)
    mid = _path(tmp_path, "mid", b, fmt)
    back = _path(tmp_path, "back", a, fmt)
    r1 = convert(src, mid, to=b, from_=a, fmt=fmt)
    r2 = convert(mid, back, to=a, from_=b, fmt=fmt)
    assert r1.plan.read.layout.name == a and r2.plan.read.layout.name == b

    original, returned = read_all(src), read_all(back)
    expected = _expected_keys_after(original, a, b, tmp_path, fmt)
    assert set(returned) == expected
    for k in expected:
        assert returned[k].dtype == original[k].dtype, k
        assert torch.equal(returned[k], original[k]), k
    # what B could not hold is said, not silently lost
    lost = _omitted(b) & set(canon)
    for name in lost:
        assert any(name in n for n in r1.plan.notes), (name, r1.plan.notes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_detection_finds_each_layout(tmp_path, layout):
    canon = {k: v for k, v in distinct_canonical().items() if k not in _omitted(layout)}
    src = write_layout(canon, _path(tmp_path, "src", layout, "safetensors"), layout)
    r = convert(src, _path(tmp_path, "out", "openai", "safetensors"), to="openai")
    # a flat OpenAI-named file reads identically as openai and open_clip; either is right
    expected = {"openai", "open_clip"} if layout in ("openai", "open_clip") else {layout}
    assert r.plan.read.layout.name in expected


def test_canonical_values_survive_every_layout(tmp_path):
    """Reading any layout gives the same canonical tensors it was written from."""
    from sdconv.converters.containers import open_source
    from sdconv.converters.plan import plan_read
    canon = distinct_canonical()
    for layout in LAYOUTS:
        rl = DEFAULT.layout(layout)
        slot = next(iter(rl.layout.slots.values()))
        want = {k: v for k, v in canon.items() if k not in slot.omit}
        src = open_source(write_layout(want, _path(tmp_path, layout, layout, "safetensors"), layout))
        rp = plan_read(src, rl, slot)
        from sdconv.converters.transforms import TRANSFORMS
        got = {}
        for op in rp.ops:
            for c, t in zip(op.canonical, TRANSFORMS[op.transform].read([src.load(k) for k in op.keys])):
                got[c] = t
        assert set(got) == set(want), layout
        for k in want:
            assert torch.equal(got[k], want[k]), (layout, k)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_casts_floats_only(tmp_path, dtype, torch_dtype):
    canon = {k: v for k, v in distinct_canonical().items() if k not in _omitted("ldm")}
    src = write_layout(canon, tmp_path / "src.safetensors", "openai")
    out = tmp_path / "out.safetensors"
    convert(src, out, to="ldm", dtype=dtype)
    t = read_all(out)
    ids = [k for k in t if k.endswith("position_ids")]
    assert len(ids) == 1 and t[ids[0]].dtype == torch.int64
    assert torch.equal(t[ids[0]], torch.arange(77).reshape(1, 77))
    assert all(v.dtype == torch_dtype for k, v in t.items() if k not in ids)

"""Each transform of the closed vocabulary (sdconv.converters.transforms), on tiny tensors whose
values are all distinct and exact in every dtype tried: reading then writing (its inverse) gives
back the input bit for bit and in its dtype, writing then reading too; the shape functions agree
with the tensors the transforms make and refuse the shapes a transform cannot take. In the manner
of transformers v5's tests/utils/test_core_model_loading.py (each op, and its reverse op)."""
import pytest
import torch

from sdconv.converters.stream import RowConcat
from sdconv.converters.transforms import SYNTHESIZERS, TRANSFORMS, synthesize, synthesized_code

# small enough (at most 16 values, 0..15) to be exact in float8_e4m3fn and bfloat16 too
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]

# per transform: layout-side shapes that read takes, and the canonical shapes that write takes
LAYOUT_SHAPES = {
    "rename": [[(3, 4)], [(5,)], [()]],
    "transpose": [[(3, 4)], [(4, 4)]],
    "split_qkv": [[(6, 2)], [(6,)], [(3, 2, 2)]],
    "scalar": [[()]],              # [1] is read as [] and written as []: test_scalar_takes_0d_and_1
}
CANONICAL_SHAPES = {
    "rename": [[(3, 4)], [()]],
    "transpose": [[(4, 3)], [(4, 4)]],
    "split_qkv": [[(2, 2)] * 3, [(2,)] * 3],
    "scalar": [[()]],
}


def distinct(shapes, dtype):
    """Tensors of `shapes` holding 0, 1, 2, ... across all of them: every value distinct."""
    out, start = [], 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        out.append(torch.arange(start, start + n, dtype=torch.float32).reshape(s).to(dtype))
        start += n
    flat = [v for t in out for v in t.float().reshape(-1).tolist()]
    assert len(set(flat)) == len(flat), "values must be distinct, or a mix-up could pass unseen"
    return out


def same(a, b) -> bool:
    """Bit for bit: dtype, shape and bytes (torch.equal has no float8 kernel)."""
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def materialize(ts):
    """What a writer stores for each written item: a RowConcat joined, a tensor as it is."""
    return [t.joined() if isinstance(t, RowConcat) else t for t in ts]


def _cases(table):
    return [pytest.param(name, shapes, id=f"{name}-{'x'.join(map(str, shapes[0])) or 'scalar'}-{len(shapes)}")
            for name, rows in table.items() for shapes in rows]


def test_every_transform_has_cases():
    """A transform added to the vocabulary must be added here too."""
    assert set(TRANSFORMS) == set(LAYOUT_SHAPES) == set(CANONICAL_SHAPES)
    for name, t in TRANSFORMS.items():
        assert t.name == name and t.n_keys >= 1 and t.n_canonical >= 1 and t.describe


def test_the_comparison_sees_a_changed_value_dtype_or_shape():
    """Negative control for `same`: one changed value, another dtype or another shape is seen."""
    (x,) = distinct([(3, 4)], torch.float16)
    assert same(x, x.clone())
    y = x.clone()
    y[2, 3] = -1
    assert not same(x, y)
    assert not same(x, x.to(torch.bfloat16)) and not same(x, x.float())
    assert not same(x, x.reshape(4, 3)) and not same(torch.tensor(2.0), torch.tensor([2.0]))
    assert not same(torch.tensor(0.0), torch.tensor(-0.0))       # equal as numbers, not as bits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, shapes", _cases(LAYOUT_SHAPES))
def test_read_then_write_gives_back_the_input(name, shapes, dtype):
    t = TRANSFORMS[name]
    x = distinct(shapes, dtype)
    assert len(x) == t.n_keys
    canon = t.read(x)
    assert len(canon) == t.n_canonical and all(c.dtype == dtype for c in canon)
    back = materialize(t.write(canon))
    assert len(back) == t.n_keys
    assert all(same(a, b) for a, b in zip(back, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, shapes", _cases(CANONICAL_SHAPES))
def test_write_then_read_gives_back_the_canonical(name, shapes, dtype):
    t = TRANSFORMS[name]
    canon = distinct(shapes, dtype)
    assert len(canon) == t.n_canonical
    written = materialize(t.write(canon))
    assert len(written) == t.n_keys and all(w.dtype == dtype for w in written)
    back = t.read(written)
    assert len(back) == t.n_canonical
    assert all(same(a, b) for a, b in zip(back, canon))


@pytest.mark.parametrize("name, shapes", _cases(LAYOUT_SHAPES))
def test_read_shape_agrees_with_read(name, shapes):
    t = TRANSFORMS[name]
    x = distinct(shapes, torch.float32)
    assert t.read_shape([tuple(s) for s in shapes]) == [tuple(c.shape) for c in t.read(x)]


@pytest.mark.parametrize("name, shapes", _cases(CANONICAL_SHAPES))
def test_write_shape_agrees_with_write(name, shapes):
    t = TRANSFORMS[name]
    canon = distinct(shapes, torch.float32)
    written = t.write(canon)            # a RowConcat states its shape before it is joined
    assert t.write_shape([tuple(s) for s in shapes]) == [tuple(w.shape) for w in written]
    assert [tuple(w.shape) for w in materialize(written)] == [tuple(w.shape) for w in written]


@pytest.mark.parametrize("name, direction, shapes", [
    ("transpose", "read", [(5,)]),
    ("transpose", "read", [()]),
    ("transpose", "read", [(2, 3, 4)]),
    ("transpose", "write", [(5,)]),
    ("transpose", "write", [(2, 3, 4)]),
    ("split_qkv", "read", [()]),
    ("split_qkv", "read", [(4,)]),
    ("split_qkv", "read", [(5, 2)]),
    ("split_qkv", "write", [(2, 2), (2, 3), (2, 2)]),
    ("split_qkv", "write", [(2, 2), (2, 2), (3, 2)]),
    ("split_qkv", "write", [(), (), ()]),
    ("scalar", "read", [(2,)]),
    ("scalar", "read", [(1, 1)]),
])
def test_shapes_a_transform_cannot_take_give_none(name, direction, shapes):
    t = TRANSFORMS[name]
    fn = t.read_shape if direction == "read" else t.write_shape
    assert fn(shapes) is None
    # control: rename takes any shape, so None above is the transform's refusal, not the input's
    assert TRANSFORMS["rename"].read_shape(shapes) == shapes


def test_transpose_swaps_rows_and_columns():
    x = torch.arange(12.0).reshape(3, 4)
    (y,) = TRANSFORMS["transpose"].read([x])
    assert y.tolist() == [[0.0, 4.0, 8.0], [1.0, 5.0, 9.0], [2.0, 6.0, 10.0], [3.0, 7.0, 11.0]]
    assert y.is_contiguous()
    (sq,) = TRANSFORMS["transpose"].read([torch.arange(16.0).reshape(4, 4)])
    assert not same(sq, torch.arange(16.0).reshape(4, 4))       # a square input really is turned


def test_split_qkv_splits_rows_in_q_k_v_order():
    x = torch.arange(12.0).reshape(6, 2)
    q, k, v = TRANSFORMS["split_qkv"].read([x])
    assert q.tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert k.tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert v.tolist() == [[8.0, 9.0], [10.0, 11.0]]
    qb, kb, vb = TRANSFORMS["split_qkv"].read([torch.arange(6.0)])
    assert (qb.tolist(), kb.tolist(), vb.tolist()) == ([0.0, 1.0], [2.0, 3.0], [4.0, 5.0])


def test_split_qkv_write_is_a_row_concat_of_the_parts():
    q, k, v = distinct([(2, 3)] * 3, torch.float16)
    (rc,) = TRANSFORMS["split_qkv"].write([q, k, v])
    assert isinstance(rc, RowConcat)
    assert rc.parts[0] is q and rc.parts[1] is k and rc.parts[2] is v      # kept apart, not joined
    assert rc.shape == (6, 3) and rc.dtype == torch.float16
    assert same(rc.joined(), torch.cat([q, k, v]))
    assert not same(rc.joined(), torch.cat([k, q, v]))                    # control: order matters


def test_scalar_takes_0d_and_1():
    t = TRANSFORMS["scalar"]
    assert t.read_shape([()]) == [()] and t.read_shape([(1,)]) == [()]
    for x in (torch.tensor(4.6052, dtype=torch.bfloat16), torch.tensor([4.6052], dtype=torch.bfloat16)):
        (y,) = t.read([x])
        assert same(y, torch.tensor(4.6052, dtype=torch.bfloat16))
        # [1] comes back as the canonical [] (same value, same dtype): write keeps what it is given
        (w,) = t.write([y])
        assert same(w, y)


def test_synthesize_arange():
    p = synthesize("arange", (1, 77))
    assert p.dtype == torch.int64 and tuple(p.shape) == (1, 77)
    assert p.reshape(-1).tolist() == list(range(77))
    assert torch.equal(synthesize("arange", [5]), torch.arange(5))
    assert set(SYNTHESIZERS) == {"arange"} and synthesized_code("arange") == "I64"     # what headers state
    with pytest.raises(KeyError):
        synthesize("zeros", (1, 77))

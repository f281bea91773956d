"""Planning (sdconv.converters.plan) on tiny encoders in the built-in layouts: what plan_read makes
of a file's keys (ops, canonical shapes, layer count), the architecture infer_arch binds from
those shapes and the inputs it refuses, the keys plan_write gives and in what order, and the notes
for what a target cannot hold. No tensor data is read by any of these."""
import pytest
import torch
from safetensors.torch import save_file

# open_source: the opener the other tests use, through fixtures (which imports it from sdconv)
from tests.helpers.fixtures import distinct_canonical, holdable, open_source, read_all, write_layout
from sdconv import InputError, LayoutError, UsageError
from sdconv.converters.arch import absent_last_blocks, count_layers, identify, infer_arch, resolve_params
from sdconv.converters.plan import ReadOp, ReadPlan, WriteOp, plan_read, plan_write
from sdconv.converters.registry import DEFAULT

LAYERS = 3          # three blocks, so that block order and a missing middle block can show
SD1 = "cond_stage_model.transformer."
FAMILY = DEFAULT.family("clip_text")


def canonical(**kw):
    return distinct_canonical(vocab=1000, layers=LAYERS, **kw)


def shapes_of(tensors: dict) -> dict:
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory):
    """An SD1.x (ldm) checkpoint's text encoder, and the canonical tensors written into it."""
    slot = DEFAULT.layout("ldm").layout.slots["clip_l"]
    canon = holdable(canonical(), slot)
    path = write_layout(canon, tmp_path_factory.mktemp("plan") / "sd1.safetensors", "ldm")
    return path, canon


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory):
    """An OpenAI CLIP text tower (fused q|k|v, projection [in, out], logit_scale)."""
    canon = canonical()
    return write_layout(canon, tmp_path_factory.mktemp("plan") / "openai.safetensors", "openai"), canon


def read_plan(path, layout, slot) -> ReadPlan:
    rl = DEFAULT.layout(layout)
    return plan_read(open_source(path), rl, rl.layout.slots[slot])


def rewritten(path, tmp_path, edit) -> object:
    """The file's tensors, changed by `edit(dict)`, saved with safetensors alone."""
    tensors = read_all(path)
    edit(tensors)
    out = tmp_path / f"edited-{path.name}"
    save_file(tensors, str(out), {"format": "pt"})
    return out


# ---------------------------------------------------------------- plan_read

def test_plan_read_ldm_ops_shapes_and_layers(ldm_file):
    path, canon = ldm_file
    rp = read_plan(path, "ldm", "clip_l")
    assert rp.layers == LAYERS and rp.prefix == SD1 and rp.folder == ""
    assert rp.shapes == shapes_of(canon)                     # every canonical tensor, with its shape
    assert set(rp.dtypes.values()) == {"F32"}
    assert len(rp.ops) == 2 + 16 * LAYERS + 2 and all(isinstance(op, ReadOp) for op in rp.ops)
    assert {op.transform for op in rp.ops} == {"rename"}     # transformers names: nothing fused
    assert sorted(c for op in rp.ops for c in op.canonical) == sorted(canon)
    op = rp.op_for("blk.1.attn_q.weight")
    assert op.keys == (SD1 + "text_model.encoder.layers.1.self_attn.q_proj.weight",)
    assert op.layout_keys == ("text_model.encoder.layers.1.self_attn.q_proj.weight",)
    assert rp.op_for("blk.2.ffn_down.bias").keys == (SD1 + "text_model.encoder.layers.2.mlp.fc2.bias",)
    assert rp.bytes_to_read == 4 * sum(v.numel() for v in canon.values())
    # the position_ids buffer is not read but noted, and SD1 has no projection to read
    assert rp.buffers == {"position_ids": SD1 + "text_model.embeddings.position_ids"}
    assert any(n.startswith("dropped buffer") for n in rp.notes)
    assert "text_proj.weight" not in rp.shapes and "logit_scale" not in rp.shapes


def test_plan_read_openai_splits_qkv_and_transposes_the_projection(openai_file):
    path, canon = openai_file
    rp = read_plan(path, "openai", "clip")
    assert rp.layers == LAYERS and rp.prefix == ""
    assert rp.shapes == shapes_of(canon)
    qkv = rp.op_for("blk.2.attn_k.weight")
    assert qkv.keys == ("transformer.resblocks.2.attn.in_proj_weight",) and qkv.transform == "split_qkv"
    assert qkv.canonical == ("blk.2.attn_q.weight", "blk.2.attn_k.weight", "blk.2.attn_v.weight")
    assert rp.op_for("blk.0.attn_v.bias").canonical == ("blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias")
    assert rp.op_for("text_proj.weight").transform == "transpose"
    assert rp.op_for("logit_scale").transform == "scalar" and rp.shapes["logit_scale"] == ()
    assert len(rp.ops) == 2 + 12 * LAYERS + 4               # 12 keys a block (16 tensors: q|k|v fused)


def test_a_missing_middle_layer_is_an_input_error(ldm_file, tmp_path):
    path, _ = ldm_file
    gap = rewritten(path, tmp_path, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k])
    with pytest.raises(InputError, match=r"layers are not contiguous \(missing layer 1 of 0\.\.2\)"):
        read_plan(gap, "ldm", "clip_l")


def test_a_missing_last_layer_is_a_shorter_encoder(ldm_file, tmp_path):
    """Control for the test above: without a gap, one block fewer is a valid 2-block encoder."""
    path, _ = ldm_file
    short = rewritten(path, tmp_path, lambda t: [t.pop(k) for k in list(t) if ".layers.2." in k])
    rp = read_plan(short, "ldm", "clip_l")
    assert rp.layers == LAYERS - 1 and not any(k.startswith("blk.2.") for k in rp.shapes)


def test_one_missing_tensor_in_a_layer_is_a_layout_error(ldm_file, tmp_path):
    path, _ = ldm_file
    key = SD1 + "text_model.encoder.layers.1.mlp.fc1.weight"
    holed = rewritten(path, tmp_path, lambda t: t.pop(key))
    with pytest.raises(LayoutError, match="missing " + key.replace(".", r"\.")):
        read_plan(holed, "ldm", "clip_l")


# ---------------------------------------------------------------- architecture

def test_infer_arch_binds_every_symbol(ldm_file, openai_file):
    rp = read_plan(ldm_file[0], "ldm", "clip_l")
    assert count_layers(FAMILY, rp.shapes) == LAYERS
    assert infer_arch(FAMILY, rp.shapes, rp.layers) == {
        "layers": 3, "vocab": 1000, "context": 77, "width": 128, "ffn": 512, "proj": None}
    rp = read_plan(openai_file[0], "openai", "clip")
    assert infer_arch(FAMILY, rp.shapes, rp.layers)["proj"] == 128


def test_infer_arch_of_another_width():
    """Control: the symbols come from the shapes, not from defaults (width 64, ffn 256)."""
    shapes = shapes_of(distinct_canonical(vocab=500, layers=2, width=64))
    assert count_layers(FAMILY, shapes) == 2
    assert infer_arch(FAMILY, shapes, 2) == {"layers": 2, "vocab": 500, "context": 77, "width": 64, "ffn": 256,
                                             "proj": 64}


def test_inconsistent_widths_are_an_input_error(ldm_file, tmp_path):
    shapes = shapes_of(ldm_file[1])
    infer_arch(FAMILY, shapes, LAYERS)                      # control: as written, it is consistent
    with pytest.raises(InputError, match=r"blk\.1\.ffn_norm\.bias has shape \[127\]: width = 127, but "
                                         r"tok_embd\.weight says width = 128"):
        infer_arch(FAMILY, {**shapes, "blk.1.ffn_norm.bias": (127,)}, LAYERS)
    # the same from a file: plan_read takes the shapes as they are, infer_arch refuses them
    path = rewritten(ldm_file[0], tmp_path, lambda t: t.update(
        {SD1 + "text_model.final_layer_norm.weight": torch.ones(127)}))
    rp = read_plan(path, "ldm", "clip_l")
    assert rp.shapes["final_norm.weight"] == (127,)
    with pytest.raises(InputError, match="final_norm.weight has shape"):
        infer_arch(FAMILY, rp.shapes, rp.layers)


@pytest.mark.parametrize("name, shape, says", [
    ("blk.0.attn_q.weight", (128,), "has 1 dimensions"),
    ("logit_scale", (2,), "has 1 dimensions"),
    ("pos_embd.weight", (77, 128, 1), "has 3 dimensions"),
])
def test_wrong_number_of_dimensions_is_an_input_error(ldm_file, name, shape, says):
    with pytest.raises(InputError, match=says):
        infer_arch(FAMILY, {**shapes_of(ldm_file[1]), name: shape}, LAYERS)


def test_identify_and_params():
    slot = DEFAULT.layout("openai").layout.slots["clip"]
    assert identify(FAMILY, slot, {"width": 768}, {}, {}) == ("clip_l", "width 768")
    assert identify(FAMILY, slot, {"width": 128}, {}, {}) == ("clip", "no known kind has this width")
    assert identify(FAMILY, slot, {"width": 128}, {"encoder": "clip_g"}, {}) == ("clip_g", "--param")
    with pytest.raises(UsageError, match="unknown encoder 'clip_x'"):
        identify(FAMILY, slot, {"width": 128}, {"encoder": "clip_x"}, {})
    params, origin = resolve_params(FAMILY, slot, {"width": 128}, {}, {}, "config", "clip")
    assert params == {"heads": 2, "act": "quick_gelu"} and origin["act"] == "layout default"
    params, _ = resolve_params(FAMILY, slot, {"width": 1280}, {}, {}, "config", "clip_g")
    assert params["heads"] == 20
    with pytest.raises(UsageError, match="heads = 3 does not divide width 128"):
        resolve_params(FAMILY, slot, {"width": 128}, {"heads": 3}, {}, "config", "clip")


def test_absent_last_blocks():
    ldm_h = DEFAULT.layout("ldm").layout.slots["clip_h"]
    n, notes = absent_last_blocks(FAMILY, "clip_h", {"width": 1024, "layers": 23}, ldm_h)
    assert n == 1 and "has 24 blocks; this encoder has 23" in notes[0]
    assert absent_last_blocks(FAMILY, "clip_h", {"width": 1024, "layers": 24}, ldm_h) == (0, [])
    diffusers_h = DEFAULT.layout("diffusers").layout.slots["clip_h"]
    assert absent_last_blocks(FAMILY, "clip_h", {"width": 1024, "layers": 24}, diffusers_h) == (1, [])


# ---------------------------------------------------------------- plan_write

OPENAI_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias"]


def test_plan_write_order_embeddings_blocks_final_norm():
    rl = DEFAULT.layout("openai")
    shapes = shapes_of(canonical())
    ops, buffers, notes, layers = plan_write(rl, rl.layout.slots["clip"], shapes, LAYERS, "test")
    keys = [op.keys[0] for op in ops]
    want = (["token_embedding.weight", "positional_embedding"]
            + [f"transformer.resblocks.{i}.{k}" for i in range(LAYERS) for k in OPENAI_BLOCK]
            + ["ln_final.weight", "ln_final.bias", "text_projection", "logit_scale"])
    assert keys == want
    assert keys != sorted(keys) and len(set(keys)) == len(keys)   # an order of its own, each key once
    assert (buffers, notes, layers) == ([], [], LAYERS)
    by_key = {op.keys[0]: op for op in ops}
    fused = by_key["transformer.resblocks.1.attn.in_proj_weight"]
    assert isinstance(fused, WriteOp) and fused.transform == "split_qkv" and fused.shapes == ((384, 128),)
    assert fused.canonical == ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight")
    assert by_key["text_projection"].transform == "transpose" and by_key["logit_scale"].shapes == ((),)


def test_plan_write_prefixes_and_buffers():
    rl = DEFAULT.layout("ldm")
    slot = rl.layout.slots["clip_l"]
    ops, buffers, notes, layers = plan_write(rl, slot, shapes_of(holdable(canonical(), slot)), LAYERS, "test")
    assert all(op.keys[0].startswith(SD1 + "text_model.") for op in ops)
    assert ops[0].keys == (SD1 + "text_model.embeddings.token_embedding.weight",)
    assert ops[-1].keys == (SD1 + "text_model.final_layer_norm.bias",)
    assert [(b.name, b.key, b.shape, b.synthesize) for b in buffers] == [
        ("position_ids", SD1 + "text_model.embeddings.position_ids", (1, "context"), "arange")]
    assert notes == [] and layers == LAYERS


def test_what_a_slot_omits_is_dropped_with_a_note():
    rl = DEFAULT.layout("ldm")
    slot = rl.layout.slots["clip_l"]
    ops, _, notes, _ = plan_write(rl, slot, shapes_of(canonical()), LAYERS, "test")
    assert [n for n in notes if n.startswith("dropped")] == [
        "dropped: text_proj.weight (ldm clip_l cannot hold it)", "dropped: logit_scale (ldm clip_l cannot hold it)"]
    assert not any({"text_proj.weight", "logit_scale"} & set(op.canonical) for op in ops)
    # controls: without those tensors nothing is dropped; a slot that holds them writes them
    assert plan_write(rl, slot, shapes_of(holdable(canonical(), slot)), LAYERS, "test")[2] == []
    ro = DEFAULT.layout("openai")
    ops, _, notes, _ = plan_write(ro, ro.layout.slots["clip"], shapes_of(canonical()), LAYERS, "test")
    assert not any(n.startswith("dropped") for n in notes)
    assert {"text_proj.weight", "logit_scale"} <= {c for op in ops for c in op.canonical}


def test_a_lossy_slot_drops_its_last_blocks_once():
    rl = DEFAULT.layout("diffusers")
    slot = rl.layout.slots["clip_h"]                          # keeps all but the last block (SD2)
    shapes = shapes_of(holdable(canonical(), slot))
    ops, _, notes, layers = plan_write(rl, slot, shapes, LAYERS, "test")
    assert layers == LAYERS - 1 and notes[0].startswith("dropped block 2 of 0..2: diffusers stores 2")
    assert not any(".layers.2." in op.keys[0] for op in ops) and any(".layers.1." in op.keys[0] for op in ops)
    ops, _, notes, layers = plan_write(rl, slot, shapes, LAYERS, "test", absent_last=1)
    assert layers == LAYERS and notes[0].startswith("kept all 3 blocks")
    assert any(".layers.2." in op.keys[0] for op in ops)


def test_plan_write_refuses_half_a_fused_group():
    rl = DEFAULT.layout("openai")
    shapes = shapes_of(canonical())
    del shapes["blk.1.attn_k.weight"]
    with pytest.raises(InputError, match="has blk.1.attn_q.weight but not blk.1.attn_k.weight"):
        plan_write(rl, rl.layout.slots["clip"], shapes, LAYERS, "test")

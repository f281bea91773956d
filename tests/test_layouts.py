"""Variants each layout must read: older spellings, nesting, folders given directly."""
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.fixtures import distinct_canonical, read_all, write_layout
from sdconv import InputError, LayoutError, convert, make_plan


def _canon_reference(tmp_path, layout="open_clip"):
    return read_all(write_layout(distinct_canonical(), tmp_path / "ref.safetensors", layout))


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ldm_nai_keys_without_text_model(tmp_path):
    canon = {k: v for k, v in distinct_canonical().items() if k not in ("text_proj.weight", "logit_scale")}
    sd = read_all(write_layout(canon, tmp_path / "a.safetensors", "ldm"))
    nai = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()}
    save_file(nai, str(tmp_path / "nai.safetensors"))
    convert(tmp_path / "nai.safetensors", tmp_path / "o.safetensors", to="ldm")
    _same(read_all(tmp_path / "o.safetensors"), sd)


def test_two_spellings_of_one_tensor_is_an_error(tmp_path):
    canon = {k: v for k, v in distinct_canonical().items() if k not in ("text_proj.weight", "logit_scale")}
    sd = read_all(write_layout(canon, tmp_path / "a.safetensors", "ldm"))
    k = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    sd[k.replace("text_model.", "")] = sd[k].clone()
    save_file(sd, str(tmp_path / "both.safetensors"))
    with pytest.raises(InputError, match="two spellings"):
        make_plan(tmp_path / "both.safetensors", to="openai", from_="ldm")


def test_missing_middle_layer(tmp_path):
    canon = {k: v for k, v in distinct_canonical(layers=3).items()}
    sd = read_all(write_layout(canon, tmp_path / "a.safetensors", "openai"))
    sd = {k: v for k, v in sd.items() if ".resblocks.1." not in k}
    save_file(sd, str(tmp_path / "gap.safetensors"))
    with pytest.raises(InputError, match="missing layer 1"):
        make_plan(tmp_path / "gap.safetensors", to="hf", from_="openai")


def test_missing_tensor_in_a_layer_names_the_key(tmp_path):
    sd = read_all(write_layout(distinct_canonical(), tmp_path / "a.safetensors", "openai"))
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    save_file(sd, str(tmp_path / "hole.safetensors"))
    with pytest.raises(LayoutError, match=r"missing transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        make_plan(tmp_path / "hole.safetensors", to="hf", from_="openai")


def test_inconsistent_widths(tmp_path):
    sd = read_all(write_layout(distinct_canonical(), tmp_path / "a.safetensors", "openai"))
    sd["transformer.resblocks.1.ln_2.weight"] = torch.zeros(64)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(InputError, match="width = 64"):
        make_plan(tmp_path / "mixed.safetensors", to="hf", from_="openai")


def test_open_clip_custom_text_prefix(tmp_path):
    sd = _canon_reference(tmp_path)
    custom = {("text." + k if k != "logit_scale" else k): v for k, v in sd.items()}
    custom["visual.proj"] = torch.zeros(3, 3)
    save_file(custom, str(tmp_path / "custom.safetensors"))
    plan = make_plan(tmp_path / "custom.safetensors", to="open_clip")
    assert plan.read.layout.name == "open_clip"
    convert(tmp_path / "custom.safetensors", tmp_path / "flat.safetensors", to="open_clip")
    _same(read_all(tmp_path / "flat.safetensors"), sd)


def test_hf_unprefixed_v5_save(tmp_path):
    canon = {k: v for k, v in distinct_canonical().items() if k != "logit_scale"}
    sd = read_all(write_layout(canon, tmp_path / "h", "hf"))
    flat = {k.replace("text_model.", "", 1): v for k, v in sd.items()}
    (tmp_path / "v5").mkdir()
    save_file(flat, str(tmp_path / "v5" / "model.safetensors"))
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "h" / "config.json").read_text())
    convert(tmp_path / "v5", tmp_path / "back", to="hf")
    _same(read_all(tmp_path / "back"), sd)


def test_hf_clipmodel_file_drops_vision_and_says_logit_scale(tmp_path):
    canon = distinct_canonical()
    sd = read_all(write_layout({k: v for k, v in canon.items() if k != "logit_scale"}, tmp_path / "h", "hf"))
    sd["logit_scale"] = torch.tensor(4.6)
    sd["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 4, 4)
    sd["visual_projection.weight"] = torch.zeros(128, 8)
    save_file(sd, str(tmp_path / "clipmodel.safetensors"))
    plan = make_plan(tmp_path / "clipmodel.safetensors", to="openai", from_="hf")
    assert any("logit_scale" in n for n in plan.read.notes)


def test_diffusers_component_folder_given_directly(tmp_path):
    canon = {k: v for k, v in distinct_canonical().items() if k != "logit_scale"}
    write_layout(canon, tmp_path / "pipe", "diffusers")
    plan = make_plan(tmp_path / "pipe" / "text_encoder", to="openai", from_="diffusers")
    assert plan.read.layout.name == "diffusers" and len(plan.ops) > 0


def test_config_gives_heads_and_act(tmp_path):
    canon = {k: v for k, v in distinct_canonical().items() if k != "logit_scale"}
    write_layout(canon, tmp_path / "h", "hf", params={"heads": 4, "act": "gelu"})
    plan = make_plan(tmp_path / "h", to="openai")
    assert plan.params == {"heads": 4, "act": "gelu"}
    assert plan.param_origin["act"] == "config.json"
    plan = make_plan(tmp_path / "h", to="openai", params={"act": "quick_gelu"})
    assert plan.params["act"] == "quick_gelu" and plan.param_origin["act"] == "--param"


def test_own_metadata_carries_params_through_single_files(tmp_path):
    src = write_layout(distinct_canonical(), tmp_path / "a.safetensors", "openai", params={"heads": 4, "act": "gelu"})
    convert(src, tmp_path / "b.safetensors", to="open_clip")
    plan = make_plan(tmp_path / "b.safetensors", to="hf")
    assert plan.params == {"heads": 4, "act": "gelu"} and plan.param_origin["act"] == "input metadata"


def test_unknown_key_under_prefix_is_an_error(tmp_path):
    sd = read_all(write_layout(distinct_canonical(), tmp_path / "a.safetensors", "openai"))
    sd["text_projection.bias"] = torch.zeros(128)      # open_clip proj_bias models: not supported yet
    save_file(sd, str(tmp_path / "pb.safetensors"))
    with pytest.raises(LayoutError, match="text_projection.bias"):
        make_plan(tmp_path / "pb.safetensors", to="hf", from_="open_clip")


# ---------------------------------------------------------------- several encoders

def _xl(tmp_path, name="xl.safetensors"):
    from tests.helpers.fixtures import write_multi
    return write_multi(tmp_path / name, "sgm", {"clip_l": distinct_canonical(vocab=1000),
                                                             "clip_g": distinct_canonical(vocab=1000, seed=1)},
                       {"model.diffusion_model.x": torch.zeros(4)})


def test_several_encoders_need_a_choice(tmp_path):
    from sdconv import UsageError
    with pytest.raises(UsageError, match="holds 2 encoders: clip_l, clip_g") as e:
        make_plan(_xl(tmp_path), to="openai")
    assert "--encoder" in str(e.value)
    with pytest.raises(UsageError, match="holds no clip_h encoder; it holds clip_l, clip_g"):
        make_plan(_xl(tmp_path), to="openai", encoder="clip_h")


def test_encoder_all_into_single_encoder_layout_splits(tmp_path):
    src = _xl(tmp_path)
    r = convert(src, tmp_path / "out.safetensors", to="openai", encoder="all")
    assert [p.name for p in r.outputs] == ["out.clip_l.safetensors", "out.clip_g.safetensors"]
    g = read_all(tmp_path / "out.clip_g.safetensors")
    assert "text_projection" in g and "text_projection" not in read_all(tmp_path / "out.clip_l.safetensors")
    r = convert(src, tmp_path / "te", to="hf", encoder="all")
    assert [p.name for p in r.outputs] == ["te.clip_l", "te.clip_g"]


def test_encoder_all_into_multi_encoder_layout_is_one_output(tmp_path):
    import json
    r = convert(_xl(tmp_path), tmp_path / "pipe", to="diffusers", encoder="all")
    assert r.outputs == [tmp_path / "pipe"]
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["sdconv.json", "text_encoder", "text_encoder_2"]
    cfg2 = json.loads((tmp_path / "pipe" / "text_encoder_2" / "config.json").read_text())
    assert cfg2["architectures"] == ["CLIPTextModelWithProjection"] and cfg2["hidden_act"] == "gelu"
    back = convert(tmp_path / "pipe", tmp_path / "xl2.safetensors", to="sgm", encoder="all")
    assert {e.identity for e in back.plan.encoders} == {"clip_l", "clip_g"}
    a, b = read_all(tmp_path / "xl.safetensors"), read_all(tmp_path / "xl2.safetensors")
    a.pop("model.diffusion_model.x")
    a.pop("conditioner.embedders.1.model.logit_scale")      # diffusers cannot hold it (and said so)
    assert any("logit_scale" in n for n in r.plan.notes)
    _same(a, b)


def test_target_without_a_place_for_the_kind(tmp_path):
    from sdconv import UsageError
    from tests.helpers.fixtures import write_multi
    sd2 = write_multi(tmp_path / "sd2.safetensors", "ldm", {"clip_h": distinct_canonical(vocab=1000)})
    with pytest.raises(UsageError, match="sd3 has no place for a clip_h encoder"):
        make_plan(sd2, to="sd3")


def test_sd2_into_diffusers_is_lossy_and_says_so(tmp_path):
    import json

    from safetensors import safe_open
    from tests.helpers.fixtures import write_multi
    sd2 = write_multi(tmp_path / "sd2.safetensors", "ldm", {"clip_h": distinct_canonical(vocab=1000, layers=3)})
    r = convert(sd2, tmp_path / "pipe", to="diffusers")
    notes = " ".join(r.plan.notes)
    assert "dropped block 2 of 0..2" in notes and "penultimate" in notes
    assert "text_proj.weight" in notes and "logit_scale" in notes
    te = tmp_path / "pipe" / "text_encoder"
    assert json.loads((te / "config.json").read_text())["num_hidden_layers"] == 2
    with safe_open(str(te / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert not any(".layers.2." in k or "text_projection" in k for k in f.keys())
    assert "dropped block 2" in meta["sdconv.notes"]
    assert json.loads(meta["sdconv.encoders"])["clip_h"]["absent_last_blocks"] == 1
    # and back: 2 blocks, the last one said to be absent, nothing made up
    back = convert(tmp_path / "pipe", tmp_path / "sd2b.safetensors", to="ldm", params={"encoder": "clip_h"})
    assert back.plan.encoders[0].layers_out == 2
    assert not any(k.endswith("text_projection") for k in read_all(tmp_path / "sd2b.safetensors"))

"""The mapping loader is strict and says where a file is wrong."""
import shutil

import pytest

from sdconv.errors import MappingError, UsageError
from tests.helpers.fixtures import ALL_LAYOUTS
from sdconv.converters.registry import BUILTIN_DIR, Registry

GOOD = (BUILTIN_DIR / "openai.yaml").read_text()


def _registry_with(tmp_path, name, text):
    d = tmp_path / "maps"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(text)
    return Registry((BUILTIN_DIR, d)), d / f"{name}.yaml"


def _line_of(text, needle):
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def test_builtin_layouts_all_load():
    reg = Registry()
    loaded = reg.all_layouts()
    assert [n for n, _ in loaded] == ALL_LAYOUTS
    assert all(not isinstance(rl, Exception) for _, rl in loaded)


def test_duplicate_key_names_file_and_line(tmp_path):
    text = GOOD.replace("name: openai", "name: mine") + "output: file\n"
    reg, path = _registry_with(tmp_path, "mine", text)
    with pytest.raises(MappingError) as e:
        reg.layout("mine")
    assert f"{path}:{len(text.splitlines())}" in str(e.value) and "duplicate key 'output'" in str(e.value)


def test_unknown_field_suggests_nearest(tmp_path):
    text = GOOD.replace("name: openai", "name: mine").replace("ignore:", "ignroe:")
    reg, path = _registry_with(tmp_path, "mine", text)
    with pytest.raises(MappingError) as e:
        reg.layout("mine")
    assert f"{path}:{_line_of(text, 'ignroe')}" in str(e.value)
    assert "unknown field 'ignroe'" in str(e.value) and "did you mean 'ignore'" in str(e.value)


def test_bad_template_in_naming(tmp_path):
    d = tmp_path / "maps"
    (d / "naming").mkdir(parents=True)
    text = (BUILTIN_DIR / "naming" / "openai.yaml").read_text().replace(
        "transformer.resblocks.<layer>.ln_1.weight", "transformer.resblocks.{layer}.ln_1.weight") + "overrides: true\n"
    (d / "naming" / "openai.yaml").write_text(text)
    reg = Registry((BUILTIN_DIR, d))
    with pytest.raises(MappingError) as e:
        reg.layout("openai")
    assert f"openai.yaml:{_line_of(text, '{layer}')}" in str(e.value) and "bad template" in str(e.value)


def test_unknown_transform_suggests(tmp_path):
    d = tmp_path / "maps"
    (d / "naming").mkdir(parents=True)
    text = (BUILTIN_DIR / "naming" / "openai.yaml").read_text().replace("transform: transpose",
                                                                        "transform: transpos") + "overrides: true\n"
    (d / "naming" / "openai.yaml").write_text(text)
    with pytest.raises(MappingError) as e:
        Registry((BUILTIN_DIR, d)).layout("open_clip")
    assert "unknown transform 'transpos'" in str(e.value) and "did you mean 'transpose'" in str(e.value)


def test_python_tags_are_refused(tmp_path):
    text = GOOD.replace("name: openai", "name: mine").replace("description: ", "description: !!python/object/apply:os.system ['true'] #")
    reg, path = _registry_with(tmp_path, "mine", text)
    with pytest.raises(MappingError) as e:
        reg.layout("mine")
    assert str(path) in str(e.value)


def test_name_must_match_file(tmp_path):
    reg, path = _registry_with(tmp_path, "other", GOOD)
    with pytest.raises(MappingError) as e:
        reg.layout("other")
    assert "differs from the file name" in str(e.value)


def test_broken_file_breaks_only_itself(tmp_path):
    reg, _ = _registry_with(tmp_path, "broken", "schema: 1\nkind: layout\nname: broken\n")
    result = dict(reg.all_layouts())
    assert isinstance(result["broken"], MappingError)
    assert not isinstance(result["openai"], Exception)


def test_unknown_layout_suggests_close_name():
    with pytest.raises(UsageError) as e:
        Registry().layout("opneai")
    assert "did you mean 'openai'" in str(e.value)


def test_missing_required_canonical(tmp_path):
    d = tmp_path / "maps"
    (d / "naming").mkdir(parents=True)
    text = "\n".join(ln for ln in (BUILTIN_DIR / "naming" / "hf.yaml").read_text().splitlines()
                     if "final_norm.bias" not in ln) + "\noverrides: true\n"
    (d / "naming" / "hf.yaml").write_text(text)
    with pytest.raises(MappingError) as e:
        Registry((BUILTIN_DIR, d)).layout("hf")
    assert "'final_norm.bias' is not mapped" in str(e.value)


def test_user_layout_from_yaml_only(tmp_path):
    """A new layout is a YAML file: here, an OpenAI-named encoder under a trainer's prefix."""
    from tests.helpers.fixtures import distinct_canonical, read_all, write_layout

    import torch
    from sdconv import convert
    text = """schema: 1
kind: layout
name: mytrainer
family: clip_text
description: a trainer that nests the text tower
output: file
encoders:
  clip:
    prefix: te.
    naming: openai
"""
    reg, _ = _registry_with(tmp_path, "mytrainer", text)
    canon = distinct_canonical()
    src = tmp_path / "a.safetensors"
    from sdconv.samples import write_canonical
    write_canonical(canon, src, "mytrainer", {"heads": 2, "act": "quick_gelu"}, registry=reg)
    assert all(k.startswith("te.") for k in read_all(src))
    out = tmp_path / "b.safetensors"
    convert(src, out, to="open_clip", registry=reg)
    ref = write_layout(canon, tmp_path / "ref.safetensors", "open_clip")
    a, b = read_all(out), read_all(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_every_mapping_file_is_package_data():
    """A wheel must ship every built-in mapping file (pyproject package-data globs)."""
    import fnmatch
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sdconv.mappings"]
    for p in BUILTIN_DIR.rglob("*.yaml"):
        rel = p.relative_to(BUILTIN_DIR).as_posix()
        assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel


def test_user_file_with_a_builtin_name_must_say_it_overrides(tmp_path):
    text = (BUILTIN_DIR / "openai.yaml").read_text().replace("description: ", "description: my ")
    reg, path = _registry_with(tmp_path, "openai", text)
    with pytest.raises(MappingError, match="is the name of a built-in") as e:
        reg.layout("openai")
    assert "overrides: true" in str(e.value)
    reg, _ = _registry_with(tmp_path, "openai", text + "overrides: true\n")
    assert reg.layout("openai").layout.description.startswith("my ")
    assert reg.origin("openai") == str(path)


def test_sdconv_mappings_env(tmp_path, monkeypatch):
    d = tmp_path / "maps"
    d.mkdir()
    (d / "mine.yaml").write_text(GOOD.replace("name: openai", "name: mine"))
    monkeypatch.setenv("SDCONV_MAPPINGS", str(d))
    reg = Registry.with_user_dirs()
    assert "mine" in reg.layout_names() and reg.origin("mine") == str(d / "mine.yaml")
    assert reg.origin("openai") == "built-in"
    monkeypatch.setenv("SDCONV_MAPPINGS", str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="does not exist"):
        Registry.with_user_dirs()


def test_user_layout_round_trips_with_every_builtin(tmp_path):
    """A layout from a temporary folder, A -> built-in B -> A, bitwise (less what B cannot hold)."""
    import torch

    from tests.helpers.fixtures import ALL_LAYOUTS, distinct_canonical, holdable, read_all, target_slot
    from sdconv import convert
    from sdconv.samples import write_canonical
    text = GOOD.replace("name: openai", "name: mytrainer").replace('prefix: ""', "prefix: model.text.") \
        .replace("description: OpenAI", "description: mytrainer").replace("ignore: [visual., input_resolution, "
                                                                          "context_length, vocab_size]", "")
    reg, _ = _registry_with(tmp_path, "mytrainer", text)
    assert reg.layout("mytrainer").layout.slots["clip"].prefix == "model.text."
    canon = distinct_canonical(vocab=1000, layers=3)
    params = {"heads": 2, "act": "quick_gelu", "encoder": "clip_l"}
    src = tmp_path / "src.safetensors"
    write_canonical(canon, src, "mytrainer", params, registry=reg)
    original = read_all(src)
    assert all(k.startswith("model.text.") for k in original)
    for b in ALL_LAYOUTS:
        folder = reg.layout(b).layout.output == "folder"
        mid = tmp_path / (f"mid-{b}" if folder else f"mid-{b}.safetensors")
        back = tmp_path / f"back-{b}.safetensors"
        convert(src, mid, to=b, from_="mytrainer", registry=reg, params={"encoder": "clip_l"})
        convert(mid, back, to="mytrainer", from_=b, registry=reg, params={"encoder": "clip_l"})
        kept = holdable(canon, target_slot(b, "clip_l"))
        ref = tmp_path / f"ref-{b}.safetensors"
        write_canonical(kept, ref, "mytrainer", params, registry=reg)
        want, got = read_all(ref), read_all(back)
        assert set(got) == set(want), b
        assert all(torch.equal(got[k], want[k]) for k in want), b


# ---------------------------------------------------------------- only what the engine serves

def _cli(*args):
    from click.testing import CliRunner

    from sdconv.cli import main
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _refused(code, text, *needles):
    """Exit 2, one line, no traceback, and the needles in it."""
    lines = [ln for ln in text.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdconv: error: "), text
    assert "Traceback" not in text
    for n in needles:
        assert n in lines[0], (n, text)


FOLDER_LAYOUT = """schema: 1
kind: layout
name: mine
family: clip_text
description: a folder of one encoder and its config
output: folder
folder_weights: {safetensors: model.safetensors, pt: pytorch_model.bin}
encoders:
  clip:
    prefix: ""
    naming: hf
    omit: [logit_scale]
    config: {file: config.json, format: hf_clip_text}
"""


@pytest.mark.parametrize("fmt", ["open_clip", "hf_clip"])
def test_a_whole_clip_config_format_on_an_encoder_slot_is_refused(tmp_path, fmt):
    """open_clip and hf_clip configs describe a whole CLIP (the engine writes them only with
    --with-vision): an encoder slot naming one is refused by every command that loads it,
    instead of crashing the engine when it reads or writes the config."""
    from sdconv.converters.configs import SLOT_FORMATS

    from tests.helpers.fixtures import distinct_canonical, write_layout
    text = FOLDER_LAYOUT.replace("format: hf_clip_text", f"format: {fmt}")
    _, path = _registry_with(tmp_path, "mine", text)
    maps = path.parent
    where = f"{path}:{_line_of(text, 'format:')}: config format {fmt!r}"
    _refused(*_cli("layouts", "check", path), where, *SLOT_FORMATS)
    src = write_layout(distinct_canonical(), tmp_path / "sd1.safetensors", "ldm")
    _refused(*_cli("--mappings", maps, "convert", src, "-o", tmp_path / "out", "--to", "mine"), where)
    assert not (tmp_path / "out").exists()
    _refused(*_cli("--mappings", maps, "inspect", src, "--from", "mine"), where)
    code, listing = _cli("--mappings", maps, "layouts")              # flagged; the others still listed
    assert code == 0 and any(ln.split()[:2] == ["mine", "BROKEN"] and where in ln for ln in listing.splitlines())
    assert [ln.split()[0] for ln in listing.splitlines()] == sorted([*ALL_LAYOUTS, "mine"])
    code, report = _cli("--mappings", maps, "inspect", src)           # detection skips the broken file
    assert code == 0 and "ldm" in report, report


def test_an_encoder_config_format_under_vision_is_refused(tmp_path):
    """hf_clip_text describes one text encoder: a whole CLIP's config (vision: config) cannot be one."""
    from sdconv.converters.configs import CLIP_FORMATS
    text = (BUILTIN_DIR / "hf.yaml").read_text().replace("name: hf", "name: mine") \
        .replace("config: {file: config.json, format: hf_clip}", "config: {file: config.json, format: hf_clip_text}")
    _, path = _registry_with(tmp_path, "mine", text)
    line = max(i for i, ln in enumerate(text.splitlines(), 1) if "format: hf_clip_text" in ln)    # the vision one
    assert line > _line_of(text, "vision:")
    _refused(*_cli("layouts", "check", path), f"{path}:{line}: config format 'hf_clip_text'", *CLIP_FORMATS)


def test_a_read_only_config_format_on_a_folder_layout_is_refused(tmp_path):
    """open_clip_text is read from open_clip folders, never written: a folder layout, which
    writes its slots' configs, cannot name it (a file layout such as open_clip can)."""
    text = FOLDER_LAYOUT.replace("format: hf_clip_text", "format: open_clip_text")
    _, path = _registry_with(tmp_path, "mine", text)
    _refused(*_cli("layouts", "check", path), f"{path}:{_line_of(text, 'config:')}", "'open_clip_text'",
             "never written")


def test_an_unknown_config_format_names_the_valid_ones(tmp_path):
    text = FOLDER_LAYOUT.replace("format: hf_clip_text", "format: hf_clip_txt")
    _, path = _registry_with(tmp_path, "mine", text)
    _refused(*_cli("layouts", "check", path), f"{path}:{_line_of(text, 'format:')}: unknown config format 'hf_clip_txt'",
             "did you mean 'hf_clip_text'?")
    _, path = _registry_with(tmp_path, "mine", FOLDER_LAYOUT)           # and the right one passes
    code, out = _cli("layouts", "check", path)
    assert code == 0 and out.startswith("ok: "), out


def _mine(layout):
    return (BUILTIN_DIR / f"{layout}.yaml").read_text().replace(f"name: {layout}", "name: mine")


FAMILY = (BUILTIN_DIR / "family" / "clip_text.yaml").read_text() + "overrides: true\n"
NO_LOGIT_SCALE = "".join(ln for ln in (BUILTIN_DIR / "naming" / "hf.yaml").read_text().splitlines(True)
                         if "logit_scale" not in ln).replace("name: hf", "name: hf_nols")
ALTERNATE_ONLY = """schema: 1
kind: layout
name: mine
family: clip_text
description: an alternate spelling of a tensor its naming does not map
output: file
encoders:
  clip:
    prefix: ""
    naming: hf_nols
    alternates:
      - {canonical: text_proj.weight, key: text_projection, transform: transpose}
"""
# case: (file in the mapping folder, its text, replaced, replacement, what the error says, other files)
UNSERVED = {
    # plan.resolve_params reads heads and act; an act must be one the family (and the engine) has
    "slot act sdconv lacks": ("mine.yaml", _mine("openai"), "{act: quick_gelu}", "{act: relu}",
                              "unknown activation 'relu'", {}),
    "slot act the family lacks": ("mine.yaml", _mine("openai"), "{act: quick_gelu}", "{act: gelu}",
                                  "encoder clip: activation 'gelu' is not one of ['quick_gelu']",
                                  {"family/clip_text.yaml": FAMILY.replace("choices: [quick_gelu, gelu]", "choices: [quick_gelu]")
                                   .replace("act: gelu}", "act: quick_gelu}").replace("act: gelu,", "act: quick_gelu,")}),
    "slot encoder param": ("mine.yaml", _mine("openai"), "{act: quick_gelu}", "{encoder: clip_l}",
                           "unknown field 'encoder' in encoder clip params", {}),
    "slot heads 0": ("mine.yaml", _mine("openai"), "{act: quick_gelu}", "{heads: 0}", "heads must be a whole number", {}),
    # a bare string was read as a list of its characters
    "ignore as a string": ("mine.yaml", _mine("openai"), "ignore: [visual., input_resolution, context_length, vocab_size]",
                           "ignore: visual.", "ignore must be a list of strings", {}),
    "omit as a string": ("mine.yaml", _mine("diffusers"), "omit: [text_proj.weight, logit_scale]",
                         "omit: logit_scale", "omit must be a list of strings", {}),
    "components as a string": ("mine.yaml", _mine("ldm"), "unet: [model.diffusion_model.]", "unet: model.diffusion_model.",
                               "components unet must be a list of strings", {}),
    "sample extra with a symbol": ("mine.yaml", _mine("ldm"), "alphas_cumprod: [1000]", "alphas_cumprod: [steps]",
                                   "a shape here is a list of sizes", {}),
    # plan_read reads an alternate as one key for one flat tensor the naming maps
    "alternate of three tensors": ("mine.yaml", _mine("comfy"), "transform: transpose}", "transform: split_qkv}",
                                   "transform 'split_qkv' makes 3 canonical tensor(s) from 1 key(s)", {}),
    "alternate in the blocks": ("mine.yaml", _mine("comfy"), "{canonical: text_proj.weight, key: text_projection,",
                                "{canonical: blk.<layer>.attn_q.weight, key: q.<layer>,", "uses <layer>", {}),
    "alternate the naming lacks": ("mine.yaml", ALTERNATE_ONLY, "canonical: text_proj.weight", "canonical: logit_scale",
                                   "alternate for 'logit_scale', which naming hf_nols does not map",
                                   {"naming/hf_nols.yaml": NO_LOGIT_SCALE}),
    # files are written beside the weights and read back from there
    "config file outside": ("mine.yaml", _mine("hf"), "config: {file: config.json, format: hf_clip_text}",
                            "config: {file: ../config.json, format: hf_clip_text}", "config file must be a file name", {}),
    "config file in a sub-folder": ("mine.yaml", _mine("hf"), "config: {file: config.json, format: hf_clip_text}",
                                    "config: {file: cfg/config.json, format: hf_clip_text}", "config file must be a file name", {}),
    "weights file of the wrong format": ("mine.yaml", _mine("diffusers"), "pt: pytorch_model.bin}", "pt: model.safetensors}",
                                         "folder_weights pt must be a file name ending in .ckpt", {}),
    "weights file outside": ("mine.yaml", _mine("diffusers"), "{safetensors: model.safetensors,",
                             "{safetensors: /tmp/model.safetensors,", "folder_weights safetensors must be a file name", {}),
    "vision weights file outside": ("mine.yaml", _mine("open_clip"), "weights: {safetensors: open_clip_model.safetensors,",
                                    "weights: {safetensors: ../open_clip_model.safetensors,", "vision weights safetensors", {}),
    "prefix two folders down": ("mine.yaml", _mine("diffusers"), "prefix: text_encoder_2/", "prefix: a/text_encoder_2/",
                                "only one plain folder name may come before '/'", {}),
    "prefix outside": ("mine.yaml", _mine("diffusers"), "prefix: text_encoder_2/", "prefix: ../text_encoder_2/",
                       "only one plain folder name may come before '/'", {}),
    # tokenizer files and the image processor config go in a folder of the output, in a format sdconv writes
    "tokenizer folder outside": ("mine.yaml", _mine("diffusers"), "tokenizer: {folder: tokenizer_2/,",
                                 "tokenizer: {folder: ../tokenizer_2/,", "tokenizer folder '../tokenizer_2/' must be", {}),
    "tokenizer folder without a slash": ("mine.yaml", _mine("diffusers"), "tokenizer: {folder: tokenizer_2/,",
                                         "tokenizer: {folder: tokenizer_2,", "one plain folder name ending in '/'", {}),
    "tokenizer format": ("mine.yaml", _mine("hf"), 'tokenizer: {folder: "", format: hf_clip}',
                         'tokenizer: {folder: "", format: hf_clipp}', "did you mean 'hf_clip'?", {}),
    "tokenizer in a file layout": ("mine.yaml", _mine("openai"), "    params: {act: quick_gelu}",
                                   "    params: {act: quick_gelu}\n    tokenizer: {folder: tok/, format: hf_clip}",
                                   "tokenizer files need output: folder", {}),
    "processor file outside": ("mine.yaml", _mine("hf"), "processor: {file: preprocessor_config.json,",
                               "processor: {file: ../preprocessor_config.json,", "vision processor file must be a file name", {}),
    "processor format": ("mine.yaml", _mine("hf"), "format: hf_clip_image}", "format: hf_clip_img}",
                         "unknown image processor format 'hf_clip_img' — did you mean 'hf_clip_image'?", {}),
    "processor of a file output": ("mine.yaml", _mine("openai"), "  output: file", "  output: file\n  processor: "
                                   "{file: preprocessor_config.json, format: hf_clip_image}",
                                   "a processor config needs output: folder", {}),
    "pad token not a string": ("family/clip_text.yaml", FAMILY, 'heads: 16, act: gelu, pad_token: "!"}',
                               "heads: 16, act: gelu, pad_token: [1]}",
                               "pad_token must be", {}),
    # families: the engine writes a buffer as its synthesizer makes it, computes two activations,
    # and `sdconv sample` needs every size, the layers, heads and act of a preset
    "buffer dtype": ("family/clip_text.yaml", FAMILY, "dtype: int64", "dtype: float32",
                     "buffer position_ids: synthesizer 'arange' makes int64, not float32", {}),
    "family activation": ("family/clip_text.yaml", FAMILY, "choices: [quick_gelu, gelu]", "choices: [quick_gelu, gelu, relu]",
                          "unknown activation 'relu'", {}),
    "preset without a size": ("family/clip_text.yaml", FAMILY, "tiny:      {vocab: 49408, context: 77, width: 128, ffn: 512,",
                              "tiny:      {vocab: 49408, context: 77, width: 128,", "preset tiny lacks the required field 'ffn'", {}),
    "preset with a typo": ("family/clip_text.yaml", FAMILY, "tiny:      {vocab: 49408, context: 77, width: 128,",
                           "tiny:      {vocab: 49408, context: 77, widht: 128,", "did you mean 'width'?", {}),
    "preset heads": ("family/clip_text.yaml", FAMILY, "layers: 2, heads: 2,", "layers: 2, heads: two,",
                     "preset tiny heads must be a whole number", {}),
    "sample value": ("family/clip_text.yaml", FAMILY, "sample: 4.6052", "sample: ln100",
                     "tensor logit_scale sample must be a number", {}),
}


@pytest.mark.parametrize("case", UNSERVED)
def test_a_value_the_engine_cannot_serve_is_refused(tmp_path, case):
    """Each of these passed `layouts check` and then crashed the engine, was ignored, or was
    misread; now the check names the file and line."""
    rel, text, old, new, says, others = UNSERVED[case]
    assert text.count(old) == 1, old
    text = text.replace(old, new)
    maps = tmp_path / "maps"
    for name, content in {rel: text, **others}.items():
        (maps / name).parent.mkdir(parents=True, exist_ok=True)
        (maps / name).write_text(content)
    path = maps / rel
    _refused(*_cli("layouts", "check", path), f"{path}:{_line_of(text, new.splitlines()[-1])}: ", says)

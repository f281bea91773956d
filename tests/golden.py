"""A fixed set of conversions whose outputs must stay byte for byte what they were.

`build(d)` makes deterministic inputs in `d` (an SD1.x checkpoint, an SDXL-style two-encoder
checkpoint, an open_clip and a transformers encoder, a tiny whole OpenAI CLIP as reference),
runs each command of CASES through the command line, and returns {case: digest}. A digest
covers every file an output consists of: safetensors and JSON files byte for byte; torch .pt
files by their tensors (keys, dtypes, shapes, bytes, in order), since torch.save writes a random
serialization id; dry runs by their printed text.

Run as a script to record the digests (tests/data/golden_outputs.json) from the current code:
    python tests/golden.py --record
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "data" / "golden_outputs.json"

# Outputs changed on purpose since the digests were recorded: case -> (new digest, why).
CHANGED_ON_PURPOSE = {
    "sample-diffusers": ("9a5c03095f9992576c79457db63a538a295347e3a06e8954a7fb6ed8bc0ee068",
                         "a sample written in a folder layout no longer carries an sdconv.ledger: the old one "
                         "was made by a stand-in plan and named canonical names as source keys (tensors, "
                         "config.json and every other metadata key are unchanged)"),
}

# (case name, command line) - run in the inputs' folder, outputs under out/
CASES = [
    ("sd1-openai", "convert sd1.safetensors -o out/sd1-openai.safetensors --to openai"),
    ("sd1-hf", "convert sd1.safetensors -o out/sd1-hf --to hf"),
    ("sd1-diffusers", "convert sd1.safetensors -o out/sd1-diffusers --to diffusers"),
    ("sd1-open_clip-fp16", "convert sd1.safetensors -o out/sd1-oc.safetensors --to open_clip --dtype fp16"),
    ("sd1-comfy-bf16", "convert sd1.safetensors -o out/sd1-comfy.safetensors --to comfy --dtype bf16"),
    ("sd1-sgm", "convert sd1.safetensors -o out/sd1-sgm.safetensors --to sgm --param encoder=clip_l"),
    ("sd1-sd3", "convert sd1.safetensors -o out/sd1-sd3.safetensors --to sd3 --param encoder=clip_l"),
    ("sd1-ldm", "convert sd1.safetensors -o out/sd1-ldm.safetensors --to ldm"),
    ("sd1-openai-pt", "convert sd1.safetensors -o out/sd1-openai.pt --to openai"),
    ("sd1-hf-pt", "convert sd1.safetensors -o out/sd1-hf-pt --to hf --format pt"),
    ("sd1-dry-run", "convert sd1.safetensors -o out/x --to hf --dry-run"),
    ("sd1-projection", "convert sd1.safetensors -o out/sd1-proj.safetensors --to openai --projection ref.safetensors"),
    ("sd1-vision-openai", "convert sd1.safetensors -o out/sd1-clip.pt --to openai --with-vision ref.safetensors"),
    ("sd1-vision-hf", "convert sd1.safetensors -o out/sd1-clip-hf --to hf --with-vision ref.safetensors"),
    ("sd1-vision-open_clip", "convert sd1.safetensors -o out/sd1-clip-oc --to open_clip --with-vision ref.safetensors"),
    ("xl-openai-all", "convert xl.safetensors -o out/xl.safetensors --to openai --encoder all"),
    ("xl-diffusers-all", "convert xl.safetensors -o out/xl-te --to diffusers --encoder all"),
    ("xl-hf-g", "convert xl.safetensors -o out/xl-g --to hf --encoder clip_g"),
    ("xl-sgm-all", "convert xl.safetensors -o out/xl-sgm.safetensors --to sgm --encoder all"),
    ("xl-into", "convert out/sd1-sgm.safetensors --to sgm --encoder clip_l --into xl.safetensors -o out/xl-new.safetensors"),
    ("oc-hf-gelu", "convert oc.safetensors -o out/oc-hf --to hf --param act=gelu --param encoder=clip_h"),
    ("oc-diffusers-h", "convert oc.safetensors -o out/oc-diffusers --to diffusers --param encoder=clip_h"),
    ("hf-openai", "convert hfin -o out/hfin-openai.safetensors --to openai"),
    ("hf-ldm", "convert hfin -o out/hfin-ldm.safetensors --to ldm"),
    ("drift-ldm-fix", "convert drift.safetensors -o out/drift-fix.safetensors --to ldm --fix-position-ids"),
    ("drift-hf", "convert drift.safetensors -o out/drift-hf --to hf"),
    ("batch", "convert sd1.safetensors oc.safetensors -o out/batch/ --to hf --param act=gelu"),
    ("sample-sgm", "sample out/sample-sgm.safetensors --layout sgm --preset tiny --seed 5"),
    ("sample-diffusers", "sample out/sample-diffusers --layout diffusers --preset tiny --seed 6 --dtype fp32"),
]


def _tensor_digest(path: Path) -> str:
    import torch
    sd = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k, t in sd.items():
        t = t.contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digest(path: Path) -> str:
    """One digest of a file or folder output (and of a .pt file's sidecar beside it)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    side = path.with_name(path.name + ".sdconv.json")
    if side.is_file():
        files.append(side)
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + b"\0")
        h.update((_tensor_digest(f) if f.suffix in (".pt", ".bin") else hashlib.sha256(f.read_bytes()).hexdigest()).encode())
    return h.hexdigest()


def make_inputs(d: Path):
    """Deterministic inputs, made through the command line's `sample` and safetensors alone."""
    import torch
    from safetensors.torch import load_file, save_file

    from consumers import openai_model, seeded_randn_

    run(d, "sample sd1.safetensors --layout ldm --preset tiny --seed 1 --dtype fp32")
    run(d, "sample oc.safetensors --layout open_clip --preset tiny --seed 2 --dtype fp16")
    run(d, "sample hfin.safetensors --layout openai --preset tiny --seed 3 --dtype fp32")
    run(d, "convert hfin.safetensors -o hfin --to hf")
    run(d, "sample l.safetensors --layout sgm --preset tiny --seed 4 --dtype fp16")
    xl = load_file(str(d / "l.safetensors"))
    g = torch.Generator().manual_seed(9)
    w = 128
    pre = "conditioner.embedders.1.model."
    xl[pre + "token_embedding.weight"] = torch.randn(49408, w, generator=g).half()
    xl[pre + "positional_embedding"] = torch.randn(77, w, generator=g).half()
    for i in range(2):
        b = f"{pre}transformer.resblocks.{i}."
        for name, shape in (("ln_1.weight", (w,)), ("ln_1.bias", (w,)), ("attn.in_proj_weight", (3 * w, w)),
                            ("attn.in_proj_bias", (3 * w,)), ("attn.out_proj.weight", (w, w)),
                            ("attn.out_proj.bias", (w,)), ("ln_2.weight", (w,)), ("ln_2.bias", (w,)),
                            ("mlp.c_fc.weight", (4 * w, w)), ("mlp.c_fc.bias", (4 * w,)),
                            ("mlp.c_proj.weight", (w, 4 * w)), ("mlp.c_proj.bias", (w,))):
            xl[b + name] = torch.randn(*shape, generator=g).half()
    xl[pre + "ln_final.weight"] = torch.randn(w, generator=g).half()
    xl[pre + "ln_final.bias"] = torch.randn(w, generator=g).half()
    xl[pre + "text_projection"] = torch.randn(w, w, generator=g).half()
    # one metadata key: safetensors writes several in a random order
    save_file(xl, str(d / "xl.safetensors"), {"sdconv.encoders": json.dumps(
        {"clip_l": {"params": {"heads": 2, "act": "quick_gelu"}}, "clip_g": {"params": {"heads": 2, "act": "gelu"}}})})
    m = openai_model()
    seeded_randn_(m, 7)
    with torch.no_grad():
        m.logit_scale.fill_(4.6052)
    save_file({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}, str(d / "ref.safetensors"))
    # an ldm input with drifted position_ids, for --fix-position-ids
    sd1 = load_file(str(d / "sd1.safetensors"))
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    sd1[pid] = torch.arange(77, dtype=torch.float32)[None] - 0.0003
    save_file(sd1, str(d / "drift.safetensors"), {"format": "pt"})


def run(d: Path, command: str) -> str:
    from click.testing import CliRunner

    from sdconv.cli import main
    cwd = os.getcwd()
    os.chdir(d)
    try:
        r = CliRunner().invoke(main, command.split())
    finally:
        os.chdir(cwd)
    if r.exit_code != 0:
        raise AssertionError(f"sdconv {command}: exit {r.exit_code}\n{r.output}\n{r.exception!r}")
    return r.output


def build(d: Path) -> dict:
    d = Path(d)
    make_inputs(d)
    (d / "out").mkdir()
    out = {}
    for name, command in CASES:
        printed = run(d, command)
        if "--dry-run" in command:
            out[name] = hashlib.sha256(printed.encode()).hexdigest()
            continue
        target = Path(command.split(" -o ")[1].split()[0]) if " -o " in command else Path(command.split()[1])
        target = d / target
        if command.endswith(" --encoder all") and "openai" in command:
            parts = sorted(target.parent.glob(f"{target.stem}.*{target.suffix}"))
            out[name] = hashlib.sha256("".join(digest(p) for p in parts).encode()).hexdigest()
        else:
            out[name] = digest(target)
    return out


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, str(Path(__file__).parent))
    import conftest  # noqa: F401  (the torchvision stub, offline settings)
    with tempfile.TemporaryDirectory() as tmp:
        got = build(Path(tmp))
    if "--record" in sys.argv:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} digests in {GOLDEN}")
    else:
        print(json.dumps(got, indent=1, sort_keys=True))

"""A fixed set of conversions whose outputs must stay byte for byte what they were.

`build(d)` makes deterministic inputs in `d` (an SD1.x checkpoint, an SDXL-style two-encoder
checkpoint, an open_clip and a transformers encoder, a tiny whole OpenAI CLIP as reference),
runs each command of CASES through the command line, and returns {case: digest}. A digest
covers every file an output consists of: safetensors and JSON files byte for byte; torch .pt
files by their tensors (keys, dtypes, shapes, bytes, in order), since torch.save writes a random
serialization id; dry runs by their printed text.

Run as a module, from the repository root, to record the digests (tests/data/golden_outputs.json)
from the current code (without --record it prints them):
    python -m tests.helpers.golden --record
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

GOLDEN = Path(__file__).parents[1] / "data" / "golden_outputs.json"

# Outputs changed on purpose since the digests were recorded: case -> (new digest, why).
CHANGED_ON_PURPOSE = {
    "sample-diffusers": ("9a5c03095f9992576c79457db63a538a295347e3a06e8954a7fb6ed8bc0ee068",
                         "a sample written in a folder layout no longer carries an sdconv.ledger: the old one "
                         "was made by a stand-in plan and named canonical names as source keys (tensors, "
                         "config.json and every other metadata key are unchanged)"),
    "batch": ("94e8d4aeaae8c46937e7c10eaffdd453e3162c6800715fe5842f5ffadb737c9e",
        "hf folders carry CLIPTokenizer files (issue 14.2); the weights' sdconv.notes and sdconv.json gain the note saying so (tensors unchanged)"),
    "drift-hf": ("f726a6e3150e4834059aea76462099ce09361370cb635be8e98962c2aa266bba",
        "hf folders carry CLIPTokenizer files (issue 14.2); the weights' sdconv.notes and sdconv.json gain the note saying so (tensors unchanged)"),
    "hf-ldm": ("549de1ade9d87287b306950887b394dad09c1e1ee6b9b0cd17986d95d52d2a76",
        "the input folder hfin is made by `convert --to hf`, whose weights file now has another note: the recorded source sha256 differs (tensors unchanged)"),
    "hf-openai": ("eaa077df79328f58df4a94bab80b79d5d69f18518059a232b3cd70cf70d75f82",
        "the input folder hfin is made by `convert --to hf`, whose weights file now has another note: the recorded source sha256 differs (tensors unchanged)"),
    "oc-diffusers-h": ("7b29e490e159500c2acabfb6cc165191c26a0dcf2c7db8de74d2baa7e803a9fe",
        "diffusers folders carry tokenizer/ (tokenizer_2/) beside the text encoders (issue 14.2); sdconv.notes and sdconv.json gain the note (tensors unchanged)"),
    "oc-hf-gelu": ("d055318a1b2eeb5bc32cb42e42cb01101277461bfe0f07985862a068f612532e",
        "hf folders carry CLIPTokenizer files (issue 14.2); the weights' sdconv.notes and sdconv.json gain the note saying so (tensors unchanged)"),
    "sd1-diffusers": ("67c29f68798de9cc966b4ef28ac1607d7177914c828fc73c9268e7b8f7214eed",
        "diffusers folders carry tokenizer/ (tokenizer_2/) beside the text encoders (issue 14.2); sdconv.notes and sdconv.json gain the note (tensors unchanged)"),
    "sd1-dry-run": ("d67f6d1e02fe4e2f59c27b2c7fdd02e2e706d90fd5a232b066c9c289034deb4f",
        "the plan printed by --dry-run --to hf lists the tokenizer files it would write"),
    "sd1-hf": ("472a2264353723ddc07418d6662baa89e3ae8cfefce92897db9946f7412994b1",
        "hf folders carry CLIPTokenizer files (issue 14.2); the weights' sdconv.notes and sdconv.json gain the note saying so (tensors unchanged)"),
    "sd1-hf-pt": ("439f2450029fb5c61363147f89363f712d64e1c97517277402b1b856af0d918c",
        "hf folders carry CLIPTokenizer files (issue 14.2); the weights' sdconv.notes and sdconv.json gain the note saying so (tensors unchanged)"),
    "sd1-vision-hf": ("ad9180bbf8d03457954768cf368ef9f09d9d27d866386e71f00f57aafdb81ad8",
        "a whole CLIP in hf carries the tokenizer files and preprocessor_config.json (issue 14.2); sdconv.notes gains the note (tensors unchanged)"),
    "sd1-vision-open_clip": ("e59e78877f01f92723fd8d33b02e57320d8d51aebaea5399a4f499e2fa144bd2",
        "open_clip_config.json's preprocess_cfg states CLIP's mean, std, bicubic and shortest-side resize (issue 14.2; was {})"),
    "xl-diffusers-all": ("ab53a159bf6f78671d748f87f0e16ad7fb9a4e9ba93f6f567e9b05e0881956d6",
        "diffusers folders carry tokenizer/ (tokenizer_2/) beside the text encoders (issue 14.2); sdconv.notes and sdconv.json gain the note (tensors unchanged)"),
    "xl-hf-g": ("2679f57bd259e471f1737bd3cb069fc2ed9eeba6f2949b22f56670a5dc0ae06b",
        "hf folders carry CLIPTokenizer files (issue 14.2); the weights' sdconv.notes and sdconv.json gain the note saying so (tensors unchanged)"),
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

    from tests.helpers.consumers import openai_model, seeded_randn_

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
    import tests.conftest  # noqa: F401  (the torchvision stub, offline settings)
    with tempfile.TemporaryDirectory() as tmp:
        got = build(Path(tmp))
    if "--record" in sys.argv:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} digests in {GOLDEN}")
    else:
        print(json.dumps(got, indent=1, sort_keys=True))

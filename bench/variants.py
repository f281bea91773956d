"""The comparison programs of bench.py, one per process: `python variants.py MODE INPUT OUTDIR PREFIX...`.

Each mode does one way of getting the text encoder(s) out of a checkpoint, the way a user or a
library would, and writes them to OUTDIR. bench.py runs each under `/usr/bin/time -v`, so every
mode imports only what it needs (the null mode imports torch and safetensors and stops).

PREFIX: one per encoder to extract (SD1.5: `cond_stage_model.transformer.`; SDXL:
`conditioner.embedders.0.transformer.` and `conditioner.embedders.1.model.`); the tensors under
it are saved with the prefix removed, one file per prefix.

modes
  null          python + `import torch, safetensors`; nothing else (fixed cost of every row)
  floor         read only the encoder's tensors, save them: `safe_open` for .safetensors,
                `torch.load(mmap=True, weights_only=True)` for torch files, with the Lightning and
                numpy globals allowed through `torch.serialization.safe_globals` (stand-ins, as
                sdconv does; nothing unsafe is enabled)
  load_file     safetensors `load_file` of the whole file, pick, `save_file`
  torch_load    `torch.load` of the whole file (weights_only=False: acceptable ONLY because the
                bench made this file itself; it is what users fall back to for Lightning .ckpt
                files), pick, `save_file`. weights_only=False imports the pickled classes, so a
                stand-in `pytorch_lightning` module is registered first, as if it were installed.
  diffusers     diffusers' single-file text-encoder conversion,
                `create_diffusers_clip_model_from_ldm`, with a local config folder (offline), then
                `save_pretrained`. Its state dict: for .safetensors, what diffusers' own
                `load_single_file_checkpoint` returns (`load_file`); for a Lightning .ckpt,
                diffusers' loader (torch.load weights_only=True) refuses the file (see the
                `diffusers_loader` mode), so the dict comes from torch.load(weights_only=False), as
                in torch_load: what users do after the refusal.
  diffusers_loader
                only diffusers' `load_single_file_checkpoint` (what `from_single_file` runs
                first); exits 0 if it returns, 3 if it raises (the error on stderr).
"""
import os
import re
import sys
import time


def pick(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def save(sd, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def out_path(outdir, i):
    return os.path.join(outdir, f"encoder{i}.safetensors")


def floor_safetensors(path, outdir, prefixes):
    from safetensors import safe_open
    for i, p in enumerate(prefixes):
        with safe_open(path, framework="pt") as f:
            sd = {k[len(p):]: f.get_tensor(k) for k in f.keys() if k.startswith(p)}
        save(sd, out_path(outdir, i))
        del sd


def lightning_safe_globals():
    """What a real SD .ckpt pickles besides tensors: a PyTorch Lightning ModelCheckpoint (a stand-in
    class, so pytorch_lightning need not be installed; it is only given a __dict__) and numpy
    scalars and dtypes, in the numpy 1 and numpy 2 spellings (numpy's own rebuilders: they only
    decode bytes). Nothing here enables unsafe loading."""
    import numpy as np

    class ModelCheckpoint:
        pass

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed = [(ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
               (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
               np.dtype]
    allowed += [type(np.dtype(t)) for t in ("int64", "float64", "int32", "float32")]
    return allowed


def floor_torch(path, outdir, prefixes):
    import torch
    with torch.serialization.safe_globals(lightning_safe_globals()):
        ck = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    sd = ck.get("state_dict", ck)
    for i, p in enumerate(prefixes):
        save(pick(sd, p), out_path(outdir, i))


def load_file_mode(path, outdir, prefixes):
    from safetensors.torch import load_file
    sd = load_file(path)
    for i, p in enumerate(prefixes):
        save(pick(sd, p), out_path(outdir, i))


def lightning_installed_stand_in():
    """weights_only=False resolves every pickled global by importing it: without pytorch_lightning
    installed, a Lightning .ckpt fails with ModuleNotFoundError. Register a stand-in module, as if
    it were installed (numpy 2 still provides numpy.core.multiarray.scalar)."""
    import types
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    for m in names:
        sys.modules.setdefault(m, types.ModuleType(m))

    class ModelCheckpoint:
        pass
    ModelCheckpoint.__module__ = names[-1]
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint


def torch_load_whole(path):
    import torch
    lightning_installed_stand_in()
    ck = torch.load(path, map_location="cpu", weights_only=False)   # our own synthetic file only
    return ck.get("state_dict", ck)


def torch_load_mode(path, outdir, prefixes):
    sd = torch_load_whole(path)
    for i, p in enumerate(prefixes):
        save(pick(sd, p), out_path(outdir, i))


def diffusers_mode(path, outdir, prefixes, config_root):
    # The test extras' torchvision 0.28.0 wheel does not load its compiled ops beside the CPU torch
    # (tests/conftest.py does the same); transformers' image side imports it, the text side needs none.
    import types
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    if path.endswith(".safetensors"):
        sd = load_single_file_checkpoint(path, local_files_only=True)
    else:
        sd = torch_load_whole(path)     # diffusers' own loader refuses a Lightning .ckpt
    dtype = next(v.dtype for k, v in sd.items() if k.startswith(prefixes[0]) and v.is_floating_point())
    for i, p in enumerate(prefixes):
        # diffusers picks the encoder from the whole state dict by its keys and the config's width,
        # as from_single_file does for text_encoder and text_encoder_2.
        if p.endswith(".model."):     # OpenCLIP (bigG): diffusers' SDXL text_encoder_2
            cls, cfg = CLIPTextModelWithProjection, os.path.join(config_root, "clip_g")
        else:
            cls, cfg = CLIPTextModel, os.path.join(config_root, "clip_l")
        model = create_diffusers_clip_model_from_ldm(cls, sd, config=cfg, torch_dtype=dtype, local_files_only=True)
        model.save_pretrained(os.path.join(outdir, f"text_encoder{i}"))
        del model


def diffusers_loader_mode(path):
    import types
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint
    try:
        sd = load_single_file_checkpoint(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the refusal is what is measured
        chain, x = [], e
        while x is not None and len(chain) < 6:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(x)).strip().replace(str(path), "FILE")
            chain.append(f"{type(x).__name__}: {(text.splitlines() or [''])[0][:100]}")
            x = x.__cause__ or x.__context__
        print("refused: " + " <- ".join(chain), file=sys.stderr)   # outermost first, root cause last
        raise SystemExit(3)
    print(f"loaded {len(sd)} tensors", file=sys.stderr)


def main(argv):
    mode = argv[0]
    if mode == "null":
        import safetensors  # noqa: F401
        import torch  # noqa: F401
        return
    path, outdir, prefixes = argv[1], argv[2], argv[3:]
    os.makedirs(outdir, exist_ok=True)
    t0 = time.perf_counter()
    if mode == "floor":
        (floor_safetensors if path.endswith(".safetensors") else floor_torch)(path, outdir, prefixes)
    elif mode == "load_file":
        load_file_mode(path, outdir, prefixes)
    elif mode == "torch_load":
        torch_load_mode(path, outdir, prefixes)
    elif mode == "diffusers_loader":
        diffusers_loader_mode(path)
    elif mode == "diffusers":
        diffusers_mode(path, outdir, prefixes, os.environ["BENCH_CLIP_CONFIGS"])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(f"{mode}: {time.perf_counter() - t0:.2f}s after imports", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])

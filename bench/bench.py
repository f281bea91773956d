#!/usr/bin/env python3
"""Full-scale benchmark of sdconv against the floor and the usual ways (issue 5, item 5).

    make bench                          # = .venv/bin/python bench/bench.py
    .venv/bin/python bench/bench.py --quick              # 1 repetition, warm cache only
    .venv/bin/python bench/bench.py --dir /big/disk --reps 5 --inputs sd15-sft,sdxl-sft

What it does, in one run:
1. Generates full-size synthetic checkpoints with random weights, one at a time (each is deleted
   once measured, so at most one input and its outputs are on disk; about 9 GB at the peak):
   - `sd15-sft`  SD1.5-shaped fp16 .safetensors (~2.1 GB),
   - `sd15-ckpt` SD1.5-shaped fp32 zip .ckpt (~4.3 GB), `{"state_dict": sd, "global_step": 840000,
     ...}` plus Lightning-style extras (a PyTorch Lightning `ModelCheckpoint` object and numpy
     scalars in the numpy 1 and numpy 2 spellings, pickled by name without pytorch_lightning),
   - `sdxl-sft`  SDXL-base-shaped fp16 .safetensors (~6.9 GB).
   The text encoders have the exact keys and shapes of real checkpoints (tests/data/*.txt, from
   arenasys/stable-diffusion-webui-model-toolkit) and random N(0, 0.02) values. The UNet and VAE
   are stand-ins with the real tensor counts and parameter totals (SD1.5: 1,145 tensors,
   1,066,247,386 params, as ../shared/SETUP.md §11; SDXL base: 2,515 tensors, ~3.47 B params);
   their values are slices of one random pool (they are never read by the extracting programs,
   only by the whole-file loaders, for which values do not matter).
   Safetensors files are written header first, then tensor by tensor; the .ckpt goes through
   torch.save (the whole fp32 dict in memory, ~4.3 GB).
2. Times each variant as its own process under `/usr/bin/time -v` (wall time from this process,
   peak RSS = "Maximum resident set size"), median of N (default 3), with a warm page cache and
   a cold one (`sync` + `echo 3 > /proc/sys/vm/drop_caches` before each cold run; skipped with a
   note when not allowed). `sync` also runs before every warm run, so the previous run's output
   is not being written back during the next. Variants are interleaved within each repetition,
   and each repetition starts one variant later than the one before. (Before this rotation,
   sdconv → openai always ran first, right after the ~5 GB variants, and came out slower than
   → hf in the bench, though not in interleaved runs without those.)
   Each run records the CPU other processes used during it (`foreign_cores`); before each run
   the bench waits briefly (3 s at most, 45 s in all) for a busy machine to quieten.
   - sdconv (the current code of the editable install: .venv/bin/sdconv; its bytecode is compiled
     first, as installing a wheel does, so that no run pays for compiling it, even where
     PYTHONDONTWRITEBYTECODE is set),
   - the floor: read only the encoder's tensors and save them (variants.py floor),
   - the usual ways: torch.load of the whole file, safetensors load_file of the whole file,
     diffusers' single-file text-encoder conversion (variants.py),
   - a null row: python + `import torch, safetensors`.
   Also `sdconv --help` and `sdconv inspect` of the SDXL file (warm, median of N).
3. Prints the table, writes bench/results.md and bench/results.json, and deletes its files (also
   on failure or Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO / "tests" / "data"
PY = sys.executable
SDCONV = str(REPO / ".venv" / "bin" / "sdconv")
VARIANTS = str(HERE / "variants.py")
TIME = "/usr/bin/time"

SD1_TE = "cond_stage_model.transformer."           # what the floor and the usual ways extract
SDXL_L = "conditioner.embedders.0.transformer."
SDXL_G = "conditioner.embedders.1.model."

SCHEDULE = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]

GIB = 1024 ** 3
MIB = 1024 ** 2


# ---------------------------------------------------------------------------------------------
# 1. synthetic checkpoints
# ---------------------------------------------------------------------------------------------

def te_keys(list_name: str, prefix: str):
    out = []
    for line in (DATA / list_name).read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.rsplit(" ", 1)
        dims = [int(d) for d in shape.strip("[]").split(",") if d]
        out.append((prefix + key, dims))
    return out


def standins(prefix: str, count: int, total: int, bias_len: int, width: int):
    """`count` tensors holding `total` parameters: half biases [bias_len], half weights [rows, width],
    one 1-D tensor taking the remainder."""
    nb = count // 2
    nw = count - nb
    rows = (total - nb * bias_len) // (nw * width)
    rest = total - nb * bias_len - (nw - 1) * rows * width
    out = []
    for i in range(nw - 1):
        out.append((f"{prefix}standin.{i:04d}.weight", [rows, width]))
    out.append((f"{prefix}standin.{nw - 1:04d}.weight", [rest]))
    for i in range(nb):
        out.append((f"{prefix}standin.{i:04d}.bias", [bias_len]))
    assert sum(math.prod(s) for _, s in out) == total and len(out) == count
    return out


def spec(kind: str):
    """[(key, shape, role)]; role: te (random), pool (stand-in), ids (int64 arange), logit, sched,
    ema_decay, ema_steps."""
    items = []
    if kind.startswith("sd15"):
        items += [(k, s, "ids" if k.endswith("position_ids") else "te")
                  for k, s in te_keys("CLIP-v1-SD.txt", SD1_TE + "text_model.")]
        # SETUP.md §11: UNet 686 tensors / 859,520,964 params; VAE 248 / 83,653,863
        items += [(k, s, "pool") for k, s in standins("model.diffusion_model.", 686, 859_520_964, 1280, 1280)]
        items += [(k, s, "pool") for k, s in standins("first_stage_model.", 248, 83_653_863, 512, 512)]
        items += [(k, [1000], "sched") for k in SCHEDULE]
        items += [("model_ema.decay", [], "ema_decay"), ("model_ema.num_updates", [], "ema_steps")]
    elif kind == "sdxl-sft":
        items += [(k, s, "ids" if k.endswith("position_ids") else "te")
                  for k, s in te_keys("CLIP-v1-SD.txt", SDXL_L + "text_model.")]
        items += [(k, s, "logit" if k.endswith("logit_scale") else "te")
                  for k, s in te_keys("CLIP-XL-SD.txt", SDXL_G)]
        # sd_xl_base_1.0: UNet 1,680 tensors / 2,567,463,684 params; VAE as SD1.5
        items += [(k, s, "pool") for k, s in standins("model.diffusion_model.", 1680, 2_567_463_684, 1280, 1280)]
        items += [(k, s, "pool") for k, s in standins("first_stage_model.", 248, 83_653_863, 512, 512)]
    else:
        raise ValueError(kind)
    keys = [k for k, _, _ in items]
    assert len(keys) == len(set(keys))
    return sorted(items)      # safetensors writers sort by name: the encoder's bytes are contiguous


class Filler:
    """Produces each tensor. Text-encoder tensors: fresh N(0, 0.02) values; stand-ins: slices of a
    64 MiB random pool (rotating offsets, so neighbouring tensors differ)."""
    POOL = 32 * 1024 * 1024

    def __init__(self, torch, dtype):
        self.torch, self.dtype = torch, dtype
        torch.manual_seed(0)
        self.pool = torch.empty(self.POOL, dtype=torch.float16).normal_(0, 0.02)
        self.off = 0

    def pool_slice(self, n):
        assert n <= self.POOL
        if self.off + n > self.POOL:
            self.off = (self.off + 7919) % (self.POOL - n + 1)
        t = self.pool.narrow(0, self.off, n)
        self.off = (self.off + n + 7919) % self.POOL
        return t

    def tensor(self, shape, role, copy=True):
        torch = self.torch
        n = math.prod(shape)
        if role == "te":
            return torch.empty(shape, dtype=self.dtype).normal_(0, 0.02)
        if role == "pool":
            t = self.pool_slice(n)
            t = t.to(self.dtype) if (copy or t.dtype != self.dtype) else t
            return t.reshape(shape) if copy else t
        if role == "ids":
            return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        if role == "logit":
            return torch.full(shape, math.log(100.0), dtype=self.dtype)
        if role == "sched":
            return torch.linspace(0.00085, 0.012, n, dtype=torch.float32).to(self.dtype).reshape(shape)
        if role == "ema_decay":
            return torch.tensor(0.9999, dtype=torch.float32)
        if role == "ema_steps":
            return torch.tensor(840000, dtype=torch.int32)
        raise ValueError(role)


ST_DTYPE = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32"}


def dtype_of(torch, role, dtype):
    return {"ids": torch.int64, "ema_decay": torch.float32, "ema_steps": torch.int32}.get(role, dtype)


def generate_safetensors(kind: str, path: str):
    """Header first, then each tensor's bytes, one tensor at a time (RSS stays at the pool + one tensor)."""
    import torch
    dtype = torch.float16
    items = spec(kind)
    fill = Filler(torch, dtype)
    header, offset = {"__metadata__": {"format": "pt", "sdconv.bench": f"synthetic {kind}, random weights"}}, 0
    for key, shape, role in items:
        dt = dtype_of(torch, role, dtype)
        n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        header[key] = {"dtype": ST_DTYPE[str(dt).removeprefix("torch.")], "shape": shape,
                       "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, role in items:
            t = fill.tensor(shape, role, copy=False)
            assert t.dtype == dtype_of(torch, role, dtype), key
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return {"tensors": len(items), "params": sum(math.prod(s) for _, s, _ in items), "bytes": os.path.getsize(path)}


def generate_ckpt(kind: str, path: str):
    """fp32 zip .ckpt with Lightning-style extras (tests/helpers/lightning_ckpt.py: fake
    pytorch_lightning and numpy 1 modules, registered in this generator process only)."""
    import importlib.util

    import torch
    found = importlib.util.spec_from_file_location(
        "lightning_ckpt", Path(__file__).resolve().parents[1] / "tests" / "helpers" / "lightning_ckpt.py")
    lightning_ckpt = importlib.util.module_from_spec(found)
    found.loader.exec_module(lightning_ckpt)
    save_lightning_ckpt = lightning_ckpt.save_lightning_ckpt
    items = spec(kind)
    fill = Filler(torch, torch.float32)
    sd = {key: fill.tensor(shape, role) for key, shape, role in items}
    del fill
    save_lightning_ckpt(sd, path)
    return {"tensors": len(items), "params": sum(math.prod(s) for _, s, _ in items), "bytes": os.path.getsize(path)}


def write_clip_configs(root: Path):
    """transformers CLIPTextConfig folders for diffusers' single-file conversion (offline)."""
    common = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 0,
              "eos_token_id": 2, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0,
              "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "clip_text_model"}
    cfgs = {"clip_l": {"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072,
                       "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu",
                       "projection_dim": 768},
            "clip_g": {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
                       "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                       "hidden_act": "gelu", "projection_dim": 1280}}
    for name, c in cfgs.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps({**common, **c}, indent=2))


# ---------------------------------------------------------------------------------------------
# 2. measuring
# ---------------------------------------------------------------------------------------------

def can_drop_caches():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_through(path: Path):
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MIB):
            pass


def du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


WAIT_BUDGET = {"left": 45.0}   # seconds of waiting for a quiet machine, over the whole run


def wait_quiet(max_wait=3.0, threshold=0.3) -> float:
    """The machine may be shared (another engineer running tests): before a run, wait up to max_wait
    seconds (within a budget for the whole bench) until other processes use under `threshold`
    cores over half a second. Returns the time waited. Each run also records the other processes'
    CPU during it (foreign_cores), so a disturbed figure can be told apart."""
    t0 = time.perf_counter()
    while True:
        b0 = cpu_busy_s()
        time.sleep(0.5)
        waited = time.perf_counter() - t0 - 0.5
        if cpu_busy_s() - b0 < threshold * 0.5 or waited >= min(max_wait, WAIT_BUDGET["left"]):
            WAIT_BUDGET["left"] = max(0.0, WAIT_BUDGET["left"] - waited)
            return waited


class Runner:
    def __init__(self, work: Path, env: dict, log):
        self.work, self.env, self.log = work, env, log
        self.disk_peak = 0

    def timed(self, cmd: list[str], cold: bool = False, outdir: Path | None = None, keep_stdout=False) -> dict:
        """One run of cmd under /usr/bin/time -v. Returns wall (s), rss_kib, rc, stderr tail."""
        tfile = self.work / "time.txt"
        if outdir is not None:
            shutil.rmtree(outdir, ignore_errors=True)
            outdir.mkdir(parents=True)
        if cold:
            drop_caches()
        else:
            os.sync()
        waited = wait_quiet()
        b0 = cpu_busy_s()
        t0 = time.perf_counter()
        # own process group, so that an interrupt stops the measured program too, not only `time`
        proc = subprocess.Popen([TIME, "-v", "-o", str(tfile)] + cmd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate()
        except BaseException:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
        p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        wall = time.perf_counter() - t0
        busy = cpu_busy_s() - b0
        rss, cpu = None, 0.0
        for line in tfile.read_text().splitlines():
            if "Maximum resident set size" in line:
                rss = int(line.rsplit(":", 1)[1])
            elif "User time (seconds)" in line or "System time (seconds)" in line:
                cpu += float(line.rsplit(":", 1)[1])
        # other processes' CPU during the run, in cores (kernel work on our behalf, e.g. writeback
        # threads, lands here too, so a few hundredths are normal)
        foreign = max(0.0, busy - cpu) / wall if wall > 0 else 0.0
        out = {"wall": wall, "rss_kib": rss, "rc": p.returncode, "cpu_s": cpu, "foreign_cores": round(foreign, 3),
               "waited_s": round(waited, 1)}
        if keep_stdout:
            out["stdout"] = p.stdout
        if p.returncode != 0:
            out["stderr"] = (p.stderr or "")[-1500:]
        elif p.stderr and "refused" in p.stderr:
            out["note"] = p.stderr.strip().splitlines()[0][:300]
        if outdir is not None:
            out["out_bytes"] = du(outdir)
            self.disk_peak = max(self.disk_peak, du(self.work))
            shutil.rmtree(outdir, ignore_errors=True)
        return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def variants_for(inp: dict, path: Path, out: Path, cfg_root: Path):
    """[(id, label, cmd, floor_id)]; floor_id None for the floors themselves."""
    v = [PY, VARIANTS]
    if inp["id"] in ("sd15-sft", "sd15-ckpt"):
        rows = [("sdconv-openai", "sdconv --to openai", [SDCONV, "convert", str(path), "-o", str(out / "clip.safetensors"),
                                                          "--to", "openai", "-q"], "floor"),
                ("sdconv-hf", "sdconv --to hf", [SDCONV, "convert", str(path), "-o", str(out / "clip-hf"), "--to", "hf", "-q"],
                 "floor"),
                ("floor", "floor: " + ("safe_open" if inp["id"] == "sd15-sft" else "torch.load(mmap, weights_only)")
                 + " TE only -> save_file", v + ["floor", str(path), str(out), SD1_TE], None)]
        if inp["id"] == "sd15-ckpt":
            rows.append(("torch_load", "torch.load whole (weights_only=False) -> pick -> save_file",
                         v + ["torch_load", str(path), str(out), SD1_TE], "floor"))
        else:
            rows.append(("load_file", "safetensors load_file whole -> pick -> save_file",
                         v + ["load_file", str(path), str(out), SD1_TE], "floor"))
        rows.append(("diffusers", "diffusers create_diffusers_clip_model_from_ldm -> save_pretrained"
                     + (" (its loader refuses the file: dict from torch.load weights_only=False)"
                        if inp["id"] == "sd15-ckpt" else ""),
                     v + ["diffusers", str(path), str(out), SD1_TE], "floor"))
        return rows
    return [
        ("sdconv-all-openai", "sdconv --encoder all --to openai (2 files)",
         [SDCONV, "convert", str(path), "-o", str(out / "clip.safetensors"), "--encoder", "all", "--to", "openai", "-q"],
         "floor"),
        ("sdconv-g-hf", "sdconv --encoder clip_g --to hf",
         [SDCONV, "convert", str(path), "-o", str(out / "g-hf"), "--encoder", "clip_g", "--to", "hf", "-q"], "floor-g"),
        ("floor", "floor: safe_open both TEs -> save_file x2", v + ["floor", str(path), str(out), SDXL_L, SDXL_G], None),
        ("floor-g", "floor: safe_open clip_g only -> save_file", v + ["floor", str(path), str(out), SDXL_G], None),
        ("load_file", "safetensors load_file whole -> pick both -> save_file x2",
         v + ["load_file", str(path), str(out), SDXL_L, SDXL_G], "floor"),
        ("diffusers", "diffusers create_diffusers_clip_model_from_ldm x2 -> save_pretrained",
         v + ["diffusers", str(path), str(out), SDXL_L, SDXL_G], "floor"),
    ]


INPUTS = [
    {"id": "sd15-sft", "name": "SD1.5 fp16 .safetensors", "file": "sd15-fp16.safetensors"},
    {"id": "sd15-ckpt", "name": "SD1.5 fp32 .ckpt (Lightning)", "file": "sd15-fp32.ckpt"},
    {"id": "sdxl-sft", "name": "SDXL base fp16 .safetensors", "file": "sdxl-base-fp16.safetensors"},
]


def measure_rows(runner: Runner, rows, reps: int, cold_ok: bool, out: Path, log):
    res = {rid: {"id": rid, "label": label, "cmd": cmd, "floor": floor, "warm": [], "cold": []}
           for rid, label, cmd, floor in rows}
    # untimed: byte-compiles sdconv's changed sources (editable install) and warms its libraries
    runner.timed(next(cmd for rid, _, cmd, _ in rows if rid.startswith("sdconv")), outdir=out)
    for mode in (["warm"] + (["cold"] if cold_ok else [])):
        for rep in range(reps):
            # each repetition starts one variant later, so that no variant always runs first,
            # right after the previous repetition's heaviest (~5 GB) ones
            for rid, label, cmd, floor in rows[rep % len(rows):] + rows[:rep % len(rows)]:
                r = runner.timed(cmd, cold=mode == "cold", outdir=out)
                res[rid][mode].append(r)
                status = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']}: {r.get('stderr', '')[-300:]}"
                log(f"    {mode} {rep + 1}/{reps} {rid:18s} {r['wall']:7.2f} s  {r['rss_kib'] / 1024:8.0f} MiB"
                    f"  (others {r['foreign_cores']:.2f} cores{', waited %.0f s' % r['waited_s'] if r['waited_s'] >= 1 else ''})"
                    f"{status}")
    for r in res.values():
        ok = [x for x in r["warm"] + r["cold"] if x["rc"] == 0]
        r["ok"] = len(ok) == len(r["warm"]) + len(r["cold"])
        r["wall_warm"] = med([x["wall"] for x in r["warm"] if x["rc"] == 0])
        r["wall_cold"] = med([x["wall"] for x in r["cold"] if x["rc"] == 0])
        r["rss_mib"] = med([x["rss_kib"] / 1024 for x in ok])
        cold = [x["wall"] for x in r["cold"] if x["rc"] == 0]
        r["cold_range"] = [min(cold), max(cold)] if cold else None
        r["foreign_cores_max"] = max((x["foreign_cores"] for x in r["warm"] + r["cold"]), default=0.0)
        notes = sorted({x["note"] for x in ok if "note" in x})
        if notes:
            r["note"] = notes[0]
        if not r["ok"]:
            r["error"] = next(x.get("stderr", "") for x in r["warm"] + r["cold"] if x["rc"] != 0)[-500:]
    for r in res.values():
        f = res.get(r["floor"]) if r["floor"] else None
        ratio = (lambda a, b: a / b if (a is not None and b) else None)
        r["ratio_wall_warm"] = ratio(r["wall_warm"], f["wall_warm"]) if f else None
        r["ratio_wall_cold"] = ratio(r["wall_cold"], f["wall_cold"]) if f else None
        r["ratio_rss"] = ratio(r["rss_mib"], f["rss_mib"]) if f else None
    return list(res.values())


# ---------------------------------------------------------------------------------------------
# 3. report
# ---------------------------------------------------------------------------------------------

def fmt(x, spec=".2f", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def render(results: dict) -> str:
    L = []
    meta = results["meta"]
    L.append("# sdconv full-scale benchmark")
    L.append("")
    L.append(f"{meta['date']} · {meta['machine']} · sdconv {meta['sdconv_commit']} · torch {meta['torch']} · "
             f"safetensors {meta['safetensors']} · diffusers {meta['diffusers']} · transformers {meta['transformers']}")
    L.append(f"Median of {meta['reps']} runs per cell, each its own process under `/usr/bin/time -v`, the variants "
             "of an input interleaved, each repetition starting one variant later; "
             f"cold = `sync` + `drop_caches` before the run{'' if meta['cold'] else ' (not measured: ' + meta['cold_note'] + ')'}. "
             "Ratios are to the floor of the same input (SDXL `--encoder clip_g`: to the clip_g-only floor); "
             "wall ratios warm / cold. Peak RSS: median of all runs.")
    L.append("")
    L.append("| input | variant | wall warm | wall cold | peak RSS | wall ÷ floor | RSS ÷ floor |")
    L.append("|---|---|---|---|---|---|---|")
    n = results["null"]
    L.append(f"| — | null: python + `import torch, safetensors` | {fmt(n['wall_warm'], suffix=' s')} | "
             f"{fmt(n['wall_cold'], suffix=' s')} | {fmt(n['rss_mib'], '.0f', ' MiB')} | | |")
    for inp in results["inputs"]:
        for r in inp["rows"]:
            label = r["label"] if r["ok"] else r["label"] + " **(failed)**"
            if r.get("note"):
                label += " ¹"
            wr = "" if r["floor"] is None else f"{fmt(r['ratio_wall_warm'])} / {fmt(r['ratio_wall_cold'])}"
            rr = "" if r["floor"] is None else fmt(r["ratio_rss"])
            name = f"{inp['name']} ({inp['gen']['bytes'] / 1e9:.2f} GB)"
            if r["floor"] is None:
                label = f"**{label}**"
            L.append(f"| {name} | {label} | {fmt(r['wall_warm'], suffix=' s')} | {fmt(r['wall_cold'], suffix=' s')} | "
                     f"{fmt(r['rss_mib'], '.0f', ' MiB')} | {wr} | {rr} |")
    L.append("")
    notes = sorted({r["note"] for inp in results["inputs"] for r in inp["rows"] if r.get("note")})
    for note in notes:
        L.append(f"¹ {note}")
    if notes:
        L.append("")
    c = results["cli"]
    L.append(f"- `sdconv --help`: {fmt(c['help']['wall'], '.3f', ' s')} (peak RSS {fmt(c['help']['rss_mib'], '.0f', ' MiB')}); "
             f"`sdconv inspect` of the SDXL file: {fmt(c['inspect']['wall'], '.3f', ' s')} "
             f"(peak RSS {fmt(c['inspect']['rss_mib'], '.0f', ' MiB')}); warm, median of {meta['reps']}.")
    for line in results["summary"]:
        L.append(f"- {line}")
    L.append("")
    L.append("## Targets (issue 5)")
    L.append("")
    L.append("| target | measured | met |")
    L.append("|---|---|---|")
    for t in results["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else ('—' if t['met'] is None else '**no**')} |")
    L.append("")
    L.append("## Inputs and generation")
    L.append("")
    L.append("| input | tensors | params | bytes | generation wall | generator peak RSS |")
    L.append("|---|---|---|---|---|---|")
    for inp in results["inputs"]:
        g = inp["gen"]
        L.append(f"| {inp['name']} | {g['tensors']:,} | {g['params']:,} | {g['bytes']:,} | {g['wall']:.1f} s | "
                 f"{g['rss_kib'] / 1024 / 1024:.2f} GiB |")
    L.append("")
    L.append(f"Peak disk used by the bench's files: {results['disk_peak'] / 1e9:.2f} GB. "
             f"Total run time: {results['duration_s'] / 60:.1f} min.")
    L.append("")
    return "\n".join(L)


def targets(results: dict):
    out, summary = [], []
    rows = {(inp["id"], r["id"]): r for inp in results["inputs"] for r in inp["rows"]}
    sd = [(k, r) for k, r in rows.items() if k[1].startswith("sdconv")]
    if sd:
        def worst(key):
            vals = [(r[key], f"{k[0]} {k[1]}") for k, r in sd if r[key] is not None]
            return max(vals) if vals else (None, "")
        ww, wn = worst("ratio_wall_warm")
        wc, wcn = worst("ratio_wall_cold")
        rr, rn = worst("ratio_rss")
        met_w = None if ww is None else (ww <= 1.2 and (wc is None or wc <= 1.2))
        out.append({"target": "wall ≤ 1.2 × floor, every input", "met": met_w,
                    "measured": f"worst warm {fmt(ww)} ({wn}); worst cold {fmt(wc)} ({wcn})"})
        out.append({"target": "peak RSS ≤ 1.2 × floor's, every input", "met": None if rr is None else rr <= 1.2,
                    "measured": f"worst {fmt(rr)} ({rn})"})
    tl = rows.get(("sd15-ckpt", "torch_load"))
    sc = [rows.get(("sd15-ckpt", i)) for i in ("sdconv-openai", "sdconv-hf")]
    sc = [r for r in sc if r and r["rss_mib"]]
    if tl and tl["rss_mib"] and sc:
        worst_sd = max(r["rss_mib"] for r in sc)
        ratio = tl["rss_mib"] / worst_sd
        out.append({"target": "fp32 .ckpt: peak RSS ≥ 4 × below torch.load's", "met": ratio >= 4,
                    "measured": f"torch.load {tl['rss_mib']:.0f} MiB / sdconv {worst_sd:.0f} MiB = {ratio:.2f} ×"})
        for r in sc:
            summary.append(f"fp32 .ckpt: {r['label']} peak RSS is {r['rss_mib'] / tl['rss_mib']:.3f} × torch.load's "
                           f"({r['rss_mib']:.0f} / {tl['rss_mib']:.0f} MiB), i.e. {tl['rss_mib'] / r['rss_mib']:.1f} × less.")
    d = results.get("diffusers_loader_ckpt")
    if d:
        what = "loaded it" if d["rc"] == 0 else f"refused it ({d['message'][:600]})"
        summary.append(f"fp32 .ckpt: diffusers' own `load_single_file_checkpoint` (the first step of `from_single_file`) "
                       f"{what} after {d['wall']:.1f} s at {d['rss_kib'] / 1024:.0f} MiB peak RSS (one warm run).")
    c = results["cli"]
    if c["help"]["wall"] is not None:
        out.append({"target": "`sdconv --help` < 0.3 s", "met": c["help"]["wall"] < 0.3, "measured": f"{c['help']['wall']:.3f} s"})
    if c["inspect"]["wall"] is not None:
        out.append({"target": "`sdconv inspect` SDXL .safetensors < 0.5 s", "met": c["inspect"]["wall"] < 0.5,
                    "measured": f"{c['inspect']['wall']:.3f} s"})
    for inp in results["inputs"]:
        for r in inp["rows"]:
            if not r["ok"]:
                last = (r.get("error") or "").strip().splitlines()
                summary.append(f"FAILED: {inp['id']} {r['id']}: {last[-1][:300] if last else '?'}")
    busy = [(r["foreign_cores_max"], f"{inp['id']} {r['id']}") for inp in results["inputs"] for r in inp["rows"]
            if r["foreign_cores_max"] > 0.25]
    if busy:
        summary.append("other processes were busy during some runs (max cores used by others): "
                       + ", ".join(f"{n} {c:.2f}" for c, n in sorted(busy, reverse=True)[:8]))
    for inp in results["inputs"]:
        for r in inp["rows"]:
            if r["cold_range"] and r["wall_cold"] and (r["cold_range"][1] - r["cold_range"][0]) > 0.3 * r["wall_cold"]:
                summary.append(f"noisy cold runs: {inp['id']} {r['id']} {r['cold_range'][0]:.2f}–{r['cold_range'][1]:.2f} s")
    return out, summary


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def versions():
    code = ("import torch, safetensors, importlib.metadata as m; "
            "print(torch.__version__, safetensors.__version__, m.version('diffusers'), m.version('transformers'))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True).stdout.split()
    out += ["?"] * (4 - len(out))
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 1024 / 1024
    return {"torch": out[0], "safetensors": out[1], "diffusers": out[2], "transformers": out[3],
            "sdconv_commit": git + (" + uncommitted src changes" if dirty.strip() else ""),
            "machine": f"{os.cpu_count()} × {cpu}, {mem:.0f} GiB RAM, Python {platform.python_version()}"}


def default_dir() -> Path:
    """A directory on a disk with room: beside the repo (its disk) if it has ≥ 20 GB free, else the
    system temp dir."""
    beside = REPO.parent
    if os.access(beside, os.W_OK) and shutil.disk_usage(beside).free >= 20e9:
        return beside
    return Path(tempfile.gettempdir())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to put the synthetic checkpoints (a temporary folder is made inside it and "
                         "removed at the end); default: beside the repo if that disk has 20 GB free, else the temp dir")
    ap.add_argument("--quick", action="store_true", help="1 repetition, warm cache only")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per cell (default 3)")
    ap.add_argument("--no-cold", action="store_true", help="warm cache only")
    ap.add_argument("--inputs", default=",".join(i["id"] for i in INPUTS),
                    help="comma-separated subset of: " + ", ".join(i["id"] for i in INPUTS))
    ap.add_argument("--results", type=Path, default=HERE, help="where results.md / results.json go (default bench/)")
    ap.add_argument("--_generate", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._generate:
        kind, path = args._generate
        info = (generate_ckpt if kind.endswith("ckpt") else generate_safetensors)(kind, path)
        print(json.dumps(info))
        return

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)      # also when started in the background (SIGINT ignored)

    reps = 1 if args.quick else args.reps
    wanted = args.inputs.split(",")
    unknown = set(wanted) - {i["id"] for i in INPUTS}
    if unknown:
        ap.error(f"unknown input(s) {sorted(unknown)}")
    for tool in (TIME, SDCONV):
        if not os.access(tool, os.X_OK):
            sys.exit(f"bench: {tool} is needed")
    cold_ok, cold_note = False, "--quick" if args.quick else ("--no-cold" if args.no_cold else "")
    if not (args.quick or args.no_cold):
        cold_ok = can_drop_caches()
        if not cold_ok:
            cold_note = "/proc/sys/vm/drop_caches is not writable (needs root)"

    base = args.dir or default_dir()
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < 12e9:
        sys.exit(f"bench: {base} has {free / 1e9:.1f} GB free; the bench needs about 10 GB (use --dir)")
    work = Path(tempfile.mkdtemp(prefix="sdconv-bench-", dir=base))
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               BENCH_CLIP_CONFIGS=str(work / "configs"), PYTHONWARNINGS="ignore")
    results = {"meta": {**versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": reps,
                        "cold": cold_ok, "cold_note": cold_note, "work_dir": str(work),
                        "command": " ".join([Path(sys.executable).name] + sys.argv)},
               "inputs": []}
    log(f"work dir {work} ({free / 1e9:.0f} GB free); {reps} rep(s); cold cache: {cold_ok or cold_note}")
    log(f"sdconv {results['meta']['sdconv_commit']}")
    runner = Runner(work, env, log)
    try:
        write_clip_configs(work / "configs")
        subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "src" / "sdconv")], check=True)
        warm_libs = [PY, "-c", "import sys, types; sys.modules['torchvision._meta_registrations'] = types.ModuleType('x');"
                               "import torch, safetensors, numpy, transformers, sdconv.cli;"
                               "import diffusers.loaders.single_file_utils"]
        runner.timed(warm_libs)
        null_cmd = [PY, VARIANTS, "null"]
        null = {"warm": [], "cold": []}
        for mode in ["warm"] + (["cold"] if cold_ok else []):
            for _ in range(reps):
                null[mode].append(runner.timed(null_cmd, cold=mode == "cold"))
        results["null"] = {"warm": null["warm"], "cold": null["cold"],
                           "wall_warm": med([x["wall"] for x in null["warm"]]),
                           "wall_cold": med([x["wall"] for x in null["cold"]]),
                           "rss_mib": med([x["rss_kib"] / 1024 for x in null["warm"] + null["cold"]])}
        log(f"null: warm {results['null']['wall_warm']:.2f} s, cold {fmt(results['null']['wall_cold'])} s, "
            f"{results['null']['rss_mib']:.0f} MiB")
        results["cli"] = {"help": {"wall": None, "rss_mib": None}, "inspect": {"wall": None, "rss_mib": None}}

        for inp in [i for i in INPUTS if i["id"] in wanted]:
            inp = dict(inp)
            path = work / inp["file"]
            out = work / "out"
            log(f"== {inp['name']}: generating {path.name}")
            gen = runner.timed([PY, str(Path(__file__).resolve()), "--_generate", inp["id"], str(path)], keep_stdout=True)
            if gen["rc"] != 0:
                raise RuntimeError(f"generating {path.name} failed:\n{gen.get('stderr')}")
            info = json.loads(gen["stdout"].strip().splitlines()[-1])
            inp["gen"] = {"wall": gen["wall"], "rss_kib": gen["rss_kib"], "bytes": path.stat().st_size}
            runner.disk_peak = max(runner.disk_peak, du(work))
            log(f"   {path.stat().st_size:,} B in {gen['wall']:.1f} s, generator peak RSS {gen['rss_kib'] / 1024 / 1024:.2f} GiB")
            inp["gen"].update(info)
            rows = variants_for(inp, path, out, work / "configs")
            read_through(path)
            runner.timed(warm_libs)
            inp["rows"] = measure_rows(runner, rows, reps, cold_ok, out, log)
            if inp["id"] == "sd15-ckpt":     # once, warm: what diffusers' from_single_file does first
                r = runner.timed([PY, VARIANTS, "diffusers_loader", str(path), str(out)], outdir=out)
                msg = (r.get("stderr") or "").strip().splitlines()
                r["message"] = msg[-1] if msg else ""
                results["diffusers_loader_ckpt"] = r
                log(f"   diffusers load_single_file_checkpoint: rc {r['rc']} in {r['wall']:.1f} s, "
                    f"{r['rss_kib'] / 1024:.0f} MiB: {r['message'][:200]}")
            if inp["id"] == "sdxl-sft":
                hs, ins = [], []
                runner.timed([SDCONV, "--help"])
                runner.timed([SDCONV, "inspect", str(path)])
                for _ in range(reps):
                    hs.append(runner.timed([SDCONV, "--help"]))
                    ins.append(runner.timed([SDCONV, "inspect", str(path)]))
                for name, xs in (("help", hs), ("inspect", ins)):
                    results["cli"][name] = {"wall": med([x["wall"] for x in xs if x["rc"] == 0]),
                                            "rss_mib": med([x["rss_kib"] / 1024 for x in xs if x["rc"] == 0]),
                                            "runs": xs}
                log(f"   --help {fmt(results['cli']['help']['wall'], '.3f')} s, inspect {fmt(results['cli']['inspect']['wall'], '.3f')} s")
            path.unlink()
            results["inputs"].append(inp)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["disk_peak"] = runner.disk_peak
    results["duration_s"] = time.perf_counter() - t_start
    results["targets"], results["summary"] = targets(results)
    md = render(results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.md").write_text(md)
    (args.results / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(md)
    print(f"wrote {args.results / 'results.md'} and {args.results / 'results.json'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        sys.exit(f"bench: interrupted ({e or 'Ctrl-C'}); its files were removed")

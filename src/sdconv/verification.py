"""`sdconv verify A B`: are two text encoders the same model?

Both are read from any layout and container, run through one reference forward pass
(clip_forward.py, plain torch, fp32) on fixed probe sequences (and prompts, tokenized by the
built-in CLIP tokenizer or a transformers tokenizer folder), and
compared output by output. The weights are compared too, which is what explains the outputs:
identical; equal up to a dtype's rounding (why a cosine is 0.99994 and not 1); or different,
with the relative drift of each block so a fine-tuned layer stands out.
"""
from __future__ import annotations

from dataclasses import dataclass

from .converters import leases
from .converters.analyse import analyse, read_input
from .converters.execute import dtype_counts, load_canonical
from .converters.lora import apply as apply_lora, bind, read_lora
from .converters.registry import DEFAULT, Registry
from .converters.schema import LAYER
from .converters.templates import layer_pattern
from .converters.synthetic import findings
from .errors import UsageError
from .options import check_params

ROUNDINGS = ("float16", "bfloat16")


@dataclass
class Side:
    path: str
    layout: str
    encoder: str
    params: dict
    canon: dict                 # canonical tensors as stored
    dtypes: dict                # dtype name -> count
    family: object
    synthetic: list             # what looks fabricated (synthetic.findings, deep)


def load_side(path, from_=None, encoder=None, params=None, registry: Registry = DEFAULT, lora=(),
              lora_from=None) -> Side:
    """One side of a comparison: its encoder's canonical tensors, as stored (with `lora` merged,
    in order), and what is known of it."""
    given = check_params(params)
    source, reads, _ = read_input(path, from_, given, registry)
    every = found = analyse(source, reads, given)
    names = [f.identity for f in found]
    if encoder:
        found = [f for f in found if f.identity == encoder]
        if not found:
            raise UsageError(f"{path} holds no {encoder} encoder; it holds {', '.join(names)}")
    elif len(found) > 1:
        raise UsageError(f"{path} holds {len(found)} encoders: {', '.join(names)}", "choose one with --encoder NAME")
    f = found[0]
    source.prefetch([k for op in f.read.ops for k in op.keys])     # a remote input: in few requests
    canon = load_canonical(source, f.read)
    loras = [read_lora(spec, lora_from, registry) for spec in lora]
    if loras:
        canon = apply_lora(canon, bind(loras, [f], every, path)[f.identity])
    return Side(str(path), f.read.layout.name, f.identity, f.params, canon, dtype_counts(canon.values()), f.read.layout.family,
                findings(source, f.read, deep=True))


def _group(family, name: str) -> str:
    """Which part of the encoder a canonical tensor belongs to: 'block 3', or its own name."""
    for t in family.tensors:
        if LAYER in t.name:
            m = layer_pattern(t.name).fullmatch(name)
            if m:
                return f"block {m.group(1)}"
    return name.rsplit(".", 1)[0]


def compare_weights(a: Side, b: Side) -> dict:
    import torch
    common = sorted(set(a.canon) & set(b.canon))
    only = {"a": sorted(set(a.canon) - set(b.canon)), "b": sorted(set(b.canon) - set(a.canon))}
    shape_diff = [k for k in common if a.canon[k].shape != b.canon[k].shape]
    if shape_diff:
        return {"same_shapes": False, "shape_differences": shape_diff[:10], "only": only}
    identical = all(a.canon[k].dtype == b.canon[k].dtype and torch.equal(a.canon[k], b.canon[k]) for k in common)
    equal_values = all(torch.equal(a.canon[k].double(), b.canon[k].double()) for k in common)
    rounding = None
    if not equal_values:
        for name in ROUNDINGS:
            d = getattr(torch, name)
            if all(torch.equal(a.canon[k].to(d), b.canon[k].to(d)) for k in common):
                rounding = name
                break
    drift: dict = {}
    for k in common:
        g = _group(a.family, k)
        x, y = a.canon[k].double(), b.canon[k].double()
        num, den = drift.get(g, (0.0, 0.0))
        drift[g] = (num + float((x - y).pow(2).sum()), den + float(x.pow(2).sum()))
    table = [{"part": g, "relative_drift": (n / d) ** 0.5 if d else (0.0 if n == 0 else float("inf"))}
             for g, (n, d) in drift.items()]
    return {"same_shapes": True, "identical": identical, "equal_values": equal_values, "rounding": rounding,
            "only": only, "parts": table}


def _stats(x, y) -> dict:
    import torch
    x, y = x.double().flatten(1), y.double().flatten(1)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
    return {"cosine": float(cos.min()), "max_abs": float((x - y).abs().max())}


def verify(a_path, b_path, *, encoder=None, from_a=None, from_b=None, params_a=None, params_b=None,
           prompts=None, tokenizer=None, atol: float = 1e-5, lora_a=(), lora_b=(), lora_from=None,
           registry: Registry = DEFAULT) -> dict:
    """Are the text encoders in `a_path` and `b_path` the same model? Both run through the built-in
    CLIP forward pass (fp32) on fixed probes (and `prompts`: the built-in CLIP tokenizer's ids,
    or a transformers `tokenizer` folder's); the
    report (a dict, as `sdconv verify --json` prints it) has each side, the weights compared,
    per-probe cosine and max-abs of each output, a `verdict` and an `exit_code` (0: the same).
    `lora_a`, `lora_b`: LoRAs (FILE[:SCALE]) merged into A, into B first (a LoRA's effect per block)."""
    from .options import parse_lora_spec
    la, lb = (tuple(parse_lora_spec(s) for s in ([x] if isinstance(x, str) else x)) for x in (lora_a, lora_b))
    try:
        return _verify(a_path, b_path, encoder, from_a, from_b, params_a, params_b, prompts, tokenizer, atol, registry,
                       (la, lb, lora_from))
    finally:
        leases.release_all()        # done reading: a lease kept would hold up whoever writes the files next


def _verify(a_path, b_path, encoder, from_a, from_b, params_a, params_b, prompts, tokenizer, atol, registry,
            loras) -> dict:
    import torch

    from .clip_forward import PROBE_ROWS, as_float32, encode, probe_ids
    la, lb, lora_from = loras
    a = load_side(a_path, from_a, encoder, params_a, registry, la, lora_from)
    b = load_side(b_path, from_b, encoder, params_b, registry, lb, lora_from)
    w = compare_weights(a, b)
    report = {"a": _describe(a), "b": _describe(b), "weights": w, "atol": atol}
    if not w["same_shapes"]:
        report.update(verdict="different architecture", exit_code=1, probes=[])
        return report
    ctx, vocab = a.canon["pos_embd.weight"].shape[0], a.canon["tok_embd.weight"].shape[0]
    sets = [("probe", [r[0] for r in PROBE_ROWS], probe_ids(ctx, vocab))]
    if prompts:
        ids = _tokenize(prompts, tokenizer, ctx, vocab)
        sets.append(("prompt", prompts, ids))
        report["tokenizer"] = str(tokenizer) if tokenizer is not None else "built-in"
    fa, fb = as_float32(a.canon), as_float32(b.canon)
    rows, worst = [], 0.0
    for kind, names, ids in sets:
        with torch.no_grad():
            oa = encode(fa, ids, a.params["heads"], a.params["act"])
            ob = encode(fb, ids, b.params["heads"], b.params["act"])
        for i, name in enumerate(names):
            row = {"kind": kind, "name": name}
            for out in ("last_hidden", "pooled", "projected"):
                if oa.get(out) is not None and ob.get(out) is not None:
                    row[out] = _stats(oa[out][i:i + 1], ob[out][i:i + 1])
                    worst = max(worst, row[out]["max_abs"])
            rows.append(row)
    report["probes"] = rows
    report["max_abs"] = worst
    same_params = a.params == b.params
    if w["identical"] and same_params:
        verdict = "identical"
    elif w["equal_values"] and same_params:
        verdict = "identical values (different storage dtypes)"
    elif w["rounding"] and same_params:
        verdict = f"equal up to {w['rounding']} rounding"
    elif not same_params:
        verdict = f"different settings: a has {a.params}, b has {b.params}"
    else:
        verdict = "different weights"
    report["verdict"] = verdict
    ok = verdict.startswith(("identical", "equal up to")) or (same_params and worst <= atol)
    report["exit_code"] = 0 if ok else 1
    return report


def _describe(s: Side) -> dict:
    return {"file": s.path, "layout": s.layout, "encoder": s.encoder, "params": s.params, "dtypes": s.dtypes,
            "tensors": len(s.canon), "synthetic": s.synthetic}


def _tokenize(prompts, tokenizer, context, vocab):
    """Prompts to ids: the built-in CLIP tokenizer (OpenAI clip's ids, padded with 0), or a
    transformers CLIPTokenizer folder (optional dependency) when `tokenizer` names one."""
    if tokenizer is None:
        from .tokenizer import VOCAB_SIZE, tokenize
        if vocab != VOCAB_SIZE:
            raise UsageError(f"the built-in CLIP tokenizer gives ids of a {VOCAB_SIZE}-token vocabulary; "
                             f"these encoders have {vocab} tokens",
                             "give --tokenizer PATH (a CLIP tokenizer folder for this vocabulary)")
        return tokenize(list(prompts), context, pad="zero", truncate=True)
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the transformers package for its CLIP tokenizer",
                         "pip install transformers, or leave --tokenizer out: the built-in CLIP tokenizer is used")
    import torch
    tok = CLIPTokenizer.from_pretrained(str(tokenizer), model_max_length=context)
    ids = tok(list(prompts), padding="max_length", truncation=True, max_length=context, return_tensors="pt").input_ids
    return ids.to(torch.long)

"""A reference forward pass of the CLIP text transformer, in plain torch.

It runs straight on the *canonical* dict (see ``mappings/family/clip_text.yaml``; every matrix
``[out, in]``), so ``sdconv verify`` can check a conversion without transformers, open_clip or
OpenAI clip. ``tests/test_forward.py`` holds it to those libraries at ``atol 1e-5`` in fp32.

The architecture (OpenAI CLIP text tower; transformers ``CLIPTextModel`` is the same network):

- ``x = tok_embd[ids] + pos_embd[:L]``
- N pre-LN blocks: ``x = x + attn(attn_norm(x))``; ``x = x + ffn_down(act(ffn_up(ffn_norm(x))))``
- attention: q/k/v ``[W, W]`` each, heads are contiguous ``W // heads``-wide slices of W (no
  per-head permutation), scores scaled by ``1/sqrt(head_dim)``, additive ``-inf`` causal mask
  (upper triangle), softmax in float32, then ``attn_out``
- ``act``: ``quick_gelu`` = ``x * sigmoid(1.702 x)`` (OpenAI weights, ViT-L/14) or ``gelu`` =
  exact erf GELU (OpenCLIP ViT-H/bigG)
- ``last_hidden = final_norm(x)``; ``pooled = last_hidden[b, ids[b].argmax()]`` (OpenAI's rule:
  the end-of-text token 49407 is the largest id; transformers does the same when
  ``config.eos_token_id == 2``); ``projected = pooled @ text_proj.weight.T`` when present.

Only torch is imported here (and the names of the activations, from configs.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .converters.configs import ACTIVATIONS as ACTS

__all__ = ["ACTS", "BOS", "EOS", "PROBE_ROWS", "as_float32", "encode", "num_layers", "probe_ids"]

BOS, EOS = 49406, 49407  # CLIP's <|startoftext|> / <|endoftext|> in the 49408-token vocabulary

_BLOCK_PARAMS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_out",
                 "ffn_norm", "ffn_up", "ffn_down")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def as_float32(canon: dict) -> dict:
    """A float32 copy of a canonical dict (floating tensors cast, others cloned; never aliased)."""
    out = {}
    for k, v in canon.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            out[k] = v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
        else:
            out[k] = v
    return out


def num_layers(canon: dict) -> int:
    """Number of blocks: ``blk.<i>.*`` indices, which must run contiguously from 0."""
    idx = set()
    for k in canon:
        if k.startswith("blk."):
            part = k.split(".", 2)[1]
            if not part.isdigit():
                raise ValueError(f"bad block key {k!r}")
            idx.add(int(part))
    if idx != set(range(len(idx))):
        raise ValueError(f"block indices are not contiguous from 0: {sorted(idx)}")
    return len(idx)


def _compute_dtype(canon: dict) -> torch.dtype:
    """Promotion over the floating tensors: fp16 stays fp16; a mixed fp16/fp32 dict runs in fp32."""
    dt = None
    for v in canon.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            dt = v.dtype if dt is None else torch.promote_types(dt, v.dtype)
    if dt is None:
        raise ValueError("canonical dict holds no floating-point tensors")
    return dt


def _activation(act: str):
    if act == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if act == "gelu":
        return lambda x: F.gelu(x, approximate="none")
    raise ValueError(f"act must be one of {ACTS}, not {act!r}")


def causal_mask(length: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Additive ``[L, L]`` mask: 0 on and below the diagonal, ``-inf`` above it."""
    m = torch.full((length, length), float("-inf"), dtype=dtype, device=device)
    return torch.triu(m, diagonal=1)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
def encode(canon: dict, ids: torch.Tensor, heads: int, act: str = "quick_gelu", eps: float = 1e-5,
           hidden_layers: bool = False, dtype: torch.dtype | None = None) -> dict:
    """Run the CLIP text transformer held in ``canon`` on token ids ``[B, L]`` (or ``[L]``).

    Returns a dict:
      ``last_hidden`` ``[B, L, W]`` after ``final_norm``;
      ``pooled`` ``[B, W]``, ``last_hidden`` at ``ids.argmax(-1)`` (first maximum);
      ``projected`` ``[B, P]`` = ``pooled @ text_proj.weight.T``, or ``None`` without ``text_proj.weight``;
      with ``hidden_layers=True`` also ``hidden_states``: N+1 tensors ``[B, L, W]`` (embeddings,
      then each block's output, none with the final norm), as transformers' ``output_hidden_states``.

    Computation runs in ``dtype`` (default: the promoted dtype of the dict's floating tensors, so
    an fp16 dict runs in fp16 and a mixed fp16/fp32 one in fp32), on the device of
    ``tok_embd.weight``; only the softmax runs in float32. ``L`` may be shorter than the context
    (``pos_embd.weight``'s length); positions ``0..L-1`` are used.
    """
    act_fn = _activation(act)
    if dtype is None:
        dtype = _compute_dtype(canon)
    try:
        tok = canon["tok_embd.weight"]
        pos = canon["pos_embd.weight"]
    except KeyError as e:
        raise ValueError(f"canonical dict lacks {e.args[0]!r}") from None
    device = tok.device

    def t(key: str) -> torch.Tensor:
        try:
            return canon[key].to(device=device, dtype=dtype)
        except KeyError:
            raise ValueError(f"canonical dict lacks {key!r}") from None

    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integer, got {ids.dtype}")
    ids = ids.to(device=device, dtype=torch.long)
    batch, length = ids.shape
    vocab, width = tok.shape
    context = pos.shape[0]
    if length < 1 or length > context:
        raise ValueError(f"sequence length {length} outside 1..{context} (pos_embd.weight rows)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in 0..{vocab - 1}")
    if heads < 1 or width % heads:
        raise ValueError(f"heads={heads} does not divide width {width}")
    head_dim = width // heads
    scale = 1.0 / math.sqrt(head_dim)
    layers = num_layers(canon)

    x = F.embedding(ids, tok.to(dtype)) + pos[:length].to(device=device, dtype=dtype)
    hidden = [x] if hidden_layers else None
    mask = causal_mask(length, torch.float32, device)

    def split_heads(y: torch.Tensor) -> torch.Tensor:  # [B, L, W] -> [B, H, L, D]
        return y.view(batch, length, heads, head_dim).transpose(1, 2)

    for i in range(layers):
        p = f"blk.{i}."
        h = F.layer_norm(x, (width,), t(p + "attn_norm.weight"), t(p + "attn_norm.bias"), eps)
        q = split_heads(F.linear(h, t(p + "attn_q.weight"), t(p + "attn_q.bias")))
        k = split_heads(F.linear(h, t(p + "attn_k.weight"), t(p + "attn_k.bias")))
        v = split_heads(F.linear(h, t(p + "attn_v.weight"), t(p + "attn_v.bias")))
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
        probs = torch.softmax(scores.float() + mask, dim=-1).to(dtype)
        a = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(a, t(p + "attn_out.weight"), t(p + "attn_out.bias"))

        h = F.layer_norm(x, (width,), t(p + "ffn_norm.weight"), t(p + "ffn_norm.bias"), eps)
        h = act_fn(F.linear(h, t(p + "ffn_up.weight"), t(p + "ffn_up.bias")))
        x = x + F.linear(h, t(p + "ffn_down.weight"), t(p + "ffn_down.bias"))
        if hidden_layers:
            hidden.append(x)

    last = F.layer_norm(x, (width,), t("final_norm.weight"), t("final_norm.bias"), eps)
    pooled = last[torch.arange(batch, device=device), ids.argmax(dim=-1)]
    projected = None
    if "text_proj.weight" in canon:
        projected = F.linear(pooled, t("text_proj.weight"))
    out = {"last_hidden": last, "pooled": pooled, "projected": projected}
    if hidden_layers:
        out["hidden_states"] = hidden
    return out


# --------------------------------------------------------------------------------------------
# Probe token ids
# --------------------------------------------------------------------------------------------
# (name, end-of-text position, padding after it). Positions are for context 77; for a shorter
# context "short" is min(3, C-1), "middle" C // 2 and "last" C - 1. Each "pad 0" row and the
# "pad eos" row after it share their tokens up to the end-of-text, so under the causal mask their
# pooled outputs must agree: the padding convention must not matter.
PROBE_ROWS = (
    ("short_pad0", "short", 0),     # row 0: bos, 2 tokens, eos at 3, then 0s (OpenAI/open_clip tokenizers)
    ("short_padeos", "short", EOS),  # row 1: same tokens, then eos repeated (transformers' CLIPTokenizer)
    ("mid_pad0", "middle", 0),      # row 2: bos, 37 tokens, eos at 38, then 0s
    ("mid_padeos", "middle", EOS),  # row 3: same tokens, then eos repeated
    ("full", "last", None),         # row 4: bos, 75 tokens, eos at 76 (the last position), no padding
    ("empty_padeos", "first", EOS),  # row 5: empty prompt: bos, eos at 1, then eos repeated
)
_PROBE_SEED = 0x5DC0


def probe_ids(context: int = 77, vocab: int = 49408) -> torch.Tensor:
    """The fixed probe suite, ``LongTensor [6, context]`` (rows: ``PROBE_ROWS``).

    Every row starts with bos (``vocab - 2``, 49406) and holds exactly one run of end-of-text
    (``vocab - 1``, 49407) starting at its eos position, so ``argmax`` finds that position; tokens
    between bos and eos are pseudo-random ids in ``1 .. vocab - 3`` drawn from a fixed
    ``torch.Generator``, so the suite is identical on every machine and run.
    """
    if context < 2:
        raise ValueError("context must be at least 2 (bos and eos)")
    if vocab < 3:
        raise ValueError("vocab must be at least 3")
    bos, eos = vocab - 2, vocab - 1
    where = {"first": 1, "short": min(3, context - 1), "middle": max(1, context // 2), "last": context - 1}
    g = torch.Generator().manual_seed(_PROBE_SEED)
    body = {}  # one draw per eos position, shared by the pad-0 / pad-eos pair
    rows = []
    for _name, place, pad in PROBE_ROWS:
        pos = where[place]
        if pos not in body:
            body[pos] = torch.randint(1, max(2, bos), (pos - 1,), generator=g, dtype=torch.long)
        r = torch.full((context,), 0 if pad is None else (eos if pad == EOS else pad), dtype=torch.long)
        r[0] = bos
        r[1:pos] = body[pos]
        r[pos] = eos
        rows.append(r)
    return torch.stack(rows)

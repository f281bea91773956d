"""Encoder fingerprints (`sdconv fingerprint`): an identity of an encoder computed from its
canonical tensors' values alone, so that it survives a change of layout, container or file.

The exact digest is the sha256 of, for each canonical tensor in name order: its name, dtype code
and shape (a line), then its bytes (little-endian, row-major). Same weights in the same dtype:
the same digest, whatever the layout (a fused q|k|v is split into q, k and v first), the
container or the file; any changed value, or another dtype: another digest. Buffers
(position_ids) are not weights and are left out; the digest is never read back from metadata."""
from __future__ import annotations

import hashlib

from .converters import dtypes, leases
from .converters.analyse import analyse, read_input
from .converters.execute import dtype_counts, load_canonical
from .converters.registry import DEFAULT, Registry
from .converters.sources import tensor_bytes

FINGERPRINT_VERSION = 1


def digest(canonical: dict) -> str:
    """The exact digest of {canonical name: tensor}."""
    h = hashlib.sha256(f"sdconv-fingerprint {FINGERPRINT_VERSION}\n".encode())
    for name in sorted(canonical):
        t = canonical[name].contiguous()
        h.update(f"{name} {dtypes.code_of(t.dtype)} {list(t.shape)}\n".encode())
        h.update(bytes(tensor_bytes(t)))
    return h.hexdigest()


def fingerprint(input, *, encoder: str | None = None, from_: str | None = None,
                registry: Registry = DEFAULT) -> list[dict]:
    """One record per encoder of `input` (or the one `encoder` names): file, encoder, layout,
    digest, and the dtypes and tensor count it covers."""
    try:
        source, reads, _ = read_input(input, from_, {}, registry)
        out = []
        for f in analyse(source, reads, {}):
            if encoder not in (None, "all", f.identity):
                continue
            source.prefetch([k for op in f.read.ops for k in op.keys])     # a remote input: at once
            canon = load_canonical(source, f.read)
            out.append({"file": str(input), "encoder": f.identity, "layout": f.read.layout.name,
                        "digest": digest(canon), "tensors": len(canon), "dtypes": dtype_counts(canon.values())})
        return out
    finally:
        leases.release_all()


def relate(records: list[dict]) -> list[dict]:
    """Encoders grouped by digest: [{"digest", "count", "members": [file (encoder)]}], most first."""
    groups: dict = {}
    for r in records:
        groups.setdefault(r["digest"], []).append(f"{r['file']} ({r['encoder']})")
    return sorted(({"digest": d, "count": len(m), "members": m} for d, m in groups.items()),
                  key=lambda g: -g["count"])

"""Laying out an output: a target layout's tensors into one file, or into a folder with each
encoder slot's sub-folder, weights file and config; or a whole CLIP (text and vision)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import configs
from .registry import ResolvedLayout
from .schema import Slot
from .stream import TensorStream
from .writers import save_tensors


@dataclass
class SlotOutput:
    """One encoder's tensors, in the slot of the target layout they are written to."""
    slot: Slot
    tensors: TensorStream
    arch: dict                  # the architecture written (for config.json)
    params: dict                # heads and act (for config.json)
    metadata: dict | None = None    # this slot's own weights-file metadata (folder layouts), else the output's


def write_layout(target: ResolvedLayout, fmt: str, tmp: Path, parts: list[SlotOutput], metadata: dict) -> list[Path]:
    """Write the encoders' tensors into `tmp` as `target` lays them out; the files written."""
    if target.layout.output == "file":
        save_tensors(TensorStream.concat([p.tensors for p in parts]), tmp, fmt, metadata)
        return [tmp]
    files = []
    for p in parts:
        folder = p.slot.folder
        sub = tmp / folder if folder else tmp
        sub.mkdir(parents=True, exist_ok=True)
        weights = sub / target.layout.folder_weights[fmt]
        save_tensors(p.tensors.renamed(lambda k: k[len(folder):]), weights, fmt,
                     p.metadata if p.metadata is not None else metadata)
        files.append(weights)
        if p.slot.config is not None:
            cfg = sub / p.slot.config.file
            cfg.write_text(configs.SLOT_FORMATS[p.slot.config.format].write(p.arch, p.params, p.tensors.dominant_dtype()))
            files.append(cfg)
    return files


def write_whole_clip(target: ResolvedLayout, vision_target: ResolvedLayout, fmt: str, tmp: Path, text: SlotOutput,
                     vision: TensorStream, vision_config: tuple, metadata: dict) -> list[Path]:
    """A whole CLIP: text and vision tensors in one weights file (plus a config for folders).
    `vision_config`: (the vision tower's arch, its params)."""
    tensors = TensorStream.concat([text.tensors, vision])
    if vision_target.layout.output == "file":
        save_tensors(tensors, tmp, fmt, metadata)
        return [tmp]
    weights = tmp / vision_target.layout.folder_weights[fmt]
    save_tensors(tensors, weights, fmt, metadata)
    files = [weights]
    spec = target.layout.vision.config
    if spec is not None:
        cfg = tmp / spec.file
        cfg.write_text(configs.CLIP_FORMATS[spec.format](text.arch, text.params, tensors.dominant_dtype(), vision_config))
        files.append(cfg)
    return files

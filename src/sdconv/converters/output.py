"""Laying out an output: a target layout's tensors into one file, or into a folder with each
encoder slot's sub-folder, weights file, config and tokenizer files; or a whole CLIP (text and
vision, with the image processor's config where the layout has one)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import configs
from .preprocessing import PROCESSOR_FORMATS
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
    tokenizer: dict = field(default_factory=dict)   # {path in the output: text} (preprocessing.tokenizer_files)


def write_texts(tmp: Path, files: dict) -> list[Path]:
    """Write {path in the output: text} under `tmp` (UTF-8); the files written."""
    out = []
    for name, text in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out


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
        files += write_texts(tmp, p.tokenizer)
    return files


def write_whole_clip(target: ResolvedLayout, vision_target: ResolvedLayout, fmt: str, tmp: Path, text: SlotOutput,
                     vision: TensorStream, vision_config: tuple, metadata: dict) -> list[Path]:
    """A whole CLIP: text and vision tensors in one weights file (plus a config for folders).
    `vision_config`: (the vision tower's arch, its params)."""
    fam = vision_target.family
    tower = configs.VisionTower(*vision_config, fam.image_mean, fam.image_std)
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
        cfg.write_text(configs.CLIP_FORMATS[spec.format](text.arch, text.params, tensors.dominant_dtype(), tower))
        files.append(cfg)
    processor = target.layout.vision.processor
    if processor is not None:
        size, _ = configs.image_geometry(tower.arch)
        processor_text = PROCESSOR_FORMATS[processor.format](size, fam.image_mean, fam.image_std)
        files += write_texts(tmp, {processor.file: processor_text})
    return files + write_texts(tmp, text.tokenizer)

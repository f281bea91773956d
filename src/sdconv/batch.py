"""Batch conversions: many inputs, one output folder, incremental, with a report.

Inputs are files, model folders, folders of checkpoints (expanded, not recursive) or globs.
Outputs are named `<stem><ext>` (or a folder `<stem>` for folder layouts; with --encoder all
and a one-encoder layout, `<stem>.<encoder><ext>`). An output that sdconv made from the same
input with the same options, newer than the input, is skipped (unless force); a stale one made
by sdconv is replaced; anything else already there is refused without force.
"""
from __future__ import annotations

import gc
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

from .converters import metakeys, untrusted
from .converters.atomic import AtomicOutput, refuse_overlap, refuse_special
from .converters.engine import convert
from .converters.folders import FOLDER_WEIGHTS, open_source
from .converters.registry import DEFAULT, Registry
from .converters.remote import RemoteName, is_remote
from .converters.sources import PICKLE_EXT, SAFETENSORS_EXT
from .errors import MalformedInputError, OutputError, SdconvError, UsageError
from .options import ConvertOptions

CHECKPOINT_EXT = SAFETENSORS_EXT + PICKLE_EXT
MODEL_FOLDER_MARKERS = ("config.json", "model_index.json", "open_clip_config.json")


def is_model_folder(d: Path) -> bool:
    """A transformers / diffusers / open_clip folder (one model), as opposed to a folder of checkpoints."""
    if any((d / m).is_file() for m in MODEL_FOLDER_MARKERS + FOLDER_WEIGHTS):
        return True
    return any(sub.is_dir() and any((sub / m).is_file() for m in MODEL_FOLDER_MARKERS + FOLDER_WEIGHTS)
               for sub in d.iterdir())


def expand(inputs) -> tuple[list[Path], bool]:
    """(input paths, whether this is a batch): globs and folders of checkpoints expanded."""
    out, batch = [], len(inputs) > 1
    for raw in inputs:
        if is_remote(raw):
            out.append(RemoteName(raw))
            continue
        p = Path(raw)
        if not p.exists() and glob.has_magic(str(raw)):
            hits = sorted(Path(h) for h in glob.glob(str(raw)))
            if not hits:
                raise UsageError(f"{raw}: no file matches", "check the pattern")
            out += hits
            batch = True
        elif p.is_dir() and not is_model_folder(p):
            hits = sorted(q for q in p.iterdir() if q.is_file() and q.suffix in CHECKPOINT_EXT)
            if not hits:
                raise UsageError(f"{p}: no checkpoints in this folder", f"sdconv reads {', '.join(CHECKPOINT_EXT)}")
            out += hits
            batch = True
        else:
            out.append(p)
    return out, batch


def output_for(inp: Path, out_dir: Path, folder_layout: bool, fmt: str | None) -> Path:
    stem = inp.name if not is_remote(inp) and inp.is_dir() else inp.stem
    if folder_layout:
        return out_dir / stem
    return out_dir / (stem + (".pt" if fmt == "pt" else ".safetensors"))


def _made_by_sdconv_with(out: Path, options: dict) -> bool | None:
    """True: sdconv made it with these options; False: with others; None: not sdconv's (or its
    record cannot be read: then nothing proves it is sdconv's, and it is not replaced unasked)."""
    for side in (out.with_name(out.name + metakeys.SIDECAR_SUFFIX), out / metakeys.SIDECAR_IN_FOLDER):
        if side.exists():
            try:
                said = untrusted.read_json(side).obj().get(metakeys.sidecar_key(metakeys.OPTIONS))
            except (OSError, MalformedInputError):
                return None
            return said is not None and json.dumps(said.raw, sort_keys=True) == json.dumps(options, sort_keys=True)
    try:
        meta = open_source(out).metadata()
    except SdconvError:
        return None
    if metakeys.OPTIONS not in meta:
        return None
    return meta[metakeys.OPTIONS] == json.dumps(options, sort_keys=True)


def _existing_outputs(out: Path, registry) -> list[Path]:
    """What an earlier run made for this output name: the output itself, or its per-encoder
    splits (<stem>.<encoder><ext>)."""
    if out.exists():
        return [out]
    base = out.stem if out.suffix else out.name
    names = set()
    for _, rl in registry.all_layouts():
        if hasattr(rl, "family"):
            names |= set(rl.family.kinds) | set(rl.layout.slots)
    return sorted(p for n in names if (p := out.with_name(f"{base}.{n}{out.suffix}")).exists())


def _newest_mtime(p: Path) -> float:
    if p.is_dir():
        return max((q.stat().st_mtime for q in p.rglob("*") if q.is_file()), default=p.stat().st_mtime)
    return p.stat().st_mtime


@dataclass
class Record:
    input: str
    status: str                     # converted / skipped / failed / not run
    outputs: list[str] = field(default_factory=list)
    layout: str | None = None
    encoders: list[str] = field(default_factory=list)
    sha256: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0
    reason: str = ""

    def json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def _convert_one(inp: Path, out: Path, options: ConvertOptions, registry) -> Record:
    try:
        r = convert(inp, out, options.replace(force=True), registry=registry, record=options.record())
    except SdconvError as e:
        return Record(str(inp), "failed", error=str(e), exit_code=e.exit_code)
    return Record(str(inp), "converted", [str(o) for o in r.outputs], r.plan.read.layout.name,
                  [e.identity for p in r.plans for e in p.encoders], r.source_sha256,
                  [w for p in r.plans for e in p.encoders for w in e.warnings])


def run_batch(inputs: list[Path], out_dir: Path, options: ConvertOptions, *, continue_on_error: bool = False,
              registry: Registry = DEFAULT, on_record=None) -> list[Record]:
    """Convert each input into out_dir; returns one Record per input (`on_record(record)` is
    called as each is done). With options.force, up-to-date outputs are redone and outputs
    sdconv did not make are replaced."""
    force = options.force
    target = registry.layout(options.to)
    whole = options.with_vision is not None or options.whole_clip
    folder_layout = target.layout.output == "folder" or (whole and target.layout.vision
                                                         and target.layout.vision.output == "folder")
    check_output_folder(out_dir, inputs)
    outputs = {inp: output_for(inp, out_dir, folder_layout, options.fmt) for inp in inputs}
    seen: dict[Path, Path] = {}
    for inp, out in outputs.items():
        if out in seen:
            raise UsageError(f"{inp} and {seen[out]} would both write {out}", "convert them into separate folders")
        seen[out] = inp
        refuse_overlap(out, inputs)             # one input's output may not be another input
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    stop = False
    for inp in inputs:
        out = outputs[inp]
        if stop:
            records.append(Record(str(inp), "not run", reason="an earlier input failed (--continue-on-error goes on)"))
            continue
        made = _existing_outputs(out, registry)
        same = [_made_by_sdconv_with(p, options.record()) for p in made]
        # a URL's file cannot be dated without asking its server: it is converted again
        fresh = made and all(same) and not is_remote(inp) and min(_newest_mtime(p) for p in made) >= _newest_mtime(inp)
        if fresh and not force:
            rec = Record(str(inp), "skipped", [str(p) for p in made], reason="up to date (same options, newer)")
        elif made and any(s is None for s in same) and not force:
            rec = Record(str(inp), "failed", error=f"{made[0]} exists and was not made by sdconv (--force replaces it)",
                         exit_code=6)
        else:
            rec = _convert_one(inp, out, options, registry)
            # the CLI runs with cyclic GC off (cli._Group.invoke); what this conversion left in
            # reference cycles is freed here, scanning only the objects made since the last input
            gc.collect(0)
        records.append(rec)
        if on_record:
            on_record(rec)
        if rec.status == "failed" and not continue_on_error:
            stop = True
    return records


def check_output_folder(out_dir: Path, inputs: list[Path]):
    """-o of a batch is a folder (made if missing, its parent must exist), never an input."""
    refuse_overlap(out_dir, inputs, replaces=False)
    refuse_special(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file; with several inputs, -o names the folder the outputs go to",
                          "choose a folder (it is made if missing)")
    if not out_dir.exists() and not out_dir.parent.is_dir():
        raise OutputError(f"{out_dir.parent}: the output folder's parent does not exist", "create it first")


class ReportFile:
    """The JSON-lines report of a batch (--report): checked before anything is converted (never an
    input or inside one, never a file that is not an sdconv report unless force), written to a
    temporary beside it, one line per input as each is done, and put in place when the run ends."""

    def __init__(self, path, inputs: list[Path], force: bool):
        path = Path(path)
        self._guard = AtomicOutput(path, False, True, protect=inputs)   # never an input, a FIFO or a device
        if path.exists() and not force and not _is_report(path):
            raise OutputError(f"{path} exists and is not an sdconv report", "pass --force to replace it, or name "
                                                                           "another --report file")
        self._file = open(self._guard.__enter__(), "w", encoding="utf-8")

    def write(self, rec: "Record"):
        self._file.write(rec.json() + "\n")
        self._file.flush()

    def close(self, failed: BaseException | None = None):
        """Put the report in place; after a failure (Ctrl-C), remove it and leave nothing."""
        self._file.close()
        self._guard.__exit__(type(failed) if failed else None, failed, None)


def _is_report(path: Path) -> bool:
    """An earlier report (or an empty file): each line a JSON record of an input."""
    try:
        text = untrusted.read_file(path, 64 << 20)     # reports are ~1 KB an input; a checkpoint is not one
        first = text.split(b"\n", 1)[0]
        if not first.strip():
            return not text
        rec = untrusted.parse_json(first, str(path))
    except (OSError, MalformedInputError):
        return False
    return rec.is_object() and {"input", "status"} <= set(rec.raw)

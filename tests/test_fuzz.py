"""Fuzzing: whatever bytes or text come in, the mapping loader, the safetensors header reader
and the pickle readers either load or raise one of sdconv's documented errors - never another
exception, a hang or a crash. Thousands of examples per target, a few seconds each."""
import atexit
import io
import json
import shutil
import pickle
import pickletools
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdconv.converters.folders import open_file
from sdconv.converters.sources import tensor_bytes
from sdconv.errors import SdconvError
from sdconv.converters.registry import BUILTIN_DIR
from sdconv.converters.schema import parse_family, parse_layout, parse_naming

FAST = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
# structured generators are slower: fewer examples each, still thousands per target
SLOW = settings(FAST, max_examples=1000)
TMP = Path(tempfile.mkdtemp(prefix="sdconv-fuzz-"))
atexit.register(shutil.rmtree, TMP, True)


def _file(name: str, data: bytes) -> Path:
    p = TMP / name
    p.write_bytes(data)
    return p


def _reads_or_documented_error(path: Path):
    try:
        src = open_file(path)
        for k in list(src.keys())[:8]:     # reading a few tensors exercises offsets and dtypes too
            src.load(k)
    except SdconvError:
        pass


# ---------------------------------------------------------------- mapping files

LAYOUT_TEXT = (BUILTIN_DIR / "ldm.yaml").read_text()
NAMING_TEXT = (BUILTIN_DIR / "naming" / "openai.yaml").read_text()
FAMILY = parse_family(BUILTIN_DIR / "family" / "clip_text.yaml")
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
yaml_values = st.recursive(yaml_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(st.text(max_size=10), c, max_size=4)),
                           max_leaves=12)


def _parse_all(name: str, text: str):
    for parse, args in ((parse_layout, ()), (parse_naming, (FAMILY,)), (parse_family, ())):
        p = TMP / parse.__name__ / f"{name}.yaml"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(text.encode("utf-8", "replace"))
        try:
            parse(p, *args)
        except SdconvError:
            pass


@FAST
@given(st.text(max_size=300))
def test_yaml_any_text(text):
    _parse_all("x", text)


@SLOW
@given(st.integers(0, len(LAYOUT_TEXT)), st.integers(0, 40), st.text(max_size=20))
def test_yaml_mutated_layout(at, cut, insert):
    _parse_all("ldm", LAYOUT_TEXT[:at] + insert + LAYOUT_TEXT[at + cut:])
    _parse_all("openai", NAMING_TEXT[:at] + insert + NAMING_TEXT[at + cut:])


@SLOW
@given(st.dictionaries(st.sampled_from(["schema", "kind", "name", "family", "description", "output", "encoders",
                                        "ignore", "detect", "tensors", "groups", "params", "vision", "buffers"]),
                       yaml_values, max_size=8))
def test_yaml_structures(doc):
    import yaml
    _parse_all("x", yaml.safe_dump(doc))


# ---------------------------------------------------------------- safetensors headers

def _st(header, data=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "Q9", "", "F8_E4M3"]),
    "shape": st.lists(st.integers(-2, 6), max_size=3),
    "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3)})


@SLOW
@given(st.dictionaries(st.text(max_size=8), st.one_of(entries, yaml_values), max_size=5), st.binary(max_size=96))
def test_safetensors_headers(header, data):
    _reads_or_documented_error(_file("h.safetensors", _st(header, data)))


@FAST
@given(st.binary(max_size=200))
def test_safetensors_any_bytes(data):
    _reads_or_documented_error(_file("b.safetensors", data))


GOOD_ST = _st({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
               "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}, b"\1" * 24)


@FAST
@given(st.integers(0, len(GOOD_ST) - 1), st.binary(min_size=1, max_size=8), st.booleans())
def test_safetensors_mutated(at, patch, truncate):
    data = GOOD_ST[:at] if truncate else GOOD_ST[:at] + patch + GOOD_ST[at + len(patch):]
    _reads_or_documented_error(_file("m.safetensors", data))


# ---------------------------------------------------------------- pickles (torch zip, legacy, TorchScript)

def _torch_bytes(obj, zip_format=True) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


GOOD_ZIP = _torch_bytes({"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "i": torch.arange(3)}, "step": 7})
GOOD_LEGACY = _torch_bytes({"state_dict": {"w": torch.arange(6.0)}}, zip_format=False)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(["zip", "legacy"]), st.integers(0, 4000), st.binary(min_size=1, max_size=6), st.booleans())
def test_pickle_mutated(kind, at, patch, truncate):
    good = GOOD_ZIP if kind == "zip" else GOOD_LEGACY
    at %= len(good)
    data = good[:at] if truncate else good[:at] + patch + good[at + len(patch):]
    _reads_or_documented_error(_file("p.ckpt", data))


@FAST
@given(st.binary(max_size=300))
def test_pickle_any_bytes(data):
    _reads_or_documented_error(_file("r.ckpt", data))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.binary(max_size=200), st.booleans())
def test_torchscript_shaped_archives(pkl, with_data):
    """Anything in a TorchScript-looking zip's data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("m/data.pkl", pkl)
        z.writestr("m/constants.pkl", pickle.dumps(()))
        z.writestr("m/code/__torch__/m.py", "")
        if with_data:
            z.writestr("m/data/0", b"\0" * 16)
    _reads_or_documented_error(_file("t.pt", buf.getvalue()))


# ---------------------------------------------------------------- torch zips: records and pickle opcodes

def _zip_records(data: bytes) -> list:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


# a real torch zip with two dtypes, a view sharing a storage, and Lightning-style extras
REAL_RECORDS = _zip_records(_torch_bytes({"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "i": torch.arange(3),
                                                          "v": torch.arange(8.0)[2:6]}, "step": 7}))
REAL_PICKLE = next(b for n, b in REAL_RECORDS if n.endswith("/data.pkl"))
OP_STARTS = [pos for _op, _arg, pos in pickletools.genops(REAL_PICKLE)]
OPCODES = sorted({op.code.encode("latin-1") for op in pickletools.opcodes})
DATA_RECORDS = [i for i, (n, _b) in enumerate(REAL_RECORDS) if "/data/" in n]

pickle_edits = st.one_of(
    st.tuples(st.just("opcode"), st.sampled_from(OP_STARTS), st.sampled_from(OPCODES)),     # an opcode swapped
    st.tuples(st.just("insert"), st.sampled_from(OP_STARTS), st.sampled_from(OPCODES), st.binary(max_size=9)),
    st.tuples(st.just("delete"), st.integers(0, len(OP_STARTS) - 2)),                        # an opcode dropped
    st.tuples(st.just("arg"), st.sampled_from(OP_STARTS), st.integers(1, 8), st.integers(0, 255)))
record_edits = st.one_of(
    st.tuples(st.just("cut"), st.sampled_from(DATA_RECORDS), st.integers(0, 32)),
    st.tuples(st.just("grow"), st.sampled_from(DATA_RECORDS), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("drop"), st.sampled_from(DATA_RECORDS)),
    st.tuples(st.just("twice"), st.sampled_from(DATA_RECORDS)),
    st.tuples(st.just("deflate"), st.sampled_from(DATA_RECORDS)))


def _edit_pickle(pkl: bytes, edit) -> bytes:
    kind, at = edit[0], edit[1]
    if kind == "opcode":
        return pkl[:at] + edit[2] + pkl[at + 1:]
    if kind == "insert":
        return pkl[:at] + edit[2] + edit[3] + pkl[at:]
    if kind == "delete":
        start, end = OP_STARTS[at], OP_STARTS[at + 1]
        return pkl[:start] + pkl[end:]
    pos = min(at + edit[2], len(pkl) - 1)
    return pkl[:pos] + bytes([edit[3]]) + pkl[pos + 1:]


def _build_zip(pickle_edit_list, record_edit) -> bytes:
    pkl = REAL_PICKLE
    for e in pickle_edit_list:
        pkl = _edit_pickle(pkl, e)
    records = [(n, pkl if n.endswith("/data.pkl") else b, zipfile.ZIP_STORED) for n, b in REAL_RECORDS]
    if record_edit is not None:
        kind, i = record_edit[0], record_edit[1]
        n, b, _c = records[i]
        if kind == "cut":
            records[i] = (n, b[:record_edit[2]], zipfile.ZIP_STORED)
        elif kind == "grow":
            records[i] = (n, b + record_edit[2], zipfile.ZIP_STORED)
        elif kind == "drop":
            del records[i]
        elif kind == "twice":
            records.append((n, b[::-1], zipfile.ZIP_STORED))
        else:
            records[i] = (n, b, zipfile.ZIP_DEFLATED)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # "Duplicate name"
        with zipfile.ZipFile(buf, "w") as z:
            for n, b, c in records:
                z.writestr(n, b, compress_type=c)
    return buf.getvalue()


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(pickle_edits, max_size=3), st.one_of(st.none(), record_edits))
def test_torch_zip_records_and_opcodes(pickle_edit_list, record_edit):
    """A real torch zip with its data.pkl's opcodes swapped, inserted, dropped or their arguments
    changed, and its storage records cut, grown, dropped, duplicated or deflated: it reads (and
    every tensor's bytes can be read) or gives one of sdconv's errors; never another exception
    or a crash (a bad view or a record read past its end would crash the process)."""
    path = _file("z.ckpt", _build_zip(pickle_edit_list, record_edit))
    try:
        src = open_file(path)
        for k in src.keys():
            t = src.load(k)
            c = t.contiguous()
            assert src.raw(k) == bytes(tensor_bytes(c))
            float(t.double().sum())
    except SdconvError:
        pass

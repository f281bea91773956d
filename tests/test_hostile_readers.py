"""Hostile text in inputs (issue 13, items 5 and 6): every untrusted text goes through one
bounded, typed reader (converters/untrusted.py), and folders stay folders.

Each case runs sdconv as a program, under a time limit and a memory cap, and gives its documented
exit code and exactly one line on stderr (or, for sdconv's own optional records, success and one
warning), no traceback, no output or temporary left, and its input unchanged (hashed; FIFOs are
never opened, not even by the test)."""
import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdconv.converters.registry import BUILTIN_DIR
from sdconv.converters.writers import write_safetensors
from sdconv.errors import MappingError
from tests.helpers.fixtures import distinct_canonical, read_all, write_layout

TIMEOUT = 60                # seconds; a hang is caught here (the cases take a few seconds on a busy machine)
MEMORY = 3 << 30            # address space cap: torch needs ~1.5 GB of it


def _cap():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _sdconv(args, cwd: Path, cache: Path):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sdconv", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT, preexec_fn=_cap)
    return r.returncode, r.stdout, r.stderr, time.monotonic() - start


def _tree(root: Path) -> dict:
    """What a folder holds: regular files by sha256, anything else by its kind; nothing but
    regular files is opened."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "-> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = oct(stat.S_IFMT(st.st_mode))
    return out


# ---------------------------------------------------------------- inputs

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-base")
    canon = distinct_canonical(vocab=1000, layers=2)
    write_layout(canon, d / "sd1.safetensors", "ldm")
    write_layout(canon, d / "hf", "hf")
    write_layout(canon, d / "oa.safetensors", "openai")
    return d


def _hf_config(d: Path, edit) -> Path:
    cfg = json.loads((d / "hf" / "config.json").read_text())
    text = edit(cfg)
    (d / "hf" / "config.json").write_text(text if isinstance(text, str) else json.dumps(cfg))
    return d / "hf"


def _with_metadata(d: Path, meta: dict) -> Path:
    write_safetensors(read_all(d / "oa.safetensors"), d / "x.safetensors", {"format": "pt", **meta})
    return d / "x.safetensors"


def _sharded(d: Path, weight_map: dict, shard_tensors: dict | None = None) -> Path:
    """A folder holding model.safetensors.index.json; shard-1.safetensors holds the encoder (or
    `shard_tensors`)."""
    f = d / "sharded"
    f.mkdir()
    tensors = shard_tensors if shard_tensors is not None else read_all(d / "hf")
    write_safetensors(tensors, f / "shard-1.safetensors", {"format": "pt"})
    shutil.copy(d / "hf" / "config.json", f / "config.json")
    wm = {k: "shard-1.safetensors" for k in tensors}
    wm.update(weight_map)
    (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return f


def _heads(value):
    def edit(cfg):
        cfg["num_attention_heads"] = value
    return edit


def _deep(cfg):
    cfg["task_specific_params"] = json.loads("[" * 200 + "]" * 200)


def _laughs(d: Path) -> Path:
    lines = ["schema: 1", "kind: layout", 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (d / "laughs.yaml").write_text("\n".join(lines) + "\n")
    return d / "laughs.yaml"


def _zero_head_width(d: Path) -> Path:
    text = (BUILTIN_DIR / "family" / "clip_text.yaml").read_text()
    assert "head_width: 64" in text
    (d / "family").mkdir()
    p = d / "family" / "clip_text.yaml"
    p.write_text(text.replace("head_width: 64", "head_width: 0") + "overrides: true\n")
    return p


def _sparse(p: Path, size: int):
    with open(p, "wb") as f:
        f.truncate(size)


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _symlink_out(d: Path) -> Path:
    outside = d.parent / "elsewhere.safetensors"
    write_safetensors(read_all(d / "hf"), outside, {"format": "pt"})
    f = _sharded(d, {})
    (f / "shard-1.safetensors").unlink()
    (f / "shard-1.safetensors").symlink_to(outside)
    return f


# name -> (make(d) -> (command, input), exit code, a phrase of the one line)
CONVERT = ["convert", "{input}", "-o", "{out}/o.safetensors", "--to", "openai"]
ERRORS = {
    # config.json of a transformers folder: the input's own file, so exit 3, never 2
    "config_is_a_list": (lambda d: _hf_config(d, lambda cfg: "[1, 2]"), 3, "config.json: the document must be an object"),
    "config_heads_abc": (lambda d: _hf_config(d, _heads("abc")), 3, "num_attention_heads must be a whole number"),
    "config_heads_zero": (lambda d: _hf_config(d, _heads(0)), 3, "num_attention_heads must be a whole number from 1"),
    "config_heads_negative": (lambda d: _hf_config(d, _heads(-2)), 3, "num_attention_heads must be a whole number"),
    "config_heads_bool": (lambda d: _hf_config(d, _heads(True)), 3, "found true"),
    "config_heads_not_dividing": (lambda d: _hf_config(d, _heads(3)), 3, "config.json: heads = 3 does not divide"),
    "config_act_unknown": (lambda d: _hf_config(d, lambda cfg: cfg.update(hidden_act="swish")), 3,
                           "config.json: unknown activation 'swish'"),
    "config_1e400": (lambda d: _hf_config(d, lambda cfg: json.dumps(cfg)[:-1] + ', "x": 1e400}'), 3, "out of range"),
    "config_nan": (lambda d: _hf_config(d, lambda cfg: json.dumps(cfg)[:-1] + ', "x": NaN}'), 3, "NaN is not a number"),
    "config_deep": (lambda d: _hf_config(d, _deep), 3, "nested"),
    "config_duplicate_key": (lambda d: _hf_config(d, lambda cfg: json.dumps(cfg)[:-1] + ', "hidden_act": "gelu"}'), 3,
                             "duplicate key"),
    "config_fifo": (lambda d: (((d / "hf" / "config.json").unlink(), _fifo(d / "hf" / "config.json")), d / "hf")[1],
                    3, "FIFO"),
    # safetensors headers and metadata
    "header_1e400": (lambda d: _raw_safetensors(d, b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}'),
                     3, "out of range"),
    "header_deep": (lambda d: _raw_safetensors(d, b'{"__metadata__": ' + b"[" * 100 + b"]" * 100 + b"}"), 3, "nested"),
    "metadata_not_a_string": (lambda d: _raw_safetensors(d, b'{"__metadata__": {"sdconv.encoders": {"clip_l": 1}}}'),
                              3, "must be a string"),
    # shard indexes: only regular files inside the index's folder, each key in its shard
    "index_parent_path": (lambda d: _sharded(d, {"extra": "../sd1.safetensors"}), 3, "not a weights file in its folder"),
    "index_absolute_path": (lambda d: _sharded(d, {"extra": str(d / "sd1.safetensors")}), 3,
                            "not a weights file in its folder"),
    "index_symlink_out": (_symlink_out, 3, "leads out of the index's folder"),
    "index_fifo_shard": (lambda d: _fifo_shard(d), 3, "FIFO"),
    "index_missing_key": (lambda d: _sharded(d, {"text_model.not_there": "shard-1.safetensors"}), 3,
                          "names 'text_model.not_there' in shard-1.safetensors, which does not hold it"),
    "index_is_a_list": (lambda d: _index_text(d, "[]"), 3, "must be an object"),
    "index_names_itself": (lambda d: _sharded(d, {"extra": "model.safetensors.index.json"}), 3, "no other index"),
    # folders: the weights file they pick must be a regular file
    "folder_fifo_weights": (lambda d: _fifo_folder(d), 3, "FIFO"),
    "fifo_input": (lambda d: _fifo(d / "pipe.safetensors"), 3, "FIFO"),
}
YAML_ERRORS = {
    "yaml_billion_laughs": (_laughs, "this YAML expands to more than"),
    "family_head_width_zero": (_zero_head_width, "head_width must be a whole number of at least 1, found 0"),
}


def _raw_safetensors(d: Path, header: bytes) -> Path:
    header += b" " * (-len(header) % 8)
    p = d / "raw.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    return p


def _index_text(d: Path, text: str) -> Path:
    f = _sharded(d, {})
    (f / "model.safetensors.index.json").write_text(text)
    return f


def _fifo_shard(d: Path) -> Path:
    f = _sharded(d, {"extra": "shard-2.safetensors"})
    _fifo(f / "shard-2.safetensors")
    return f


def _fifo_folder(d: Path) -> Path:
    f = d / "fifo-folder"
    f.mkdir()
    shutil.copy(d / "hf" / "config.json", f / "config.json")
    _fifo(f / "model.safetensors")
    return f


def _setup(tmp_path: Path, base: Path):
    d = tmp_path / "in"
    shutil.copytree(base, d, symlinks=True)
    out = tmp_path / "out"
    out.mkdir()
    return d, out


def _one_error_line(code, stdout, stderr, elapsed, want_code, phrase):
    assert code == want_code, (code, stdout, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdconv: error: "), stderr
    assert "Traceback" not in stderr + stdout
    assert phrase in lines[0], (phrase, lines[0])
    assert elapsed < TIMEOUT


@pytest.mark.parametrize("kind", ERRORS)
def test_hostile_input_is_one_line(tmp_path, base, kind):
    d, out = _setup(tmp_path, base)
    make, want, phrase = ERRORS[kind]
    path = make(d)
    before = _tree(tmp_path / "in")
    cmd = [a.format(input=path, out=out) for a in CONVERT]
    _one_error_line(*_sdconv(cmd, tmp_path, tmp_path / "cache"), want, phrase)
    assert list(out.iterdir()) == []                   # no output, no temporary
    assert _tree(tmp_path / "in") == before            # the input unchanged (FIFOs never opened)
    # inspect reads the same text the same way
    code, _, err, _ = _sdconv(["inspect", path], tmp_path, tmp_path / "cache")
    assert code == want and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("kind", YAML_ERRORS)
def test_hostile_mapping_file_is_one_line(tmp_path, kind):
    make, phrase = YAML_ERRORS[kind]
    path = make(tmp_path)
    before = _tree(tmp_path)
    code, out, err, elapsed = _sdconv(["layouts", "check", path], tmp_path, tmp_path / "cache")
    _one_error_line(code, out, err, elapsed, MappingError.exit_code, phrase)
    assert f"{path}:" in err                            # file:line
    assert elapsed < 20
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------- sdconv's own optional records

OWN_RECORDS = {
    "encoders_heads_abc": {"sdconv.encoders": json.dumps({"clip_l": {"params": {"heads": "abc", "act": "quick_gelu"}}})},
    "encoders_not_json": {"sdconv.encoders": "{"},
    "encoders_a_list": {"sdconv.encoders": "[1, 2]"},
    "encoders_absent_blocks_huge": {"sdconv.encoders": json.dumps({"clip_l": {"absent_last_blocks": 10 ** 9}})},
    "params_1e400": {"sdconv.params": '{"heads": 1e400}'},
    "params_act_unknown": {"sdconv.params": '{"heads": 2, "act": "swish"}'},
    "params_heads_not_dividing": {"sdconv.params": '{"heads": 3}'},
}


@pytest.mark.parametrize("kind", OWN_RECORDS)
def test_malformed_own_metadata_is_ignored_with_a_warning(tmp_path, base, kind):
    d, out = _setup(tmp_path, base)
    path = _with_metadata(d, OWN_RECORDS[kind])
    before = _tree(d)
    code, stdout, stderr, _ = _sdconv([a.format(input=path, out=out) for a in CONVERT], tmp_path, tmp_path / "cache")
    assert code == 0, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdconv: warning: ") and "ignored" in lines[0], stderr
    assert "Traceback" not in stderr + stdout and "heads 2" in stdout
    assert [p.name for p in out.iterdir()] == ["o.safetensors"]
    assert _tree(d) == before
    code, stdout, stderr, _ = _sdconv(["inspect", path], tmp_path, tmp_path / "cache")
    assert code == 0 and "ignored" in stdout and not stderr.strip(), stderr


LEDGERS = {
    "ledger_a_list": ("meta", "[1]"),
    "ledger_wrong_types": ("meta", json.dumps({"tensors": {"a": {"origin": 7}}})),
    "ledger_not_json": ("meta", "{"),
    "sidecar_a_list": ("sidecar", "[]"),
    "sidecar_ledger_wrong_types": ("sidecar", json.dumps({"ledger": {"tensors": [], "repairs": "x"}})),
    "sidecar_fifo": ("sidecar", None),
}


@pytest.mark.parametrize("kind", LEDGERS)
def test_malformed_ledger_is_a_note_in_inspect(tmp_path, base, kind):
    d, _ = _setup(tmp_path, base)
    where, text = LEDGERS[kind]
    if where == "meta":
        path = _with_metadata(d, {"sdconv.ledger": text})
    else:
        path = d / "hf"
        side = path / "sdconv.json"
        if text is None:
            _fifo(side)
        else:
            side.write_text(text)
    before = _tree(d)
    code, stdout, stderr, _ = _sdconv(["inspect", "--json", path], tmp_path, tmp_path / "cache")
    assert code == 0 and not stderr.strip(), stderr
    report = json.loads(stdout)
    assert report["ledger"] is None
    assert any("ledger ignored" in n for e in report["encoders"] for n in e["notes"]), report["encoders"]
    assert _tree(d) == before


CACHES = {
    "a_list": lambda p: p.write_text("[]"),
    "wrong_types": lambda p: p.write_text(json.dumps({"x|1|2|3": 5, "y": [1], "\u0000|1": "0" * 64})),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "deep": lambda p: p.write_text("[" * 5000 + "]" * 5000),
    "one_gigabyte": lambda p: _sparse(p, 1 << 30),
    "fifo": lambda p: _fifo(p),
}


@pytest.mark.parametrize("kind", CACHES)
def test_broken_hash_cache_is_ignored_and_rewritten(tmp_path, base, kind):
    d, out = _setup(tmp_path, base)
    cache = tmp_path / "cache" / "sdconv" / "sha256.json"
    cache.parent.mkdir(parents=True)
    CACHES[kind](cache)
    code, stdout, stderr, elapsed = _sdconv([a.format(input=d / "sd1.safetensors", out=out) for a in CONVERT],
                                            tmp_path, tmp_path / "cache")
    assert code == 0 and not stderr.strip() and "Traceback" not in stdout, stderr
    assert elapsed < TIMEOUT
    entries = json.loads(cache.read_text())             # rewritten: a regular file, sdconv's entries only
    assert list(entries.values()) == [hashlib.sha256((d / "sd1.safetensors").read_bytes()).hexdigest()]


def test_batch_with_malformed_sidecar_is_refused_not_a_traceback(tmp_path, base):
    """An earlier output whose sidecar cannot be read proves nothing: not replaced without --force."""
    d, out = _setup(tmp_path, base)
    (out / "sd1.pt").write_bytes(b"not sdconv's")
    (out / "sd1.pt.sdconv.json").write_text("[[[")
    (d / "two").mkdir()
    shutil.copy(d / "sd1.safetensors", d / "two" / "sd1.safetensors")
    code, stdout, stderr, _ = _sdconv(["convert", d / "two", "-o", out, "--to", "openai", "--format", "pt"],
                                      tmp_path, tmp_path / "cache")
    assert code == 6 and "Traceback" not in stderr + stdout and "was not made by sdconv" in stderr + stdout, stderr
    assert (out / "sd1.pt").read_bytes() == b"not sdconv's"


# ---------------------------------------------------------------- fuzzing: YAML with anchors and aliases

SCALARS = ["x", "1", "1e400", ".inf", ".nan", "~", "'s'", "[]", "{}", "!!str 1", "!!python/name:os.system"]
KEYS = ["k", "m", "<<", "n", "o", "k"]


def _yaml_with_aliases(program: bytes) -> str:
    """A small YAML document built from bytes (one draw, so thousands of examples stay fast):
    anchors, aliases (to defined, undefined and enclosing anchors), merge keys, tags, nesting:
    what the loader must bound, never expand without limit."""
    codes = iter(program)

    def nxt(n: int) -> int:
        return next(codes, 0) % n

    def node(depth: int) -> str:
        kind = nxt(4) if depth < 5 else nxt(2)
        anchor = f"&{'abc'[nxt(3)]} " if nxt(2) else ""
        if kind == 0:
            return anchor + SCALARS[nxt(len(SCALARS))]
        if kind == 1:
            return f"*{'abc'[nxt(3)]}"
        items = [node(depth + 1) for _ in range(nxt(10))]
        if kind == 2:
            return anchor + "[" + ", ".join(items) + "]"
        return anchor + "{" + ", ".join(f"{KEYS[nxt(len(KEYS))]}: {v}" for v in items) + "}"
    head = f"schema: 1\nkind: {('layout', 'family', 'naming')[nxt(3)]}\n"
    return head + "".join(f"{k}: {node(0)}\n" for k in "pqrs"[:1 + nxt(4)])


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.binary(min_size=1, max_size=400))
def test_yaml_with_anchors_and_aliases_is_bounded(tmp_path_factory, program):
    from sdconv.converters.yamlload import load_yaml
    text = _yaml_with_aliases(program)
    p = tmp_path_factory.getbasetemp() / "fuzz-aliases.yaml"
    p.write_text(text)
    start = time.monotonic()
    try:
        load_yaml(p)
    except MappingError:
        pass
    assert time.monotonic() - start < 2, text


def test_sharded_folders_still_convert(tmp_path, base):
    """The limits keep what is real: a sharded folder, and one laid out as the Hugging Face cache
    does (index and shards symlinks into a blobs folder beside the snapshot)."""
    d, out = _setup(tmp_path, base)
    plain = _sharded(d, {})
    snap = d / "hub" / "snapshots" / "rev"
    blobs = d / "hub" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in plain.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    for i, src in enumerate((plain, snap)):
        code, stdout, stderr, _ = _sdconv(["convert", src, "-o", out / f"o{i}.safetensors", "--to", "openai"],
                                          tmp_path, tmp_path / "cache")
        assert code == 0 and not stderr.strip(), stderr
    assert read_all(out / "o0.safetensors").keys() == read_all(out / "o1.safetensors").keys()

"""What a pickle would import and which storages it names, found without unpickling it.

Every torch pickle sdconv reads (a zip checkpoint's data.pkl, the pickles of a legacy file, a
TorchScript archive's data.pkl and constants.pkl) is walked opcode by opcode with
`pickletools.genops` before anything unpickles it, and a small model of the unpickler's stack and
memo follows the values that matter: strings, integers, tuples of them, and imported names. So:

- every import is found, by any opcode: GLOBAL and INST name it; STACK_GLOBAL takes it from the
  two strings on the stack, wherever they came from (pushed, or fetched from the memo); a name
  the model cannot tell (computed by a call) is refused. The extension registry (EXT1/2/4) is
  refused. A name outside the allow-list is `UnsafeInputError` (exit 4); a torch tensor kind
  sdconv does not read (sparse, meta, quantized, ...) is `InputError` (exit 3).
- every call (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST) must call an allowed import directly: a call
  of anything else (an object the pickle built, the result of another call) is refused (exit 4).
- every persistent id must be a torch storage reference made of constants: `('storage',
  torch.<T>Storage, key, location, numel[, view])`; the storages found are returned, so that their
  records can be checked against the archive before torch reads a byte of them.

The model only needs to be exact for what it tracks; anything it does not track is "unknown",
and an unknown value is never accepted where a name, a callable or a storage reference is needed.
"""
from __future__ import annotations

import pickletools
from dataclasses import dataclass, field

from ..errors import InputError, UnsafeInputError

UNSAFE_HINT = "sdconv never runs code from a checkpoint; convert the file to .safetensors with a tool you trust"
DAMAGED_HINT = "the file may be truncated or damaged; download it again"

# the storage classes a torch pickle names, and their element sizes
STORAGE_SIZES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
                 "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
                 "UntypedStorage": 1}

# what a state dict of plain tensors imports (torch.save writes these; real SD .ckpt files hold
# only these, the storage classes and Lightning/numpy objects, which pickles.py adds as stand-ins)
TENSOR_GLOBALS = frozenset({
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.Tensor", "torch.nn.parameter.Parameter", "torch.Size",
    "torch.device", "_codecs.encode",     # protocol 2 writes bytes (numpy scalars) as _codecs.encode(str, 'latin1')
    *(f"torch.{s}" for s in STORAGE_SIZES)})

# tensors torch can rebuild but sdconv does not read: refused as unreadable (exit 3), not unsafe
UNSUPPORTED_GLOBALS = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_sparse_csr_tensor": "a sparse tensor",
    "torch.serialization._get_layout": "a sparse tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta-device tensor (no data)",
    "torch._utils._rebuild_wrapper_subclass": "a tensor without data (meta or a wrapper subclass)",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch._utils._rebuild_tensor_v3": "a tensor in a form sdconv does not read",
    "torch._utils._rebuild_device_tensor_from_numpy": "a device tensor stored through numpy",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "a device tensor",
    "torch._utils._rebuild_xla_tensor": "an XLA tensor",
    "torch._utils._rebuild_mtia_tensor": "an MTIA tensor",
}

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_NUMBERS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


@dataclass(frozen=True)
class Import:
    """A name a pickle imports (module.attribute)."""
    name: str


class _Unknown:
    __slots__ = ()

    def __repr__(self):
        return "<unknown>"


UNKNOWN, _MARK = _Unknown(), object()


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class StorageRef:
    key: str
    type_name: str          # FloatStorage, ...
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * STORAGE_SIZES[self.type_name]


@dataclass
class Scan:
    imports: set = field(default_factory=set)
    storages: dict = field(default_factory=dict)        # key -> StorageRef


class _Machine:
    def __init__(self, path, what: str, allowed, scan: Scan):
        self.path, self.what, self.allowed, self.scan = path, what, allowed, scan
        self.stack: list = []
        self.memo: dict = {}

    # -- the stack
    def pop(self, allow_mark=False):
        if not self.stack:
            raise _Malformed("stack underflow")
        v = self.stack.pop()
        if v is _MARK and not allow_mark:
            raise _Malformed("a MARK where a value was expected")
        return v

    def pop_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise _Malformed("no MARK on the stack")

    def top(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise _Malformed("nothing to memoize")
        return self.stack[-1]

    # -- what is refused
    def unsafe(self, what: str):
        raise UnsafeInputError(f"{self.path}: refused to unpickle: it {what} in {self.what}, which could run code",
                               UNSAFE_HINT)

    def imported(self, module, name) -> Import:
        if not isinstance(module, str) or not isinstance(name, str):
            self.unsafe("imports a name it computes")
        full = f"{module}.{name}"
        if full in UNSUPPORTED_GLOBALS:
            raise InputError(f"{self.path}: {self.what} holds {UNSUPPORTED_GLOBALS[full]} ({full}), which sdconv "
                             "does not read", "save the state dict with plain dense CPU tensors")
        if "." in name or full not in self.allowed:
            self.unsafe(f"imports {full[:120]}")
        self.scan.imports.add(full)
        return Import(full)

    def called(self, fn):
        if isinstance(fn, Import):
            return
        if fn is UNKNOWN:       # an object the pickle built, or what a call returned: could be anything
            self.unsafe("calls an object it built itself, not an allowed import")
        raise _Malformed(f"it calls a {type(fn).__name__}")     # a constant: a damaged pickle, not a threat

    def persistent(self, pid):
        ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], Import)
              and pid[1].name.startswith("torch.") and pid[1].name[6:] in STORAGE_SIZES
              and isinstance(pid[2], str) and isinstance(pid[3], str)
              and isinstance(pid[4], int) and not isinstance(pid[4], bool) and pid[4] >= 0)
        if len(pid if isinstance(pid, tuple) else ()) == 6:     # legacy: (view key, offset, size) or None
            view = pid[5]
            ok = ok and (view is None or (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                                          and all(isinstance(v, int) and v >= 0 for v in view[1:])))
        if not ok:
            raise InputError(f"{self.path}: {self.what} holds an unexpected persistent id {str(pid)[:80]}",
                             DAMAGED_HINT)
        ref = StorageRef(pid[2], pid[1].name[6:], pid[4])
        seen = self.scan.storages.setdefault(ref.key, ref)
        if seen != ref:
            raise InputError(f"{self.path}: storage {ref.key} is named with two sizes or types in {self.what}",
                             DAMAGED_HINT)

    # -- one opcode
    def step(self, op, arg):
        name, push = op.name, self.stack.append
        if name in _STRINGS:
            push(arg if isinstance(arg, str) else UNKNOWN)
        elif name in _NUMBERS:
            push(arg)
        elif name in _CONSTANTS:
            push(_CONSTANTS[name])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [self.pop() for _ in range(int(name[-1]))]
            push(tuple(reversed(items)))
        elif name == "TUPLE":
            push(tuple(self.pop_mark()))
        elif name == "MARK":
            push(_MARK)
        elif name == "POP":
            self.pop(allow_mark=True)
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            push(self.top())
        elif name in _PUTS:
            self.memo[arg] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in _GETS:
            if arg not in self.memo:
                raise _Malformed(f"memo entry {arg} read before it is written")
            push(self.memo[arg])
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            fn = self.imported(module, attr)
            if name == "INST":
                self.pop_mark()
                push(UNKNOWN)
            else:
                push(fn)
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            push(self.imported(module, attr))
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.unsafe("imports through the extension registry")
        elif name == "REDUCE":
            self.pop()
            self.called(self.pop())
            push(UNKNOWN)
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            for _ in range(1 if name == "NEWOBJ" else 2):
                self.pop()
            self.called(self.pop())
            push(UNKNOWN)
        elif name == "OBJ":
            items = self.pop_mark()
            self.called(items[0] if items else None)
            push(UNKNOWN)
        elif name == "BINPERSID":
            self.persistent(self.pop())
            push(UNKNOWN)
        elif name == "PERSID":
            self.persistent(arg)
        else:
            self.generic(op)

    def generic(self, op):
        before = op.stack_before
        if pickletools.markobject in before:
            self.pop_mark()
            before = before[:before.index(pickletools.markobject)]
        for _ in before:
            self.pop()
        for s in op.stack_after:
            self.stack.append(_MARK if s is pickletools.markobject else UNKNOWN)


def scan_pickle(f, path, what: str, allowed, scan: Scan | None = None) -> Scan:
    """Walk one pickle from the file object `f` (up to its STOP), refusing what it must not
    import or call; the imports and storages found are added to `scan`."""
    scan = scan if scan is not None else Scan()
    machine = _Machine(path, what, allowed, scan)
    stopped = False
    try:
        for op, arg, _pos in pickletools.genops(f):
            machine.step(op, arg)
            stopped = op.name == "STOP"
    except _Malformed as e:
        raise InputError(f"{path}: not a readable torch checkpoint ({what} is not a valid pickle: {e})",
                         DAMAGED_HINT) from None
    except (ValueError, TypeError, EOFError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise InputError(f"{path}: not a readable torch checkpoint ({what} is not a valid pickle: {first})",
                         DAMAGED_HINT) from None
    if not stopped:
        raise InputError(f"{path}: not a readable torch checkpoint ({what} is not a valid pickle: it has no end)",
                         DAMAGED_HINT)
    return scan

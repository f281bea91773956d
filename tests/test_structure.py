"""The shape of the package (issue 12): small modules, no import cycle, no private name
imported across modules, a public API that imports lightly, and no layout vocabulary in Python."""
import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "sdconv"
MAX_LINES = 400


def _modules() -> dict:
    """{dotted module name: path} of every module in the package."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict):
    """(imported module, imported names) for every import statement, at any depth (function-level
    and TYPE_CHECKING imports count: a cycle through a lazy import is still a cycle)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            plain = []
            for a in node.names:           # `from . import dtypes` imports the module sdconv.converters.dtypes
                sub = f"{target}.{a.name}"
                if sub in modules:
                    yield sub, []
                else:
                    plain.append(a.name)
            if plain:
                yield target, plain


def _graph():
    modules = _modules()
    return modules, {m: list(_imports(m, p, modules)) for m, p in modules.items()}


def test_no_module_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _cycles(edges: dict) -> list:
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in edges.get(m, ()):
            if t == m:
                continue
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"
    for m in edges:
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle():
    _, graph = _graph()
    edges = {m: sorted({t for t, _ in imps}) for m, imps in graph.items()}
    assert not _cycles(edges), f"import cycles: {_cycles(edges)}"


def test_the_cycle_finder_finds_a_cycle():
    """Negative control: a known cycle is reported."""
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == [["a", "b", "c", "a"]]


def test_no_private_name_imported_from_another_module():
    _, graph = _graph()
    bad = [f"{m} imports {n} from {t}" for m, imps in graph.items() for t, names in imps for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_the_public_api_imports_without_torch():
    code = ("import sys\n"
            "from sdconv import convert, make_plans, make_plan, inspect, verify, write_back, sample, Registry, "
            "ConvertOptions, Plan, Result, SdconvError\n"
            "import sdconv.inspection, sdconv.verification, sdconv.samples, sdconv.tokenizer\n"
            "from sdconv import inspect, verify, sample, tokenize, Tokenizer\n"
            "assert callable(inspect) and callable(verify) and callable(sample), (inspect, verify, sample)\n"
            "assert callable(tokenize) and callable(Tokenizer)\n"
            "print(sorted(m for m in ('torch', 'ftfy', 'regex') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # importing the API's modules does not import torch either: tensors are made on first use;
    # nor the tokenizer's ftfy and regex, imported when a tokenizer is made
    assert r.stdout.strip() == "[]"


def test_help_does_not_import_torch():
    code = ("import sys\nfrom sdconv.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'ftfy' not in sys.modules and 'regex' not in sys.modules, 'the tokenizer was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_no_layout_key_strings_in_python():
    """Layout knowledge lives in mapping files: no checkpoint key prefix of a built-in layout
    appears in the package's Python code."""
    import yaml
    prefixes = set()
    for f in (PKG / "mappings").glob("*.yaml"):
        d = yaml.safe_load(f.read_text())
        for slot in (d.get("encoders") or {}).values():
            for p in [slot.get("prefix"), *(slot.get("read_prefixes") or [])]:
                if p and len(p) > 6:
                    prefixes.add(p)
    assert prefixes
    hits = [(m, p) for m, path in _modules().items() for lit in _string_literals(path) for p in prefixes if p in lit]
    assert not hits, hits


def _string_literals(path: Path) -> list:
    """The string constants of a module's code (docstrings excluded: prose may name a folder)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_every_error_type_has_a_documented_exit_code():
    import sdconv.errors as E
    types = [c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.SdconvError)]
    assert len(types) >= 7
    assert all(t.exit_code in E.EXIT_CODES for t in types)


def test_only_the_command_line_prints():
    """The library returns data; every human-readable line is the command line's (cli/)."""
    offenders = []
    for m, path in _modules().items():
        if m.startswith("sdconv.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{m}: print()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "click" in names:
                    offenders.append(f"{m}: imports click")
    assert not offenders, offenders


def test_the_encoder_params_are_declared_alike():
    """--param's names and a layout's `params:` rows name the same things."""
    import dataclasses

    from sdconv.converters.schema import Params
    from sdconv.options import ENCODER_PARAMS
    assert tuple(f.name for f in dataclasses.fields(Params)) == ENCODER_PARAMS

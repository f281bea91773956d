"""The docs stay true: every command in docs/adding-a-layout.md runs, in an empty folder, as a
user would; every `sdconv` command quoted in a code block of README.md or docs/*.md is accepted by
the real command line; docs/cli.md lists each command's real options; links between pages resolve."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sdconv.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "adding-a-layout.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_adding_a_layout_walkthrough(tmp_path):
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 4
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("SDCONV_MAPPINGS", None)
    script = "set -euo pipefail\n" + "\n".join(blocks)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ok: my-layouts/mytrainer.yaml: layout mytrainer" in r.stdout
    assert "mytrainer  file" in r.stdout and "layout: mytrainer (detected)" in r.stdout
    assert "verdict: identical" in r.stdout and "1 passed" in r.stdout


def test_the_documented_mistake_is_reported_at_its_line(tmp_path):
    text = re.search(r"cat > my-layouts/mytrainer.yaml <<'EOF'\n(.*?)EOF", DOC.read_text(), re.S).group(1)
    bad = text.replace("    prefix: model.text.", "    prefx: model.text.")
    (tmp_path / "my-layouts").mkdir()
    (tmp_path / "my-layouts" / "mytrainer.yaml").write_text(bad)
    r = subprocess.run([sys.executable, "-m", "sdconv", "layouts", "check", "my-layouts/mytrainer.yaml"],
                       cwd=tmp_path, capture_output=True, text=True)
    line = next(i for i, ln in enumerate(bad.splitlines(), 1) if "prefx" in ln)
    assert r.returncode == 2
    said = f"sdconv: error: my-layouts/mytrainer.yaml:{line}: unknown field 'prefx' in encoder clip — did you mean 'prefix'?"
    assert r.stderr.strip() == said
    assert said in DOC.read_text()           # the doc quotes exactly this


# ---- every quoted command is one the real command line accepts ----------------------------------

# `# OpenAI clip: sdconv convert ...`: a command quoted in a comment of a Python snippet
COMMENTED = re.compile(r"#[^#:]*:\s+(sdconv\s.*)$")
HEREDOC = re.compile(r"<<-?\s*['\"]?([A-Za-z_]\w*)")
# the docs' vocabulary beside the layout names (which come from `sdconv layouts`)
ENCODERS = {"clip_l", "clip_h", "clip_g"}
PARAMS = {"heads": None, "act": {"gelu", "quick_gelu"}, "encoder": ENCODERS}


def code_lines(text: str):
    """(line number, line) of every line inside a fenced code block, continuations joined,
    heredoc bodies (file contents, not commands) left out."""
    out, fence, heredoc, pending = [], False, None, None
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence, heredoc, pending = not fence, None, None
            continue
        if not fence:
            continue
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if pending is not None:
            start, line = pending[0], pending[1] + " " + line.lstrip()
        else:
            start = n
        if line.rstrip().endswith("\\"):
            pending = (start, line.rstrip()[:-1])
            continue
        pending = None
        m = HEREDOC.search(line)
        if m:
            heredoc = m.group(1)
        out.append((start, line))
    return out


def _strip_comment(line: str) -> str:
    """The line up to a shell comment: `#` at the start of a word, outside quotes."""
    quote, prev = None, " "
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and prev.isspace():
            return line[:i]
        prev = c
    return line


def command_args(line: str):
    """The arguments after `sdconv` of the command on this line, or None if it quotes none.
    Leading VAR=value assignments and a `$ ` prompt are skipped; the command ends at a pipe,
    `;`, `&&` or a redirection."""
    s = line.strip()
    m = COMMENTED.match(s)
    if m:
        s = m.group(1)
    elif s.startswith("#"):
        return None
    s = _strip_comment(s.removeprefix("$ "))
    if not re.match(r"([A-Za-z_]\w*=\S*\s+)*sdconv(\s|$)", s):
        return None                                     # prose or a diagram, not a command
    lex = shlex.shlex(s, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split, lex.commenters = True, ""
    tokens = []
    for t in lex:
        if set(t) <= set(";&|<>"):
            if t[0] in "<>" and tokens and tokens[-1].isdigit():
                tokens.pop()                            # 2>/dev/null
            break
        tokens.append(t)
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
        tokens.pop(0)
    if not tokens or tokens[0] != "sdconv":
        return None
    return tokens[1:]


def quoted_commands():
    """(page, line number, args) of every sdconv command in a code block of README and docs."""
    for page in PAGES:
        for n, line in code_lines(page.read_text()):
            args = command_args(line)
            if args is not None:
                yield page, n, args


def _placeholders(args, folder: Path):
    """Empty files (or folders, for a trailing /) for every path the command names, so that
    click's `exists=True` checks pass as they would on the user's files."""
    for a in args:
        if a.startswith("-") or "=" in a or "$" in a or any(c in a for c in "*?[") or os.path.isabs(a):
            continue
        if "." not in a and "/" not in a:
            continue
        p = folder / a
        try:
            if a.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
            elif not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
        except OSError:         # one path inside another named as a file: the first one wins
            pass


def _known_layouts() -> set:
    r = CliRunner().invoke(main, ["layouts"], env={"SDCONV_MAPPINGS": None})
    assert r.exit_code == 0, r.output
    names = {ln.split()[0] for ln in r.output.splitlines() if ln.strip()}
    # layouts the docs themselves add (docs/adding-a-layout.md writes my-layouts/mytrainer.yaml)
    for page in PAGES:
        names |= set(re.findall(r"cat > \S+/(\w+)\.yaml <<", page.read_text()))
    assert {"ldm", "sgm", "openai", "hf"} <= names
    return names


def check_command(args, folder: Path, layouts: set):
    """Parse `sdconv ARGS` as the real command line would, without running it: the group's
    options, then each subcommand's options and arguments, by click itself. Raises click's
    error (unknown command or option, missing option or argument, bad value) or a ValueError
    for a layout, encoder or --param name sdconv does not know."""
    _placeholders(args, folder)
    here = os.getcwd()
    os.chdir(folder)
    try:
        try:
            ctx = main.make_context("sdconv", list(args))
        except click.exceptions.Exit as e:      # --help, --version
            if e.exit_code:
                raise
            return
        cmd = main
        while isinstance(cmd, click.Group):
            rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
            if not rest:
                if not cmd.invoke_without_command:
                    raise click.UsageError(f"{ctx.command_path} needs a command")
                break
            name, sub, rest = cmd.resolve_command(ctx, rest)
            try:
                ctx = sub.make_context(name, rest, parent=ctx)
            except click.exceptions.Exit as e:
                if e.exit_code:
                    raise
                return
            cmd = sub
    finally:
        os.chdir(here)
    p = ctx.params
    for key in ("to", "from_", "from_a", "from_b", "layout", "name"):
        v = p.get(key)
        if v is not None and v != "auto" and v not in layouts:
            raise ValueError(f"unknown layout {v!r}")
    if p.get("encoder") is not None and p["encoder"] not in ENCODERS | {"all"}:
        raise ValueError(f"unknown encoder {p['encoder']!r}")
    for key in ("params", "param_a", "param_b"):
        for kv in p.get(key) or ():
            k, sep, v = kv.partition("=")
            if not sep or k not in PARAMS or (PARAMS[k] is not None and v not in PARAMS[k]):
                raise ValueError(f"bad --param {kv!r}")


def test_every_quoted_command_is_accepted(tmp_path):
    layouts = _known_layouts()
    found, failures = [], []
    for i, (page, n, args) in enumerate(quoted_commands()):
        found.append(page)
        folder = tmp_path / str(i)
        folder.mkdir()
        try:
            check_command(args, folder, layouts)
        except (click.ClickException, ValueError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            failures.append(f"{page.relative_to(ROOT)}:{n}: sdconv {shlex.join(args)}\n    {msg}")
    assert not failures, "\n".join(failures)
    # the extraction finds what is there: every page that quotes commands, and enough of them
    assert len(found) >= 40, len(found)
    assert {"README.md", "converting.md", "layouts.md", "clipscore.md", "inspect-and-verify.md", "reliability.md",
            "cli.md", "adding-a-layout.md"} <= {p.name for p in found}


def test_command_extraction():
    text = "\n".join([
        "prose: sdconv convert not-in-a-block --bogus",
        "```",
        "sdconv --mappings my-layouts convert a.safetensors -o 'b c.safetensors' --to mine   # comment",
        "SDCONV_MAPPINGS=x sdconv layouts",
        "sdconv convert big.safetensors \\",
        "    -o out --to hf",
        "sdconv inspect x.safetensors --json | jq '.encoders[] # not a comment'",
        "sdconv verify a b 2>/dev/null",
        "# OpenAI clip: sdconv convert sd15.safetensors -o c.pt --to openai",
        "# a comment that names sdconv convert in prose",
        "cat > t.py <<'EOF'",
        "sdconv convert inside-a-heredoc --bogus",
        "EOF",
        "make convert IN=models OUT=encoders",
        "```",
    ])
    got = [command_args(line) for _, line in code_lines(text)]
    assert [g for g in got if g is not None] == [
        ["--mappings", "my-layouts", "convert", "a.safetensors", "-o", "b c.safetensors", "--to", "mine"],
        ["layouts"],
        ["convert", "big.safetensors", "-o", "out", "--to", "hf"],
        ["inspect", "x.safetensors", "--json"],
        ["verify", "a", "b"],
        ["convert", "sd15.safetensors", "-o", "c.pt", "--to", "openai"],
    ]


GOOD = [
    "sdconv convert a.safetensors -o b.safetensors --to openai",
    "sdconv --mappings my-layouts convert a.safetensors -o b.safetensors --to mytrainer",
    "sdconv convert x.safetensors --to ldm --into merge.safetensors -o merge-fixed.safetensors",
    "sdconv layouts check my-layouts/mytrainer.yaml",
    "sdconv layouts",
    "sdconv --help",
]
BAD = [
    "sdconv convert a.safetensors -o b.safetensors --to openai --frobnicate",     # a made-up option
    "sdconv --mapping my-layouts layouts",                                        # a misspelt global option
    "sdconv convert a.safetensors --to openai",                                   # -o is required
    "sdconv convert -o b.safetensors --to openai",                                # INPUT is required
    "sdconv convrt a.safetensors -o b.safetensors --to openai",                   # no such command
    "sdconv layouts shwo ldm",                                                    # no such subcommand
    "sdconv verify a.safetensors",                                                # B is missing
    "sdconv convert a.safetensors -o b.safetensors --to openai --dtype fp8",      # not a choice
    "sdconv sample s.safetensors --seed one",                                     # not an integer
    "sdconv convert a.safetensors -o b.safetensors --to opneai",                  # no such layout
    "sdconv convert a.safetensors -o b.safetensors --to openai --encoder clip_x",  # no such encoder
    "sdconv convert a.safetensors -o b.safetensors --to hf --param head=16",      # no such --param
    "sdconv",                                                                     # no command
]


@pytest.mark.parametrize("line", GOOD)
def test_checker_accepts(tmp_path, line):
    check_command(command_args(line), tmp_path, _known_layouts())


@pytest.mark.parametrize("line", BAD)
def test_checker_catches(tmp_path, line):
    """Negative controls: the checker is not a rubber stamp."""
    with pytest.raises((click.ClickException, ValueError)):
        check_command(command_args(line), tmp_path, _known_layouts())


# ---- docs/cli.md lists each command's real options ----------------------------------------------

def _real_options(cmd: click.Command) -> set:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}


def test_cli_md_lists_every_option():
    text = (ROOT / "docs" / "cli.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    seen = {}
    for sec in sections:
        title, body = sec.split("\n", 1)
        m = re.fullmatch(r"`sdconv ([\w ]+)`", title.strip())
        if title.strip() == "Global options":
            path = ()
        elif m:
            path = tuple(m.group(1).split())
        else:
            continue
        rows = [ln.split("|")[1] for ln in body.splitlines() if ln.startswith("| `")]
        # -h/--help, which every command takes, is listed once, with the global options
        seen[path] = {o for cell in rows for o in re.findall(r"`(--?[a-z][\w-]*)", cell)} - {"-h", "--help"}
    expected = {}

    def walk(cmd, path):
        expected[path] = _real_options(cmd)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + (name,))
    walk(main, ())
    assert set(seen) == set(expected), (set(seen) ^ set(expected))
    for path, opts in expected.items():
        assert seen[path] == opts, f"sdconv {' '.join(path)}: cli.md lacks {opts - seen[path]}, " \
                                   f"lists unknown {seen[path] - opts}"


# ---- links between the pages resolve ------------------------------------------------------------

def _anchors(page: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -."""
    out = set()
    for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M):
        out.add(re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-"))
    return out


def test_links_resolve():
    bad = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue                                # http(s):, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target}: no such heading")
    assert not bad, "\n".join(bad)

"""Every command in docs/adding-a-layout.md runs, in an empty folder, as a user would."""
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding-a-layout.md"


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

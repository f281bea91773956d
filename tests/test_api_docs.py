"""Every example in docs/api.md runs, in order, in an empty folder, as a user would run it."""
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_api_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 8
    script = "\n".join(blocks) + "\nprint('all examples ran')\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all examples ran" in r.stdout


def test_a_failing_example_would_fail_the_test(tmp_path):
    """Negative control: an example whose assertion fails exits non-zero."""
    r = subprocess.run([sys.executable, "-c", "from sdconv import ConvertOptions\nassert ConvertOptions(to='hf').dtype == 'fp16'"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0

"""Outputs stay byte for byte what they were: the conversions of tests/golden.py, their digests
recorded in tests/data/golden_outputs.json before the code was restructured (issue 12)."""
import json

import golden


def test_outputs_are_byte_identical_to_the_recorded_ones(tmp_path):
    want = json.loads(golden.GOLDEN.read_text())
    want.update({case: new for case, (new, _) in golden.CHANGED_ON_PURPOSE.items()})
    got = golden.build(tmp_path)
    assert set(got) == set(want)
    changed = sorted(k for k in want if got[k] != want[k])
    assert not changed, f"outputs changed: {changed}"


def test_the_digest_sees_a_one_byte_change(tmp_path):
    """Negative control: flipping one byte of an output changes its digest."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"abcdef")
    before = golden.digest(f)
    f.write_bytes(b"abcdeg")
    assert golden.digest(f) != before

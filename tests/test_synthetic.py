"""The synthetic-weight detector flags each planted fake, names it, and passes real weights."""
import pytest
import torch

from fixtures import distinct_canonical, write_layout
from sdconv.converters.folders import open_source
from sdconv.converters.detect import read_layout
from sdconv.converters.registry import DEFAULT
from sdconv.converters.synthetic import findings


def _findings(tmp_path, canon, deep=False, layout="open_clip"):
    p = write_layout(canon, tmp_path / f"x{len(list(tmp_path.iterdir()))}.safetensors", layout)
    src = open_source(p)
    (rp,) = read_layout(src, DEFAULT.layout(layout))
    return findings(src, rp, deep=deep)


def test_real_weights_pass(tmp_path):
    canon = distinct_canonical(vocab=1000, layers=3)
    canon["logit_scale"] = torch.tensor(4.6052)
    assert _findings(tmp_path, canon, deep=True) == []


@pytest.mark.parametrize("fake,look", [(torch.eye(128), "identity"), (torch.ones(128, 128), "all ones"),
                                       (torch.zeros(128, 128), "zeros")])
def test_placeholder_projection(tmp_path, fake, look):
    canon = distinct_canonical(vocab=1000)
    canon["text_proj.weight"] = fake
    canon["logit_scale"] = torch.tensor(4.6052)
    (f,) = _findings(tmp_path, canon)
    assert f.startswith("text_projection is " + look)


def test_identity_projection_in_fp16_and_hf_naming(tmp_path):
    canon = {k: v.half() for k, v in distinct_canonical(vocab=1000).items() if k != "logit_scale"}
    canon["text_proj.weight"] = torch.eye(128, dtype=torch.float16)
    (f,) = _findings(tmp_path, canon, layout="comfy")
    assert f.startswith("text_projection.weight is identity")


def test_untrained_logit_scale(tmp_path):
    canon = distinct_canonical(vocab=1000)
    canon["logit_scale"] = torch.tensor(2.6593)
    (f,) = _findings(tmp_path, canon)
    assert "logit_scale is 2.6593" in f and "untrained" in f


def test_duplicated_block(tmp_path):
    canon = distinct_canonical(vocab=1000, layers=3)
    canon["logit_scale"] = torch.tensor(4.6052)
    for k in [k for k in canon if k.startswith("blk.1.")]:
        canon[k.replace("blk.1.", "blk.2.")] = canon[k].clone()
    (f,) = _findings(tmp_path, canon)
    assert f.startswith("block 2 repeats block 1")


def test_nan_found_in_deep_mode_only(tmp_path):
    canon = distinct_canonical(vocab=1000)
    canon["logit_scale"] = torch.tensor(4.6052)
    canon["blk.1.ffn_up.weight"][3, 4] = float("nan")
    assert _findings(tmp_path, canon) == []
    (f,) = _findings(tmp_path, canon, deep=True)
    assert f == "transformer.resblocks.1.mlp.c_fc.weight holds NaN or Inf values"

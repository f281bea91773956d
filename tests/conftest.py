"""Shared test set-up.

The first lines must run before anything imports transformers, diffusers, open_clip or clip:
the torchvision 0.28.0 wheel links CUDA libraries, so beside the CPU torch its compiled ops
are skipped and `torchvision._meta_registrations` raises "operator torchvision::nms does not
exist". Only the text side is used here, which needs none of those ops.
"""
import atexit
import os
import shutil
import sys
import tempfile
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

# sdconv caches source hashes under $XDG_CACHE_HOME: keep the tests' cache out of $HOME
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sdconv-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

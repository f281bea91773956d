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

import pytest

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

# sdconv caches source hashes under $XDG_CACHE_HOME: keep the tests' cache out of $HOME
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sdconv-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# The oracle tier: a test that imports a consumer library must be marked `oracle`, so that
# -m "not oracle" (make test-fast) needs none of them. Checked for each test against the libraries
# already imported before it, so the check is complete when the oracle tests are deselected.
CONSUMERS = ("transformers", "open_clip", "clip", "diffusers", "torchvision", "torchmetrics", "peft")
_LOADED_BEFORE = pytest.StashKey[frozenset]()


def _consumers_loaded() -> frozenset:
    return frozenset(m for m in CONSUMERS if m in sys.modules)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_LOADED_BEFORE] = _consumers_loaded()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    new = _consumers_loaded() - item.stash.get(_LOADED_BEFORE, frozenset())
    if new and item.get_closest_marker("oracle") is None:
        raise AssertionError(f"{item.nodeid} imported {', '.join(sorted(new))} but is not marked "
                             "@pytest.mark.oracle (see markers in pyproject.toml)")


@pytest.fixture
def quick_retries():
    """Remote inputs retried after 10 ms, so that retried faults take no time (restored after the test)."""
    from sdconv.converters import remote_sources
    before = remote_sources._SETTINGS["transfer"]
    remote_sources.configure(backoff=0.01, retries=3, timeout=5.0, download=False, show_progress=False)
    yield
    remote_sources._SETTINGS["transfer"] = before

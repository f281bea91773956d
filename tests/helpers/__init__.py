"""Test helpers, imported by the tests as ``from tests.helpers import consumers`` or
``from tests.helpers.fixtures import distinct_canonical``.

- ``fixtures``: tiny synthetic encoders with distinct values, written in any layout (no consumer
  library needed);
- ``consumers``, ``consumers_sd``: the consumer libraries as oracles (transformers, open_clip,
  OpenAI clip, diffusers), independent of sdconv; ``clipref``: a whole tiny OpenAI CLIP reference;
- ``lightning_ckpt``: a Lightning-style .ckpt made without Lightning (also used by bench/bench.py);
- ``golden``: the conversions whose output digests are recorded in tests/data/golden_outputs.json.
"""

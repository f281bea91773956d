"""The names of the metadata sdconv writes (safetensors `__metadata__`, and the JSON sidecar,
where the same keys appear without the `sdconv.` prefix). Declared once; read and written by
name. Values are strings; those in JSON_VALUED hold JSON."""

FORMAT = "format"                       # safetensors' own: "pt" (torch tensors)
FORMAT_PT = "pt"

VERSION = "sdconv.version"
SOURCE = "sdconv.source"                # the input's file name
SOURCE_SHA256 = "sdconv.source_sha256"
SOURCE_URL = "sdconv.source_url"        # a remote input: its address (no credentials, no query) ...
SOURCE_ETAG = "sdconv.source_etag"      # ... the server's ETag of it ...
SOURCE_SHA256_OF = "sdconv.source_sha256_of"    # ... and what its source_sha256 covers
FROM = "sdconv.from"                    # the layout read
TO = "sdconv.to"                        # the layout written
ENCODERS = "sdconv.encoders"            # per encoder: slot, params, arch, absent_last_blocks, grafted
NOTES = "sdconv.notes"
LEDGER = "sdconv.ledger"                # every tensor's origin (see provenance.py)
OPTIONS = "sdconv.options"              # a batch run's options, to skip up-to-date outputs
ENCODER = "sdconv.encoder"              # single-encoder outputs: which kind
PARAMS = "sdconv.params"                # ... its heads and activation
ARCH = "sdconv.arch"                    # ... its architecture
VISION_SOURCE = "sdconv.vision_source"  # a whole CLIP: where the vision tower came from
VISION_SHA256 = "sdconv.vision_sha256"
LORAS = "sdconv.loras"                  # LoRAs merged, in order: file, sha256, format, scale, changed
INTO = "sdconv.into"                    # write-back: what was replaced in the checkpoint
SAMPLE = "sdconv.sample"                # a synthetic sample: layout/preset/seed

JSON_VALUED = frozenset({ENCODERS, NOTES, LEDGER, PARAMS, ARCH, OPTIONS, LORAS})

PREFIX = "sdconv."
SIDECAR_SUFFIX = ".sdconv.json"         # beside a .pt output: OUTPUT.sdconv.json
SIDECAR_IN_FOLDER = "sdconv.json"       # inside a folder output


def sidecar_key(key: str) -> str:
    """A metadata key as the sidecar spells it."""
    return key.replace(PREFIX, "")

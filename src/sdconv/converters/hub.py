"""`hf://ORG/REPO[@REVISION]/PATH`: a file in a Hugging Face Hub model repository, resolved with
huggingface_hub, so that the Hub's own conventions hold: its endpoint (HF_ENDPOINT), token
(HF_TOKEN, or a saved login), revisions, and the sha256 it states for an LFS file. The file is
then read by byte ranges like any URL, pinned to the commit the revision named when the run
began."""
from __future__ import annotations

import re

from ..errors import RemoteError, UsageError

_NAME = re.compile(r"hf://(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)", re.IGNORECASE)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse(name: str) -> tuple[str, str, str]:
    """(repo id, revision, path in the repository) of hf://ORG/REPO[@REVISION]/PATH."""
    m = _NAME.fullmatch(name)
    if not m or any(p in ("", ".", "..") for p in m["path"].split("/")):
        raise UsageError(f"{name}: not a Hub file name", "write hf://ORG/REPO/PATH or hf://ORG/REPO@REVISION/PATH")
    return m["repo"], m["rev"] or "main", m["path"]


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError("reading hf:// names needs the remote extra", "pip install 'sdconv[remote]'") from None
    return huggingface_hub


def resolve(name: str) -> tuple[str, dict, dict, str]:
    """(the URL to read, the request headers (the token), the origin to record, the name to show)."""
    hub = _hub()
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import build_hf_headers
    repo, revision, path = parse(name)
    if constants.HF_HUB_OFFLINE:
        raise RemoteError(f"{name}: HF_HUB_OFFLINE is set", "unset it to read from the Hub")
    headers = build_hf_headers()
    url = hub.hf_hub_url(repo, path, revision=revision, endpoint=constants.ENDPOINT)
    try:
        meta = hub.get_hf_file_metadata(url, headers=headers, retry_on_errors=True)
    except errors.GatedRepoError:
        raise RemoteError(f"{name}: the repository is gated", "accept its terms on the Hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise RemoteError(f"{name}: no such repository, or it is private",
                          "check the name; for a private repository set HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise RemoteError(f"{name}: no revision {revision!r} in {repo}", "check the branch, tag or commit") from None
    except errors.EntryNotFoundError:
        raise RemoteError(f"{name}: no file {path!r} in {repo}@{revision}", "check the path in the repository") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise RemoteError(f"{name}: the Hub answered HTTP {status}", "set HF_TOKEN if the repository is "
                          "private or gated" if status in (401, 403) else "try again later") from None
    except Exception as e:          # connection errors, after huggingface_hub's own retries
        raise RemoteError(f"{name}: the Hub could not be reached ({type(e).__name__})",
                          "check the network and HF_ENDPOINT") from None
    commit = meta.commit_hash or revision
    etag = meta.etag or None
    sha = etag if etag and _SHA256.fullmatch(etag) else None
    pinned = hub.hf_hub_url(repo, path, revision=commit, endpoint=constants.ENDPOINT) if meta.commit_hash else url
    origin = {"url": f"hf://{repo}@{commit}/{path}", "etag": etag}
    if sha:
        origin["sha256"] = sha
    auth = {k: v for k, v in headers.items() if k.lower() in ("authorization", "user-agent")}
    return pinned, auth, origin, name

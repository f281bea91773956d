"""`hf://ORG/REPO[@REVISION]/PATH`: a file in a Hugging Face Hub model repository, resolved with
huggingface_hub, so that the Hub's own conventions hold: its endpoint (HF_ENDPOINT), token
(HF_TOKEN, or a saved login), revisions, and the sha256 it states for an LFS file. The file is
then read by byte ranges like any URL, pinned to the commit the revision named when the run
began."""
from __future__ import annotations

import re

from ..errors import RemoteError, UsageError

_NAME = re.compile(r"hf://(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<path>.*))?", re.IGNORECASE)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse(name: str) -> tuple[str, str, str]:
    """(repo id, revision, path in the repository: '' for the whole repository) of
    hf://ORG/REPO[@REVISION][/PATH]."""
    m = _NAME.fullmatch(name)
    path = (m["path"] or "").strip("/") if m else ""
    if not m or (path and any(p in ("", ".", "..") for p in path.split("/"))):
        raise UsageError(f"{name}: not a Hub name", "write hf://ORG/REPO/PATH or hf://ORG/REPO@REVISION/PATH")
    return m["repo"], m["rev"] or "main", path


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError("reading hf:// names needs the remote extra", "pip install 'sdconv[remote]'") from None
    return huggingface_hub


def _errors(name: str, repo: str, revision: str, path: str, call):
    """call(), its huggingface_hub errors made one line each."""
    from huggingface_hub import errors
    try:
        return call()
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


def folder(name: str) -> tuple[str, list[tuple[str, str, int, str | None]], dict]:
    """A folder of a Hub repository (the whole repository with no PATH): (the name to record,
    hf://ORG/REPO@COMMIT/PATH; [(path under the folder, its URL at that commit, size, the LFS
    sha256 or None)], the request headers)."""
    hub = _hub()
    from huggingface_hub import constants
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import build_hf_headers
    repo, revision, path = parse(name)
    if constants.HF_HUB_OFFLINE:
        raise RemoteError(f"{name}: HF_HUB_OFFLINE is set", "unset it to read from the Hub")
    api = hub.HfApi(endpoint=constants.ENDPOINT)
    commit = _errors(name, repo, revision, path, lambda: api.model_info(repo, revision=revision).sha) or revision
    tree = _errors(name, repo, revision, path, lambda: list(api.list_repo_tree(
        repo, path_in_repo=path or None, recursive=True, revision=commit)))
    files = []
    for e in tree:
        if isinstance(e, RepoFile):
            rel = e.path[len(path) + 1:] if path else e.path
            files.append((rel, hub.hf_hub_url(repo, e.path, revision=commit, endpoint=constants.ENDPOINT), e.size,
                          e.lfs.sha256 if e.lfs is not None else None))
    if not files:
        raise RemoteError(f"{name}: no files there", "check the path in the repository")
    headers = {k: v for k, v in build_hf_headers().items() if k.lower() in ("authorization", "user-agent")}
    return f"hf://{repo}@{commit}" + (f"/{path}" if path else ""), files, headers


def resolve(name: str) -> tuple[str, dict, dict, str]:
    """(the URL to read, the request headers (the token), the origin to record, the name to show)."""
    hub = _hub()
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers
    repo, revision, path = parse(name)
    if constants.HF_HUB_OFFLINE:
        raise RemoteError(f"{name}: HF_HUB_OFFLINE is set", "unset it to read from the Hub")
    headers = build_hf_headers()
    url = hub.hf_hub_url(repo, path, revision=revision, endpoint=constants.ENDPOINT)
    meta = _errors(name, repo, revision, path, lambda: hub.get_hf_file_metadata(url, headers=headers,
                                                                           retry_on_errors=True))
    commit = meta.commit_hash or revision
    etag = meta.etag or None
    sha = etag if etag and _SHA256.fullmatch(etag) else None
    pinned = hub.hf_hub_url(repo, path, revision=commit, endpoint=constants.ENDPOINT) if meta.commit_hash else url
    origin = {"url": f"hf://{repo}@{commit}/{path}", "etag": etag}
    if sha:
        origin["sha256"] = sha
    auth = {k: v for k, v in headers.items() if k.lower() in ("authorization", "user-agent")}
    return pinned, auth, origin, name

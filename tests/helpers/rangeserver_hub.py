"""The Hugging Face Hub as huggingface_hub 2.4.0 sees it, served by RangeServer (rangeserver.py).

    commit = srv.add_repo("org/sd15", folder)                        # revision "main"
    srv.add_repo("org/sd15", other_folder, revision="v2")           # another revision of it
    srv.add_repo("org/secret", folder, private=True, token="hf_x")  # 401 without "Authorization: Bearer hf_x"
    use_hub(monkeypatch, srv)                                        # huggingface_hub now talks to srv

Covered (models only):
- `/{repo_id}/resolve/{revision}/{path}`, HEAD and GET; repo ids with or without an org; the
  revision a branch name given to add_repo, or the 40-hex commit; quoted revisions
  (refs%2Fpr%2F1). Headers: `X-Repo-Commit`; a regular file answers 200 itself with
  `ETag: "<git blob sha1 of its content>"`, as the Hub does; an LFS file (by name: `lfs=`
  patterns, *.safetensors, *.ckpt, *.bin, ... by default) answers 302 with
  `X-Linked-Etag: "<sha256>"`, `X-Linked-Size`, `ETag: "<sha256>"` and a Location on the cdn
  origin (another port: huggingface_hub does not follow it on HEAD, reads the X-Linked
  headers from the 302, and drops the Authorization header for the download):
  `/_lfs/<sha256>?X-Amz-...&X-Amz-Signature=...&response-content-disposition=...`. There the
  file is served with Range support and an S3-like ETag (a stat sha1, NOT the sha256: as on the
  real CDN, a client must not send the X-Linked-Etag in If-Range there), only with a signature
  the server issued (else 403; `srv.revoke_signatures()` expires them all), and only while the
  file still has that sha256 (else 404 NoSuchKey, as a blob that is gone). With
  `lfs_redirect=False` LFS files are served from /resolve/ directly, with the X-Linked headers.
- `GET /api/models/{repo_id}` and `/api/models/{repo_id}/revision/{rev}` (`model_info`,
  `repo_info`; `?blobs=true` (files_metadata=True) adds size, blobId and lfs {sha256, size,
  pointerSize} to each sibling); `GET /api/models/{repo_id}/tree/{rev}[/{path}]`
  (`list_repo_tree`, `list_repo_files`; recursive or not; `expand` adds lastCommit; paged by
  `srv.hub.page_size` entries with a `Link: <...>; rel="next"` header);
  `POST /api/models/{repo_id}/paths-info/{rev}` (`get_paths_info`, HfFileSystem.info).
  With these, hf_hub_url, get_hf_file_metadata, hf_hub_download, file_exists, HfApi.model_info /
  list_repo_files / list_repo_tree / get_paths_info and HfFileSystem reads work.
- Errors with the headers hf_raise_for_status maps: unknown repo -> 404 `X-Error-Code:
  RepoNotFound` (RepositoryNotFoundError); unknown revision -> 404 RevisionNotFound; missing file
  -> 404 EntryNotFound (with X-Repo-Commit, as the Hub sends it); private repo without a token
  -> 401 RepoNotFound, with a wrong one -> 401 `X-Error-Message: Invalid credentials in
  Authorization header` (HfHubHTTPError); gated repo without the token -> 401, with a wrong one
  -> 403, both `X-Error-Code: GatedRepo` (GatedRepoError).

Not covered: Xet (no X-Xet-Hash header, so huggingface_hub downloads over plain HTTP even with
hf_xet installed); datasets, spaces and buckets; uploads and commits; whoami and other /api
routes (404); renamed repos' redirects (use faults.redirect); gated access requests; the
safetensors metadata API; the tree-listing cache's xet shortcut; real commit history (each
revision is one folder; its content at a "commit" is whatever the folder holds when asked, so
replacing a file changes it under the same commit unless add_repo is called again with a new
commit). The `/api/`, `/_lfs/` and `*/resolve/*` paths belong to the Hub: a file under the
root at such a path is not served.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode

DEFAULT_LFS = ("*.safetensors", "*.ckpt", "*.pt", "*.pth", "*.bin", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.pkl")
DEFAULT_TOKEN = "hf_rangeserver_token"
_RESOLVE = re.compile(r"^/(?:[^/]+/)?[^/]+/resolve/")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def use_hub(monkeypatch, srv, *, token: str | None = None) -> None:
    """Point huggingface_hub at `srv` for one test (see rangeserver.py's docstring for why each patch)."""
    from huggingface_hub import constants, hf_api
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "ENDPOINT", srv.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", srv.url + "/{repo_id}/resolve/{revision}/{filename}")
    # no token file: the user's own login must not reach the test server
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(tempfile.gettempdir(), "rangeserver-no-such-token"))
    monkeypatch.setattr(hf_api.api, "endpoint", srv.url)


@dataclass
class HubRepo:
    repo_id: str
    private: bool = False
    gated: bool = False
    token: str | None = None
    lfs: tuple = DEFAULT_LFS
    lfs_redirect: bool = True
    refs: dict = field(default_factory=dict)     # revision name -> commit
    trees: dict = field(default_factory=dict)    # commit -> folder (real path)

    def commit_for(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.trees else None

    def is_lfs(self, path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in self.lfs)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


class Hub:
    """The Hub routes of one RangeServer (`srv.hub`)."""

    def __init__(self, server):
        self.server = server
        self.repos: dict[str, HubRepo] = {}
        self.page_size = 1000
        self._lock = threading.Lock()
        self._digests: dict[tuple, dict] = {}
        self._blobs: dict[str, str] = {}          # sha256 -> real path

    def add_repo(self, repo_id: str, folder, *, revision: str = "main", commit: str | None = None,
                 private: bool = False, gated: bool = False, token: str | None = None,
                 lfs=DEFAULT_LFS, lfs_redirect: bool = True) -> str:
        """Serve `folder` as revision `revision` of the model repo `repo_id`; returns the commit
        (`commit`, or a sha1 of repo_id@revision). Calling again adds a revision, or re-points one;
        the repo-wide settings (private, gated, token, lfs, lfs_redirect) are the last call's.
        A private or gated repo without `token` gets DEFAULT_TOKEN."""
        commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        if not _HEX40.match(commit):
            raise ValueError(f"commit must be 40 lowercase hex digits: {commit!r}")
        if not os.path.isdir(folder):
            raise ValueError(f"not a folder: {folder}")
        with self._lock:
            repo = self.repos.get(repo_id) or HubRepo(repo_id)
            repo.private, repo.gated, repo.lfs, repo.lfs_redirect = private, gated, tuple(lfs), lfs_redirect
            repo.token = token if token is not None else (DEFAULT_TOKEN if private or gated else None)
            repo.refs[revision] = commit
            repo.trees[commit] = os.path.realpath(folder)
            self.repos[repo_id] = repo
        return commit

    @staticmethod
    def handles(raw_path: str) -> bool:
        return raw_path.startswith(("/api/", "/_lfs/")) or bool(_RESOLVE.match(raw_path))

    def handle(self, h) -> None:
        segs = h.raw_path.split("/")[1:]
        if segs[0] == "_lfs":
            return self._cdn(h, unquote("/".join(segs[1:])))
        if segs[0] == "api":
            return self._api(h, [unquote(s) for s in segs[1:]])
        return self._resolve(h, segs)

    # -- helpers
    @staticmethod
    def _error(h, code: int, error_code: str | None, message: str, headers=None) -> None:
        hdrs = dict(headers or {})
        if error_code:
            hdrs["X-Error-Code"] = error_code
        hdrs["X-Error-Message"] = message
        h.reply(code, json.dumps({"error": message}).encode(), hdrs, "application/json; charset=utf-8")

    def _repo(self, h, repo_id: str) -> HubRepo | None:
        """The repo, if it exists and the request may see it; else the error is sent and None returned."""
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found")
            return None
        if not (repo.private or repo.gated):
            return repo
        auth = h.headers.get("Authorization")
        if auth == f"Bearer {repo.token}":
            return repo
        if repo.gated:
            self._error(h, 401 if auth is None else 403, "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                        "to access it. Please log in.")
        elif auth is None:
            self._error(h, 401, "RepoNotFound", "Repository not found")
        else:
            self._error(h, 401, None, "Invalid credentials in Authorization header")
        return None

    def digests(self, real: str, st, f) -> dict:
        """sha256, git blob oid and LFS pointer of an open file, cached by (path, size, mtime, inode)."""
        key = (real, st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        f.seek(0)
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
        while data := f.read(1 << 20):
            sha256.update(data)
            sha1.update(data)
        pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256.hexdigest()}\n"
                   f"size {st.st_size}\n").encode()
        d = {"sha256": sha256.hexdigest(), "oid": sha1.hexdigest(), "pointer_size": len(pointer),
             "pointer_oid": hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()}
        with self._lock:
            self._digests[key] = d
            self._blobs[d["sha256"]] = real
        return d

    def _stat_digests(self, real: str) -> tuple:
        with open(real, "rb") as f:
            st = os.fstat(f.fileno())
            return st, self.digests(real, st, f)

    # -- /resolve/
    def _resolve(self, h, segs: list[str]) -> None:
        if h.command not in ("GET", "HEAD"):
            return h.reply(405, b"method not allowed\n", {"Allow": "GET, HEAD"})
        i = 2 if len(segs) > 2 and segs[2] == "resolve" else 1
        repo = self._repo(h, "/".join(unquote(s) for s in segs[:i]))
        if repo is None:
            return
        revision = unquote(segs[i + 1]) if len(segs) > i + 1 else ""
        commit = repo.commit_for(revision)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        filename = unquote("/".join(segs[i + 2:]))
        local = self.server._local(repo.trees[commit], filename)
        hdrs = {"X-Repo-Commit": commit}
        if local is None:
            return self._error(h, 404, "EntryNotFound", "Entry not found", hdrs)
        if not repo.is_lfs(filename):
            return h.serve_file(local, etag=lambda st, f: f'"{self.digests(local, st, f)["oid"]}"', headers=hdrs)
        if not repo.lfs_redirect:             # the ETag function fills hdrs' X-Linked headers from the open file
            return h.serve_file(local, etag=lambda st, f: self._linked(hdrs, self.digests(local, st, f), st),
                                headers=hdrs)
        self.server._serving(local)
        st, d = self._stat_digests(local)
        self._linked(hdrs, d, st)
        name = filename.rsplit("/", 1)[-1]
        disposition = f"attachment; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
        location = (self.server._sign(f"{self.server.cdn_url}/_lfs/{d['sha256']}")
                    + "&" + urlencode({"response-content-disposition": disposition}))
        body = f"Found. Redirecting to {location}".encode()
        h.reply(302, body, dict(hdrs, **{"Location": location, "Accept-Ranges": "bytes"}))

    @staticmethod
    def _linked(hdrs: dict, d: dict, st) -> str:
        """Add the X-Linked headers of an LFS file to hdrs; return its ETag (the quoted sha256)."""
        hdrs["X-Linked-Etag"] = f'"{d["sha256"]}"'
        hdrs["X-Linked-Size"] = str(st.st_size)
        hdrs["ETag"] = f'"{d["sha256"]}"'
        return hdrs["ETag"]

    # -- the CDN
    def _cdn(self, h, sha256: str) -> None:
        if h.command not in ("GET", "HEAD"):
            return h.reply(405, b"method not allowed\n", {"Allow": "GET, HEAD"})
        if not self.server._check_signed(h):
            return
        with self._lock:
            real = self._blobs.get(sha256)
        if real is None:
            return h.reply(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
        name = os.path.basename(real)
        h.serve_file(real, headers={"Content-Disposition": f"attachment; filename=\"{name}\""},
                     check=lambda st, f: self.digests(real, st, f)["sha256"] == sha256)

    # -- /api/models/
    def _api(self, h, segs: list[str]) -> None:
        if not segs or segs[0] != "models" or len(segs) < 2:
            return self._error(h, 404, None, "Not found")
        rest = segs[1:]
        if len(rest) >= 2 and f"{rest[0]}/{rest[1]}" in self.repos:
            repo_id, tail = f"{rest[0]}/{rest[1]}", rest[2:]
        elif rest[0] in self.repos:
            repo_id, tail = rest[0], rest[1:]
        else:
            repo_id, tail = "/".join(rest[:2]), []
        action = tail[0] if tail else "revision"
        method = {"revision": ("GET", "HEAD"), "tree": ("GET", "HEAD"), "paths-info": ("POST",)}.get(action)
        if method is None:
            return self._error(h, 404, None, "Not found")
        if h.command not in method:
            return h.reply(405, b"method not allowed\n", {"Allow": ", ".join(method)})
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        revision = tail[1] if len(tail) > 1 else "main"
        commit = repo.commit_for(revision)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        folder = repo.trees[commit]
        query = parse_qs(h.query)
        flag = lambda name: query.get(name, [""])[0].lower() in ("1", "true")  # noqa: E731
        if action == "revision":
            return self._json(h, self._info(repo, commit, folder, blobs=flag("blobs")))
        if action == "paths-info":
            form = parse_qs(h.body.decode())
            expand = form.get("expand", [""])[0].lower() in ("1", "true")
            out = [e for p in form.get("paths", []) if (e := self._entry(repo, commit, folder, p.strip("/"), expand))]
            return self._json(h, out)
        path = "/".join(tail[2:]).strip("/")
        top = os.path.join(folder, *path.split("/")) if path else folder
        if self.server._local(folder, path) is not None or not self._inside(folder, top) or not os.path.isdir(top):
            return self._error(h, 404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                               {"X-Repo-Commit": commit})
        rels = self._walk(folder, path, recursive=flag("recursive"))
        entries = [e for rel in rels if (e := self._entry(repo, commit, folder, rel, flag("expand")))]
        start = int(query.get("cursor", ["0"])[0] or 0)
        page = entries[start:start + self.page_size]
        hdrs = {}
        if start + len(page) < len(entries):
            q = [(k, v) for k, v in parse_qsl(h.query) if k != "cursor"] + [("cursor", str(start + len(page)))]
            hdrs["Link"] = f'<{h.origin_url(h.server.origin == "cdn")}{h.raw_path}?{urlencode(q)}>; rel="next"'
        return self._json(h, page, hdrs)

    @staticmethod
    def _json(h, obj, headers=None) -> None:
        h.reply(200, json.dumps(obj).encode(), headers, "application/json; charset=utf-8")

    @staticmethod
    def _inside(folder: str, path: str) -> bool:
        real = os.path.realpath(path)
        return real == folder or real.startswith(folder + os.sep)

    def _walk(self, folder: str, path: str, recursive: bool) -> list[str]:
        """Relative paths ("/" separated) of the folders and files under `path`, folders first in each folder."""
        out = []
        top = os.path.join(folder, *path.split("/")) if path else folder
        for here, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            rel = os.path.relpath(here, folder).replace(os.sep, "/")
            rel = "" if rel == "." else rel + "/"
            out += [rel + d for d in dirs] + [rel + f for f in sorted(files)]
            if not recursive:
                break
        return out

    def _entry(self, repo: HubRepo, commit: str, folder: str, rel: str, expand: bool) -> dict | None:
        """A tree / paths-info entry, as the Hub's JSON; None if `rel` is not in the folder."""
        real = os.path.join(folder, *rel.split("/")) if rel else folder
        if not rel or ".." in rel.split("/") or not self._inside(folder, real):
            return None
        if os.path.isdir(real):
            e = {"type": "directory", "oid": hashlib.sha1(f"{commit}:{rel}".encode()).hexdigest(), "size": 0,
                 "path": rel}
            mtime = os.stat(real).st_mtime
        elif (local := self.server._local(folder, rel)) is not None:
            st, d = self._stat_digests(local)
            e = {"type": "file", "oid": d["oid"], "size": st.st_size, "path": rel}
            if repo.is_lfs(rel):
                e["oid"] = d["pointer_oid"]
                e["lfs"] = {"oid": d["sha256"], "size": st.st_size, "pointerSize": d["pointer_size"]}
            mtime = st.st_mtime
        else:
            return None
        if expand:
            e["lastCommit"] = {"id": commit, "title": "rangeserver", "date": _iso(mtime)}
        return e

    def _info(self, repo: HubRepo, commit: str, folder: str, blobs: bool) -> dict:
        files = [rel for rel in self._walk(folder, "", recursive=True) if self.server._local(folder, rel)]
        siblings, mtimes = [], [os.stat(folder).st_mtime]
        for rel in files:
            s = {"rfilename": rel}
            if blobs:
                e = self._entry(repo, commit, folder, rel, False)
                s.update(size=e["size"], blobId=e["oid"])
                if "lfs" in e:
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(s)
            mtimes.append(os.stat(os.path.join(folder, rel)).st_mtime)
        org = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        return {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": org, "sha": commit, "lastModified": _iso(max(mtimes)),
                "createdAt": _iso(min(mtimes)), "private": repo.private, "gated": "manual" if repo.gated else False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}

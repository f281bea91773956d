"""The test HTTP server of issue 15 (tests/helpers/rangeserver.py) checked on its own: range
semantics, byte counting, each fault, clean shutdown, and the Hub emulation through
huggingface_hub itself. No sdconv code is involved."""
import email.utils
import hashlib
import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.helpers.rangeserver import RangeServer, parse_range, use_hub

SIZE = 300_000


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sd1.safetensors").write_bytes(random.Random(0).randbytes(SIZE))
    (root / "sub" / "small.json").write_bytes(b'{"x": 1}\n')
    (root / "empty.bin").write_bytes(b"")
    (tmp_path / "secret.txt").write_bytes(b"outside the root")
    os.symlink(tmp_path / "secret.txt", root / "escape.txt")
    return root


@pytest.fixture
def data(root):
    return (root / "sd1.safetensors").read_bytes()


@pytest.fixture
def srv(root):
    with RangeServer(root) as s:
        yield s


def conn(srv, cdn=False, timeout=5.0):
    u = urlsplit(srv.cdn_url if cdn else srv.url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def fetch(srv, path, method="GET", headers=None, cdn=False, timeout=5.0):
    """(status, {lower-case header: value}, body) of one request on a fresh connection."""
    c = conn(srv, cdn, timeout)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


# ---------------------------------------------------------------- ranges

def test_a_whole_file_with_its_validators(srv, data):
    status, h, body = fetch(srv, "/sd1.safetensors")
    assert (status, body) == (200, data)
    assert h["content-length"] == str(SIZE) and h["accept-ranges"] == "bytes"
    assert h["etag"].startswith('"') and h["etag"].endswith('"') and len(h["etag"]) > 10
    assert email.utils.parsedate_to_datetime(h["last-modified"]).timestamp() == int(os.stat(srv.root + "/sd1.safetensors").st_mtime)
    assert h["content-type"] == "application/octet-stream"
    assert srv.url_for("sub/small.json") == srv.url + "/sub/small.json"


@pytest.mark.parametrize("header, start, stop", [
    ("bytes=0-9", 0, 10), ("bytes=100-", 100, SIZE), ("bytes=-50", SIZE - 50, SIZE),
    ("bytes=299990-400000", 299990, SIZE), ("bytes=-999999", 0, SIZE), ("bytes=5-5", 5, 6),
    ("Bytes = 7 - 8", 7, 9),
])
def test_single_ranges(srv, data, header, start, stop):
    status, h, body = fetch(srv, "/sd1.safetensors", headers={"Range": header})
    assert status == 206 and body == data[start:stop]
    assert h["content-range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    assert h["content-length"] == str(stop - start)


@pytest.mark.parametrize("path, header, size", [
    ("/sd1.safetensors", f"bytes={SIZE}-", SIZE), ("/sd1.safetensors", "bytes=-0", SIZE),
    ("/sd1.safetensors", "bytes=500000-600000", SIZE), ("/empty.bin", "bytes=0-", 0), ("/empty.bin", "bytes=-5", 0),
])
def test_unsatisfiable_ranges_are_416(srv, path, header, size):
    status, h, _ = fetch(srv, path, headers={"Range": header})
    assert status == 416 and h["content-range"] == f"bytes */{size}"


@pytest.mark.parametrize("header", ["bytes=5-2", "items=0-1", "bytes=0-1,5-6", "bytes=-", "bytes=x-y"])
def test_invalid_and_multiple_ranges_are_ignored(srv, data, header):
    """Documented choice: a Range that does not parse, or asks for several ranges, gets 200 and the whole file."""
    status, h, body = fetch(srv, "/sd1.safetensors", headers={"Range": header})
    assert (status, body) == (200, data) and "content-range" not in h
    assert srv.stats.requests[-1].range == header


def test_parse_range_directly():
    assert parse_range("bytes=0-0", 1) == (0, 1)
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=1-0", 10) is None


def test_head_answers_the_get_headers_without_a_body(srv):
    status, h, body = fetch(srv, "/sd1.safetensors", "HEAD")
    assert (status, body, h["content-length"]) == (200, b"", str(SIZE))
    status, h, body = fetch(srv, "/sd1.safetensors", "HEAD", {"Range": "bytes=10-19"})
    assert (status, body, h["content-length"], h["content-range"]) == (206, b"", "10", f"bytes 10-19/{SIZE}")
    assert srv.stats.total_bytes == 0


def test_if_range(srv, data):
    _, h, _ = fetch(srv, "/sd1.safetensors", "HEAD")
    etag, lm = h["etag"], h["last-modified"]
    rng = {"Range": "bytes=10-19"}
    assert fetch(srv, "/sd1.safetensors", headers={**rng, "If-Range": etag})[0] == 206
    assert fetch(srv, "/sd1.safetensors", headers={**rng, "If-Range": lm})[0] == 206
    for stale in ('"0123"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT"):
        status, _, body = fetch(srv, "/sd1.safetensors", headers={**rng, "If-Range": stale})
        assert (status, body) == (200, data)


@pytest.mark.parametrize("path", ["/missing", "/sub", "/sub/", "/", "/../secret.txt", "/%2e%2e/secret.txt",
                                  "/sub/..%2f..%2fsecret.txt", "/escape.txt", "/sub%5c..%5csecret.txt"])
def test_no_listing_no_escape(srv, path):
    assert fetch(srv, path)[0] == 404


def test_only_get_and_head(srv):
    assert fetch(srv, "/sd1.safetensors", "POST")[0] == 405


def test_keep_alive_and_quoted_names(srv, root):
    (root / "a b#c.bin").write_bytes(b"xyz")
    c = conn(srv)
    for _ in range(3):
        c.request("GET", "/sub/small.json")
        r = c.getresponse()
        assert r.read() == b'{"x": 1}\n' and r.getheader("Content-Type") == "application/json"
    c.close()
    assert requests.get(srv.url_for("a b#c.bin"), timeout=5).content == b"xyz"
    assert srv.stats.bytes_by_path["/a b#c.bin"] == 3


# ---------------------------------------------------------------- stats

def test_byte_counting(srv, root, data):
    fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-999"})
    fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=-24"})
    fetch(srv, "/sd1.safetensors", "HEAD")
    fetch(srv, "/sub/small.json")
    fetch(srv, "/missing")
    s = srv.stats
    assert s.calls == [("GET", "/sd1.safetensors", "bytes=0-999", 206), ("GET", "/sd1.safetensors", "bytes=-24", 206),
                       ("HEAD", "/sd1.safetensors", None, 200), ("GET", "/sub/small.json", None, 200),
                       ("GET", "/missing", None, 404)]
    assert s.n_requests == 5 and s.bytes_by_path["/sd1.safetensors"] == 1024
    assert s.file_bytes(root / "sd1.safetensors") == 1024 and s.file_bytes(root / "sub" / "small.json") == 9
    assert s.total_bytes == 1024 + 9 + len(b"not found\n")
    assert s.count("*.safetensors") == 3 and s.count(method="HEAD") == 1 and s.bytes_for("/sd1*", status=206) == 1024
    fetch(srv, "/sub/small.json")
    assert s.n_requests == 5, "a snapshot does not change"
    srv.reset_stats()
    assert srv.stats.n_requests == 0 and srv.stats.total_bytes == 0


def test_concurrent_requests_are_all_counted(srv, data):
    errors, spans = [], [(i * 7000, i * 7000 + 4999) for i in range(40)]

    def worker(part):
        try:
            c = conn(srv)
            for a, b in part:
                c.request("GET", "/sd1.safetensors", headers={"Range": f"bytes={a}-{b}"})
                r = c.getresponse()
                assert r.read() == data[a:b + 1]
            c.close()
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(spans[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert srv.wait_idle()
    assert srv.stats.total_bytes == 40 * 5000 and srv.stats.count(status=206) == 40


# ---------------------------------------------------------------- faults

def test_drop_mid_body_then_resume(srv, root, data):
    rule = srv.faults.drop("/sd1.safetensors", after_bytes=1000)
    c = conn(srv)
    c.request("GET", "/sd1.safetensors", headers={"Range": "bytes=0-"})
    r = c.getresponse()
    assert r.status == 206
    with pytest.raises(http.client.IncompleteRead) as e:
        r.read()
    assert e.value.partial == data[:1000]
    etag = r.getheader("ETag")
    c.close()
    assert rule.hits == 1 and rule.spent
    status, _, rest = fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=1000-", "If-Range": etag})
    assert status == 206 and e.value.partial + rest == data
    s = srv.stats
    assert s.file_bytes(root / "sd1.safetensors") == SIZE
    assert [r.aborted for r in s.requests] == [True, False]


def test_drop_with_a_reset(srv):
    srv.faults.drop("*.safetensors", after_bytes=10, reset=True)
    c = conn(srv)
    c.request("GET", "/sd1.safetensors")
    with pytest.raises(ConnectionResetError):
        c.getresponse().read()
    c.close()


def test_drop_spares_short_bodies_and_heads(srv):
    rule = srv.faults.drop("/sd1.safetensors", after_bytes=1000, times=2)
    assert fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-99"})[0] == 206
    assert fetch(srv, "/sd1.safetensors", "HEAD")[0] == 200
    assert rule.hits == 0


def test_unavailable_n_times_then_served(srv):
    rule = srv.faults.unavailable("/sd1.safetensors", times=2, retry_after=3)
    for _ in range(2):
        status, h, _ = fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-9"})
        assert status == 503 and h["retry-after"] == "3"
    assert fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-9"})[0] == 206
    assert rule.hits == 2 and rule.spent
    assert [c[3] for c in srv.stats.calls] == [503, 503, 206]


def test_too_many_requests_and_other_paths_untouched(srv):
    srv.faults.too_many_requests("*.safetensors", times=1)
    assert fetch(srv, "/sub/small.json")[0] == 200
    assert fetch(srv, "/sd1.safetensors")[0] == 429
    assert fetch(srv, "/sd1.safetensors")[0] == 200


@pytest.mark.parametrize("code", [401, 403, 404])
def test_deny(srv, code):
    rule = srv.faults.deny("/sd1.safetensors", code)
    for _ in range(3):
        status, h, _ = fetch(srv, "/sd1.safetensors")
        assert status == code
    assert ("www-authenticate" in h) == (code == 401)
    assert rule.hits == 3 and not rule.spent
    assert fetch(srv, "/sub/small.json")[0] == 200
    srv.faults.clear()
    assert fetch(srv, "/sd1.safetensors")[0] == 200


def test_replace_after_n_requests(srv, root, data):
    new = b"new content" * 10
    rule = srv.faults.replace("sd1.safetensors", new, after=2)
    h1 = fetch(srv, "/sd1.safetensors", "HEAD")[1]
    h2 = fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-9"})[1]
    assert h1["etag"] == h2["etag"] and rule.hits == 0
    status, h3, body = fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-9", "If-Range": h1["etag"]})
    assert (status, body) == (200, new), "the old ETag no longer holds: the whole new file"
    assert h3["etag"] != h1["etag"] and h3["last-modified"] != h1["last-modified"]
    assert h3["content-length"] == str(len(new)) and rule.hits == 1
    assert (root / "sd1.safetensors").read_bytes() == new
    assert fetch(srv, "/sd1.safetensors", "HEAD")[1]["etag"] == h3["etag"], "one-shot"


def test_a_response_in_flight_keeps_the_old_content(srv, root, data):
    srv.faults.slow("/sd1.safetensors", per_chunk=0.05, chunk_size=50_000)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=fetch(srv, "/sd1.safetensors")))
    t.start()
    _until_started(srv, "/sd1.safetensors")
    srv.replace_file("sd1.safetensors", b"short")
    t.join()
    assert out["r"][2] == data
    assert fetch(srv, "/sd1.safetensors")[2] == b"short"


def _until_started(srv, path):
    deadline = time.monotonic() + 5
    while srv.stats.bytes_for(path) == 0 and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_file_truncated_in_place_while_served_cuts_the_connection(srv, root):
    """Not a server error: the body is cut short, as a real server would."""
    srv.faults.slow("/sd1.safetensors", per_chunk=0.05, chunk_size=50_000)
    c = conn(srv)
    c.request("GET", "/sd1.safetensors")
    r = c.getresponse()
    _until_started(srv, "/sd1.safetensors")
    os.truncate(root / "sd1.safetensors", 60_000)
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    c.close()
    assert srv.wait_idle() and srv.stats.requests[-1].aborted and not srv.errors


def test_a_request_that_does_not_parse(srv):
    s = socket.create_connection(("127.0.0.1", urlsplit(srv.url).port), timeout=5)
    s.sendall(b"GET /sub/small.json HTTP/1.1 junk\r\n\r\n")
    answer = b"".join(iter(lambda: s.recv(4096), b""))
    assert b"Error code: 400" in answer          # http.server's own answer (as HTTP/0.9: no status line)
    s.close()
    assert fetch(srv, "/sub/small.json")[0] == 200
    assert srv.stats.calls == [("GET", "/sub/small.json", None, 200)] and not srv.errors


def test_ignore_range(srv, data):
    rule = srv.faults.ignore_range("/sd1.safetensors")
    status, h, body = fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-9"})
    assert (status, body) == (200, data) and "accept-ranges" not in h
    assert "accept-ranges" not in fetch(srv, "/sd1.safetensors", "HEAD")[1]
    assert fetch(srv, "/sub/small.json", "HEAD")[1]["accept-ranges"] == "bytes"
    assert rule.hits == 2


@pytest.mark.parametrize("code", [302, 307])
def test_redirect_to_a_signed_storage_url(srv, data, code):
    srv.faults.redirect("/sd1.safetensors", code=code)
    status, h, _ = fetch(srv, "/sd1.safetensors")
    assert status == code and h["location"].startswith(srv.url + "/_storage/sd1.safetensors?")
    assert "X-Amz-Signature=" in h["location"]
    r = requests.get(srv.url_for("sd1.safetensors"), headers={"Range": "bytes=100-199"}, timeout=5)
    assert r.status_code == 206 and r.content == data[100:200]
    assert [(c[1], c[3]) for c in srv.stats.calls[-2:]] == [("/sd1.safetensors", code), ("/_storage/sd1.safetensors", 206)]
    assert "X-Amz-Signature=" in srv.stats.requests[-1].query


def test_signed_storage_urls(srv, data):
    url = srv.signed_url_for("sd1.safetensors")
    path = url[len(srv.url):]
    assert fetch(srv, path, headers={"Range": "bytes=0-9"})[2] == data[:10]
    assert fetch(srv, path.replace("X-Amz-Signature=", "X-Amz-Signature=0"))[0] == 403
    assert fetch(srv, "/_storage/sd1.safetensors")[0] == 403
    srv.storage_rejects_auth = True
    assert fetch(srv, path, headers={"Authorization": "Bearer x"})[0] == 400
    srv.revoke_signatures()
    assert fetch(srv, path)[0] == 403


def test_redirect_to_the_cdn_origin_and_to_a_path(srv, data):
    srv.faults.redirect("/old.safetensors", to="/sd1.safetensors", code=301)
    srv.faults.redirect("/sd1.safetensors", cdn=True, times=1)
    r = requests.get(srv.url_for("old.safetensors"), headers={"Range": "bytes=0-9", "Authorization": "Bearer t"}, timeout=5)
    assert r.content == data[:10]
    reqs = srv.stats.requests
    assert [(q.path, q.status, q.origin) for q in reqs] == [
        ("/old.safetensors", 301, "main"), ("/sd1.safetensors", 302, "main"), ("/_storage/sd1.safetensors", 206, "cdn")]
    assert reqs[0].authorization == "Bearer t" and reqs[2].authorization is None, "requests drops it for another origin"


def test_slow_headers_time_a_client_out_and_close_does_not_wait(root):
    srv = RangeServer(root).start()
    srv.faults.slow("/sd1.safetensors", before_headers=30)
    with pytest.raises((TimeoutError, socket.timeout)):
        fetch(srv, "/sd1.safetensors", timeout=0.3)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 2


def test_slow_chunks(srv, data):
    rule = srv.faults.slow("/sd1.safetensors", per_chunk=0.05, chunk_size=100_000)
    t0 = time.monotonic()
    assert fetch(srv, "/sd1.safetensors")[2] == data
    assert time.monotonic() - t0 >= 0.15
    fetch(srv, "/sub/small.json")
    assert rule.hits == 1


def test_bandwidth(srv, data):
    srv.bandwidth = 1_000_000
    t0 = time.monotonic()
    assert fetch(srv, "/sd1.safetensors")[2] == data
    assert 0.25 <= time.monotonic() - t0 < 2
    out = []

    def get():
        out.append(fetch(srv, "/sd1.safetensors", headers={"Range": "bytes=0-149999"})[2])
    t0 = time.monotonic()
    threads = [threading.Thread(target=get) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 >= 0.25, "the link is shared: 2 x 150 kB at 1 MB/s"
    assert out == [data[:150_000]] * 2
    srv.bandwidth, srv.response_bandwidth = None, 500_000
    t0 = time.monotonic()
    threads = [threading.Thread(target=get) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0.28 <= time.monotonic() - t0 < 0.55, "each response on its own: 150 kB at 500 kB/s, in parallel"


def test_match_by_callable_and_methods(srv):
    srv.faults.status(lambda p: p.endswith(".json"), 500, times=None, methods=["HEAD"])
    assert fetch(srv, "/sub/small.json", "HEAD")[0] == 500
    assert fetch(srv, "/sub/small.json")[0] == 200


# ---------------------------------------------------------------- life

def _server_threads():
    return {t for t in threading.enumerate() if t.name.startswith("rangeserver-")}


def test_close_cuts_idle_and_busy_connections_and_joins_its_threads(root):
    before = _server_threads()
    srv = RangeServer(root).start()
    idle = conn(srv)
    idle.request("GET", "/sub/small.json")
    idle.getresponse().read()                  # kept alive, idle
    srv.faults.slow("/sd1.safetensors", per_chunk=1, chunk_size=1000)
    busy = conn(srv, timeout=10)
    busy.request("GET", "/sd1.safetensors")
    r = busy.getresponse()
    assert len(_server_threads() - before) >= 4     # two listeners, two connections
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 2
    assert _server_threads() == before
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", urlsplit(srv.url).port), timeout=1)


def test_a_handler_error_is_raised_by_close(root):
    srv = RangeServer(root).start()
    srv.hub.handle = lambda h: 1 / 0
    assert fetch(srv, "/api/models/x/y")[0] == 500
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        srv.close()


def test_the_root_is_optional(tmp_path):
    with RangeServer() as srv:
        assert fetch(srv, "/anything")[0] == 404


# ---------------------------------------------------------------- the Hub

@pytest.fixture
def repo(tmp_path):
    folder = tmp_path / "repo"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "model_index.json").write_bytes(b'{"_class_name": "StableDiffusionPipeline"}\n')
    (folder / "text_encoder" / "config.json").write_bytes(b'{"hidden_size": 768}\n')
    (folder / "text_encoder" / "model.safetensors").write_bytes(random.Random(1).randbytes(200_000))
    return folder


@pytest.fixture
def hub(srv, repo, monkeypatch):
    srv.add_repo("org/sd15", repo, commit="a" * 40)
    use_hub(monkeypatch, srv)
    return srv


def _sha256(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _git_oid(p):
    b = p.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()


def test_hub_file_metadata(hub, repo):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    url = hf_hub_url("org/sd15", "text_encoder/model.safetensors")
    assert url == hub.hub_url("org/sd15", "text_encoder/model.safetensors")
    m = get_hf_file_metadata(url)
    lfs = repo / "text_encoder" / "model.safetensors"
    assert (m.commit_hash, m.etag, m.size) == ("a" * 40, _sha256(lfs), 200_000)
    assert m.location.startswith(hub.cdn_url + "/_lfs/" + _sha256(lfs) + "?") and m.xet_file_data is None
    m = get_hf_file_metadata(hf_hub_url("org/sd15", "model_index.json", revision="a" * 40))
    assert (m.commit_hash, m.etag, m.size) == ("a" * 40, _git_oid(repo / "model_index.json"),
                                                (repo / "model_index.json").stat().st_size)
    assert m.location.endswith("/org/sd15/resolve/" + "a" * 40 + "/model_index.json")
    assert hub.stats.calls == [("HEAD", "/org/sd15/resolve/main/text_encoder/model.safetensors", None, 302),
                               ("HEAD", "/org/sd15/resolve/" + "a" * 40 + "/model_index.json", None, 200)]


def test_hub_download(hub, repo, tmp_path):
    from huggingface_hub import hf_hub_download
    cache = tmp_path / "cache"
    for name in ("text_encoder/model.safetensors", "model_index.json"):
        p = hf_hub_download("org/sd15", name, cache_dir=cache)
        assert open(p, "rb").read() == (repo / name).read_bytes()
        assert f"snapshots/{'a' * 40}/{name}" in p
    s = hub.stats
    assert s.file_bytes(repo / "text_encoder" / "model.safetensors") == 200_000
    assert [(r.method, r.status, r.origin) for r in s.requests] == [
        ("HEAD", 302, "main"), ("GET", 200, "cdn"), ("HEAD", 200, "main"), ("GET", 200, "main")]


def test_hub_raw_protocol(hub, repo):
    url = hub.hub_url("org/sd15", "text_encoder/model.safetensors")
    r = requests.head(url, timeout=5)
    assert r.status_code == 302 and r.headers["X-Repo-Commit"] == "a" * 40
    sha = _sha256(repo / "text_encoder" / "model.safetensors")
    assert r.headers["X-Linked-Etag"] == f'"{sha}"' and r.headers["X-Linked-Size"] == "200000"
    r = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert r.status_code == 206 and r.content == (repo / "text_encoder" / "model.safetensors").read_bytes()[10:20]
    assert r.headers["ETag"] != f'"{sha}"', "the CDN has its own ETag, as S3 does"
    r2 = requests.get(url, headers={"Range": "bytes=10-19", "If-Range": f'"{sha}"'}, timeout=5)
    assert r2.status_code == 200, "so the X-Linked-Etag as If-Range there gets the whole file"


def test_hub_api_json(hub, repo):
    from huggingface_hub import HfApi, model_info
    api = HfApi()
    info = api.model_info("org/sd15", files_metadata=True)
    assert info.sha == "a" * 40 and info.id == "org/sd15" and info.private is False
    sib = {s.rfilename: s for s in info.siblings}
    assert sorted(sib) == ["model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors"]
    st = sib["text_encoder/model.safetensors"]
    assert st.size == 200_000 and st.lfs.sha256 == _sha256(repo / "text_encoder" / "model.safetensors")
    assert sib["model_index.json"].blob_id == _git_oid(repo / "model_index.json") and sib["model_index.json"].lfs is None
    assert model_info("org/sd15", revision="a" * 40).sha == "a" * 40, "the module-level functions too"
    assert api.list_repo_files("org/sd15") == sorted(sib)
    top = list(api.list_repo_tree("org/sd15"))
    assert [(type(e).__name__, e.path) for e in top] == [("RepoFolder", "text_encoder"), ("RepoFile", "model_index.json")]
    hub.hub.page_size = 1
    hub.reset_stats()
    tree = list(api.list_repo_tree("org/sd15", "text_encoder", recursive=True, expand=True))
    assert [e.path for e in tree] == ["text_encoder/config.json", "text_encoder/model.safetensors"]
    assert tree[1].lfs.size == 200_000 and tree[1].last_commit.oid == "a" * 40
    assert hub.stats.count("/api/models/org/sd15/tree/*") == 2, "paged"
    got = api.get_paths_info("org/sd15", ["text_encoder", "model_index.json", "nope"])
    assert [e.path for e in got] == ["text_encoder", "model_index.json"]


def test_hub_revisions(hub, repo, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "model_index.json").write_bytes(b"{}\n")
    commit = hub.add_repo("org/sd15", v2, revision="refs/pr/1")
    assert HfApi().model_info("org/sd15", revision="refs/pr/1").sha == commit
    p = hf_hub_download("org/sd15", "model_index.json", revision="refs/pr/1", cache_dir=tmp_path / "c")
    assert open(p, "rb").read() == b"{}\n"
    assert HfApi().list_repo_files("org/sd15", revision=commit) == ["model_index.json"]


def test_hub_errors(hub, tmp_path):
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        get_hf_file_metadata(hf_hub_url("org/nope", "x.json"))
    with pytest.raises(RevisionNotFoundError):
        get_hf_file_metadata(hf_hub_url("org/sd15", "model_index.json", revision="v9"))
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/sd15", "nope.safetensors", cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/nope")
    with pytest.raises(RevisionNotFoundError):
        HfApi().list_repo_files("org/sd15", revision="v9")
    api = HfApi()
    assert api.file_exists("org/sd15", "model_index.json") and not api.file_exists("org/sd15", "nope")
    statuses = [c[3] for c in hub.stats.calls]
    assert statuses[:5] == [404] * 5


def test_hub_private_repo(srv, repo, monkeypatch, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    srv.add_repo("org/private", repo, private=True, token="hf_good")
    use_hub(monkeypatch, srv)
    with pytest.raises(RepositoryNotFoundError) as e:
        hf_hub_download("org/private", "model_index.json", cache_dir=tmp_path / "c")
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(token="hf_bad").model_info("org/private")
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)
    srv.reset_stats()
    use_hub(monkeypatch, srv, token="hf_good")
    p = hf_hub_download("org/private", "text_encoder/model.safetensors", cache_dir=tmp_path / "c")
    assert open(p, "rb").read() == (repo / "text_encoder" / "model.safetensors").read_bytes()
    auth = [(r.origin, r.authorization) for r in srv.stats.requests]
    assert auth == [("main", "Bearer hf_good"), ("cdn", None)], "the token stays on the Hub"


def test_hub_gated_repo(srv, repo, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError
    srv.add_repo("org/gated", repo, gated=True)
    use_hub(monkeypatch, srv)
    with pytest.raises(GatedRepoError):
        HfApi().model_info("org/gated")
    with pytest.raises(GatedRepoError):
        HfApi(token="hf_other").model_info("org/gated")
    assert HfApi(token=srv.hub.repos["org/gated"].token).model_info("org/gated").gated == "manual"


def test_hub_lfs_without_redirect_and_single_segment_ids(srv, repo, monkeypatch):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    srv.add_repo("sd15", repo, lfs_redirect=False)
    use_hub(monkeypatch, srv)
    url = hf_hub_url("sd15", "text_encoder/model.safetensors")
    m = get_hf_file_metadata(url)
    assert m.location == url and m.size == 200_000 and m.etag == _sha256(repo / "text_encoder" / "model.safetensors")
    r = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": f'"{m.etag}"'}, timeout=5)
    assert r.status_code == 206 and r.headers["X-Linked-Size"] == "200000"


def test_hub_range_reads_fetch_only_their_bytes(hub, repo):
    from huggingface_hub import HfFileSystem
    fs = HfFileSystem(skip_instance_cache=True)
    data = (repo / "text_encoder" / "model.safetensors").read_bytes()
    with fs.open("org/sd15/text_encoder/model.safetensors", "rb", block_size=4096, cache_type="none") as f:
        f.seek(150_000)
        assert f.read(100) == data[150_000:150_100]
    assert hub.stats.file_bytes(repo / "text_encoder" / "model.safetensors") == 100


def test_hub_blob_gone_after_a_replace(hub, repo):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    url = hf_hub_url("org/sd15", "text_encoder/model.safetensors")
    old = get_hf_file_metadata(url)
    hub.replace_file(repo / "text_encoder" / "model.safetensors", b"other weights")
    assert requests.get(old.location, timeout=5).status_code == 404, "content-addressed: the old blob is gone"
    new = get_hf_file_metadata(url)
    assert (new.size, new.etag) == (13, hashlib.sha256(b"other weights").hexdigest())
    assert requests.get(new.location, timeout=5).content == b"other weights"


def test_hub_from_a_subprocess(hub, tmp_path):
    """A subprocess started after use_hub inherits HF_ENDPOINT and no HF_HUB_OFFLINE."""
    code = ("from huggingface_hub import hf_hub_download\n"
            "print(open(hf_hub_download('org/sd15', 'model_index.json'), 'rb').read().decode(), end='')\n")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == '{"_class_name": "StableDiffusionPipeline"}\n'

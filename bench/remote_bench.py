#!/usr/bin/env python3
"""Reading a checkpoint from a URL against downloading it and converting the copy (issue 15, item 8).

    make bench-remote                                     # = .venv/bin/python bench/remote_bench.py
    .venv/bin/python bench/remote_bench.py --quick        # 1 repetition
    .venv/bin/python bench/remote_bench.py --bandwidth 50 --reps 5 --inputs sd15-sft,sdxl-sft

What it does, in one run, for each input (the full-size synthetic checkpoints of bench.py,
made by its generators, one at a time, each deleted once measured):
1. Serves the file from the test server of tests/helpers/rangeserver.py on 127.0.0.1 (stdlib
   HTTP with Range support, in this process), its bandwidth capped (`--bandwidth`, MB/s, default
   100: one shared link, no burst).
2. Times, each as its own process under `/usr/bin/time -v`, median of N (default 3), the two
   alternating within each repetition (the first of a pair swaps from one repetition to the next):
   (a) `sdconv convert URL -o out/clip.safetensors --to openai --encoder all -q`: SD1.5 its
       clip_l, SDXL both encoders; the fp32 .ckpt by ranges too (its zip directory, pickle and
       the encoder's storage records);
   (b) download, then convert: `curl -o FILE URL && sdconv convert FILE ...` (same options), one
       shell command, timed as a whole; curl's own `time_total` splits it into download and
       convert. The downloaded copy is deleted after each run.
   Bytes transferred: the file body bytes the server sent during the run (its own count).
   sdconv runs as `python -m sdconv` with this checkout's src/ first on PYTHONPATH, and a private
   XDG_CACHE_HOME, so that no digest cached by earlier runs is used (a fresh download is hashed
   once for provenance, as for any user; a URL input hashes only the bytes read).
3. Checks that the cap binds: once per input, uncapped, (a) and a plain curl download of the
   file (achieved rate vs. the cap), before the capped runs.
4. Prints the table, writes bench/remote_results.md and bench/remote_results.json, and deletes
   its files (also on failure or Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench as B  # noqa: E402  (bench/bench.py: generators, timing, helpers)

PY = sys.executable
SDCONV = [PY, "-m", "sdconv"]
MB = 1e6

INPUTS = [
    # id (as bench.py's), name, file, sdconv options beyond `--to openai --encoder all`, target ratio
    {"id": "sd15-sft", "name": "SD1.5 fp16 .safetensors", "file": "sd15-fp16.safetensors", "extra": [],
     "what": "clip_l", "target": 6.0},
    {"id": "sd15-ckpt", "name": "SD1.5 fp32 .ckpt (Lightning)", "file": "sd15-fp32.ckpt", "extra": [],
     "what": "clip_l (a torch zip read by ranges: its directory, pickle and the encoder's records)", "target": None},
    {"id": "sdxl-sft", "name": "SDXL base fp16 .safetensors", "file": "sdxl-base-fp16.safetensors", "extra": [],
     "what": "clip_l + clip_g", "target": 3.5},
]


def downloader(url: str, dest: Path) -> list[str]:
    """A plain streaming GET of the whole file to `dest`; prints `seconds bytes` on stdout."""
    if shutil.which("curl"):
        return ["curl", "-sS", "--fail", "--noproxy", "*", "-o", str(dest), "-w", "%{time_total} %{size_download}\\n", url]
    return [PY, str(Path(__file__).resolve()), "--_download", url, str(dest)]


def python_download(url: str, dest: str):
    """Without curl: urllib, 1 MiB reads."""
    import urllib.request
    t0 = time.perf_counter()
    n = 0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url) as r, open(dest, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
            n += len(chunk)
    print(f"{time.perf_counter() - t0:.6f} {n}")


class Link:
    """The server's shared cap, as a link with a small buffer. The test server's own pacer starts
    each chunk no earlier than "now", so the time a chunk loses to Python's sleep and write (~0.1 ms
    a 64 KiB chunk) is never made up: curl got ~80 MB/s under a 100 MB/s cap. This one lets a late
    sender catch up, by at most `buffer_s` of the link's time (so an idle gap banks at most that:
    2 MB at 100 MB/s), which keeps the long-run rate at the cap."""

    def __init__(self, rate: float, buffer_s: float = 0.02):
        self.rate, self.buffer_s = float(rate), buffer_s
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def reserve(self, n: int) -> float:
        with self.lock:
            start = max(time.monotonic() - self.buffer_s, self.next)
            self.next = start + n / self.rate
            return self.next


def set_cap(srv, rate: float | None) -> None:
    """srv.bandwidth = rate, with the Link pacer (the server reads srv._pacer for every chunk)."""
    srv.bandwidth = rate
    if rate:
        srv._pacer = Link(rate)


def convert_cmd(src: str, out: Path, inp: dict) -> list[str]:
    return SDCONV + ["convert", src, "-o", str(out / "clip.safetensors"), "--to", "openai", "--encoder", "all", "-q",
                     *inp["extra"]]


class Served:
    """Runs commands against the server, reading its byte counts around each run."""

    def __init__(self, runner: B.Runner, srv, path: str):
        self.runner, self.srv, self.path = runner, srv, path

    def run(self, cmd, out: Path, keep_stdout=False) -> dict:
        self.srv.reset_stats()
        cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        r = self.runner.timed(cmd, outdir=out, keep_stdout=keep_stdout)
        self.srv.wait_idle()
        st = self.srv.stats
        r["bytes"] = st.bytes_for(self.path)
        r["requests"] = st.count(self.path)
        r["server_cpu_s"] = round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0, 2)
        # the runner's foreign_cores counts this process too (the server's threads): take it out
        r["other_cores"] = round(max(0.0, r["foreign_cores"] - r["server_cpu_s"] / r["wall"]), 3) if r["wall"] else 0.0
        return r


def download_split(r: dict) -> None:
    """(b) runs: curl's time_total and byte count, from its stdout."""
    try:
        t, n = r.pop("stdout", "").strip().splitlines()[0].split()[:2]
        r["download_s"], r["download_bytes"] = float(t), int(float(n))
        r["convert_s"] = r["wall"] - r["download_s"]
    except (ValueError, IndexError):
        r["download_s"] = r["download_bytes"] = r["convert_s"] = None


def log_run(log, label, r):
    status = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']}: {r.get('stderr', '')[-300:]}"
    split = f"  (download {r['download_s']:.2f} s + convert {r['convert_s']:.2f} s)" if r.get("download_s") else ""
    log(f"    {label:24s} {r['wall']:7.2f} s  {r['bytes'] / MB:9.1f} MB in {r['requests']:3d} requests  "
        f"{r['rss_kib'] / 1024:6.0f} MiB  server {r['server_cpu_s']:.1f} cpu-s, other processes {r['other_cores']:.2f} cores"
        f"{split}{status}")


def measure(inp: dict, path: Path, work: Path, runner: B.Runner, bandwidth: float, reps: int, log) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.helpers.rangeserver import RangeServer
    out = work / "out"
    size = path.stat().st_size
    res = {"uncapped": {}, "a": [], "b": []}
    with RangeServer(path.parent) as srv:
        served = Served(runner, srv, "/" + path.name)
        url = srv.url_for(path.name)
        a_cmd = convert_cmd(url, out, inp)
        b_cmd = ["sh", "-c", shlex.join(downloader(url, out / path.name)) + " && " + shlex.join(convert_cmd(str(out / path.name), out, inp))]
        # uncapped: what the loopback, this server and the disk do without a cap (and warms up)
        set_cap(srv, None)
        r = served.run(downloader(url, out / path.name), out, keep_stdout=True)
        download_split(r)
        res["uncapped"]["download"] = r
        log(f"    uncapped curl: {r['wall']:.2f} s, {size / r['wall'] / MB:.0f} MB/s (the cap: {bandwidth / MB:.0f} MB/s)"
            + ("" if r["rc"] == 0 else f"  FAILED: {r.get('stderr', '')[-300:]}"))
        r = served.run(a_cmd, out)
        res["uncapped"]["a"] = r
        log_run(log, "uncapped (a) sdconv URL", r)
        set_cap(srv, bandwidth)
        assert srv.bandwidth == bandwidth
        for rep in range(reps):
            for which in (("a", "b") if rep % 2 == 0 else ("b", "a")):
                r = served.run(a_cmd if which == "a" else b_cmd, out, keep_stdout=which == "b")
                if which == "b":
                    download_split(r)
                res[which].append(r)
                log_run(log, f"{rep + 1}/{reps} ({which}) " + ("sdconv URL" if which == "a" else "download+convert"), r)
    res["a_cmd"] = [("URL" if c == url else c) for c in a_cmd]
    res["b_cmd"] = b_cmd[-1].replace(url, "URL")
    return res


def summarize(inp: dict, res: dict, bandwidth: float) -> dict:
    med = B.med
    a = [x for x in res["a"] if x["rc"] == 0]
    b = [x for x in res["b"] if x["rc"] == 0]
    s = {"ok": len(a) == len(res["a"]) and len(b) == len(res["b"]) and bool(a) and bool(b)}
    s["a_wall"], s["b_wall"] = med([x["wall"] for x in a]), med([x["wall"] for x in b])
    s["a_range"] = [min(x["wall"] for x in a), max(x["wall"] for x in a)] if a else None
    s["b_range"] = [min(x["wall"] for x in b), max(x["wall"] for x in b)] if b else None
    s["a_bytes"], s["b_bytes"] = med([x["bytes"] for x in a]), med([x["bytes"] for x in b])
    s["a_requests"] = med([x["requests"] for x in a])
    s["a_rss_mib"] = med([x["rss_kib"] / 1024 for x in a])
    s["b_download"], s["b_convert"] = med([x["download_s"] for x in b]), med([x["convert_s"] for x in b])
    s["download_rate"] = med([x["download_bytes"] / x["download_s"] for x in b if x.get("download_s")])
    ratio = (lambda x, y: x / y if (x is not None and y) else None)
    s["wall_ratio"] = ratio(s["b_wall"], s["a_wall"])
    s["download_only_ratio"] = ratio(s["b_download"], s["a_wall"])
    s["bytes_ratio"] = ratio(s["b_bytes"], s["a_bytes"])
    # the parts that do not scale with the cap: time beyond bytes / bandwidth
    s["a_fixed"] = None if s["a_wall"] is None else s["a_wall"] - s["a_bytes"] / bandwidth
    s["b_fixed"] = None if s["b_wall"] is None else s["b_wall"] - s["b_bytes"] / bandwidth
    u = res["uncapped"]
    s["uncapped_rate"] = (u["download"]["download_bytes"] / u["download"]["download_s"]
                          if u["download"].get("download_s") else None)
    s["uncapped_a_wall"] = u["a"]["wall"] if u["a"]["rc"] == 0 else None
    s["server_cores_max"] = max((x["server_cpu_s"] / x["wall"] for x in res["a"] + res["b"] if x["wall"]), default=0.0)
    s["other_cores_max"] = max((x["other_cores"] for x in res["a"] + res["b"]), default=0.0)
    t = inp["target"]
    s["target"], s["met"] = t, (None if t is None or s["wall_ratio"] is None else s["wall_ratio"] >= t)
    # not measured: the cap at which this run's fixed parts would give the target ratio
    if t and s["a_fixed"] is not None and s["b_bytes"] > t * s["a_bytes"] and t * s["a_fixed"] > s["b_fixed"]:
        s["target_bandwidth"] = (s["b_bytes"] - t * s["a_bytes"]) / (t * s["a_fixed"] - s["b_fixed"])
    else:
        s["target_bandwidth"] = None
    return s


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def fmt(x, spec=".2f", suffix=""):
    return B.fmt(x, spec, suffix)


def mb(x):
    return "—" if x is None else (f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / MB:.0f} MB")


def render(results: dict) -> str:
    meta, L = results["meta"], []
    bw = meta["bandwidth"]
    L.append("# sdconv: reading a URL against downloading it first")
    L.append("")
    L.append(f"{meta['date']} · {meta['machine']} · sdconv {meta['sdconv_commit']} · torch {meta['torch']} · "
             f"httpx2 {meta['httpx2']} · downloader: {meta['downloader']}")
    L.append("")
    L.append(f"Server: tests/helpers/rangeserver.py on 127.0.0.1, bandwidth capped at **{bw / MB:.0f} MB/s** "
             f"({bw * 8 / 1e9:.1f} Gbit/s; paced per 64 KiB chunk, a late chunk made up for within 20 ms). "
             f"Median of {meta['reps']} runs per cell, each its own process, "
             "(a) and (b) alternating. (a) `sdconv convert URL -o out/clip.safetensors --to openai --encoder all` "
             "(the .ckpt by ranges too); (b) `curl -o FILE URL && sdconv convert FILE` (same options), timed "
             "as one command. Bytes: file body bytes the server sent. Ratios: (b) ÷ (a).")
    L.append("")
    L.append("| input | encoders | (a) sdconv URL | (b) download + convert | (b) ÷ (a) wall | (b) ÷ (a) bytes | "
             "download alone ÷ (a) | target | met |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for inp in results["inputs"]:
        s = inp["summary"]
        met = "—" if s["met"] is None else ("yes" if s["met"] else "**no**")
        L.append(f"| {inp['name']} ({mb(inp['gen']['bytes'])}) | {inp['what']} | "
                 f"{fmt(s['a_wall'], suffix=' s')}, {mb(s['a_bytes'])} | "
                 f"{fmt(s['b_wall'], suffix=' s')} ({fmt(s['b_download'], '.1f')} + {fmt(s['b_convert'], '.1f')} s), "
                 f"{mb(s['b_bytes'])} | **{fmt(s['wall_ratio'])} ×** | {fmt(s['bytes_ratio'])} × | "
                 f"{fmt(s['download_only_ratio'])} × | {'≥ %.1f ×' % s['target'] if s['target'] else '—'} | {met} |")
    L.append("")
    L.append("(b)'s time is split by curl's own `time_total`: download + convert (the convert of a fresh "
             "download also hashes the whole file once for provenance, as it would for a user; a URL input "
             "hashes only the bytes it read).")
    L.append("")
    L.append("## Where the time goes")
    L.append("")
    L.append("| input | (a) range | (b) range | (a) bytes ÷ cap | (a) beyond that | (a) uncapped | (a) requests | "
             "(a) peak RSS | curl under the cap | curl uncapped |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for inp in results["inputs"]:
        s = inp["summary"]
        rng = (lambda r: "—" if not r else f"{r[0]:.2f}–{r[1]:.2f} s")
        L.append(f"| {inp['name']} | {rng(s['a_range'])} | {rng(s['b_range'])} | "
                 f"{fmt(None if s['a_bytes'] is None else s['a_bytes'] / bw, suffix=' s')} | "
                 f"{fmt(s['a_fixed'], suffix=' s')} | {fmt(s['uncapped_a_wall'], suffix=' s')} | "
                 f"{fmt(s['a_requests'], '.0f')} | {fmt(s['a_rss_mib'], '.0f', ' MiB')} | "
                 f"{fmt(None if s['download_rate'] is None else s['download_rate'] / MB, '.1f', ' MB/s')} | "
                 f"{fmt(None if s['uncapped_rate'] is None else s['uncapped_rate'] / MB, '.0f', ' MB/s')} |")
    L.append("")
    for line in results["summary"]:
        L.append(f"- {line}")
    L.append("")
    L.append("Generation of the inputs: " + "; ".join(f"{i['name']} {i['gen']['wall']:.0f} s" for i in results["inputs"])
             + f". Peak disk used by the bench's files: {results['disk_peak'] / 1e9:.2f} GB (plus sdconv's "
             f"temporary mirror in {meta['tmpdir']}). Total run time: {results['duration_s'] / 60:.1f} min.")
    L.append("")
    L.append(f"Command: `{meta['command']}`")
    L.append("")
    return "\n".join(L)


def summary_lines(results: dict) -> list[str]:
    out, bw = [], results["meta"]["bandwidth"]
    for inp in results["inputs"]:
        s = inp["summary"]
        if not s["ok"]:
            bad = next((x for x in inp["runs"]["a"] + inp["runs"]["b"] if x["rc"] != 0), None)
            last = ((bad or {}).get("stderr") or "").strip().splitlines()
            out.append(f"FAILED runs: {inp['id']}: {last[-1][:300] if last else '?'}")
        if s["download_rate"] and s["uncapped_rate"]:
            binds = s["uncapped_rate"] >= 1.5 * bw
            out.append(f"{inp['name']}: curl reached {s['download_rate'] / MB:.1f} MB/s under the "
                       f"{bw / MB:.0f} MB/s cap and {s['uncapped_rate'] / MB:.0f} MB/s without it: the cap "
                       + ("binds." if binds else "does NOT clearly bind (uncapped is under 1.5 × the cap)."))
        if s["target"] and s["met"] is False and s["target_bandwidth"]:
            out.append(f"{inp['name']}: not measured, derived: with this run's fixed parts ((a) {s['a_fixed']:.1f} s, "
                       f"(b) {s['b_fixed']:.1f} s beyond bytes ÷ cap), the {s['target']:.1f} × target would be reached "
                       f"at a cap of {s['target_bandwidth'] / MB:.0f} MB/s or less; the ratio can never exceed the "
                       f"bytes ratio, {s['bytes_ratio']:.2f} ×.")
        elif s["target"] and s["met"] is False:
            out.append(f"{inp['name']}: the {s['target']:.1f} × target is out of reach at any cap with this run's "
                       f"fixed parts (bytes ratio {s['bytes_ratio']:.2f} ×).")
        if s["other_cores_max"] > 0.25:
            out.append(f"{inp['name']}: other processes (not the bench's server, which used at most "
                       f"{s['server_cores_max']:.2f} cores) used up to {s['other_cores_max']:.2f} cores during a run.")
    return out


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidth", type=float, default=100.0, help="the server's cap, in MB/s (10^6 bytes/s; default 100)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of (a) and (b) per input (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 repetition")
    ap.add_argument("--inputs", default=",".join(i["id"] for i in INPUTS),
                    help="comma-separated subset of: " + ", ".join(i["id"] for i in INPUTS))
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to put the checkpoints and downloads (a temporary folder is made inside it and "
                         "removed at the end); default: beside the repo if that disk has 20 GB free, else the temp dir")
    ap.add_argument("--results", type=Path, default=HERE,
                    help="where remote_results.md / remote_results.json go (default bench/)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only write remote_results.md again from a remote_results.json (no measuring)")
    ap.add_argument("--_download", nargs=2, metavar=("URL", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._download:
        return python_download(*args._download)
    if args.render:
        results = json.loads(args.render.read_text())
        results["summary"] = summary_lines(results)
        (args.results / "remote_results.md").write_text(render(results))
        return print(f"wrote {args.results / 'remote_results.md'}")

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    reps = 1 if args.quick else args.reps
    bandwidth = args.bandwidth * MB
    wanted = args.inputs.split(",")
    unknown = set(wanted) - {i["id"] for i in INPUTS}
    if unknown:
        ap.error(f"unknown input(s) {sorted(unknown)}")
    if not os.access(B.TIME, os.X_OK):
        sys.exit(f"bench-remote: {B.TIME} is needed")
    base = args.dir or B.default_dir()
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    need = 17e9 if "sdxl-sft" in wanted else 10e9     # the file, its downloaded copy, sdconv's mirror
    if free < need:
        sys.exit(f"bench-remote: {base} has {free / 1e9:.1f} GB free; it needs about {need / 1e9:.0f} GB (use --dir)")
    work = Path(tempfile.mkdtemp(prefix="sdconv-remote-bench-", dir=base))
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               XDG_CACHE_HOME=str(work / "cache"), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONWARNINGS="ignore")
    env.pop("SDCONV_MAPPINGS", None)
    httpx2 = subprocess.run([PY, "-c", "import httpx2; print(httpx2.__version__)"], capture_output=True, text=True).stdout.strip()
    results = {"meta": {**B.versions(), "httpx2": httpx2 or "not installed", "bandwidth": bandwidth, "reps": reps,
                        "downloader": "curl" if shutil.which("curl") else "python urllib",
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "work_dir": str(work),
                        "tmpdir": tempfile.gettempdir(),
                        "command": " ".join([Path(sys.executable).name] + sys.argv)},
               "inputs": []}
    if not httpx2:
        sys.exit("bench-remote: httpx2 is not installed (the remote extra: pip install -e '.[remote]')")
    log(f"work dir {work} ({free / 1e9:.0f} GB free); cap {args.bandwidth:.0f} MB/s; {reps} rep(s)")
    runner = B.Runner(work, env, log)
    try:
        subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "src" / "sdconv")], check=True)
        runner.timed([PY, "-c", "import torch, safetensors, httpx2, sdconv.cli"])      # warms the libraries
        for inp in [i for i in INPUTS if i["id"] in wanted]:
            inp = dict(inp)
            path = work / "serve" / inp["file"]
            path.parent.mkdir(exist_ok=True)
            log(f"== {inp['name']}: generating {path.name}")
            gen = runner.timed([PY, str(HERE / "bench.py"), "--_generate", inp["id"], str(path)], keep_stdout=True)
            if gen["rc"] != 0:
                raise RuntimeError(f"generating {path.name} failed:\n{gen.get('stderr')}")
            inp["gen"] = {"wall": gen["wall"], "bytes": path.stat().st_size,
                          **json.loads(gen["stdout"].strip().splitlines()[-1])}
            log(f"   {inp['gen']['bytes']:,} B in {gen['wall']:.1f} s")
            B.read_through(path)       # served from the page cache, as a server's hot file
            inp["runs"] = measure(inp, path, work, runner, bandwidth, reps, log)
            inp["summary"] = summarize(inp, inp["runs"], bandwidth)
            s = inp["summary"]
            log(f"   (a) {fmt(s['a_wall'])} s, {mb(s['a_bytes'])}; (b) {fmt(s['b_wall'])} s, {mb(s['b_bytes'])}; "
                f"ratio {fmt(s['wall_ratio'])} × wall, {fmt(s['bytes_ratio'])} × bytes")
            runner.disk_peak = max(runner.disk_peak, B.du(work))
            path.unlink()
            results["inputs"].append(inp)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["disk_peak"] = runner.disk_peak
    results["duration_s"] = time.perf_counter() - t_start
    results["summary"] = summary_lines(results)
    md = render(results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "remote_results.md").write_text(md)
    (args.results / "remote_results.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(md)
    print(f"wrote {args.results / 'remote_results.md'} and {args.results / 'remote_results.json'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        sys.exit(f"bench-remote: interrupted ({e or 'Ctrl-C'}); its files were removed")

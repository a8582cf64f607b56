"""STOW-RS ingest against C-STORE ingest: the same files into the same `osteoscreen listen`.

    python -m bench.stow [--quick] [--workdir DIR]

Files: synthetic pelvis AP radiographs (`synth.make_study("hip")`) up-sampled to ~17 MB of pixel data
each (`bench.latency.upsampled`: the anatomy keeps its size in mm), Explicit VR Little Endian; 20, or
4 with --quick. One `osteoscreen listen` (SQLite, settle time one day so nothing is screened) with
`dicomweb.enabled`, started once. Each round gives every file fresh Study/Series/SOP Instance UIDs
(a re-sent instance is a duplicate), then sends them, in an order rotated between rounds:
- C-STORE: DCMTK storescu, every file over one association (the reference);
- STOW-RS: curl (C, like storescu), one POST of one multipart/related body holding every file, read
  from a file built before the timing (`-T`: streamed, with Content-Length);
- STOW-RS: dicomweb-client's `store_instances` (Python; the body built in memory and sent chunked,
  as that client does), every file in one request.
Both paths end in the same acceptance code: each instance is fsynced into the spool and its rows
committed before the answer. MB/s = bytes of the DICOM files / sender wall time / 10^6 (process
start to exit for storescu and curl; the call for dicomweb-client), medians over rounds; the CPU time
of the listen process per MB, and its peak RSS while receiving over each path (memory stays bounded:
waitress keeps a body over 1 MiB in a temporary file, the receiver reads it 1 MiB at a time).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np

from .common import (OSTEOSCREEN, Proc, bar_chart, cli, free_port, load_average, median, osteoscreen_env,
                     progress_bar, renew_uids, require_tool, row)
from .ingest import _clear, _instances, _send
from .memory import PeakRSS, tree_cpu_seconds

TARGET_RATIO = 0.8  # STOW-RS ingest at least 0.8x C-STORE ingest
TARGET_PIXEL_BYTES = 17e6
TOKEN = "bench-stow-token-2b7e151628aed2a6"
BOUNDARY = "osteoscreen-bench-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PATHS = ("cstore", "stow_curl", "stow_dicomweb_client")
LABELS = {"cstore": "C-STORE (storescu, 1 association)", "stow_curl": "STOW-RS (curl, 1 request)",
          "stow_dicomweb_client": "STOW-RS (dicomweb-client, 1 chunked request)"}


def make_files(n: int, bar) -> list:
    from osteoscreen.synth import make_study
    from .latency import upsampled
    datasets = []
    for i in range(n):
        ds = make_study("hip", np.random.default_rng(700 + i), patient_index=700 + i, implants=())[0].dataset
        datasets.append(upsampled(ds, (TARGET_PIXEL_BYTES / len(ds.PixelData)) ** 0.5))
        bar.update()
    return datasets


def write_body(files: list[Path], path: Path) -> int:
    """One multipart/related body of every file, streamed to `path`; its size."""
    with open(path, "wb") as out:
        for f in files:
            out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    out.write(chunk)
            out.write(b"\r\n")
        out.write(f"--{BOUNDARY}--\r\n".encode())
    return path.stat().st_size


def send_curl(url: str, body: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([require_tool("curl"), "-sS", "-f", "-o", os.devnull, "-X", "POST", "-T", str(body),
                           "-H", f"Content-Type: {CONTENT_TYPE}", "-H", f"Authorization: Bearer {TOKEN}",
                           "-H", "Expect:", url], capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"curl failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def send_dicomweb_client(base: str, files: list[Path]) -> float:
    import requests
    from dicomweb_client import DICOMwebClient
    from pydicom import dcmread
    datasets = [dcmread(f) for f in files]  # read before the clock starts
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    client = DICOMwebClient(base, session=session)
    t0 = time.perf_counter()
    client.store_instances(datasets)
    return time.perf_counter() - t0


def run(quick: bool, workdir: Path, progress: bool = True) -> dict:
    require_tool("storescu")
    require_tool("curl")
    n_files, rounds = (4, 1) if quick else (20, 3)
    workdir = Path(workdir)
    files_dir, storage = workdir / "files", workdir / "node-var"
    files_dir.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(n_files + rounds * len(PATHS), "stow", progress)
    bar.set_postfix_str("synthesising")
    datasets = make_files(n_files, bar)
    raw: dict = {"files": n_files, "rounds": rounds, "load_before": load_average(), "cores": os.cpu_count(),
                 "mb_per_s": {p: [] for p in PATHS}, "send_seconds": {p: [] for p in PATHS},
                 "receiver_cpu_ms_per_mb": {p: [] for p in PATHS}, "peak_rss_mb": {}}
    node = None
    try:
        port, web_port = free_port(), free_port()
        env = osteoscreen_env(settle_seconds=86400, dicomweb__enabled="true", dicomweb__port=web_port,
                              dicomweb__token=TOKEN)
        node = Proc([*OSTEOSCREEN, "listen", "--port", str(port), "--storage", str(storage)], workdir / "listen.log",
                    env=env, port=port)
        base = f"http://127.0.0.1:{web_port}/dicom-web"
        from .common import port_open, wait_for
        if not wait_for(lambda: port_open(web_port), 30):
            raise RuntimeError(f"the STOW-RS port did not open:\n{node.tail()}")
        db, spool = storage / "osteoscreen.db", storage / "spool"
        for r in range(rounds):
            order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
            for path in order:
                bar.set_postfix_str(f"round {r + 1}/{rounds}: {path}")
                files = []
                for i, ds in enumerate(datasets):
                    renew_uids(ds, f"S{r}{path[:2]}{i:03d}")
                    files.append(files_dir / f"{i:03d}.dcm")
                    ds.save_as(files[-1], enforce_file_format=True)
                total = sum(f.stat().st_size for f in files)
                body = files_dir / "body.bin"
                if path == "stow_curl":
                    write_body(files, body)
                before, cpu0 = _instances(db), tree_cpu_seconds(node.pid)
                os.sync()
                with PeakRSS([node.pid]) as peak:
                    if path == "cstore":
                        elapsed = _send(port, files, 1, "OSTEOSCREEN")
                    elif path == "stow_curl":
                        elapsed = send_curl(base + "/studies", body)
                    else:
                        elapsed = send_dicomweb_client(base, files)
                got = _instances(db) - before
                if got != len(files):
                    raise RuntimeError(f"{path}: the node recorded {got} of {len(files)} instances\n{node.tail()}")
                mb = total / 1e6
                raw["mb_per_s"][path].append(mb / elapsed)
                raw["send_seconds"][path].append(round(elapsed, 4))
                raw["receiver_cpu_ms_per_mb"][path].append(round((tree_cpu_seconds(node.pid) - cpu0) * 1000 / mb, 3))
                raw["peak_rss_mb"][path] = max(raw["peak_rss_mb"].get(path, 0.0), peak.peak_mb)
                raw["bytes_per_round"] = total
                body.unlink(missing_ok=True)
                _clear(spool)
                bar.update()
        raw["load_after"] = load_average()
    finally:
        bar.close()
        if node is not None:
            node.stop()
        for f in files_dir.glob("*"):
            f.unlink()

    mbps = {p: median(v) for p, v in raw["mb_per_s"].items()}
    cpu = {p: median(v) for p, v in raw["receiver_cpu_ms_per_mb"].items()}
    raw["median_mb_per_s"], raw["median_cpu_ms_per_mb"] = mbps, cpu
    size_mb = raw["bytes_per_round"] / 1e6
    common = (f"{n_files} pelvis AP files of ~17 MB ({size_mb:.0f} MB a round), median of {rounds} round(s), "
              "fresh UIDs each round, order rotated; each instance fsynced and recorded before the answer on both paths")
    rows = []
    for path in PATHS[1:]:
        rows.append(row(f"ingest MB/s, {LABELS[path]}", mbps[path], "MB/s", reference=LABELS["cstore"],
                        reference_value=mbps["cstore"], target=f"≥ {TARGET_RATIO}× C-STORE",
                        met=mbps[path] / mbps["cstore"] >= TARGET_RATIO, note=common if path == "stow_curl" else
                        "dicomweb-client builds the whole body in memory and sends it in 1 MB chunks "
                        "(Transfer-Encoding: chunked)"))
    for path in PATHS[1:]:
        rows.append(row(f"listener CPU per MB, {LABELS[path]}", cpu[path], "ms/MB", reference=LABELS["cstore"],
                        reference_value=cpu["cstore"], note="CPU time (user + system) of the `osteoscreen listen` "
                        "process per MB received" if path == "stow_curl" else None))
    rows.append(row("listener peak RSS while receiving, STOW-RS (curl)", raw["peak_rss_mb"]["stow_curl"], "MB",
                    reference="while receiving over C-STORE", reference_value=raw["peak_rss_mb"]["cstore"],
                    note=f"sampled every 50 ms; the request body is {size_mb:.0f} MB: waitress spills it to a "
                         "temporary file past 1 MiB and the receiver reads it 1 MiB at a time"))
    plot = bar_chart(workdir / "stow.png", f"Ingest over STOW-RS and C-STORE, {n_files} × ~17 MB pelvis files",
                     "MB/s (median)", ["osteoscreen listen"], {LABELS[p]: [mbps[p]] for p in PATHS})
    summary = (f"The same {n_files} synthetic pelvis radiographs (~17 MB each) into one `osteoscreen listen` "
               "with the STOW-RS receiver enabled, over C-STORE (DCMTK storescu, one association) and over "
               "STOW-RS (curl with one multipart/related request; dicomweb-client's store_instances). Both "
               "paths run the same acceptance code: fsync of file and folder and the database rows before "
               "the answer.")
    return {"name": "stow", "rows": rows, "plots": [str(plot)], "raw": raw, "summary": summary}


if __name__ == "__main__":
    raise SystemExit(cli(run, "stow"))

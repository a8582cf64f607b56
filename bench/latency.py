"""End-to-end latency inside a real PACS: Orthanc routes a study to `osteoscreen serve`, the SR comes back.

    python -m bench.latency [--quick] [--workdir DIR] [--studies N] [--no-progress]

A private Orthanc (bench/orthanc.py, the start-up tests/test_orthanc.py uses too: free ports, its
own storage, the Lua script docker/orthanc/route.lua that the demo PACS runs: every stored CR/DX
instance is sent to the node) and a real `osteoscreen serve` process (settle timer
OSTEOSCREEN_SETTLE_SECONDS=1, destination ORTHANC@127.0.0.1:<Orthanc's DICOM port>, dashboard on a
free port, everything else the node's defaults: in `serve` a settled study wakes the
worker and a finished one the dispatcher at once (their polls, 0.5 s each, are only the fallback),
1 torch thread). One unmeasured warm-up study first (model load, localiser atlases, first
associations). Then, per case, N studies sent one at a time with DCMTK `storescu` to ORTHANC, each a
new study with new UIDs, the next one only after every result object of the previous one is
delivered and a short pause, so they never overlap.

Latency, as issue 7 defines it: from the node's receipt of the study's last C-STORE
(max(instances.received_at) in the node's database: naive UTC, written by this machine's clock) to
the moment the SR is stored in Orthanc (Orthanc's REST API `/studies/{id}/series?expand` polled every
20 ms for a series of modality SR; the time of the first response that shows it, so the figure is an
upper bound by at most one poll cycle, whose measured length is recorded), minus the settle timer.
Both timestamps come from this machine's clock (time.time() and the node's utcnow()).

Also measured per study, from the node's database: the settle scheduler's tick delay (job created −
last receipt − settle), the worker's queue wait (claim = lease_expires_at − lease_seconds, minus job
created), the screening itself (claim → job finished, incl. writing the outbox), the dispatch wait +
send (job finished → SR delivery's delivered_at, set after the association is released), and
Orthanc's forwarding (storescu done → the node has the last image); and the PACS's own view
(storescu done → SR in Orthanc − settle).

Cases: a ~17 MB pelvis DX, uncompressed: `synth.make_study("hip")` (about 1800 × 2300, 12 bit,
≈ 8–10 MB depending on the phantom's scanner profile) up-sampled (bilinear) by the factor that
makes its pixel data 17 MB, about 1.3–1.45× per axis (PixelSpacing and ImagerPixelSpacing divided
by it, so the anatomy keeps its size in mm): the synthesiser has no detector-pitch option; the same as JPEG 2000 lossless (pydicom `compress` through
pylibjpeg-openjpeg); and a lumbar AP + lateral study (two images, native size). A few distinct
phantoms per case (3; quick: 1) are re-used with fresh Study/Series/SOP Instance UIDs, so every study
is new to Orthanc and to the node while J2K encoding stays out of the run time.

Reference, side by side in the same run: what it costs Orthanc to receive and store the same study
from storescu (the wall time of that storescu call: process start, association, transfer, Orthanc's
storage and index, release). The ratio latency / store says how many "PACS stores of this study" the
screening round trip costs after the settle timer. Not a test: nothing asserts a time.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_ports, load_average as _load, tail_of, wait_for as _wait  # noqa: E402
from bench.inference import _Bar, _ratio, format_rows, row  # noqa: E402
from bench.orthanc import Node, Orthanc  # noqa: E402

SETTLE_SECONDS = 1.0
POLL_SECONDS = 0.02
TARGET_PIXEL_BYTES = 17e6  # the pelvis is up-sampled until its pixel data is about this size (≈ 1.4× per axis)
STUDY_TIMEOUT = 120.0
PAUSE_SECONDS = 0.5
TARGET = "p50 ≤ 1 s for a pelvis study on this 2-core CPU machine"
CASES = {"pelvis_17MB": "pelvis AP ~17 MB uncompressed", "pelvis_17MB_j2k": "same pelvis, JPEG 2000 lossless",
         "lumbar_ap_lat": "lumbar AP + lateral (2 images)"}


# -- studies -----------------------------------------------------------------------------------------
def upsampled(ds, factor: float):
    """The dataset with its pixels up-sampled `factor`× per axis (bilinear) and the spacing divided
    accordingly: the same anatomy on a finer, larger matrix (a bigger file)."""
    import torch
    out = copy.deepcopy(ds)
    pixels = ds.pixel_array.astype(np.float32)
    t = torch.from_numpy(pixels)[None, None]
    size = (round(pixels.shape[0] * factor), round(pixels.shape[1] * factor))
    big = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    big = np.clip(np.rint(big), 0, 2 ** int(ds.BitsStored) - 1).astype("<u2")
    out.Rows, out.Columns = big.shape
    out.PixelData = big.tobytes()
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        if kw in ds:
            v = [float(x) / factor for x in ds.get(kw)]
            setattr(out, kw, [f"{x:.5f}" for x in v])
    return out


def base_files(case: str, count: int, folder: Path) -> list[list[Path]]:
    """`count` distinct phantom studies of the case, written once; each a list of files."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
    from osteoscreen.synth import make_study
    from osteoscreen.synth.dicom_writer import write_dataset
    folder.mkdir(parents=True, exist_ok=True)
    studies = []
    for i in range(count):
        seed = {"pelvis_17MB": 300, "pelvis_17MB_j2k": 300, "lumbar_ap_lat": 400}[case] + i
        kind = "lumbar" if case == "lumbar_ap_lat" else "hip"
        images = make_study(kind, np.random.default_rng(seed), patient_index=seed, implants=(), foreign_body_rate=0.0)
        files = []
        for j, im in enumerate(images):
            ds = im.dataset if kind == "lumbar" else upsampled(
                im.dataset, (TARGET_PIXEL_BYTES / len(im.dataset.PixelData)) ** 0.5)
            path = folder / f"{case}_{i}_{j}.dcm"
            write_dataset(ds, path, JPEG2000Lossless if case.endswith("j2k") else ExplicitVRLittleEndian)
            files.append(path)
        studies.append(files)
    return studies


def fresh_copy(files: list[Path], folder: Path, tag: str) -> tuple[str, list[Path]]:
    """The study's files with new Study/Series/SOP Instance UIDs (pixel data untouched, so a J2K file
    stays encoded as it is)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    series: dict[str, str] = {}
    out = []
    for j, f in enumerate(files):
        ds = dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = f"B{abs(hash(study_uid)) % 10 ** 12}"
        path = folder / f"{tag}_{j}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return study_uid, out


def _utc(value) -> float | None:
    if value is None:
        return None
    return datetime.fromisoformat(str(value)).replace(tzinfo=timezone.utc).timestamp()


def measure_study(orthanc: Orthanc, node: Node, files: list[Path], study_uid: str, lease_seconds: float,
                  j2k: bool = False) -> dict:
    t_scu0 = orthanc.store(files, j2k)
    t_scu1 = time.time()
    sid = orthanc.study_id(study_uid)
    deadline = time.monotonic() + STUDY_TIMEOUT
    polls, cycle = 0, []
    t_sr = None
    while time.monotonic() < deadline:
        t_req = time.time()
        try:
            sid = sid or orthanc.study_id(study_uid)
            seen = bool(sid) and orthanc.has_sr(sid)
        except OSError:
            seen = False
        t_resp = time.time()
        polls += 1
        cycle.append(t_resp - t_req)
        if seen:
            t_sr = t_resp
            break
        time.sleep(POLL_SECONDS)
    rec: dict = {"study_uid": study_uid, "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                 "storescu_s": t_scu1 - t_scu0, "polls": polls,
                 "poll_request_ms_median": 1000 * statistics.median(cycle) if cycle else None}
    if t_sr is None:
        rec["error"] = f"no SR in Orthanc within {STUDY_TIMEOUT:.0f} s"
        return rec
    # wait until the node has delivered everything for the study (no overlap with the next one)
    def all_delivered():
        rows = node.query("SELECT d.state FROM deliveries d JOIN studies s ON s.id = d.study_id "
                          "WHERE s.study_uid = ?", study_uid)
        return rows and all(r[0] in ("delivered", "dead") for r in rows)
    _wait(all_delivered, 60, 0.05)
    (sid_node, ) = node.query("SELECT id FROM studies WHERE study_uid = ?", study_uid)[0]
    first_recv, last_recv = node.query("SELECT min(received_at), max(received_at) FROM instances WHERE study_id = ?",
                                       sid_node)[0]
    job = node.query("SELECT created_at, lease_expires_at, finished_at FROM jobs WHERE study_id = ? ORDER BY id "
                     "LIMIT 1", sid_node)
    deliveries = node.query("SELECT kind, delivered_at, created_at FROM deliveries WHERE study_id = ?", sid_node)
    t_last = _utc(last_recv)
    rec.update(latency_s=t_sr - t_last - SETTLE_SECONDS, pacs_view_s=t_sr - t_scu1 - SETTLE_SECONDS,
               orthanc_forward_s=t_last - t_scu1, first_to_last_received_s=t_last - _utc(first_recv),
               objects=sorted(k for k, *_ in deliveries))
    if job:
        created, lease, finished = (_utc(v) for v in job[0])
        sr = [_utc(d) for k, d, _ in deliveries if k == "sr" and d]
        rec["breakdown_s"] = {
            "settle_tick_wait": created - t_last - SETTLE_SECONDS,
            "worker_queue_wait": (lease - lease_seconds) - created if lease and finished else None,
            "screening": finished - (lease - lease_seconds) if lease and finished else None,
            "dispatch_wait_and_send": (sr[0] - finished) if sr and finished else None,
            "sr_seen_after_delivered": (t_sr - sr[0]) if sr else None}
    return rec


# -- statistics and plot -----------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.percentile(v, q)) if v else None


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in results if any("latency_s" in r for r in results[n]["studies"])]
    data = [[1000 * r["latency_s"] for r in results[n]["studies"] if "latency_s" in r] for n in names]
    refs = [[1000 * r["storescu_s"] for r in results[n]["studies"] if "storescu_s" in r] for n in names]
    fig, ax = plt.subplots(figsize=(8, 5))
    if data:
        pos = np.arange(len(names))
        ax.boxplot(data, positions=pos - 0.18, widths=0.3, showfliers=False)
        ax.boxplot(refs, positions=pos + 0.18, widths=0.3, showfliers=False,
                   boxprops={"color": "0.5"}, medianprops={"color": "0.5"})
        rng = np.random.default_rng(0)
        for i, (d, r) in enumerate(zip(data, refs)):
            ax.scatter(i - 0.18 + rng.uniform(-0.08, 0.08, len(d)), d, s=14, color="tab:blue", zorder=3,
                       label="osteoscreen latency (last C-STORE → SR in Orthanc − settle)" if i == 0 else None)
            ax.scatter(i + 0.18 + rng.uniform(-0.08, 0.08, len(r)), r, s=14, color="0.5", marker="s", zorder=3,
                       label="reference: storescu → Orthanc store, same study" if i == 0 else None)
        ax.set_xticks(pos, [CASES.get(n, n) for n in names], fontsize=8)
    ax.axhline(1000, color="red", ls=":", lw=1, label="target p50 ≤ 1 s (pelvis)")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_title("End-to-end latency inside Orthanc (settle timer subtracted)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the module's interface --------------------------------------------------------------------------
def run(quick: bool, workdir: Path, progress: bool = True, studies: int | None = None,
        extra_env: dict | None = None) -> dict:
    from osteoscreen.config import Settings
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n = studies or (1 if quick else 10)
    pool = 1 if quick else min(3, n)
    lease_seconds = Settings().lease_seconds
    s = Settings()
    raw: dict = {"quick": quick, "studies_per_case": n, "distinct_phantoms_per_case": pool,
                 "settle_seconds": SETTLE_SECONDS, "poll_seconds": POLL_SECONDS, "pelvis_pixel_bytes_target": TARGET_PIXEL_BYTES,
                 "node_defaults": {"poll_seconds": s.poll_seconds, "dispatch_tick_s": 1.0,
                                   "settle_tick_s": min(1.0, max(0.2, SETTLE_SECONDS / 4)),
                                   "model_threads": s.model_threads, "worker_batch_studies": s.worker_batch_studies},
                 "extra_env": extra_env or {}, "load_1min_start": _load(), "cases": {}}
    bar = _Bar(len(CASES) * n + 2, "latency", progress)
    tmp = tempfile.TemporaryDirectory(prefix="bench_latency_", dir=workdir)
    work = Path(tmp.name)
    orthanc = node = None
    try:
        bases = {}
        for case in CASES:
            t0 = time.perf_counter()
            bases[case] = base_files(case, pool, work / "base")
            raw["cases"][case] = {"description": CASES[case], "prepare_s": time.perf_counter() - t0,
                                  "file_sizes_mb": [round(f.stat().st_size / 1e6, 2) for f in bases[case][0]]}
        bar.step("studies written")
        node_port, dicom_port, http_port = free_ports(3)
        orthanc = Orthanc(work / "orthanc", node_port, dicom_port=dicom_port, http_port=http_port,
                          config={"Name": "osteoscreen-bench-pacs"})
        node = Node(work / "node" / "var", node_port, dicom_port, settle_seconds=SETTLE_SECONDS, env=extra_env)
        raw["orthanc_version"] = orthanc.get("/system").get("Version")
        # warm-up: model, localiser atlases, associations; not measured
        uid, files = fresh_copy(bases["lumbar_ap_lat"][0], work / "send", "warmup")
        warm = measure_study(orthanc, node, files, uid, lease_seconds)
        raw["warm_up"] = warm
        bar.step("warm-up")
        for case in CASES:
            recs = []
            for i in range(n):
                uid, files = fresh_copy(bases[case][i % pool], work / "send", f"{case}_{i}")
                time.sleep(PAUSE_SECONDS)
                rec = measure_study(orthanc, node, files, uid, lease_seconds, j2k=case.endswith("j2k"))
                rec["load_1min"] = _load()
                recs.append(rec)
                for f in files:
                    f.unlink()
                bar.step(f"{case} {i + 1}/{n}: " + (f"{1000 * rec['latency_s']:.0f} ms" if "latency_s" in rec
                                                    else rec.get("error", "?")))
            raw["cases"][case]["studies"] = recs
    except Exception:
        raw["node_log_tail"] = tail_of(node.log) if node else None
        raw["orthanc_log_tail"] = tail_of(orthanc.log) if orthanc else None
        raise
    finally:
        bar.close()
        if node is not None:
            node.stop()
        if orthanc is not None:
            orthanc.stop()
        tmp.cleanup()
    raw["load_1min_end"] = _load()

    rows = []
    for case, res in raw["cases"].items():
        ok = [r for r in res["studies"] if "latency_s" in r]
        lat = [1000 * r["latency_s"] for r in ok]
        ref = [1000 * r["storescu_s"] for r in res["studies"]]
        p50, p95, ref50 = pct(lat, 50), pct(lat, 95), pct(ref, 50)
        pelvis = case.startswith("pelvis")
        failed = len(res["studies"]) - len(ok)
        size = f"{sum(res['file_sizes_mb']):.1f} MB in {len(res['file_sizes_mb'])} file(s)"
        note = f"{len(ok)} studies, {size}" + (f"; {failed} without SR" if failed else "")
        res["summary_ms"] = {"p50": p50, "p95": p95, "storescu_p50": ref50}
        rows.append(row(f"{case}: latency p50", p50, "ms", reference="storescu → Orthanc store of the same study (p50)",
                        reference_value=ref50, ratio=_ratio(p50, ref50), target=TARGET if pelvis else None,
                        met=(p50 <= 1000 if p50 is not None else None) if pelvis else None, note=note))
        p95ref = pct(ref, 95)
        rows.append(row(f"{case}: latency p95", p95, "ms", reference="storescu → Orthanc store (p95)",
                        reference_value=p95ref, ratio=_ratio(p95, p95ref), note=note))
        rows.append(row(f"{case}: PACS view p50 (storescu done → SR in Orthanc − settle)",
                        pct([1000 * r["pacs_view_s"] for r in ok], 50), "ms"))
        rows.append(row(f"{case}: Orthanc forwarding p50 (storescu done → node has last image)",
                        pct([1000 * r["orthanc_forward_s"] for r in ok], 50), "ms",
                        note="Orthanc's Lua SendToModality, a new association per instance"))
        for part, label in (("settle_tick_wait", "settle tick delay"), ("worker_queue_wait", "worker poll wait"),
                            ("screening", "screening (claim → job done)"),
                            ("dispatch_wait_and_send", "dispatch wait + send"),
                            ("sr_seen_after_delivered", "SR seen in Orthanc − node delivered_at")):
            vals = [1000 * r["breakdown_s"][part] for r in ok if r.get("breakdown_s", {}).get(part) is not None]
            rows.append(row(f"{case}: p50 {label}", pct(vals, 50), "ms"))
    plots = []
    p = workdir / "latency_distribution.png"
    plot(raw["cases"], p)
    plots.append(str(p))
    return {"name": "latency", "rows": rows, "plots": plots, "raw": raw}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workdir", default=str(ROOT / "var" / "bench"))
    p.add_argument("--studies", type=int, help="studies per case (default 10, quick 1)")
    p.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the node, e.g. OSTEOSCREEN_POLL_SECONDS=0.05 (what-if runs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.node_env)
    result = run(args.quick, Path(args.workdir), progress=not args.no_progress, studies=args.studies, extra_env=env)
    print(format_rows(result["rows"]))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

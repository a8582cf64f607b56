"""Run every benchmark, print one table, and write docs/BENCHMARKS.md with its plots.

    python -m bench [--quick] [--only ingest,stow,latency,throughput,inference,memory] [--workdir var/bench]
                    [--doc docs/BENCHMARKS.md] [--no-doc]

Each module (bench/<name>.py) measures osteoscreen beside a reference in the same run and returns
rows (measure, value, unit, reference, ratio, target, met) and PNG plots; this runner only runs them
one after another (never two at once: they would compete for the same cores), records the machine
and its load, and writes the document. Not a test: nothing here fails on a time.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("ingest", "stow", "latency", "throughput", "inference", "memory")
TITLES = {"ingest": "Ingest: DICOM C-STORE into the node vs DCMTK storescp",
          "stow": "Ingest: STOW-RS (DICOMweb) into the node vs C-STORE",
          "latency": "End-to-end latency inside a PACS (Orthanc)",
          "throughput": "Sustained screening throughput",
          "inference": "Model inference and the stages of one study",
          "memory": "Memory of a node that screens"}


# Bottlenecks the benchmarks found, what was done, and the figures before and after (from earlier runs of
# `python -m bench` and of the parts alone; kept here so that the document carries its history). Each
# item says on which machine: the first ones were measured on a faster 2-core Intel Xeon machine, the
# later ones on the 2-core AMD EPYC machine of the run above, where everything takes about twice as long.
HISTORY = (
    "*Intel Xeon, 2 cores:* **End-to-end latency, pelvis 17 MB: p50 1,878 ms → under 0.8 s.** About 1.1 s was waiting for "
    "fixed polls (dispatcher every 1 s, worker every 0.5 s). In `serve` a settled study now wakes the worker "
    "and a finished study wakes the dispatcher (`dispatch_poll_seconds` remains for separate processes).",
    "*Intel Xeon, 2 cores:* **JPEG 2000 pelvis: p50 3,064 ms → under 0.8 s.** Decoding the full 17 MB codestream took 1.2 s; the "
    "pipeline needs 0.5 mm, so the image is decoded only down to the wavelet level it needs (Pillow's "
    "OpenJPEG `reduce`), with the same findings (`tests/test_dicom_io.py`).",
    "*Intel Xeon, 2 cores:* **Preprocessing (Modality LUT, VOI LUT, normalisation): 133 ms → 36 ms on a pelvis.** The chain runs once "
    "per possible stored value and the image is a table lookup; the output is identical.",
    "*Intel Xeon, 2 cores:* **Listener memory: 340 MB → about 110 MB.** The `listen` and `dispatch` roles imported the worker and "
    "with it torch; the worker is now imported only where it runs.",
    "*Intel Xeon, 2 cores:* **Ingest with 4 concurrent senders: 0.36-0.52× → 0.71× (2 processes) and 0.83× (4 processes) of "
    "storescp --fork; the 0.9× target is still missed.** The node equals a bare pynetdicom receiver there (one Python process receives on one "
    "core at a time); `listen_processes: N` puts N receiving processes on the port (SO_REUSEPORT), as "
    "storescp --fork runs a process per association.",
    "*AMD EPYC, 2 cores:* **JPEG 2000 pelvis: p50 1,191 ms → 885 ms; uncompressed pelvis 900 ms → 771 ms.** "
    "Decoding the JPEG 2000 pelvis one resolution level down took 480 ms on one thread; OpenJPEG now decodes "
    "on `decode_threads` threads (its OPJ_NUM_THREADS; default the process's cores, at most 4): 277 ms on "
    "2 cores, the same pixels. The metal check took 83 ms a pelvis: its disc erosion, dilations and largest-label dilation are "
    "now computed from Euclidean distance transforms, exactly what scipy's morphology gave "
    "(`tests/test_quality.py`), in 26 ms.",
    "*AMD EPYC, 2 cores:* **Settle tick delay: p50 57-70 ms → 10 ms.** A study waited for the settle timer's "
    "next regular tick (settle_seconds / 10 apart: 0.1 s here, 1 s with the default settle_seconds of 10, "
    "about 0.5 s on average there). A tick now waits, within its own run, for a study that falls due "
    "before the next tick, and queues it then.",
    "*AMD EPYC, 2 cores:* **Ingest, one association: 0.69-0.77× → 0.80-0.88× of storescp (three full runs); "
    "the 0.9× target is missed on this machine (the Intel machine gave 1.8×).** Each 10 MB image waited about 21 ms for its "
    "fsync (55 ms with 4 senders). The receive file now starts its writeback every MiB as it arrives "
    "(sync_file_range), and the spool renames a file into its folder before the fsync, so that the "
    "folder's fsync finds the rename already committed: 15 ms and 0.4 ms. What is left is the disk's "
    "cache flush, which storescp never waits for. `max_pdu` 65536 → 131072 (DCMTK's largest; DCMTK senders "
    "then send half as many PDUs): 6.0-6.2 → 4.8-5.3 ms of receiver CPU per MB.",
    "*AMD EPYC, 2 cores:* **Ingest, 4 concurrent senders: 0.45× of storescp --fork, CPU-bound.** The CPU "
    "rows above say why: the node spends 6.3 ms of CPU per MB received and storescp 1.2, so with the "
    "senders on the same 2 cores the CPU alone allows the node 255 MB/s, about 60 % of what storescp "
    "reached. The node's own work (header, fsync, database) is about a fifth to a quarter of its CPU "
    "(5.0-5.2 ms per MB in one association against 3.7-4.1 for bare pynetdicom); the rest is pynetdicom's per-PDU Python path. Reading each PDU with one recv_into instead of pynetdicom's 4 KiB reads was "
    "tried (5 % less CPU at 64 KiB PDUs, nothing measurable at 128 KiB) and not kept; a SQLAlchemy Core "
    "version of the instance's rows was no faster than the ORM. 0.9× here would take a receive path "
    "outside pynetdicom.",
)


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / (1 << 20), 1)
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - torch is optional for the record
        info["cuda"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def fmt(value, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def verdict(met) -> str:
    return "–" if met is None else ("met" if met else "**missed**")


def table(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        ratio = r.get("ratio")
        out.append([r["measure"], fmt(r.get("value"), r.get("unit", "")),
                    (f"{r['reference']}: {fmt(r.get('reference_value'), r.get('unit', ''))}"
                     if r.get("reference") else "–"),
                    "–" if ratio is None else f"{ratio:.2f}×", r.get("target") or "–", verdict(r.get("met"))])
    return out


HEADERS = ["measure", "osteoscreen", "reference (same run)", "ratio", "target", ""]


def print_table(results: list[dict]) -> None:
    rows = [[f"[{res['name']}] {c[0]}", *c[1:]] for res in results for c in table(res["rows"])]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADERS)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.replace("**", "").ljust(w) for c, w in zip(r, widths)))


def write_doc(path: Path, results: list[dict], info: dict, started: datetime, quick: bool,
              loads: dict[str, float | None]) -> None:
    assets = path.parent / "benchmarks"
    assets.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmarks", "",
             "Written by `python -m bench` (`make bench`); every part's figures come from one run of it, with "
             "its reference measured in the same run on the same machine (a part measured again alone with "
             "`--only` says its own date and commit). Nothing here is a test: the suite never asserts a time.", "",
             f"- run: {started:%Y-%m-%d %H:%M} UTC{' (--quick: smoke sizes, not representative)' if quick else ''}, "
             f"commit {info.get('commit') or '?'}",
             f"- machine: {info.get('cpu', '?')}, {info.get('cpus')} cores, {info.get('memory_gib', '?')} GiB, "
             f"{'GPU ' + info['cuda'] if info.get('cuda') else 'no GPU'}; Python {info['python']}, "
             f"torch {info.get('torch', '?')}",
             "- load average (1 min) before each part: "
             + ", ".join(f"{k} {v}" for k, v in loads.items()), "",
             "## Targets", "", "| target | measured | |", "|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            if r.get("target"):
                lines.append(f"| {r['target']} ({res['name']}: {r['measure']}) | "
                             f"{fmt(r.get('value'), r.get('unit', ''))} | {verdict(r.get('met'))} |")
    for res in results:
        lines += ["", f"## {TITLES.get(res['name'], res['name'])}", ""]
        if res.get("error"):
            lines += [f"Failed in this run: `{res['error']}`", ""]
        if res.get("measured"):
            lines += [f"Measured {res['measured']}, commit {res.get('commit') or '?'}.", ""]
        if res.get("summary"):
            lines += [res["summary"], ""]
        lines += ["| " + " | ".join(HEADERS[:-1]) + " | |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(c) + " |" for c in table(res["rows"])]
        notes = [f"- {r['measure']}: {r['note']}" for r in res["rows"] if r.get("note")]
        if notes:
            lines += ["", *notes]
        for plot in res.get("plots", []):
            plot = Path(plot)
            target = assets / f"{res['name']}-{plot.name}"
            if plot.is_file():
                shutil.copyfile(plot, target)
            if target.is_file():  # (a part kept from an earlier run: its plot is already there)
                lines += ["", f"![{plot.stem}](benchmarks/{target.name})"]
    lines += ["", "## What these benchmarks changed", "",
              "Earlier runs (2026-11-29), before and after each fix, on the machine each item names; the figures "
              "above are the after.", ""]
    lines += [f"- {item}" for item in HISTORY]
    path.write_text("\n".join(lines) + "\n")
    (assets / "results.json").write_text(json.dumps({"machine": info, "started": started.isoformat(),
                                                     "quick": quick, "load": loads, "results": results},
                                                    indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes: checks that every part runs (minutes)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(MODULES)}")
    p.add_argument("--workdir", default=str(ROOT / "var" / "bench"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--no-doc", action="store_true", help="print the table only")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--from-json", metavar="RESULTS", help="write the document again from a results.json "
                   "(e.g. docs/benchmarks/results.json) without measuring")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = saved["results"]
        print_table(results)
        write_doc(Path(args.doc), results, saved["machine"], datetime.fromisoformat(saved["started"]),
                  saved["quick"], saved["load"])
        print(f"\nwrote {args.doc}")
        return 0
    names = tuple(args.only.split(",")) if args.only else MODULES
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    workdir = Path(args.workdir)
    started = datetime.now(timezone.utc)
    info = machine()
    results, loads = [], {}
    for name in names:
        loads[name] = load_average()
        part = workdir / name
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        print(f"== {name} (load {loads[name]})", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f"bench.{name}")
            res = module.run(quick=args.quick, workdir=part, progress=not args.quiet)
        except Exception as exc:  # one part failing must not lose the others' figures
            traceback.print_exc()
            res = {"name": name, "rows": [], "plots": [], "raw": {}, "error": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = round(time.monotonic() - t0, 1)
        res["measured"], res["commit"] = f"{started:%Y-%m-%d %H:%M} UTC", info.get("commit")
        results.append(res)
    saved_path = Path(args.doc).parent / "benchmarks" / "results.json"
    if args.only and not args.no_doc and not args.quick and saved_path.is_file():
        # the parts not run keep their figures (and dates) from the document's last results
        saved = json.loads(saved_path.read_text())
        ran = {r["name"] for r in results}
        kept = {r["name"]: {**r, "measured": r.get("measured") or f"{saved['started'][:16].replace('T', ' ')} UTC",
                            "commit": r.get("commit") or saved["machine"].get("commit")}
                for r in saved["results"] if r["name"] not in ran}
        loads = {**{k: v for k, v in saved.get("load", {}).items() if k in kept}, **loads}
        results = [next(r for r in results if r["name"] == n) if n in ran else kept[n]
                   for n in MODULES if n in ran or n in kept]
    print()
    print_table(results)
    if not args.no_doc:
        write_doc(Path(args.doc), results, info, started, args.quick, loads)
        print(f"\nwrote {args.doc}")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

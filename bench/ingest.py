"""Ingest: the same DICOM files sent with DCMTK storescu to DCMTK storescp, to a bare pynetdicom SCP and to
the node's listener.

    python -m bench.ingest [--quick] [--workdir DIR]

Files: full-size synthetic pelvis AP radiographs (`synth.make_study("hip")`, 8-10 MB each, Explicit VR
Little Endian; 20, or 4 with --quick). Targets, all real processes on this machine, started once and
kept running across rounds:
- reference: `storescp -pdu 131072 +B -od DIR` (DCMTK 3.6; the node's PDU size, data written as received:
  its fastest mode here; a second one with `--fork` for the concurrent case, since a plain storescp
  serves one association at a time). storescp writes each file and never calls fsync
  (checked with strace: no fsync/fdatasync/syncfs), so its files may still be in the page cache when it
  answers Success;
- second reference: a bare pynetdicom storage SCP (`BARE_SCP` below): the library the node is built on,
  streaming each data set to a file and moving it into a folder, nothing else (no fsync, no database);
- osteoscreen: `osteoscreen listen --storage DIR` (SQLite default, settle time one day so no screening
  starts): each image is streamed to spool/tmp, its header checked, renamed into the spool, the file
  and its folder fsynced, and its rows (study, instance, audit event) committed with SQLite
  synchronous=FULL before Success; a second node with listen_processes=4;
- the disk's own ceiling for durable files: the same files written and fsynced (file and folder) by
  this process, no network, 1 or 4 threads: no receiver that makes each file durable before it
  answers can be faster than this on this disk.

CPU: the CPU time (user + system) of each receiver's processes (storescp --fork's children included)
and of the storescu senders, per MB received: on a 2-core machine shared by 4 senders and 4 receiving
processes, that, not the disk, is what bounds the concurrent case.

Each round writes the files again with fresh Study/Series/SOP Instance UIDs (a re-sent SOP instance
is a duplicate to the node), calls sync() before each send, and sends them to every target in an order
rotated between rounds: once over one association (one storescu, all files), once from 4 concurrent
storescu processes (files split in 4). Received files are deleted after each measurement, outside the
timing. MB/s = bytes of the files sent / storescu wall time (process start to exit) / 10^6; medians
over rounds.
"""
from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .common import (OSTEOSCREEN, Proc, bar_chart, cli, free_port, load_average, median, osteoscreen_env,
                     progress_bar, renew_uids, require_tool, row, storescu_args)
from .memory import PeakRSS, hwm_mb, tree_cpu_seconds

TARGET_RATIO = 0.9
# storescp at its fastest here: the node's receive PDU size (max_pdu 131072, DCMTK's largest; storescp's
# default is 16384) and +B, writing the data set as it was received (no re-encoding), the closest to the
# node's streaming. On this machine that was about 10-20 % faster than plain `storescp -od DIR`.
STORESCP_OPTS = ["-pdu", "131072", "+B"]

# A second reference: the bare DICOM library the node is built on, pynetdicom, as a storage SCP that
# streams each data set to a file (as the node does) and moves it into a folder: no fsync, no header
# checks, no database. node / this = what the node's own work per image costs; this / storescp = what
# the Python library costs against DCMTK's C++.
BARE_SCP = r"""
import os, shutil, sys, tempfile, uuid
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pydicom.uid import AllTransferSyntaxes
port, out = int(sys.argv[1]), sys.argv[2]
os.makedirs(os.path.join(out, "tmp"), exist_ok=True)
tempfile.tempdir = os.path.join(out, "tmp")  # the receive file on the same disk: adopting it is a rename
_config.STORE_RECV_CHUNKED_DATASET = True
ae = AE(ae_title="BARE")
ae.maximum_pdu_size = 131072  # as the node's max_pdu default
ae.require_called_aet = False
ae.add_supported_context(Verification)
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
def on_store(event):
    shutil.move(event.dataset_path, os.path.join(out, uuid.uuid4().hex + ".dcm"))
    return 0x0000
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def _send(port: int, files: list[Path], senders: int, called: str) -> float:
    """Send `files` with `senders` concurrent storescu processes (one association each); returns the wall
    time in seconds from the first start to the last exit. Raises if any storescu fails."""
    parts = [files[i::senders] for i in range(senders)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(storescu_args(port, part, called), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for part in parts if part]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to port {port} failed ({p.returncode}): {err[-2000:]}")
    return elapsed


def _durable_copy(files: list[Path], folder: Path, threads: int) -> float:
    """Write each file's bytes into `folder` under a new name and fsync it and the folder, from `threads`
    threads (the disk's ceiling for a receiver that makes each file durable, no network); returns the
    wall time in seconds."""
    def work(part: list[Path]) -> None:
        for path in part:
            data = path.read_bytes()
            target = folder / f"{uuid.uuid4().hex}.dcm"
            with open(target, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    parts = [files[i::threads] for i in range(threads)]
    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(part,)) for part in parts if part]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (the storescu senders) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _clear(folder: Path) -> None:
    """Remove what a target received (files and sub-folders), keeping the folder itself and spool/tmp."""
    for entry in folder.iterdir():
        if entry.is_dir():
            if entry.name != "tmp":
                shutil.rmtree(entry)
        else:
            entry.unlink()


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.parent.name != "tmp")


def _instances(db_path: Path) -> int:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as c:
        return c.execute("SELECT count(*) FROM instances").fetchone()[0]


LISTEN_PROCESSES = 4  # the node's listen_processes in the second node run: one per concurrent sender


def run(quick: bool, workdir: Path, progress: bool = True) -> dict:
    from osteoscreen.synth import make_study

    require_tool("storescp")
    require_tool("storescu")
    n_files, rounds, modes = (4, 1, (1, 4)) if quick else (20, 5, (1, 4))
    workdir = Path(workdir)
    files_dir, pacs_dir, pacs_fork_dir, bare_dir, storage, storage2, disk_dir = (
        workdir / d for d in ("files", "storescp", "storescp-fork", "pynetdicom", "node-var", "node2-var",
                              "durable"))
    # node2: the same listener with listen_processes = LISTEN_PROCESSES (processes on the port, SO_REUSEPORT);
    # disk: the same bytes written and fsynced with no network (the durable-write ceiling)
    targets = ("storescp", "pynetdicom", "node", "node2", "disk")
    for d in (files_dir, pacs_dir, pacs_fork_dir, bare_dir, disk_dir):
        d.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(n_files + rounds * len(modes) * len(targets), "ingest", progress)
    bar.set_postfix_str("synthesising")
    datasets = []
    for i in range(n_files):
        datasets.append(make_study("hip", np.random.default_rng(500 + i), patient_index=500 + i)[0].dataset)
        bar.update()

    def write_round(tag: str) -> list[Path]:
        paths = []
        for i, ds in enumerate(datasets):
            renew_uids(ds, f"{tag}{i:03d}")
            path = files_dir / f"{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        os.sync()
        return paths

    raw: dict = {"files": n_files, "rounds": rounds, "load_before": load_average(), "cores": os.cpu_count(),
                 "mb_per_s": {f"{t}_{m}": [] for t in targets for m in modes}, "seconds": {},
                 "receiver_cpu_ms_per_mb": {}, "sender_cpu_ms_per_mb": {}}
    procs: list[Proc] = []
    try:
        scp_port, scp_fork_port, bare_port, node_port = free_port(), free_port(), free_port(), free_port()
        storescp = Proc([require_tool("storescp"), *STORESCP_OPTS, "-aet", "PACS", "-od", str(pacs_dir),
                         str(scp_port)], workdir / "storescp.log", port=scp_port, start_timeout=10)
        procs.append(storescp)
        storescp_fork = Proc([require_tool("storescp"), *STORESCP_OPTS, "--fork", "-aet", "PACS", "-od",
                              str(pacs_fork_dir), str(scp_fork_port)], workdir / "storescp-fork.log",
                             port=scp_fork_port, start_timeout=10)
        procs.append(storescp_fork)
        bare = Proc([sys.executable, "-c", BARE_SCP, str(bare_port), str(bare_dir)], workdir / "pynetdicom.log",
                    port=bare_port, start_timeout=60)
        procs.append(bare)
        env = osteoscreen_env(settle_seconds=86400)
        node = Proc([*OSTEOSCREEN, "listen", "--port", str(node_port), "--storage", str(storage)],
                    workdir / "listen.log", env=env, port=node_port)
        procs.append(node)
        node2_port = free_port()
        node2 = Proc([*OSTEOSCREEN, "listen", "--port", str(node2_port), "--storage", str(storage2)],
                     workdir / "listen2.log", env={**env, "OSTEOSCREEN_LISTEN_PROCESSES": str(LISTEN_PROCESSES)}, port=node2_port)
        procs.append(node2)
        db_path, spool = storage / "osteoscreen.db", storage / "spool"
        db2_path, spool2 = storage2 / "osteoscreen.db", storage2 / "spool"
        raw["listener_rss_before_mb"] = hwm_mb(node.pid)
        with PeakRSS([node.pid]) as node_peak, PeakRSS([storescp.pid, storescp_fork.pid]) as scp_peak:
            for r in range(rounds):
                for m in modes:
                    bar.set_postfix_str(f"round {r + 1}/{rounds}, {m} sender{'s' if m > 1 else ''}")
                    files = write_round(f"R{r}M{m}")
                    total_bytes = sum(p.stat().st_size for p in files)
                    # rotate the order so that no target always goes first (or last) after the file writes
                    shift = (r * len(modes) + modes.index(m)) % len(targets)
                    order = targets[shift:] + targets[:shift]
                    for target in order:
                        receiver = {"storescp": storescp if m == 1 else storescp_fork, "pynetdicom": bare,
                                    "node": node, "node2": node2}.get(target)
                        cpu0, senders0 = (tree_cpu_seconds(receiver.pid) if receiver else None), _children_cpu()
                        if target == "disk":
                            os.sync()
                            elapsed = _durable_copy(files, disk_dir, m)
                            got = _count_files(disk_dir)
                            _clear(disk_dir)
                        elif target == "storescp":
                            port, called, folder = ((scp_port, "PACS", pacs_dir) if m == 1 else
                                                    (scp_fork_port, "PACS", pacs_fork_dir))
                            os.sync()
                            elapsed = _send(port, files, m, called)
                            got = _count_files(folder)
                            _clear(folder)
                        elif target == "pynetdicom":
                            os.sync()
                            elapsed = _send(bare_port, files, m, "BARE")
                            got = _count_files(bare_dir)
                            _clear(bare_dir)
                        else:
                            port, db, folder = ((node_port, db_path, spool) if target == "node" else
                                                (node2_port, db2_path, spool2))
                            before = _instances(db)
                            os.sync()
                            elapsed = _send(port, files, m, "OSTEOSCREEN")
                            got = _instances(db) - before
                            _clear(folder)
                        if receiver is not None:
                            mb = total_bytes / 1e6
                            raw["receiver_cpu_ms_per_mb"].setdefault(f"{target}_{m}", []).append(
                                round((tree_cpu_seconds(receiver.pid) - cpu0) * 1000 / mb, 3))
                            raw["sender_cpu_ms_per_mb"].setdefault(f"{target}_{m}", []).append(
                                round((_children_cpu() - senders0) * 1000 / mb, 3))
                        if got != len(files):
                            raise RuntimeError(f"{target} received {got} of {len(files)} files")
                        raw["mb_per_s"][f"{target}_{m}"].append(total_bytes / elapsed / 1e6)
                        raw["seconds"].setdefault(f"{target}_{m}", []).append(round(elapsed, 4))
                        bar.update()
                raw["bytes_per_round"] = total_bytes
        raw["listener_peak_sampled_mb"] = node_peak.peak_mb
        raw["listener_hwm_mb"] = hwm_mb(node.pid)
        raw["storescp_peak_sampled_mb"] = scp_peak.max_single_mb
        raw["load_after"] = load_average()
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as c:
            raw["node_audit"] = dict(c.execute("SELECT event, count(*) FROM audit_events GROUP BY event").fetchall())
    finally:
        bar.close()
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(files_dir, ignore_errors=True)

    mbps = {k: median(v) for k, v in raw["mb_per_s"].items()}
    raw["median_mb_per_s"] = mbps
    size_mb = raw["bytes_per_round"] / 1e6
    fair = ("storescp never fsyncs (strace shows no fsync/fdatasync) and records nothing; the node fsyncs "
            "each file and its folder and commits its database rows (SQLite, synchronous=FULL) before "
            "answering Success: the node does strictly more durable work per image")
    rows = []
    for m in modes:
        ours, ref, bare_mbps = mbps[f"node_{m}"], mbps[f"storescp_{m}"], mbps[f"pynetdicom_{m}"]
        label = "1 association" if m == 1 else f"{m} concurrent storescu"
        rows.append(row(f"ingest MB/s, {label}", ours, "MB/s",
                        reference=f"storescp{' --fork' if m > 1 else ''}", reference_value=ref,
                        target=f"≥ {TARGET_RATIO}× storescp", met=ours / ref >= TARGET_RATIO,
                        note=f"{n_files} pelvis AP files ({size_mb:.0f} MB), median of {rounds} round(s), order "
                             f"rotated between rounds, storescu wall time; {fair}" if m == 1 else
                             f"files split over {m} storescu processes started together, wall time to the last; "
                             f"median of {rounds} round(s)"))
        two = mbps[f"node2_{m}"]
        rows.append(row(f"ingest MB/s, {label}, listen_processes={LISTEN_PROCESSES}", two, "MB/s",
                        reference=f"storescp{' --fork' if m > 1 else ''}", reference_value=ref,
                        target=f"≥ {TARGET_RATIO}× storescp", met=two / ref >= TARGET_RATIO,
                        note=f"{LISTEN_PROCESSES} receiving processes on the port (SO_REUSEPORT): the kernel "
                             "spreads the associations over them, as storescp --fork runs one process per "
                             "association (4 with 4 senders)"))
        rows.append(row(f"ingest MB/s, {label}, vs bare pynetdicom", ours, "MB/s",
                        reference="pynetdicom SCP (no fsync, no DB)", reference_value=bare_mbps,
                        note="the library the node is built on, receiving the same way (data set streamed to a "
                             "file, moved into a folder) and doing nothing else: node / it is the cost of the "
                             "node's own work (header checks, fsync of file and folder, database rows); "
                             f"it / storescp = {bare_mbps / ref:.2f}× is Python pynetdicom against C++ DCMTK"
                             if m == 1 else None))
        best = "node" if m == 1 else "node2"  # the node as it would be configured for this many senders
        rows.append(row(f"ingest MB/s, {label}, vs durable writes{'' if m == 1 else f' (listen_processes={LISTEN_PROCESSES})'}",
                        mbps[f"{best}_{m}"], "MB/s",
                        reference=f"write + fsync of the same files, {m} thread{'s' if m > 1 else ''}, no network",
                        reference_value=mbps[f"disk_{m}"],
                        note="the disk's ceiling for a receiver that makes every file durable before it answers "
                             "(file and folder fsynced, as the node does); storescp, which never fsyncs, is not "
                             "bound by it" if m == 1 else None))
        cpu = {k: median(v) for k, v in raw["receiver_cpu_ms_per_mb"].items()}
        senders = {k: median(v) for k, v in raw["sender_cpu_ms_per_mb"].items()}
        senders_cpu = senders[f"storescp_{m}"]
        cores = raw["cores"] or 1
        ceiling = {k: cores * 1000 / (cpu[f"{k}_{m}"] + senders[f"{k}_{m}"]) for k in ("storescp", "pynetdicom", best)}
        rows.append(row(f"receiver CPU per MB, {label}{'' if m == 1 else f', listen_processes={LISTEN_PROCESSES}'}",
                        cpu[f"{best}_{m}"], "ms/MB",
                        reference=f"storescp{' --fork' if m > 1 else ''}", reference_value=cpu[f"storescp_{m}"],
                        note=(f"CPU time (user + system) of the receiving processes per MB received, median of "
                              f"{rounds} round(s); bare pynetdicom {cpu[f'pynetdicom_{m}']:.2f} ms/MB, the storescu "
                              f"senders {senders_cpu:.2f} ms/MB. With senders and receivers on the same {cores} "
                              f"cores, the CPU alone allows at most {ceiling[best]:.0f} MB/s for the node, "
                              f"{ceiling['pynetdicom']:.0f} MB/s for bare pynetdicom and {ceiling['storescp']:.0f} "
                              f"MB/s for storescp")))
    rows.append(row("listener peak RSS", raw["listener_peak_sampled_mb"], "MB", reference="storescp peak RSS",
                    reference_value=raw["storescp_peak_sampled_mb"],
                    note="largest VmRSS of the `osteoscreen listen` process sampled every 50 ms during the "
                         f"rounds (VmHWM over its whole life: {raw['listener_hwm_mb']:.0f} MB; "
                         f"{raw['listener_rss_before_mb']:.0f} MB before the first image, i.e. what the process "
                         "imports: pynetdicom, pydicom, SQLAlchemy; torch only in the `work` role); storescp: "
                         "largest single process (a --fork child included)"))
    plot = bar_chart(workdir / "ingest.png", f"C-STORE ingest, {n_files} pelvis AP files ({size_mb:.0f} MB)",
                     "MB/s (median)", [f"{m} sender{'s' if m > 1 else ''}" for m in modes],
                     {"DCMTK storescp (no fsync)": [mbps[f"storescp_{m}"] for m in modes],
                      "write + fsync, no network (disk ceiling)": [mbps[f"disk_{m}"] for m in modes],
                      "bare pynetdicom SCP (no fsync)": [mbps[f"pynetdicom_{m}"] for m in modes],
                      "osteoscreen listen (fsync + DB)": [mbps[f"node_{m}"] for m in modes],
                      f"osteoscreen listen, {LISTEN_PROCESSES} processes": [mbps[f"node2_{m}"] for m in modes]})
    summary = (f"The same {n_files} full-size pelvis AP files ({size_mb:.0f} MB) sent by DCMTK storescu, "
               f"{rounds} rounds with fresh UIDs each and the target order rotated, to DCMTK storescp "
               f"({' '.join(STORESCP_OPTS)}; --fork for concurrent senders), to a bare pynetdicom SCP and to "
               "`osteoscreen listen` (SQLite). storescp and the bare SCP never fsync and record nothing; the "
               "node fsyncs every file and its folder and commits database rows before each Success. Beside "
               "them: the same bytes written and fsynced with no network (the disk's ceiling for durable "
               "files), and the CPU time each receiver and the senders spend per MB.")
    return {"name": "ingest", "rows": rows, "plots": [str(plot)], "raw": raw, "summary": summary}


if __name__ == "__main__":
    raise SystemExit(cli(run, "ingest"))

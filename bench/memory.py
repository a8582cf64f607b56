"""Peak resident memory (RSS) and CPU time of processes, read from /proc (Linux; no psutil needed).

Helpers used by the other bench modules:
- `hwm_mb(pid)`: the kernel's own high-water mark of a process (VmHWM), exact and free, but for the
  whole life of the process (start-up included) and for that one process only;
- `rss_mb(pid)`, `tree_rss_mb(pid)`: the current RSS of a process, or summed over it and its
  descendants;
- `PeakRSS(pids)`: a sampling thread (every 50 ms) that records the largest RSS seen while a block runs,
  per process and summed over the process trees; use it to measure a phase (e.g. ingest only);
- `tree_cpu_seconds(pid)`: CPU time (user + system) used so far by a process and every child it has had
  (those still running, those exited and not yet reaped, and those reaped: storescp --fork's).

`run()` (the module as a benchmark): peak RSS of one `osteoscreen serve` process (all roles, SQLite)
while it receives and screens a few full-size pelvis studies; `python -m bench.memory [--quick]`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .common import (OSTEOSCREEN, Proc, bar_chart, cli, free_port, osteoscreen_env, progress_bar, renew_uids, row,
                     storescu_args, wait_for)


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """Current resident set size (VmRSS) of one process in MB (10^6 bytes), None once it is gone."""
    kb = _status_kb(pid, "VmRSS")
    return None if kb is None else kb * 1024 / 1e6


def hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of one process over its life so far, in MB (10^6 bytes)."""
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb * 1024 / 1e6


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, … (from /proc/<pid>/task/*/children)."""
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        if p not in found:
            found.append(p)
            todo += children(p)
    return found


def _cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(utime + stime, cutime + cstime) of a process in clock ticks, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used by pid and its descendants so far. A child reaped by its parent counts in the
    parent's cutime (with what it had reaped); one not yet reaped (a zombie keeps its /proc/<pid>/stat)
    is read itself. The children are listed before and after reading them and the parent; if a
    child was reaped in between, everything is read again."""
    tick = os.sysconf("SC_CLK_TCK")
    for _ in range(10):  # read again if a child was reaped meanwhile: then it is counted exactly once
        before = set(descendants(pid))
        children = {p: _cpu_ticks(p) for p in before}
        own = _cpu_ticks(pid)
        if own is None:
            return 0.0
        if set(descendants(pid)) == before:
            break
    total = own[0] + own[1]  # the parent itself and every child it has reaped
    total += sum(t[0] + t[1] for t in children.values() if t is not None)
    return total / tick


def tree_rss_mb(pid: int) -> float:
    """RSS of pid and all its descendants, summed (shared pages count once per process)."""
    return sum(v for v in (rss_mb(p) for p in [pid, *descendants(pid)]) if v is not None)


class PeakRSS:
    """Samples the RSS of some processes (and, with `tree`, their descendants) in a thread while a block
    runs. `pids` is a list or a callable returning the current list (processes may come and go).

        with PeakRSS([proc.pid]) as peak:
            ...
        peak.peak_mb           # largest sum over all trees seen in one sample
        peak.per_pid_mb        # largest RSS seen per process (every process seen, children included)
        peak.max_single_mb     # the largest of per_pid_mb
    """

    def __init__(self, pids: Iterable[int] | Callable[[], Iterable[int]], interval: float = 0.05,
                 tree: bool = True):
        self._pids = pids if callable(pids) else (lambda p=list(pids): p)
        self.interval, self.tree = interval, tree
        self.peak_mb = 0.0
        self.per_pid_mb: dict[int, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        total = 0.0
        for root in list(self._pids()):
            for pid in [root, *(descendants(root) if self.tree else [])]:
                mb = rss_mb(pid)
                if mb is None:
                    continue
                total += mb
                if mb > self.per_pid_mb.get(pid, 0.0):
                    self.per_pid_mb[pid] = mb
        self.samples += 1
        self.peak_mb = max(self.peak_mb, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    @property
    def max_single_mb(self) -> float:
        return max(self.per_pid_mb.values(), default=0.0)

    def start(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "PeakRSS":
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.sample()
        return self

    def __enter__(self) -> "PeakRSS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the benchmark: one `serve` process screening a few studies ------------------------------------
def run(quick: bool, workdir: Path, progress: bool = True) -> dict:
    """Peak RSS of `osteoscreen serve` (listener, settle timer, worker, dispatcher in one process, SQLite)
    while it receives and screens `n` full-size pelvis studies (batches of worker_batch_studies)."""
    from sqlalchemy import create_engine, text

    from osteoscreen.synth import make_study

    n = 1 if quick else 8
    workdir = Path(workdir)
    files_dir, storage = workdir / "files", workdir / "serve-var"
    files_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        ds = make_study("hip", np.random.default_rng(1000 + i), patient_index=1000 + i)[0].dataset
        renew_uids(ds, f"MEM{i:04d}")
        path = files_dir / f"hip{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    port = free_port()
    env = osteoscreen_env(settle_seconds=1, poll_seconds=0.2, web__enabled="false", model_threads=1)
    raw: dict = {"studies": n}
    bar = progress_bar(n, "memory: serve screening", progress)
    node = Proc([*OSTEOSCREEN, "serve", "--port", str(port), "--storage", str(storage)], workdir / "serve.log",
                env=env, port=port)
    engine = create_engine(f"sqlite:///{storage / 'osteoscreen.db'}")
    try:
        time.sleep(3)  # the worker thread builds the localiser's atlases after the port opens
        raw["idle_rss_mb"] = rss_mb(node.pid)
        raw["startup_hwm_mb"] = hwm_mb(node.pid)

        def done() -> int:
            with engine.connect() as c:
                count = c.execute(text("SELECT count(*) FROM jobs WHERE state IN ('done','failed')")).scalar()
            bar.n = count
            bar.refresh()
            return count

        with PeakRSS([node.pid]) as peak:
            sent = subprocess.run(storescu_args(port, files), capture_output=True, text=True, timeout=300)
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")
            if not wait_for(lambda: done() >= n, 300, 0.5):
                raise RuntimeError(f"serve did not screen {n} studies; log tail:\n{node.tail()}")
        raw["peak_sampled_mb"] = peak.peak_mb
        raw["study_mb"] = sum(f.stat().st_size for f in files) / n / 1e6
        raw["hwm_mb"] = hwm_mb(node.pid)
        with engine.connect() as c:
            raw["jobs"] = dict(c.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all())
    finally:
        bar.close()
        engine.dispose()
        node.stop()
        shutil.rmtree(files_dir, ignore_errors=True)  # the images and what the node kept of them
        shutil.rmtree(storage, ignore_errors=True)
    hwm = raw["hwm_mb"]
    rows = [row("serve peak RSS (screening)", hwm, "MB", target="≤ 1500 MB", met=hwm <= 1500,
                note=f"VmHWM of one `osteoscreen serve` process (all roles, SQLite) after receiving and screening "
                     f"{n} full-size pelvis AP studies ({raw['study_mb']:.1f} MB each) in batches of 4, model_threads 1; "
                     f"idle after start-up: {raw['idle_rss_mb']:.0f} MB")]
    plot = bar_chart(workdir / "memory.png", "osteoscreen serve: resident memory", "MB",
                     ["idle after start-up", f"peak, screening {n} studies"],
                     {"serve": [raw["idle_rss_mb"], hwm]})
    summary = (f"One `osteoscreen serve` process (listener, settle timer, worker, dispatcher; SQLite) receives "
               f"{n} full-size pelvis AP studies with storescu and screens them; its peak RSS is the kernel's "
               "VmHWM for the process.")
    return {"name": "memory", "rows": rows, "plots": [str(plot)], "raw": raw, "summary": summary}


if __name__ == "__main__":
    raise SystemExit(cli(run, "memory"))

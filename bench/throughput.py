"""Sustained screening throughput: studies per minute with 1 and 2 `osteoscreen work` processes, on SQLite
and on PostgreSQL; and the queue's claim rate on PostgreSQL against a raw-SQL floor.

    python -m bench.throughput [--quick] [--workdir DIR]

Studies: K one-image pelvis AP studies (60, or 4 with --quick): 12 distinct full-size phantoms
(`synth.make_study("hip")`, about 8-10 MB each) copied with fresh UIDs, patient names and IDs. Per
database (SQLite in the storage folder; a throwaway PostgreSQL database), they are ingested once by the
real chain: `osteoscreen listen` (settle 1 s) + one storescu, until K jobs are queued; the listener is
then stopped (so nothing else touches the queue: no settle timer, no dispatcher, no destinations).

Per configuration (database × 1 or 2 workers) the same spool and jobs are reused: the jobs are parked in
a state no worker claims ('held'), findings are deleted, studies and the outbox reset; W `osteoscreen
work` processes are started and given time to load the model and build the localiser's atlases (their
heartbeat row is in the database and their CPU has gone quiet: they are idle-polling every 0.1 s);
then one UPDATE releases every job ('held' → 'queued') and the clock starts. It stops at the last job's
`finished_at` (written by the worker in the transaction that completes the job). So model loading and
start-up are excluded, and each worker claims batches of `worker_batch_studies` (default 4) as it
would in production; every study goes through the whole worker path: read from the spool, decode,
localise, gates, model + Grad-CAM, SR + heatmap (+ KOS when positive) written to the outbox with fsync,
findings committed. Studies/min = K / elapsed × 60.

Claim rate: 2000 dummy jobs (Study + Job rows through the ORM; 200 with --quick) on a fresh PostgreSQL
database, drained by 1 and by 4 concurrent claimer processes, each looping `queue.claim_jobs(limit=1)`
then `queue.complete_job` (no screening) until nothing is left. Reference: the same protocol in raw SQL
through psycopg (one transaction `SELECT id … ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED` + conditional
`UPDATE … SET state='running'`, one transaction `UPDATE … SET state='done'`), the floor any
implementation of this queue pays; ours also updates the study and pings a connection that rested in the
pool (store/db.py). Jobs/s = jobs / wall time from releasing the claimers to the last one finishing.
The same again in batches of 4, as the worker claims (`worker_batch_studies`): `claim_jobs(limit=4)`,
then `complete_job` per job in its own session; the reference claims 4 with one SELECT … LIMIT 4 FOR
UPDATE SKIP LOCKED + UPDATE … RETURNING and completes each in its own transaction. The issue's target
(≥ 1000 jobs/s with 4 claimers and ≥ 0.7× the floor) is read off the batched rows. Every figure is
the median of 3 rounds, each configuration measured in turn with the others. A second raw
reference in batches of 4 runs the node's own statements (the job's UPDATE … RETURNING study_id, then
the study's UPDATE, in one transaction per job): against it the ratio is what the framework costs
(SQLAlchemy, the ORM session), apart from the study bookkeeping the job-only floor leaves out.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from copy import deepcopy
from datetime import timedelta
from pathlib import Path

import numpy as np

from .common import (OSTEOSCREEN, PgDatabase, Proc, bar_chart, cli, free_port, load_average, osteoscreen_env,
                     pg_available, progress_bar, renew_uids, row, storescu_args, wait_for)
from .claim_rate import CLAIM_ROUNDS, claim_rate, claim_runs, spread
from .memory import PeakRSS, hwm_mb

TARGET_STUDIES_PER_MIN = 60
TARGET_WORKER_RSS_MB = 1500
WORKER_ENV = dict(poll_seconds=0.1, lease_seconds=120, model_threads=1, settle_seconds=1)


# -- helpers ------------------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    import os
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _quiet(pids: list[int], window: float = 1.0, threshold: float = 0.15) -> bool:
    """Whether every process used less than `threshold` of a core over `window` seconds."""
    before = [_cpu_seconds(p) for p in pids]
    time.sleep(window)
    return all(_cpu_seconds(p) - b < threshold * window for p, b in zip(pids, before))


def _write_studies(k: int, folder: Path, bar) -> list[Path]:
    from osteoscreen.synth import make_study
    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for seed in range(min(k, 12)):
        bases.append(make_study("hip", np.random.default_rng(700 + seed), patient_index=700 + seed)[0].dataset)
        bar.update()
    paths = []
    for i in range(k):
        ds = renew_uids(deepcopy(bases[i % len(bases)]), f"TP{i:05d}")
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Queue:
    """SQL on the node's database, whichever engine."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine
        self.engine = create_engine(url)

    def sql(self, query: str, **params):
        from sqlalchemy import text
        with self.engine.begin() as c:
            result = c.execute(text(query), params)
            return result.all() if result.returns_rows else result.rowcount

    def states(self) -> dict[str, int]:
        return dict(self.sql("SELECT state, count(*) FROM jobs GROUP BY state"))

    def hold_all(self) -> None:
        """Park every job where no worker claims it, and forget any earlier run's results."""
        self.sql("DELETE FROM findings")
        self.sql("DELETE FROM deliveries")
        self.sql("UPDATE jobs SET state='held', attempts=0, lease_owner=NULL, lease_expires_at=NULL, "
                 "finished_at=NULL, error=NULL")
        self.sql("UPDATE studies SET status='queued', last_report_uid=NULL, last_report_path=NULL, "
                 "reported_at=NULL")

    def dispose(self) -> None:
        self.engine.dispose()


def _ingest(paths: list[Path], storage: Path, db_url: str | None, logs: Path) -> None:
    """The real chain: `osteoscreen listen` + storescu, until every study is a queued job; then stop."""
    port = free_port()
    args = [*OSTEOSCREEN, "listen", "--port", str(port), "--storage", str(storage)]
    if db_url:
        args += ["--database-url", db_url]
    listener = Proc(args, logs / f"listen-{storage.name}.log", env=osteoscreen_env(**WORKER_ENV), port=port)
    try:
        sent = subprocess.run(storescu_args(port, paths), capture_output=True, text=True, timeout=900)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")
        q = Queue(db_url or f"sqlite:///{storage / 'osteoscreen.db'}")
        try:
            if not wait_for(lambda: q.states().get("queued", 0) >= len(paths), 120, 0.5):
                raise RuntimeError(f"only {q.states()} jobs after ingest; listener log:\n{listener.tail()}")
        finally:
            q.dispose()
    finally:
        listener.stop()


def _screen(k: int, workers: int, storage: Path, db_url: str | None, logs: Path, bar) -> dict:
    """One configuration: W workers drain the K held jobs; returns elapsed seconds, RSS and job states."""
    from osteoscreen.store.models import utcnow
    url = db_url or f"sqlite:///{storage / 'osteoscreen.db'}"
    q = Queue(url)
    q.hold_all()
    shutil.rmtree(storage / "outbox", ignore_errors=True)
    procs: list[Proc] = []
    tag = f"{'pg' if db_url else 'sqlite'}-{workers}w"
    try:
        for i in range(workers):
            args = [*OSTEOSCREEN, "work", "--storage", str(storage)]
            if db_url:
                args += ["--database-url", db_url]
            procs.append(Proc(args, logs / f"work-{tag}-{i}.log", env=osteoscreen_env(**WORKER_ENV)))
        pids = [p.pid for p in procs]
        t_start = time.monotonic()

        def ready() -> bool:
            if not all(p.alive() for p in procs):
                raise RuntimeError(f"a worker exited during start-up:\n{procs[0].tail()}")
            beating = {r[0] for r in q.sql("SELECT pid FROM process_heartbeats WHERE roles LIKE '%work%'")}
            return set(pids) <= beating and _quiet(pids)

        if not wait_for(ready, 180, 0.5):
            raise RuntimeError(f"workers not ready after 180 s:\n{procs[0].tail()}")
        startup = time.monotonic() - t_start
        bar.set_postfix_str(f"{tag}: screening")
        done_before = bar.n
        with PeakRSS(pids) as peak:
            released_at = utcnow()
            released = q.sql("UPDATE jobs SET state='queued' WHERE state='held'")
            if released != k:
                raise RuntimeError(f"released {released} jobs, expected {k}")

            def finished() -> bool:
                states = q.states()
                n = states.get("done", 0) + states.get("failed", 0)
                bar.n = done_before + n
                bar.refresh()
                if not all(p.alive() for p in procs):
                    raise RuntimeError(f"a worker died:\n{procs[0].tail()}")
                return n >= k

            if not wait_for(finished, 60 + 20 * k, 0.25):
                raise RuntimeError(f"jobs not finished: {q.states()}")
        last = q.sql("SELECT max(finished_at) FROM jobs")[0][0]
        if isinstance(last, str):  # SQLite hands DateTime back as text through a plain text() query
            from datetime import datetime
            last = datetime.fromisoformat(last)
        elapsed = (last - released_at) / timedelta(seconds=1)
        states = q.states()
        per_worker = sorted(n for _, n in q.sql("SELECT lease_owner, count(*) FROM jobs GROUP BY lease_owner"))
        hwm = [hwm_mb(p) for p in pids]
        return {"elapsed_s": elapsed, "studies_per_min": k / elapsed * 60, "states": states,
                "worker_hwm_mb": hwm, "worker_peak_sampled_mb": peak.max_single_mb,
                "startup_s": round(startup, 1), "jobs_per_worker": per_worker}
    finally:
        for p in procs:
            p.stop()
        q.dispose()


# -- the benchmark ------------------------------------------------------------------------------------
def run(quick: bool, workdir: Path, progress: bool = True) -> dict:
    k = 4 if quick else 60
    n_claim_jobs = 100 if quick else 2000
    worker_counts, claimers = (1, 2), (1, 4)
    # --quick: one worker count per database (SQLite 1, PostgreSQL 2), so the smoke run stays short
    workdir = Path(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    backends = ["sqlite"] + (["postgresql"] if pg_available() else [])
    plan = {b: ((1,) if b == "sqlite" else (2,)) if quick else worker_counts for b in backends}
    configs = [(b, w) for b in backends for w in plan[b]]
    bar = progress_bar(min(k, 12) + len(configs) * k + (len(claim_runs(claimers)) * CLAIM_ROUNDS
                                                          if "postgresql" in backends else 0),
                       "throughput", progress)
    raw: dict = {"studies": k, "load_before": load_average(), "configs": {}, "backends": backends}
    bar.set_postfix_str("synthesising")
    paths = _write_studies(k, workdir / "files", bar)
    raw["study_mb"] = sum(p.stat().st_size for p in paths) / k / 1e6
    try:
        for backend in backends:
            storage = workdir / f"var-{backend}"
            pg = PgDatabase("osteo_bench_tp") if backend == "postgresql" else None
            if pg:
                pg.__enter__()
            try:
                bar.set_postfix_str(f"{backend}: ingest")
                _ingest(paths, storage, pg.url if pg else None, logs)
                for w in plan[backend]:
                    bar.set_postfix_str(f"{backend}, {w} worker(s): start-up")
                    raw["configs"][f"{backend}_{w}"] = _screen(k, w, storage, pg.url if pg else None, logs, bar)
                    raw["configs"][f"{backend}_{w}"]["load_after"] = load_average()
            finally:
                if pg:
                    pg.__exit__(None, None, None)
                shutil.rmtree(storage, ignore_errors=True)
        if "postgresql" in backends:
            bar.set_postfix_str("claim rate")
            raw["claim_rate"] = claim_rate(n_claim_jobs, claimers, bar)
    finally:
        bar.close()
        shutil.rmtree(workdir / "files", ignore_errors=True)

    rows = []
    cfg = raw["configs"]
    for backend, w in configs:
        c = cfg[f"{backend}_{w}"]
        target = w == 2
        failed = c["states"].get("failed", 0)
        rows.append(row(f"studies/min, {w} worker{'s' if w > 1 else ''}, {backend}", c["studies_per_min"],
                        "studies/min",
                        target=f"≥ {TARGET_STUDIES_PER_MIN} studies/min on 2 CPU cores" if target else None,
                        met=c["studies_per_min"] >= TARGET_STUDIES_PER_MIN if target else None,
                        note=(f"{k} one-image pelvis AP studies ({raw['study_mb']:.1f} MB each), "
                              f"{c['elapsed_s']:.1f} s from releasing the jobs to the last finished_at; "
                              f"start-up (model load, atlases) excluded, {c['startup_s']} s"
                              + (f"; {failed} job(s) failed" if failed else ""))))
    hwm = max(max(c["worker_hwm_mb"]) for c in cfg.values())
    rows.append(row("worker peak RSS", hwm, "MB", target=f"≤ {TARGET_WORKER_RSS_MB / 1000:.1f} GB",
                    met=hwm <= TARGET_WORKER_RSS_MB,
                    note="largest VmHWM (whole life, model load included) of any `osteoscreen work` process, "
                         "batches of worker_batch_studies=4 full-size studies"))
    if "claim_rate" in raw:
        for c in claimers:
            key = f"{c}_batch4"
            ours, ref = raw["claim_rate"][f"ours_{key}"]["jobs_per_s"], raw["claim_rate"][f"raw_{key}"]["jobs_per_s"]
            rows.append(row(f"queue claims/s on PostgreSQL, {c} claimer{'s' if c > 1 else ''}, batches of 4", ours,
                            "jobs/s", reference="raw SQL SKIP LOCKED floor, batches of 4", reference_value=ref,
                            target="≥ 1000 jobs/s and ≥ 0.7× the floor" if c == 4 else None,
                            met=(ours >= 1000 and ours >= 0.7 * ref) if c == 4 else None,
                            note="as the worker claims (worker_batch_studies 4): claim_jobs(limit=4), then "
                                 "complete_job per job in its own session; the reference claims 4 with one "
                                 "SELECT … LIMIT 4 FOR UPDATE SKIP LOCKED + UPDATE … RETURNING, then one UPDATE per job"
                                 + spread(raw["claim_rate"], key)))
            same = raw["claim_rate"].get(f"raw_study_{key}", {}).get("jobs_per_s")
            if same:
                rows.append(row(f"queue claims/s on PostgreSQL, {c} claimer{'s' if c > 1 else ''}, batches of 4, "
                                "against the same statements", ours, "jobs/s",
                                reference="raw SQL with the node's statements (job + study), batches of 4",
                                reference_value=same,
                                note="the reference completes each job as the node does: UPDATE jobs … RETURNING "
                                     "study_id, then UPDATE studies, one transaction per job, over psycopg; the "
                                     "ratio is what SQLAlchemy and the session cost"))
        for c in claimers:
            ours, ref = raw["claim_rate"][f"ours_{c}"]["jobs_per_s"], raw["claim_rate"][f"raw_{c}"]["jobs_per_s"]
            rows.append(row(f"queue claims/s on PostgreSQL, {c} claimer{'s' if c > 1 else ''}", ours, "jobs/s",
                            reference="raw SQL SKIP LOCKED floor", reference_value=ref,
                            note=f"{n_claim_jobs} jobs, each claimed (claim_jobs, limit 1) and completed "
                                 f"(complete_job) with no screening, {c} process(es); the reference does the "
                                 "minimal SELECT … FOR UPDATE SKIP LOCKED + conditional UPDATE, then UPDATE to "
                                 "done, over psycopg" if c == 1 else
                                 f"{c} claimer processes on 2 cores shared with PostgreSQL"))
    labels = [f"{b}\n{w} worker{'s' if w > 1 else ''}" for b, w in configs]
    plots = [str(bar_chart(workdir / "throughput.png", f"Screening throughput, {k} pelvis AP studies",
                           "studies/min", labels,
                           {"osteoscreen work": [cfg[f"{b}_{w}"]["studies_per_min"] for b, w in configs]},
                           target=TARGET_STUDIES_PER_MIN, target_label="target (2 workers)"))]
    if "claim_rate" in raw:
        plots.append(str(bar_chart(workdir / "claim-rate.png", f"PostgreSQL queue, {n_claim_jobs} jobs",
                                   "jobs claimed + completed per s", [f"{c} claimer{'s' if c > 1 else ''}"
                                                                      for c in claimers],
                                   {"osteoscreen queue": [raw["claim_rate"][f"ours_{c}"]["jobs_per_s"]
                                                          for c in claimers],
                                    "raw SQL floor": [raw["claim_rate"][f"raw_{c}"]["jobs_per_s"]
                                                      for c in claimers]})))
    summary = (f"{k} one-image full-size pelvis AP studies are ingested once per database by `osteoscreen listen` "
               "and storescu, then screened by 1 and 2 `osteoscreen work` processes (worker_batch_studies 4, "
               "model_threads 1). The jobs are released only after every worker has loaded its model and gone "
               "idle, so start-up is excluded; the time runs from that release to the last job's finished_at. "
               "No destinations: results stay in the outbox.")
    return {"name": "throughput", "rows": rows, "plots": plots, "raw": raw, "summary": summary}


if __name__ == "__main__":
    raise SystemExit(cli(run, "throughput"))

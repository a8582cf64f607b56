"""The queue's claim rate on PostgreSQL beside raw-SQL floors: the claim-rate part of bench/throughput.py
(its docstring says what is measured and how). Claimer processes are forked; each drains the jobs with
`store.queue` ("ours"), with psycopg on the job rows alone ("raw"), or with psycopg running the node's
own statements ("raw_study")."""
from __future__ import annotations

import multiprocessing
import time

import numpy as np

from .common import PgDatabase

_RAW_DONE = "UPDATE jobs SET state='done', finished_at=now() WHERE id=%s AND lease_owner=%s AND state='running'"
_RAW_DONE_STUDY = ("UPDATE jobs SET state='done', finished_at=now(), error=NULL WHERE id=%s AND lease_owner=%s "
                   "AND state='running' RETURNING study_id")
_RAW_STUDY = ("UPDATE studies SET status = CASE WHEN status='queued' THEN 'screened' ELSE status END, "
              "reported_at=now(), last_report_uid=NULL, last_report_path=NULL WHERE id=%s")


def _claimer(url: str, mode: str, ready, start, results, index: int, batch: int = 1) -> None:
    """One claimer process: claim up to `batch` jobs, complete each, until none is left; puts its count.
    mode: "ours" (store.queue), "raw" (psycopg, the job rows only) or "raw_study" (psycopg, the node's
    own statements: the job, then its study)."""
    count = 0
    try:
        if mode != "ours":
            import psycopg
            dsn = url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn) as conn:
                owner = f"raw-{index}"
                ready.put(index)
                start.wait()
                while True:
                    with conn.transaction():
                        got = [r[0] for r in conn.execute(
                            "SELECT id FROM jobs WHERE state='queued' AND attempts < 3 "
                            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (batch,)).fetchall()]
                        if not got:
                            break
                        won = [r[0] for r in conn.execute(
                            "UPDATE jobs SET state='running', lease_owner=%s, attempts=attempts+1, "
                            "lease_expires_at=now() + interval '120 seconds' "
                            "WHERE id = ANY(%s) AND state='queued' RETURNING id", (owner, got)).fetchall()]
                    for job_id in won:
                        with conn.transaction():
                            if mode == "raw":
                                conn.execute(_RAW_DONE, (job_id, owner))
                            else:
                                study_id = conn.execute(_RAW_DONE_STUDY, (job_id, owner)).fetchone()[0]
                                conn.execute(_RAW_STUDY, (study_id,))
                        count += 1
        else:
            from sqlalchemy import text

            from osteoscreen.store import queue
            from osteoscreen.store.db import Database
            db = Database(url, migrate=False)
            owner = f"orm-{index}"
            with db.session() as s:  # connect before the start line
                s.execute(text("SELECT 1"))
            ready.put(index)
            start.wait()
            while True:
                with db.session() as s:
                    jobs = queue.claim_jobs(s, owner, 120, 3, limit=batch)
                if not jobs:
                    break
                for job in jobs:  # as the worker does: each job completed in its own session
                    with db.session() as s:
                        if queue.complete_job(s, job.id, owner, [], [], None, None):
                            count += 1
            db.dispose()
        results.put((index, count, None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put((index, count, f"{type(exc).__name__}: {exc}"))


CLAIM_ROUNDS = 3  # each claim configuration is measured this often, the rounds interleaved; the median counts


def claim_runs(claimers: tuple[int, ...], batches: tuple[int, ...] = (1, 4)) -> list[tuple[str, int, int]]:
    """(mode, claimers, batch) of one round of the claim-rate measurement."""
    return [(mode, c, b) for b in batches for mode in (("ours", "raw", "raw_study") if b > 1 else ("ours", "raw"))
            for c in claimers]


def claim_rate(n_jobs: int, claimers: tuple[int, ...], bar, batches: tuple[int, ...] = (1, 4),
                rounds: int = CLAIM_ROUNDS) -> dict:
    """Jobs/s per configuration: the median of `rounds` measurements taken in turn with the others (so
    that a burst of load on this shared machine hits every configuration alike), and every run."""
    from sqlalchemy import text
    from osteoscreen.store.db import Database
    from osteoscreen.store.models import Job, Study
    measured: dict[str, list[float]] = {}
    with PgDatabase("osteo_bench_claim") as pg:
        db = Database(pg.url)
        with db.session() as s:
            studies = [Study(study_uid=f"1.2.826.0.1.3680043.10.999.{i}", status="queued") for i in range(n_jobs)]
            s.add_all(studies)
            s.flush()
            s.add_all([Job(study_id=st.id, state="queued") for st in studies])
            s.commit()
        db.dispose()
        ctx = multiprocessing.get_context("fork")
        for mode, c, batch in claim_runs(claimers, batches) * rounds:
            db = Database(pg.url, migrate=False)
            with db.session() as s:
                s.execute(text("UPDATE jobs SET state='queued', attempts=0, lease_owner=NULL, "
                               "lease_expires_at=NULL, finished_at=NULL"))
                s.execute(text("UPDATE studies SET status='queued'"))
                s.commit()
            db.dispose()
            ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_claimer, args=(pg.url, mode, ready, start, results, i, batch))
                     for i in range(c)]
            for p in procs:
                p.start()
            for _ in procs:  # every claimer connected and waiting at the start line
                ready.get(timeout=60)
            t0 = time.perf_counter()
            start.set()
            got = [results.get(timeout=600) for _ in procs]
            elapsed = time.perf_counter() - t0
            for p in procs:
                p.join(30)
            errors = [e for _, _, e in got if e]
            if errors:
                raise RuntimeError(f"claimer failed: {errors[0]}")
            total = sum(n for _, n, _ in got)
            if total != n_jobs:
                raise RuntimeError(f"{mode} x{c}: {total} jobs completed, expected {n_jobs}")
            measured.setdefault(f"{mode}_{c}" + (f"_batch{batch}" if batch > 1 else ""), []).append(n_jobs / elapsed)
            bar.update()
    return {key: {"jobs_per_s": float(np.median(v)), "runs": v} for key, v in measured.items()}


def spread(rates: dict, key: str) -> str:
    """The runs behind a median: what one run on this shared machine may differ by."""
    ours, ref = rates[f"ours_{key}"].get("runs"), rates[f"raw_{key}"].get("runs")
    if not ours or not ref or len(ours) < 2:
        return ""
    ratios = sorted(o / r for o, r in zip(ours, ref))
    return (f"; medians of {len(ours)} rounds: ours {min(ours):.0f}–{max(ours):.0f} jobs/s, the floor "
            f"{min(ref):.0f}–{max(ref):.0f}, the ratio per round {ratios[0]:.2f}–{ratios[-1]:.2f}")

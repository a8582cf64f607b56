"""`osteoscreen db …` (schema, screenings, statistics, worklist, acknowledgements, export; `drift` and
`outcomes`/`performance` register from their own modules) and `osteoscreen resend`."""
from __future__ import annotations

import json
import sys

from .common import UsageError, _admin_session, _database, _day, _db_flags, _filter_flags, _filters


def cmd_db_upgrade(args) -> int:
    from ..store.db import current_revision
    _, db = _database(args, migrate=True)  # Database() brings the schema to head (stamping a pre-Alembic one)
    try:
        with db.engine.connect() as conn:
            revision = current_revision(conn)
        print(f"database {db.engine.url.render_as_string(hide_password=True)} at schema revision {revision} (head)")
    finally:
        db.dispose()
    return 0


def cmd_db_list(args) -> int:
    from ..admin import queries, tables as t
    f = _filters(args)
    if args.limit < 0 or args.offset < 0:
        raise UsageError("--limit and --offset must be >= 0")
    with _admin_session(args) as (positive, session):
        page = queries.list_screenings(session, f, positive_categories=positive, limit=args.limit,
                                       offset=args.offset)
    if args.json:
        print(json.dumps(page.as_dict(), indent=2))
        return 0
    rows = [(t.when(s.received_at), s.patient_id, s.patient_name, s.accession_number, t.result(s.result),
             t.t_score(s.lowest_t_score), t.site_summary(s.sites) or s.skip_reason, t.yes(s.positive),
             t.yes(s.acknowledged), s.status) for s in page.items]
    print(t.render(["received (UTC)", "patient ID", "name", "accession", "result", "lowest T", "sites",
                    "positive", "ack", "status"], rows, widths={2: 24, 6: 60}, right=[5]))
    print(f"{len(page.items)} of {page.total} screenings (dates UTC)"
          + (f", from offset {page.offset}" if page.offset else ""))
    return 0


def cmd_db_show(args) -> int:
    from ..admin import queries, tables as t
    with _admin_session(args) as (positive, session):
        d = queries.study_detail(session, args.key, positive_categories=positive)
    if args.json:
        print(json.dumps(d.as_dict(), indent=2))
        return 0
    s = d.screening
    out = [f"Study {s.study_uid}", t.fields([
        ("patient ID", s.patient_id), ("patient name", s.patient_name), ("accession", s.accession_number),
        ("study date", t.dicom_date(s.study_date)), ("calling AE", s.calling_ae),
        ("modalities", " ".join(s.modalities) or None),
        ("status", s.status + (f" ({s.skip_reason})" if s.skip_reason else "")),
        ("received", f"{t.when(s.received_at, True)} UTC"),
        ("reported", f"{t.when(s.reported_at, True)} UTC" if s.reported_at else None),
        ("result", f"{t.result(s.result)} (lowest T {t.t_score(s.lowest_t_score)})"),
        ("positive", "yes" if s.positive else "no"), ("acknowledged", "yes" if s.acknowledged else "no"),
        ("model version", s.model_version)])]
    reports: dict[int, list[dict]] = {}
    for f in d.findings_history:  # newest job first
        reports.setdefault(f["job_id"], []).append(f)
    site_headers = ["site", "result", "T", "interval", "calibration", "reason", "image (SOP Instance UID)"]
    for n, (job_id, findings) in enumerate(reports.items()):
        title = "Latest report" if n == 0 else "Earlier report"
        rows = [(f["site"], t.result(f["category"] if f["assessable"] else "not_assessable"), t.t_score(f["t_score"]),
                 t.interval(f), f["calibration_id"] or ("model's own" if f["assessable"] else ""),
                 f["reason"], f["sop_instance_uid"]) for f in findings]
        out += ["", f"{title}: job {job_id}, {t.when(findings[0]['created_at'], True)} UTC, model "
                f"{findings[0]['model_version']}", t.render(site_headers, rows, widths={6: 64}, right=[2], indent="  ")]
    if not reports:
        out += ["", "Reports: none"]
    sections = [
        ("Instances", ["SOP Instance UID", "modality", "region", "view", "eligible", "skip reason", "received (UTC)",
                       "purged"],
         [(i["sop_instance_uid"], i["modality"], i["region"], i["view"], "yes" if i["eligible"] else "no",
           i["skip_reason"], t.when(i["received_at"]), t.yes(i["purged"])) for i in d.instances]),
        ("Jobs", ["id", "state", "attempts", "created (UTC)", "finished (UTC)", "error"],
         [(j["id"], j["state"], j["attempts"], t.when(j["created_at"]), t.when(j["finished_at"]), j["error"])
          for j in d.jobs]),
        ("Deliveries", ["id", "kind", "destination", "state", "attempts", "last error", "next attempt (UTC)",
                        "delivered (UTC)"],
         [(x["id"], x["kind"], x["destination"], x["state"], x["attempts"], x["last_error"],
           t.when(x["next_attempt_at"]) if x["state"] == "pending" else None, t.when(x["delivered_at"]))
          for x in d.deliveries]),
        ("Acknowledgements", ["by", "at (UTC)", "note", "revoked (UTC)", "revoked by"],
         [(a["by"], t.when(a["at"]), a["note"], t.when(a["revoked_at"]), a["revoked_by"])
          for a in d.acknowledgements])]
    for title, headers, rows in sections:
        out += ["", f"{title}: {len(rows)}"] + ([t.render(headers, rows, widths={0: 64}, indent="  ")] if rows else [])
    print("\n".join(out))
    return 0


def cmd_db_stats(args) -> int:
    from ..admin import queries, tables as t
    since, until = _day(args.since, "--from"), _day(args.until, "--to")
    if since and until and since > until:
        raise UsageError(f"--from {since} is after --to {until}")
    with _admin_session(args) as (positive, session):
        st = queries.statistics(session, positive_categories=positive, by=args.by, since=since, until=until)
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
        return 0

    def row(p):
        return (p.period, p.received, p.screened, p.skipped, p.failed, p.pending,
                *(p.by_result[r] for r in queries.RESULTS), p.positive, t.percent(p.positive_rate))
    headers = ["period", "received", "screened", "skipped", "failed", "pending", *map(t.result, queries.RESULTS),
               "positive", "positive rate"]
    print(f"Screenings received {st.since} to {st.until} (UTC), by {st.by}; positive: {', '.join(positive)}")
    print(t.render(headers, [row(p) for p in st.periods], footer=[row(st.totals)], right=range(1, len(headers))))
    for title, counts in (("not assessable, by reason (sites, latest reports)", st.not_assessable_reasons),
                          ("not screened (images), by reason", st.skip_reasons)):
        print(f"\n{title}:")
        print(t.render(["reason", "count"], sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])), right=[1],
                       widths={0: 60}, indent="  ") if counts else "  none")
    return 0


def cmd_db_worklist(args) -> int:
    from ..admin import queries, tables as t
    from ..store.models import utcnow
    with _admin_session(args) as (positive, session):
        items = queries.worklist(session, positive_categories=positive, include_acknowledged=args.all)
    now = utcnow()
    waiting = [None if s.reported_at is None else max(0, (now - s.reported_at).days) for s in items]
    if args.json:
        print(json.dumps([{**s.as_dict(), "days_waiting": w} for s, w in zip(items, waiting)], indent=2))
        return 0
    headers = ["patient ID", "name", "accession", "received (UTC)", "result", "lowest T", "days waiting"]
    rows = [[s.patient_id, s.patient_name, s.accession_number, t.when(s.received_at), t.result(s.result),
             t.t_score(s.lowest_t_score), w] for s, w in zip(items, waiting)]
    if args.all:
        headers.append("acknowledged")
        for r, s in zip(rows, items):
            r.append(t.yes(s.acknowledged))
    print(t.render(headers, rows, widths={1: 24}, right=[5, 6]))
    pending = sum(not s.acknowledged for s in items)
    print(f"{pending} positive screening{'s' if pending != 1 else ''} awaiting follow-up"
          + (f", {len(items) - pending} acknowledged" if args.all else "") + f" (positive: {', '.join(positive)})")
    return 0


def cmd_db_ack(args) -> int:
    from ..admin import queries
    if not 1 <= len(args.by) <= 64:
        raise UsageError("--by needs a user name of 1-64 characters")
    if args.revoke and args.note:
        raise UsageError("--note does not go with --revoke")
    with _admin_session(args) as (positive, session):
        study_uid = queries.find_study(session, args.key).study_uid
        if args.revoke:
            n = queries.revoke_acknowledgement(session, args.key, args.by)
            print(f"study {study_uid}: {n} acknowledgement{'s' if n != 1 else ''} revoked by {args.by}"
                  if n else f"study {study_uid}: no standing acknowledgement to revoke")
        else:
            try:
                queries.acknowledge(session, args.key, args.by, args.note, positive_categories=positive)
            except ValueError as exc:  # not positive, or acknowledged already
                raise UsageError(str(exc)) from None
            print(f"study {study_uid}: acknowledged by {args.by}")
    return 0


def cmd_db_export(args) -> int:
    import csv
    from ..admin import queries
    f = _filters(args)
    to_stdout = args.out == "-"
    try:
        stream = sys.stdout if to_stdout else open(args.out, "w", newline="", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    n = 0
    try:
        with _admin_session(args) as (positive, session):
            writer = csv.DictWriter(stream, fieldnames=queries.EXPORT_COLUMNS)
            writer.writeheader()
            for n, row in enumerate(queries.export_rows(session, f, positive_categories=positive), 1):
                writer.writerow(row)
    finally:
        if not to_stdout:
            stream.close()
    if not to_stdout:
        print(f"{n} screening{'s' if n != 1 else ''} written to {args.out}", file=sys.stderr)
    return 0


def cmd_resend(args) -> int:
    from ..dispatch.resend import NotFound, resend
    _, db = _database(args)
    try:
        with db.session() as session:
            result = resend(session, dead=args.dead, study_uid=args.study, delivery_id=args.delivery)
    except NotFound as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.dispose()
    extra = [f"{n} {what}" for n, what in ((result.already_queued, "already queued"),
                                           (result.skipped_purged, "skipped: outbox file removed by retention"))
             if n]
    print(f"{result.requeued} deliver{'y' if result.requeued == 1 else 'ies'} re-queued"
          + (f" ({'; '.join(extra)})" if extra else ""))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("db", help="database administration: schema migrations, screenings, statistics, "
                       "follow-up worklist, CSV export")
    db_sub = p.add_subparsers(dest="db_command", required=True)  # more `db` commands register here
    q = db_sub.add_parser("upgrade", help="migrate the database schema to the newest revision (a database made "
                          "before migrations existed is stamped first); serve/listen/work/dispatch do this on start")
    _db_flags(q)
    q.set_defaults(func=cmd_db_upgrade)

    q = db_sub.add_parser("list", help="screenings, newest received first, with their latest results")
    _db_flags(q)
    _filter_flags(q)
    q.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows (default 50; 0: all)")
    q.add_argument("--offset", type=int, default=0, metavar="N", help="skip the first N rows")
    q.add_argument("--json", action="store_true", help="one JSON object: total, limit, offset, items")
    q.set_defaults(func=cmd_db_list)

    q = db_sub.add_parser("show", help="one study: sites of each report, instances, jobs, deliveries, acknowledgements")
    _db_flags(q)
    q.add_argument("key", metavar="KEY", help="Study Instance UID, or an Accession Number naming one study")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_db_show)

    q = db_sub.add_parser("stats", help="counts per day or ISO week: received, screened, results, positive rate")
    _db_flags(q)
    q.add_argument("--by", choices=["day", "week"], default="week", help="period (default week)")
    q.add_argument("--from", dest="since", metavar="YYYY-MM-DD",
                   help="first day (UTC; default 13 days before --to, or the Monday 11 weeks before it)")
    q.add_argument("--to", dest="until", metavar="YYYY-MM-DD", help="last day (UTC; default today)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_db_stats)

    q = db_sub.add_parser("worklist", help="positive screenings awaiting follow-up, longest waiting first")
    _db_flags(q)
    q.add_argument("--all", action="store_true", help="include acknowledged positives")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_db_worklist)

    q = db_sub.add_parser("ack", help="acknowledge a study's result (it leaves the worklist), or --revoke that")
    _db_flags(q)
    q.add_argument("key", metavar="KEY", help="Study Instance UID, or an Accession Number naming one study")
    q.add_argument("--by", required=True, metavar="NAME", help="who acted on the result (1-64 characters)")
    q.add_argument("--note", metavar="TEXT", help="e.g. referred to DXA")
    q.add_argument("--revoke", action="store_true", help="withdraw the study's standing acknowledgements")
    q.set_defaults(func=cmd_db_ack)

    q = db_sub.add_parser("export", help="screenings as CSV, oldest first (one row per study, columns per site)")
    _db_flags(q)
    _filter_flags(q)
    q.add_argument("--out", default="-", metavar="FILE.csv", help="file to write (default -: standard output)")
    q.set_defaults(func=cmd_db_export)

    from .drift import add_db_parsers as add_monitor_parsers
    add_monitor_parsers(db_sub)
    from .outcomes import add_db_parsers as add_outcome_parsers
    add_outcome_parsers(db_sub)  # db outcomes, db performance

    p = sub.add_parser("resend", help="re-queue result deliveries: all dead ones, or those of a study or one delivery")
    _db_flags(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="every dead delivery (attempts reset)")
    which.add_argument("--study", metavar="UID", help="the dead and delivered deliveries of this Study Instance UID")
    which.add_argument("--delivery", metavar="ID", type=int, help="one dead or delivered delivery, by id")
    p.set_defaults(func=cmd_resend)

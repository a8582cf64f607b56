"""`osteoscreen db outcomes import|match|list` and `osteoscreen db performance`: DXA results as the
reference standard, and the node's realised performance against them (admin.outcomes, admin.performance).

Patient IDs are printed to the administrator's terminal (they are what the DXA file holds), never logged."""
from __future__ import annotations

import json

from .common import UsageError, _database, _day, _db_flags


def _who(args) -> str:
    if args.by:
        if len(args.by) > 64:
            raise UsageError("--by needs a user name of at most 64 characters")
        return args.by
    import getpass
    try:
        return getpass.getuser()[:64]
    except Exception:  # noqa: BLE001 - no user name in this environment
        return "cli"


def _problem_table(problems: list[dict]) -> str:
    from ..admin import tables as t
    rows = [(p.get("line"), p["patient_id"], p["dxa_date"], p.get("accession"), p["status"], p["candidates"],
             p["reason"]) for p in problems]
    return t.render(["line", "patient ID", "DXA date", "accession", "status", "candidates", "reason"], rows,
                    widths={6: 80}, right=[0, 5], indent="  ")


def cmd_import(args) -> int:
    from ..admin import outcomes
    try:
        rows = outcomes.read_file(args.file)
    except outcomes.OutcomeFileError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    settings, db = _database(args)
    try:
        with db.session() as session:
            summary = outcomes.import_rows(session, rows, match_days=settings.outcomes.match_days, by=_who(args),
                                           peer="cli")
    finally:
        db.dispose()
    if args.json:
        print(json.dumps({**summary.as_dict(), "match_days": settings.outcomes.match_days}, indent=2))
        return 0
    c, st = summary.counts, summary.stored
    updated = (f", {len(summary.updated)} updated (line{'s' if len(summary.updated) != 1 else ''} "
               f"{', '.join(map(str, summary.updated[:20]))}{' …' if len(summary.updated) > 20 else ''})"
               if summary.updated else "")
    print(f"{args.file}: {summary.rows} DXA result(s): {summary.created} new{updated}, {summary.unchanged} unchanged")
    print(f"this file: {c['matched']} matched, {c['unmatched']} unmatched, {c['ambiguous']} ambiguous "
          f"(a screened study dated at most {settings.outcomes.match_days} days before the DXA)")
    if summary.problems:
        print("not matched (never guessed; give the accession, or import again once the study has arrived):")
        print(_problem_table(summary.problems))
    print(f"stored (every import): {st.counts['matched']} matched, {st.counts['unmatched']} unmatched, "
          f"{st.counts['ambiguous']} ambiguous; {st.newly_matched} earlier row(s) newly matched, "
          f"{st.no_longer_matched} no longer matched")
    if summary.changed_nothing:
        print("unchanged: the database already held exactly this")
    return 0


def cmd_match(args) -> int:
    from ..admin import outcomes
    settings, db = _database(args)
    try:
        with db.session() as session:
            report = outcomes.rematch(session, settings.outcomes.match_days, by=_who(args), peer="cli")
    finally:
        db.dispose()
    if args.json:
        print(json.dumps({**report.as_dict(), "match_days": settings.outcomes.match_days}, indent=2))
        return 0
    c = report.counts
    print(f"outcomes: {c['matched']} matched, {c['unmatched']} unmatched, {c['ambiguous']} ambiguous "
          f"(window {settings.outcomes.match_days} days); {report.newly_matched} newly matched, "
          f"{report.no_longer_matched} no longer matched" + ("" if report.changed else "; unchanged"))
    return 0


def cmd_list(args) -> int:
    from ..admin import outcomes, tables as t
    _, db = _database(args)
    try:
        with db.session() as session:
            items = outcomes.list_outcomes(session, unmatched_only=args.unmatched)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    rows = [(o["patient_id"], o["dxa_date"], o["accession"], *(t.t_score(o[c]) for c in outcomes.T_SCORE_COLUMNS),
             o["status"], o["study_uid"] or o["reason"], o["line"]) for o in items]
    print(t.render(["patient ID", "DXA date", "accession", "L hip", "R hip", "L1-L4", "L neck", "R neck", "status",
                    "study / reason", "line"], rows, widths={9: 80}, right=[3, 4, 5, 6, 7, 10]))
    print(f"{len(items)} {'unmatched or ambiguous ' if args.unmatched else ''}DXA result(s)")
    return 0


def _fmt(value, ci=None, percent: bool = True) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.0f} %" if percent else f"{value:+.2f}"
    if ci:
        text += f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})"
    return text


def cmd_performance(args) -> int:
    from ..admin import performance, tables as t
    since, until = _day(args.since, "--since"), _day(args.until, "--until")
    settings, db = _database(args)
    try:
        with db.session() as session:
            report = performance.performance(session, positive_categories=settings.output.positive_categories,
                                             by=args.by, since=since, until=until, scanner=args.scanner)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    o = report["outcomes"]
    print(f"Realised performance against DXA (positive: {', '.join(report['positive_categories'])}; unit: "
          f"{report['unit']}); outcomes: {o['matched']} matched, {o['unmatched']} unmatched, "
          f"{o['ambiguous']} ambiguous")
    rows = [(g, k, f["n"], f["n_not_assessable"], _fmt(f["sensitivity"], f["sensitivity_ci"]),
             _fmt(f["specificity"], f["specificity_ci"]), _fmt(f["ppv"], f["ppv_ci"]), _fmt(f["npv"], f["npv_ci"]),
             _fmt(f["mae"], percent=False).lstrip("+"), _fmt(f["bias"], percent=False),
             _fmt(f["interval"]["coverage"]) if f["interval"] else "–")
            for g, k, f in performance.table_rows(report)]
    print(t.render(["group", "", "n", "not assessable", "sensitivity (95 % CI)", "specificity", "PPV", "NPV",
                    "T MAE", "T bias", "interval coverage"], rows, widths={1: 48}, right=range(2, 11)))
    print(f"bias: estimate − DXA; {report['femoral_neck']}")
    extra = [f"{report['n_without_estimate']} DXA site(s) the radiograph did not show",
             f"{report['n_later_dxa_set_aside']} later DXA result(s) of an already matched study set aside",
             f"{report['n_studies_removed']} matched study(ies) removed by retention"]
    print("not compared: " + "; ".join(extra))
    return 0


def add_db_parsers(db_sub) -> None:
    p = db_sub.add_parser("outcomes", help="DXA results (the reference standard): import a CSV, re-match, list")
    sub = p.add_subparsers(dest="outcomes_command", required=True)
    q = sub.add_parser("import", help="import DXA results from CSV (patient_id, dxa_date YYYY-MM-DD, T-score "
                       "columns, optional accession) and match each to the patient's screened study; one bad "
                       "row and nothing is imported (exit 2)")
    _db_flags(q)
    q.add_argument("file", metavar="FILE.csv")
    q.add_argument("--by", metavar="NAME", help="who imports (default: the login name); kept with the rows")
    q.add_argument("--json", action="store_true", help="the summary as JSON")
    q.set_defaults(func=cmd_import)
    q = sub.add_parser("match", help="re-match every stored DXA result (studies that arrived since, a changed "
                       "outcomes.match_days)")
    _db_flags(q)
    q.add_argument("--by", metavar="NAME", help="who (audit; default: the login name)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_match)
    q = sub.add_parser("list", help="the stored DXA results with their match")
    _db_flags(q)
    q.add_argument("--unmatched", action="store_true", help="only the unmatched and ambiguous ones")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_list)

    q = db_sub.add_parser("performance", help="realised performance against the matched DXA results: "
                          "sensitivity, specificity, PPV, NPV (Wilson CIs), T-score MAE and bias, interval "
                          "coverage; per scanner group and site type")
    _db_flags(q)
    q.add_argument("--by", choices=["month"], help="also per month of the DXA date")
    q.add_argument("--scanner", metavar="KEY", help="only study sites imaged by this scanner group "
                   "(Manufacturer|ModelName, as the findings record it)")
    q.add_argument("--since", metavar="YYYY-MM-DD", help="DXA date on or after")
    q.add_argument("--until", metavar="YYYY-MM-DD", help="DXA date on or before")
    q.add_argument("--json", action="store_true", help="n, sensitivity, specificity, ppv, npv (with _ci), mae, "
                   "bias, interval, … of the whole selection, and groups")
    q.set_defaults(func=cmd_performance)

"""`osteoscreen db drift`: the drift watch per scanner group (monitor.watch), from the terminal."""
from __future__ import annotations

import json

from .common import _database, _db_flags


def cmd_db_drift(args) -> int:
    from ..monitor import watch
    settings, db = _database(args)
    try:
        with db.session() as session:
            if args.history:
                checks = watch.history(session, args.history, limit=args.limit)
            else:
                if not args.no_check:
                    watch.check_all(session, settings.drift, list(settings.calibrations))
                checks = watch.latest_checks(session)
            rows = [watch.as_json(c) for c in checks]
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no scanner group has sent screening images yet")
        return 0
    width = max(len(r["scanner"]) for r in rows)
    print(f"{'scanner group':<{width}}  {'status':<17}  {'reference':>9}  {'recent':>6}  checked at           signals")
    for r in rows:
        d = r["details"]
        ref, rec = (d.get(w, {}).get("studies", 0) for w in ("reference", "recent"))
        moved = ", ".join(r["signals"]) or ("last image " + (d.get("last_received") or "never")
                                            if r["status"] == "silent" else "")
        print(f"{r['scanner']:<{width}}  {r['status']:<17}  {ref:>9}  {rec:>6}  {r['checked_at']}  {moved}")
    return 0


def add_db_parsers(db_sub) -> None:
    q = db_sub.add_parser("drift", help="the drift watch per scanner group: check now and print each group's "
                          "status (ok, drift naming the signals that moved, silent, insufficient data)")
    _db_flags(q)
    q.add_argument("--json", action="store_true", help="a list with one object per group: scanner, status, signals, "
                   "checked_at, details (windows, each signal's test)")
    q.add_argument("--no-check", action="store_true", help="print the latest stored checks without checking now")
    q.add_argument("--history", metavar="KEY", help="the stored checks of one group, oldest first")
    q.add_argument("--limit", type=int, default=200, help="with --history: the newest this many (default 200)")
    q.set_defaults(func=cmd_db_drift)

"""The node's roles (`serve`, `listen`, `work`, `dispatch`), `health` for container checks, and `demo`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .common import _database, _db_flags, _node_flags, _settings


def cmd_run_roles(args) -> int:
    settings = _settings(args)  # a config error must not wait for heavy imports
    from ..service import ROLES, Node, run_until_signal
    if args.command == "serve":
        roles = ROLES + (("web",) if settings.web.enabled else ())
    else:
        roles = (args.command,)
    run_until_signal(Node(settings, roles, receive_only=getattr(args, "receive_only", False)))
    return 0


def cmd_health(args) -> int:
    """Exit 0 when a process with the role wrote a heartbeat within --max-age (container health checks)."""
    import socket
    from ..store.heartbeat import alive
    settings, db = _database(args, migrate=False)
    try:
        with db.session() as session:
            found = alive(session, role=args.role, host=socket.gethostname()[:128] if args.this_host else None,
                          max_age=args.max_age)
    except Exception as exc:  # database away or schema behind: unhealthy, said in one line
        print(f"unhealthy: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    where = " on this host" if args.this_host else ""
    if not found:
        print(f"unhealthy: no {args.role} process{where} seen in the last {args.max_age:g} s", file=sys.stderr)
        return 1
    print(f"ok: {len(found)} {args.role} process(es){where}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo
    if not args.verbose:  # the demo prints its own story; node chatter only with -v
        logging.getLogger("osteoscreen").setLevel(logging.WARNING)
    return run_demo(Path(args.workdir))


def add_role_parsers(sub) -> None:
    for name, text in (("serve", "all roles in one process (listener, scheduler, worker, dispatcher)"),
                       ("listen", "the DICOM listener and the study-settle timer"),
                       ("work", "a worker: screens queued studies"),
                       ("dispatch", "the dispatcher: sends result objects")):  # `web`: below
        p = sub.add_parser(name, help=text)
        _node_flags(p)
        if name == "serve":
            p.add_argument("--http-port", type=int, help="the dashboard's HTTP port (web.port, default 8080)")
        if name == "listen":  # a child started by listen_processes > 1: receives only (no timers)
            p.add_argument("--receive-only", action="store_true", help=argparse.SUPPRESS)
        p.set_defaults(func=cmd_run_roles)


def add_health_demo_parsers(sub) -> None:
    p = sub.add_parser("health", help="exit 0 if a process with this role is alive (heartbeat in the database); "
                       "for container health checks")
    _db_flags(p)
    p.add_argument("--role", required=True, choices=["listen", "work", "dispatch", "web"])
    p.add_argument("--this-host", action="store_true", help="only count processes on this host (container)")
    p.add_argument("--max-age", type=float, default=30.0, help="seconds since the last heartbeat (default 30)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("demo", help="end-to-end demonstration on a fresh machine")
    p.add_argument("--workdir", default="demo-output", help="folder for the demo, emptied first (default ./demo-output)")
    p.set_defaults(func=cmd_demo)

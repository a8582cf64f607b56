"""Command line: one sub-command per role or tool. Exit codes: 0 ok, 1 runtime failure, 2 usage/config.

One module per command group, each adding its parsers: `roles` (serve, listen, work, dispatch, health,
demo), `tools` (synth, predict, score, train, evaluate; `calibrate`), `db` (db …, resend; `drift`,
`outcomes`), `web`; `common` holds what they share."""
from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..config import ConfigError
from . import db, roles, tools, web
from .common import UsageError

log = logging.getLogger("osteoscreen")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osteoscreen", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"osteoscreen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    roles.add_role_parsers(sub)
    tools.add_parsers(sub)
    db.add_parsers(sub)
    web.add_parsers(sub)
    roles.add_health_demo_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("highdicom", "pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # a skipped overlapping tick is normal
    try:
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"osteoscreen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 1
    except Exception as exc:  # runtime failure: one clear line; the traceback only with --verbose
        if args.verbose:
            log.exception("failed")
        print(f"osteoscreen: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

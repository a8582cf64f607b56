"""What the command modules share: the node and database flags, settings and the database they name,
dates, the screening filters, and UsageError (exit 2)."""
from __future__ import annotations

import argparse
import contextlib

from ..config import load, parse_destination


class UsageError(Exception):
    """A wrong invocation the user can fix (bad flag value, unknown study): exit 2, one line."""


def _node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.yaml (default: none; environment OSTEOSCREEN_* also applies)")
    p.add_argument("--port", type=int)
    p.add_argument("--ae-title")
    p.add_argument("--destination", action="append", metavar="AET@HOST:PORT|URL",
                   help="where results are sent (repeatable): AET@HOST:PORT[?tls] by C-STORE, or a "
                        "DICOMweb base URL by STOW-RS")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the storage folder)")
    p.add_argument("--storage", help="folder for spool, outbox and the SQLite database (default ./var)")


def _settings(args):
    overrides = {"port": args.port, "ae_title": args.ae_title, "database_url": args.database_url,
                 "storage": args.storage}
    if getattr(args, "http_port", None) is not None:
        overrides["web"] = {"port": args.http_port}
    if args.destination:
        overrides["destinations"] = [parse_destination(d) for d in args.destination]
    return load(args.config or None, overrides)


def _db_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.yaml (default: none; environment OSTEOSCREEN_* also applies)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the storage folder)")
    p.add_argument("--storage", help="folder holding the SQLite database (default ./var)")


def _database(args, migrate: bool = True):
    """Open the configured database; a URL SQLAlchemy cannot use is a usage error (exit 2)."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    from ..store.db import Database
    settings = load(args.config or None, {"database_url": args.database_url, "storage": args.storage})
    try:
        return settings, Database(settings.db_url, migrate=migrate)
    except (ArgumentError, NoSuchModuleError, ModuleNotFoundError) as exc:
        raise UsageError(f"database URL is not usable ({type(exc).__name__}: {exc}); expected e.g. "
                         "sqlite:///path/osteoscreen.db or postgresql+psycopg://user@host/dbname") from None


@contextlib.contextmanager
def _admin_session(args):
    """(positive categories, session) on the configured database; an unknown study is a usage error."""
    from ..admin.queries import NotFound
    settings, db = _database(args)
    try:
        with db.session() as session:
            yield settings.output.positive_categories, session
    except NotFound as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.dispose()


def _day(value: str | None, flag: str):
    from datetime import date
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: expected a date YYYY-MM-DD") from None


def _filter_flags(p: argparse.ArgumentParser) -> None:
    yn = ["yes", "no"]
    p.add_argument("--from", dest="since", metavar="YYYY-MM-DD", help="first received on or after (UTC)")
    p.add_argument("--to", dest="until", metavar="YYYY-MM-DD", help="first received on or before (UTC)")
    p.add_argument("--result", help="normal | osteopenia | osteoporosis | not_assessable (of --site, if given)")
    p.add_argument("--site", help="left_hip | right_hip | lumbar_spine: --result and --assessable look at this site")
    p.add_argument("--assessable", choices=yn, help="some site (or --site) assessable, or none")
    p.add_argument("--positive", choices=yn, help="result among output.positive_categories")
    p.add_argument("--acknowledged", choices=yn)
    p.add_argument("--status", help="receiving | queued | screened | skipped | failed")
    p.add_argument("--modality", metavar="M", help="an image of this modality (CR, DX)")
    p.add_argument("--calling-ae", metavar="AE")
    p.add_argument("--model-version", metavar="V", help="the latest report made by this model version")
    p.add_argument("--patient", metavar="ID_OR_ACCESSION", help="Patient ID or Accession Number, exactly")


def _filters(args):
    from ..admin.queries import Filters
    yn = {None: None, "yes": True, "no": False}
    f = Filters(since=_day(args.since, "--from"), until=_day(args.until, "--to"), result=args.result,
                site=args.site, assessable=yn[args.assessable], positive=yn[args.positive],
                acknowledged=yn[args.acknowledged], status=args.status, modality=args.modality,
                calling_ae=args.calling_ae, model_version=args.model_version, patient=args.patient)
    try:
        return f.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None

"""Command line: one sub-command per role or tool. Exit codes: 0 ok, 1 runtime failure, 2 usage/config."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError, Destination, load

log = logging.getLogger("osteoscreen")


class UsageError(Exception):
    """Bad arguments or input files: exit code 2 with a message, no traceback."""


def _node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.yaml (default: none; environment OSTEOSCREEN_* also applies)")
    p.add_argument("--port", type=int)
    p.add_argument("--ae-title")
    p.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                   help="where results are sent (repeatable)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the storage folder)")
    p.add_argument("--storage", help="folder for spool, outbox and the SQLite database (default ./var)")


def _settings(args):
    overrides = {"port": args.port, "ae_title": args.ae_title, "database_url": args.database_url,
                 "storage": args.storage}
    if args.destination:
        overrides["destinations"] = [Destination.parse(d) for d in args.destination]
    return load(args.config or None, overrides)


def cmd_run_roles(args) -> int:
    settings = _settings(args)  # a config error must not wait for heavy imports
    from .service import ROLES, Node, run_until_signal
    roles = ROLES if args.command == "serve" else (args.command,)
    run_until_signal(Node(settings, roles))
    return 0


def cmd_synth(args) -> int:
    from .synth import synthesize
    from .synth.profiles import PROFILES
    views = tuple(args.views.split(",")) if args.views else None
    profiles = tuple(args.profile.split(",")) if args.profile else None
    unknown = [p for p in profiles or () if p not in PROFILES]
    if unknown:
        raise UsageError(f"unknown scanner profile(s) {', '.join(unknown)}; known: {', '.join(PROFILES)}")
    for name in ("implant_rate", "foreign_body_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1")
    manifest = synthesize(args.kind, args.count, Path(args.out), seed=args.seed, views=views,
                          transfer_syntax=args.transfer_syntax, progress=not args.quiet, profiles=profiles,
                          implant_rate=args.implant_rate, foreign_body_rate=args.foreign_body_rate,
                          bone_masks=args.bone_masks)
    print(manifest)
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_files
    settings = load(args.config or None, {"model_path": args.model, "device": args.device})
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise UsageError(f"no such file: {', '.join(missing)}")
    for record in predict_files([Path(f) for f in args.files], settings, Path(args.out) if args.out else None):
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            sites = "; ".join(f"{s['site']}: {s['class'] or 'not assessable (' + str(s['reason']) + ')'}"
                              + (f" T≈{s['t_score']:+.1f}" if s["t_score"] is not None else "")
                              for s in record["sites"]) or f"not assessable ({record['reason']})"
            print(f"{record['file']}: {sites}")
    return 0


def cmd_train(args) -> int:
    from .training.train import TrainConfig, train
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      device=args.device, val_fraction=args.val_fraction, version=args.version,
                      tta=not args.no_tta, cam_guidance=args.cam_guidance,
                      cam_guidance_warmup=args.cam_guidance_warmup,
                      **({} if args.t_loss_weight is None else {"t_loss_weight": args.t_loss_weight}))
    if args.cam_guidance < 0:
        raise UsageError("--cam-guidance must be >= 0")
    if not 0 <= args.cam_guidance_warmup <= 1:
        raise UsageError("--cam-guidance-warmup must be between 0 and 1")
    holdout: dict[str, list[Path]] = {}
    for spec in args.holdout or []:  # NAME=CSV names a hold-out set; plain CSVs form the set "holdout"
        name, _, path = spec.rpartition("=") if "=" in spec else ("holdout", "", spec)
        holdout.setdefault(name or "holdout", []).append(Path(path))
    for m in [Path(m) for m in args.manifest] + [p for ps in holdout.values() for p in ps]:
        if not m.is_file():
            raise UsageError(f"no such manifest: {m}")
    ckpt = train([Path(m) for m in args.manifest], Path(args.out), cfg, resume=args.resume,
                 progress=not args.quiet, holdout=holdout)
    print(ckpt)
    return 0


def cmd_score(args) -> int:
    from .model.inference import LoadedModel
    from .training.score import score_manifests
    settings = load(args.config or None, {"model_path": args.model, "device": args.device})
    missing = [m for m in args.manifest if not Path(m).is_file()]
    if missing:
        raise UsageError(f"no such manifest: {', '.join(missing)}")
    model = LoadedModel(settings.model_path, settings.device, settings.model_threads)
    try:
        summary = score_manifests([Path(m) for m in args.manifest], model, Path(args.out), progress=not args.quiet)
    except (ValueError, KeyError) as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .training.evaluate import compare_csv, evaluate_csv, format_comparison, format_report
    for f in (args.predictions, args.compare):
        if f is not None and not Path(f).is_file():
            raise UsageError(f"no such file: {f}")
    plots = Path(args.plots) if args.plots else None
    try:
        if args.compare:
            report = compare_csv(Path(args.predictions), Path(args.compare), plots=plots)
        else:
            report = evaluate_csv(Path(args.predictions), plots=plots)
    except (ValueError, KeyError) as exc:
        names = args.predictions + (f" vs {args.compare}" if args.compare else "")
        raise UsageError(f"{names}: {exc}") from exc
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if "comparison" in report:
            print()
            print(format_comparison(report["comparison"]))
    return 0


def _db_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.yaml (default: none; environment OSTEOSCREEN_* also applies)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the storage folder)")
    p.add_argument("--storage", help="folder holding the SQLite database (default ./var)")


def _database(args, migrate: bool = True):
    """Open the configured database; a URL SQLAlchemy cannot use is a usage error (exit 2)."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    from .store.db import Database
    settings = load(args.config or None, {"database_url": args.database_url, "storage": args.storage})
    try:
        return settings, Database(settings.db_url, migrate=migrate)
    except (ArgumentError, NoSuchModuleError, ModuleNotFoundError) as exc:
        raise UsageError(f"database URL is not usable ({type(exc).__name__}: {exc}); expected e.g. "
                         "sqlite:///path/osteoscreen.db or postgresql+psycopg://user@host/dbname") from None


def cmd_db_upgrade(args) -> int:
    from .store.db import current_revision
    _, db = _database(args, migrate=True)  # Database() brings the schema to head (stamping a pre-Alembic one)
    try:
        with db.engine.connect() as conn:
            revision = current_revision(conn)
        print(f"database {db.engine.url.render_as_string(hide_password=True)} at schema revision {revision} (head)")
    finally:
        db.dispose()
    return 0


def cmd_resend(args) -> int:
    from .dispatch.resend import NotFound, resend
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


def cmd_demo(args) -> int:
    from .demo import run_demo
    if not args.verbose:  # the demo prints its own story; node chatter only with -v
        logging.getLogger("osteoscreen").setLevel(logging.WARNING)
    return run_demo(Path(args.workdir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osteoscreen", description=__doc__)
    parser.add_argument("--version", action="version", version=f"osteoscreen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "all roles in one process (listener, scheduler, worker, dispatcher)"),
                       ("listen", "the DICOM listener and the study-settle timer"),
                       ("work", "a worker: screens queued studies"),
                       ("dispatch", "the dispatcher: sends result objects")):
        p = sub.add_parser(name, help=text)
        _node_flags(p)
        p.set_defaults(func=cmd_run_roles)

    p = sub.add_parser("synth", help="write synthetic phantom radiographs with known T-scores")
    p.add_argument("--kind", required=True, choices=["hip", "lumbar", "chest"])
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", help="comma-separated views, e.g. ap,lat (lumbar default)")
    p.add_argument("--transfer-syntax", default="1.2.840.10008.1.2.1")
    p.add_argument("--profile", help="comma-separated scanner profiles to draw from (default: the training "
                   "profiles; name the held-out one to measure domain shift)")
    p.add_argument("--implant-rate", type=float, default=0.0, help="chance of metal at each site (0-1)")
    p.add_argument("--foreign-body-rate", type=float, default=0.0, help="chance of foreign bodies per image (0-1)")
    p.add_argument("--bone-masks", action="store_true",
                   help="also write each image's whole-bone mask (<image>_bone.png, manifest column bone_mask)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("score", help="run the node's pipeline over a manifest; one CSV row per study site "
                       "(for `evaluate`), gates and view fusion included")
    p.add_argument("--manifest", required=True, action="append", help="CSV of DICOM paths and truth (repeatable)")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("predict", help="score DICOM files offline")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per file and line")
    p.add_argument("--out", help="also write the SR and heatmap files here")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train", help="train a model from a manifest of DICOM files with T-scores")
    p.add_argument("--manifest", required=True, action="append", help="CSV of DICOM paths and T-scores (repeatable)")
    p.add_argument("--holdout", action="append", help="manifest of an independent hold-out set, or NAME=CSV for a named set "
                   "(repeatable; e.g. holdout_profile=held/manifest.csv)")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--cam-guidance", type=float, default=0.0,
                   help="weight of a penalty on Grad-CAM mass off bone, for crops whose manifest row names a "
                   "bone_mask (synth --bone-masks; 0: off)")
    p.add_argument("--cam-guidance-warmup", type=float, default=0.25,
                   help="share of the epochs over which the guidance weight ramps up from 0 (default 0.25)")
    p.add_argument("--t-loss-weight", type=float, help="weight of the T-score loss against the class loss "
                   "(default: TrainConfig's)")
    p.add_argument("--no-tta", action="store_true", help="score without test-time augmentation")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--version", default="0.3.0")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="screening metrics from a predictions CSV")
    p.add_argument("predictions")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plots", help="write ROC/calibration/Bland-Altman PNGs here")
    p.add_argument("--compare", metavar="B.csv",
                   help="a second predictions CSV of the same cases: paired DeLong test of the AUCs and the "
                        "paired difference in T-score MAE (rows pair by group,site[,site_type,view] if both files "
                        "have them, else by order); with --json under the key \"comparison\"")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("db", help="database administration (schema migrations)")
    db_sub = p.add_subparsers(dest="db_command", required=True)  # more `db` commands register here
    q = db_sub.add_parser("upgrade", help="migrate the database schema to the newest revision (a database made "
                          "before migrations existed is stamped first); serve/listen/work/dispatch do this on start")
    _db_flags(q)
    q.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("resend", help="re-queue result deliveries: all dead ones, or those of a study or one delivery")
    _db_flags(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="every dead delivery (attempts reset)")
    which.add_argument("--study", metavar="UID", help="the dead and delivered deliveries of this Study Instance UID")
    which.add_argument("--delivery", metavar="ID", type=int, help="one dead or delivered delivery, by id")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("demo", help="end-to-end demonstration on a fresh machine")
    p.add_argument("--workdir", default="demo-output", help="folder for the demo, emptied first (default ./demo-output)")
    p.set_defaults(func=cmd_demo)
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


if __name__ == "__main__":
    sys.exit(main())

"""`osteoscreen calibrate`: the command and its options (the fitting is training.calibrate's)."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import UsageError, _database, _day
from ..config import load


def cmd_calibrate(args) -> int:
    from ..training.calibrate import NotEnoughData, calibrate, format_calibration_report
    settings = load(args.config or None, {"model_path": args.model, "device": args.device})
    missing = [m for m in args.manifest if not Path(m).is_file()]
    if missing:
        raise UsageError(f"no such manifest: {', '.join(missing)}")
    manifests = [Path(m) for m in args.manifest]
    if args.from_node:
        manifests.append(_node_manifest(args))
    if not manifests:
        raise UsageError("calibrate needs --manifest CSV (repeatable) or --from-node --scanner KEY")
    if args.scanner:
        from ..model.calibration import CalibrationError, parse_scanner_key
        try:
            parse_scanner_key(args.scanner)
        except CalibrationError as exc:
            raise UsageError(str(exc)) from None
    level = settings.interval_level if args.level is None else args.level
    if args.embed:  # the model's own calibration, written into a copy of the checkpoint
        from ..training.calibrate import embed_own_calibration
        try:
            cal = embed_own_calibration(settings.model_path, manifests, Path(args.out),
                                        version=args.version, level=level, progress=not args.quiet, seed=args.seed)
        except NotEnoughData as exc:
            raise UsageError(f"not enough data: {exc}") from None
        print(format_calibration_report(cal))
        print(f"wrote {args.out}")
        return 0
    try:
        cal = calibrate(manifests, settings.model_path, scanner=args.scanner,
                        level=level,
                        batchnorm=args.batchnorm, batchnorm_prior=args.batchnorm_prior,
                        device="cuda" if settings.device == "cuda" else "cpu", progress=not args.quiet, seed=args.seed)
    except NotEnoughData as exc:
        raise UsageError(f"not enough data: {exc}") from None
    cal.save(args.out)
    print(format_calibration_report(cal))
    print(f"wrote {args.out}")
    return 0


def _node_manifest(args) -> Path:
    """The node's own images of --scanner (received since --since) as a manifest file beside --out."""
    import csv
    from ..admin.node_cases import scanner_rows
    from ..admin.outcomes import T_SCORE_COLUMNS
    from ..model.calibration import CalibrationError
    if not args.scanner:
        raise UsageError("--from-node needs --scanner KEY (Manufacturer|ModelName[|station=S][|serial=N])")
    since = _day(args.since, "--since")
    _, db = _database(args)
    try:
        with db.session() as session:
            rows, counts = scanner_rows(session, args.scanner, since)
    except CalibrationError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.dispose()
    print(f"node: {counts['matched']} of {counts['eligible']} eligible spooled images are from {args.scanner} "
          f"({counts['other_scanner']} other scanners, {counts['unreadable']} unreadable); "
          f"{counts['labelled_studies']} of their studies have a matched DXA outcome", file=sys.stderr)
    rows = _node_labels(rows, counts["labelled_studies"], alone=not args.manifest)
    path = Path(args.out).with_suffix(".node-manifest.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "kind", "view", "study_instance_uid", *T_SCORE_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    if not rows:
        raise UsageError(f"not enough data: the node holds no eligible images from {args.scanner}")
    return path


def _node_labels(rows: list[dict], labelled: int, alone: bool) -> list[dict]:
    """The node's rows as calibration rows: too few labelled studies for a supervised recalibration, and no
    --manifest to add more, and the DXA labels are left out (the rows still adapt, unlabelled)."""
    from ..admin.outcomes import T_SCORE_COLUMNS
    from ..training.calibrate import MIN_LABELLED_STUDIES
    if alone and 0 < labelled < MIN_LABELLED_STUDIES:
        print(f"node: {labelled} labelled studies are fewer than the {MIN_LABELLED_STUDIES} a supervised "
              "recalibration needs: their DXA T-scores are left out (unlabelled adaptation only)", file=sys.stderr)
        return [{k: v for k, v in r.items() if k not in T_SCORE_COLUMNS} for r in rows]
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a site calibration for one scanner (group) from its own images: "
                       "unlabelled rows adapt, rows with DXA T-scores recalibrate; prints the report")
    p.add_argument("--manifest", action="append", default=[], help="CSV in the train format; rows with and "
                   "without T-scores may be mixed (repeatable)")
    p.add_argument("--out", required=True, help="calibration file to write (JSON)")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--scanner", metavar="KEY", help="the scanner key it is for, Manufacturer|ModelName"
                   "[|station=S][|serial=N] (default: read from the images)")
    p.add_argument("--level", type=float, help="interval coverage (default interval_level, 0.9)")
    p.add_argument("--batchnorm", action="store_true", help="also re-estimate the BatchNorm statistics on the local "
                   "crops (measured in docs/CALIBRATION.md: no gain on synthD)")
    p.add_argument("--batchnorm-prior", type=float, default=16.0, help="the source statistics' weight in crops")
    p.add_argument("--from-node", action="store_true", help="add the node's own spooled images of --scanner "
                   "as rows (with the DXA T-scores of studies that have a matched outcome, `db outcomes import`); "
                   "with --database-url/--storage/--config")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="with --from-node: images received on or after this day")
    p.add_argument("--database-url", help="with --from-node: the node's database (default: SQLite in --storage)")
    p.add_argument("--storage", help="with --from-node: the node's storage folder (default ./var)")
    p.add_argument("--embed", action="store_true", help="fit the model's own calibration (any scanner; from "
                   "labelled cases of its training scanners) and write the checkpoint carrying it to --out")
    p.add_argument("--version", help="with --embed: the version of the written checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)

"""The offline model tools: `synth`, `predict`, `score`, `train`, `calibrate` (cli.calibrate) and
`evaluate`."""
from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError
from ..config import load


def cmd_synth(args) -> int:
    from ..synth import synthesize
    from ..synth.profiles import PROFILES
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
    from ..predict import predict_files
    settings = load(args.config or None, {"model_path": args.model, "device": args.device})
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise UsageError(f"no such file: {', '.join(missing)}")
    for record in predict_files([Path(f) for f in args.files], settings, Path(args.out) if args.out else None,
                                _calibration_file(args)):
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            sites = "; ".join(f"{s['site']}: {s['class'] or 'not assessable (' + str(s['reason']) + ')'}"
                              + (f" T≈{s['t_score']:+.1f}" if s["t_score"] is not None else "")
                              + (f" [{s['t_score_interval'][0]:+.1f}, {s['t_score_interval'][1]:+.1f}]"
                                 if s.get("t_score_interval") else "")
                              for s in record["sites"]) or f"not assessable ({record['reason']})"
            print(f"{record['file']}: {sites}")
    return 0


def cmd_train(args) -> int:
    from ..training.train import TrainConfig, train
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      device=args.device, val_fraction=args.val_fraction, version=args.version,
                      tta=not args.no_tta, cam_guidance=args.cam_guidance,
                      cam_guidance_warmup=args.cam_guidance_warmup, init=args.init, freeze=args.freeze,
                      **({} if args.t_loss_weight is None else {"t_loss_weight": args.t_loss_weight}))
    if args.cam_guidance < 0:
        raise UsageError("--cam-guidance must be >= 0")
    if args.init and not Path(args.init).is_file():
        raise UsageError(f"no such checkpoint: {args.init}")
    if args.freeze != "none" and not args.init:
        raise UsageError("--freeze needs --init CHECKPOINT (it fixes layers of a trained model)")
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


def _calibration_file(args) -> Path | None:
    if not getattr(args, "calibration", None):
        return None
    if not Path(args.calibration).is_file():
        raise UsageError(f"no such calibration file: {args.calibration}")
    return Path(args.calibration)


def cmd_score(args) -> int:
    from ..pipeline.dicom_io import set_jpeg2000_threads
    from ..scanners import models_from_settings
    from ..training.score import score_manifests
    settings = load(args.config or None, {"model_path": args.model, "device": args.device})
    missing = [m for m in args.manifest if not Path(m).is_file()]
    if missing:
        raise UsageError(f"no such manifest: {', '.join(missing)}")
    model = models_from_settings(settings, _calibration_file(args))
    set_jpeg2000_threads(settings.decode_threads)
    try:
        summary = score_manifests([Path(m) for m in args.manifest], model, Path(args.out), progress=not args.quiet)
    except (ValueError, KeyError) as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from ..training.evaluate import compare_csv, evaluate_csv
    from ..training.evaluate_text import format_comparison, format_report
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


def add_parsers(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic phantom radiographs with known T-scores")
    p.add_argument("--kind", required=True, choices=["hip", "lumbar", "chest", "leg"])
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
    p.add_argument("--calibration", metavar="FILE", help="apply this calibration (osteoscreen calibrate) to every image")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("predict", help="score DICOM files offline")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per file and line")
    p.add_argument("--out", help="also write the SR and heatmap files here")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--calibration", metavar="FILE", help="apply this calibration (osteoscreen calibrate) to every image")
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
    p.add_argument("--init", metavar="CHECKPOINT", help="fine-tune: start from this model's weights (e.g. the "
                   "shipped one) instead of from scratch; a lower --lr (e.g. 5e-4) suits it")
    p.add_argument("--freeze", default="none", choices=["none", "stem", "early", "backbone"],
                   help="with --init: layers kept fixed (early: up to the Grad-CAM map; backbone: all convolutions)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--version", default="0.3.0")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    from .calibrate import add_parser as add_calibrate_parser
    add_calibrate_parser(sub)

    p = sub.add_parser("evaluate", help="screening metrics from a predictions CSV")
    p.add_argument("predictions")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plots", help="write ROC/calibration/Bland-Altman PNGs here")
    p.add_argument("--compare", metavar="B.csv",
                   help="a second predictions CSV of the same cases: paired DeLong test of the AUCs and the "
                        "paired difference in T-score MAE (rows pair by group,site[,site_type,view] if both files "
                        "have them, else by order); with --json under the key \"comparison\"")
    p.set_defaults(func=cmd_evaluate)

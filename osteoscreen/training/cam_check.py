"""Does the model look at bone? Grad-CAM mass on the site's bone mask, measured on phantoms.

Phantom studies come from `synth.make_study`, which knows each site's bone (the whole femur for a
hip, the L1-L4 vertebral bodies for the lumbar spine) on the source grid. Each image goes through
the real pipeline (`screen_image` with heatmaps on, as the node runs it, but without the display's
fade at the crop border, so that the raw Grad-CAM is measured); the heatmap it returns
lives on the display grid (`display_scale` display pixels per source pixel), so the mask is brought
to that grid by area averaging (a soft mask: each display pixel's bone fraction).

Per site, inside the region the model saw (its crop square, clipped to the image; the heatmap is
zero elsewhere):

- cam_on_bone: the share of Grad-CAM mass on bone, sum(cam * mask) / sum(cam);
- chance: the bone fraction of the region, mean(mask), which is what cam_on_bone would be for a
  map that ignores anatomy (flat, or uniformly random);
- pointing hit: whether the CAM's peak lies on bone (mask >= 0.5); its chance rate is `chance` too.

    python -m osteoscreen.training.cam_check --model models/osteoscreen-v0.3.pt --studies 20 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..pipeline.crops import CONTEXT, SITE_TYPES, site_type
from ..pipeline.dicom_io import resample

KINDS = ("hip", "lumbar")  # hip: AP pelvis, both hips; lumbar: AP and lateral


def mask_to_grid(mask: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """A source-grid boolean mask on a grid with `scale` pixels per source pixel, as each pixel's
    bone fraction in [0, 1], padded or cut to `shape` the way the pipeline fits its heatmap."""
    m = np.asarray(mask, dtype=np.float32)
    if scale != 1.0:
        m = resample(m, scale)
    m = np.pad(m, [(0, max(0, a - b)) for a, b in zip(shape, m.shape)])[:shape[0], :shape[1]]
    return np.clip(m, 0.0, 1.0)


def crop_region(box: tuple[int, int, int, int], scale: float, shape: tuple[int, int],
                context: float = CONTEXT) -> tuple[int, int, int, int]:
    """The crop square the model saw for a site box (source pixels, exclusive ends) on a grid
    with `scale` pixels per source pixel, clipped to the image: (row0, col0, row1, col1).

    Mirrors `pipeline.crops.square_crop`: a square of side context * max(height, width) centred on
    the box."""
    r0, c0, r1, c1 = (v * scale for v in box)
    side = max(r1 - r0, c1 - c0) * context
    top, left = (r0 + r1) / 2 - side / 2, (c0 + c1) / 2 - side / 2
    rows, cols = shape
    return (max(0, int(round(top))), max(0, int(round(left))),
            min(rows, int(round(top + side))), min(cols, int(round(left + side))))


def bone_fractions(heatmap: np.ndarray, mask: np.ndarray, region: tuple[int, int, int, int]) -> dict:
    """CAM mass on bone, the region's bone fraction (chance level) and the pointing-game hit for one
    site. heatmap and mask (bone fraction per pixel, or bool) share one grid; region is
    (row0, col0, row1, col1) on it. cam_on_bone and pointing_hit are None where the CAM is empty."""
    r0, c0, r1, c1 = region
    h = np.asarray(heatmap, dtype=np.float64)[r0:r1, c0:c1]
    m = np.asarray(mask, dtype=np.float64)[r0:r1, c0:c1]
    if h.size == 0:
        raise ValueError(f"empty region {region}")
    h = np.clip(h, 0.0, None)
    chance = float(m.mean())
    mass = float(h.sum())
    if mass <= 0:
        return {"cam_on_bone": None, "chance": chance, "pointing_hit": None, "region_pixels": int(h.size)}
    peak = np.unravel_index(int(np.argmax(h)), h.shape)
    return {"cam_on_bone": float((h * m).sum() / mass), "chance": chance,
            "pointing_hit": bool(m[peak] >= 0.5), "region_pixels": int(h.size)}


def _iou(a, b) -> float:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def site_records(image, result) -> list[dict]:
    """One record per expected site of one screened phantom image (`SynthImage`, `ImageResult`)."""
    out = []
    for finding in result.sites:
        truth = image.sites.get(finding.site)
        rec = {"site": finding.site, "view": image.view, "site_type": SITE_TYPES[site_type(finding.site, image.view)],
               "assessable": bool(finding.assessable), "reason": finding.reason}
        if truth is not None and finding.box is not None:
            rec["box_iou"] = _iou(finding.box, truth.box)
        if finding.assessable and truth is not None and truth.mask is not None and result.heatmap is not None:
            shape = result.heatmap.shape
            mask = mask_to_grid(truth.mask, result.display_scale, shape)
            region = crop_region(finding.box, result.display_scale, shape)
            rec.update(bone_fractions(result.heatmap, mask, region))
            if getattr(image, "bone_mask", None) is not None:  # every bone in the crop, not only the site's
                anyb = bone_fractions(result.heatmap, mask_to_grid(image.bone_mask, result.display_scale, shape), region)
                rec.update({f"{k}_any_bone": v for k, v in anyb.items() if k != "region_pixels"})
        out.append(rec)
    return out


def _stats(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "median": None}
    return {"mean": float(v.mean()), "median": float(np.median(v))}


def summarise(records: list[dict]) -> dict:
    out = {}
    for st in SITE_TYPES:
        rs = [r for r in records if r["site_type"] == st]
        if not rs:
            continue
        measured = [r for r in rs if r.get("cam_on_bone") is not None]
        hits = [r["pointing_hit"] for r in measured]
        out[st] = {
            "n_sites": len(rs),
            "n_measured": len(measured),
            "n_not_assessable": sum(not r["assessable"] for r in rs),
            "n_empty_cam": sum(r["assessable"] and "chance" in r and r.get("cam_on_bone") is None for r in rs),
            "cam_on_bone": _stats(r["cam_on_bone"] for r in measured),
            "chance": _stats(r["chance"] for r in measured),
            "lift": _stats(r["cam_on_bone"] / r["chance"] if r["chance"] > 0 else None for r in measured),
            "pointing_hit_rate": float(np.mean(hits)) if hits else None,
            "box_iou": _stats(r.get("box_iou") for r in rs),
        }
        anyb = [r for r in measured if r.get("cam_on_bone_any_bone") is not None]
        if anyb:
            out[st]["any_bone"] = {
                "cam_on_bone": _stats(r["cam_on_bone_any_bone"] for r in anyb),
                "chance": _stats(r["chance_any_bone"] for r in anyb),
                "share_of_sites_with_most_mass_on_bone": float(np.mean([r["cam_on_bone_any_bone"] > 0.5 for r in anyb])),
                "pointing_hit_rate": float(np.mean([r["pointing_hit_any_bone"] for r in anyb]))}
    return out


def cam_on_bone(model_path: Path | str, n_studies: int = 20, seed: int = 0, progress: bool = True,
                device: str = "cpu", kinds: tuple[str, ...] = KINDS) -> dict:
    """Screen `n_studies` phantom studies of each kind and measure where Grad-CAM points.

    Returns {"model", "model_version", "seed", "n_studies_per_kind", "site_types": {hip | lumbar_ap |
    lumbar_lat: {"cam_on_bone", "chance", "lift": {"mean","median"}, "pointing_hit_rate", counts…}},
    "sites": [per-site records]}."""
    from tqdm import tqdm

    from ..model.inference import LoadedModel
    from ..pipeline.screen import screen_image
    from ..synth import make_study

    model = LoadedModel(model_path, device)
    records = []
    for k, kind in enumerate(kinds):
        for i in tqdm(range(n_studies), desc=f"CAM on bone, {kind}", unit="study", disable=not progress,
                      file=sys.stderr):
            for image in make_study(kind, np.random.default_rng([seed, k, i]), patient_index=i + 1):
                result = screen_image(image.dataset, kind, image.view, model, heatmaps=True, feather=0.0)
                for rec in site_records(image, result):
                    rec["study"] = f"{kind}-{i}"
                    records.append(rec)
    return {"model": str(model_path), "model_version": model.info.version, "seed": seed,
            "n_studies_per_kind": n_studies, "grid": "display", "mask": "area fraction per display pixel",
            "site_types": summarise(records), "sites": records}


def format_summary(report: dict) -> str:
    def f(v):
        return "  n/a" if v is None else f"{v:5.3f}"

    lines = [f"Grad-CAM on bone: {report['model']} (v{report['model_version']}), "
             f"{report['n_studies_per_kind']} phantom studies per kind, seed {report['seed']}",
             f"{'site type':<12}{'sites':>6}{'meas.':>6}  {'on bone mean/median':<20}{'chance mean/median':<20}"
             f"{'lift':>6}{'pointing':>9}{'box IoU':>8}"]
    for st, s in report["site_types"].items():
        lines.append(f"{st:<12}{s['n_sites']:>6}{s['n_measured']:>6}  "
                     f"{f(s['cam_on_bone']['mean'])} / {f(s['cam_on_bone']['median']):<11}"
                     f"{f(s['chance']['mean'])} / {f(s['chance']['median']):<11}"
                     f"{f(s['lift']['mean']):>6}{f(s['pointing_hit_rate']):>9}{f(s['box_iou']['mean']):>8}")
    lines.append("on bone: share of CAM mass on the site's bone inside its crop square; chance: the bone "
                 "share of that square; pointing: CAM peak on bone")
    rows = [(st, s["any_bone"]) for st, s in report["site_types"].items() if "any_bone" in s]
    if rows:
        lines.append(f"{'any bone':<12}{'on bone mean/median':<22}{'chance mean':<13}{'sites >50 %':>12}{'pointing':>9}")
        for st, a in rows:
            lines.append(f"{st:<12}{f(a['cam_on_bone']['mean'])} / {f(a['cam_on_bone']['median']):<13}"
                         f"{f(a['chance']['mean']):<13}{f(a['share_of_sites_with_most_mass_on_bone']):>12}"
                         f"{f(a['pointing_hit_rate']):>9}")
        lines.append("any bone: the same against every bone in the crop (femur, pelvis, vertebrae with their "
                     "posterior elements), the phantom's whole-bone mask")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..config import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m osteoscreen.training.cam_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint (default: the shipped model)")
    p.add_argument("--studies", type=int, default=20, help="phantom studies per kind (hip, lumbar)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print the whole report, per-site records included, as JSON")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"cam_check: error: no such model: {args.model}", file=sys.stderr)
        return 2
    if args.studies < 1:
        print("cam_check: error: --studies must be >= 1", file=sys.stderr)
        return 2
    report = cam_on_bone(args.model, n_studies=args.studies, seed=args.seed, progress=not args.quiet,
                         device=args.device)
    print(json.dumps(report, indent=2) if args.json else format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`osteoscreen score`: run the node's pipeline over a manifest of studies and write one row per
study site, in the format `osteoscreen evaluate` reads.

Where `train` reports on site crops, this measures what a radiologist would receive: every gate
(anatomy, localisation, metal, out of distribution) and the AP + lateral fusion are applied, and a
site the node refuses is written with its reason instead of a class. `evaluate` then scores the
assessable rows and counts the rest, so "how often does the node decline, and why" and "how good
is it when it answers" come from the same run.

Rows: group (study), site, site_type (hip | lumbar_ap | lumbar_lat | lumbar_fused), file(s),
assessable, reason, true_class, predicted_class, p_<class>, true_t_score, predicted_t_score, the
femoral-neck pair where known, implant (truth, when the manifest has it).
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
from pydicom import dcmread
from tqdm import tqdm

from ..config import Routing
from ..findings import CLASSES, SiteFinding, who_category
from ..model.inference import LoadedModel
from ..node.routing import classify
from ..pipeline.screen import EXPECTED_SITES, StudyImage, screen_study

COLUMNS = ["group", "site", "site_type", "files", "assessable", "reason", "true_class", "predicted_class",
           "p_normal", "p_osteopenia", "p_osteoporosis", "true_t_score", "predicted_t_score",
           "true_femoral_neck_t_score", "predicted_femoral_neck_t_score", "implant",
           "t_score_low", "t_score_high", "interval_level", "calibration"]


def _studies(manifest: Path) -> list[list[dict]]:
    """Manifest rows grouped by study, in order of first appearance."""
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{manifest} must be a CSV with a 'path' column")
    base = manifest.resolve().parent
    groups: dict[str, list[dict]] = {}
    for row in rows:
        row = dict(row)
        row["path"] = str(Path(row["path"]) if Path(row["path"]).is_absolute() else base / row["path"])
        groups.setdefault(row.get("study_instance_uid") or row["path"], []).append(row)
    return list(groups.values())


def _site_type(finding: SiteFinding, views: dict[str, str]) -> str:
    if finding.site != "lumbar_spine":
        return "hip"
    if finding.fused_with:
        return "lumbar_fused"
    return f"lumbar_{views.get(finding.source_sop_instance_uid, 'ap')}"


def _row(group: str, site: str, rows: list[dict], findings: list[SiteFinding], views: dict[str, str]) -> dict:
    """The study's answer for one site: the (fused) assessable estimate, else the first refusal."""
    truth = next((r for r in rows if (r.get(f"{site}_t_score") or "").strip()), rows[0])
    t = (truth.get(f"{site}_t_score") or "").strip()
    out = dict.fromkeys(COLUMNS, "")
    out.update(group=group, site=site, true_class=who_category(float(t)) if t else "", true_t_score=t,
               true_femoral_neck_t_score=(truth.get(f"{site}_neck_t_score") or "").strip(),
               implant=(truth.get(f"{site}_implant") or "").strip())
    chosen = next((f for f in findings if f.assessable), findings[0] if findings else None)
    if chosen is None:
        out.update(assessable=0, reason="not_in_study", site_type="")
        return out
    out.update(site_type=_site_type(chosen, views), assessable=int(chosen.assessable), reason=chosen.reason or "",
               files=";".join(Path(r["path"]).name for r in rows))
    if chosen.assessable:
        out.update(predicted_class=chosen.category, predicted_t_score=f"{chosen.t_score:.3f}",
                   **{f"p_{c}": f"{chosen.probabilities[c]:.5f}" for c in CLASSES})
        if chosen.t_score_interval is not None:
            out.update(t_score_low=f"{chosen.t_score_interval[0]:.3f}", t_score_high=f"{chosen.t_score_interval[1]:.3f}",
                       interval_level=chosen.interval_level)
        out["calibration"] = (chosen.calibration or {}).get("id", "")
        neck = (chosen.regions or {}).get("femoral_neck")
        out["predicted_femoral_neck_t_score"] = "" if neck is None else f"{neck:.3f}"
    return out


def score_manifests(manifests: list[Path], model: LoadedModel, out: Path, progress: bool = True) -> dict:
    """Screen every study of the manifests, write `out` (CSV, COLUMNS) and return a summary."""
    written = []
    studies = [study for manifest in manifests for study in _studies(manifest)]
    for rows in tqdm(studies, desc="scoring studies", unit="study", disable=not progress):
        images, views = [], {}
        for row in rows:
            ds = dcmread(row["path"])
            kind, view = (row.get("kind") or "").strip(), (row.get("view") or "").strip()
            if kind not in EXPECTED_SITES or view not in ("ap", "lat"):
                decision = classify(ds, Routing())
                kind, view = decision.region, decision.view
            if kind in EXPECTED_SITES:
                images.append(StudyImage(ds, kind, view))
                views[str(ds.SOPInstanceUID)] = view
        results = screen_study(images, model, heatmaps=False) if images else []
        sites = sorted({s for im in images for s in EXPECTED_SITES[im.region]})
        group = rows[0].get("study_instance_uid") or rows[0]["path"]
        for site in sites:
            findings = [f for r in results for f in r.sites if f.site == site]
            written.append(_row(group, site, rows, findings, views))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(written)
    return summarise(written)


def summarise(rows: list[dict]) -> dict:
    """Refusals by reason, for sites without metal (should be rare) and with metal (should be all)."""
    clean = [r for r in rows if r["implant"] in ("", "0")]
    metal = [r for r in rows if r["implant"] not in ("", "0")]
    refused = [r for r in clean if str(r["assessable"]) == "0"]
    return {"sites": len(rows), "clean_sites": len(clean),
            "clean_not_assessable_rate": len(refused) / max(1, len(clean)),
            "clean_not_assessable_reasons": dict(Counter(r["reason"] for r in refused)),
            "metal_sites": len(metal),
            "metal_refused_rate": (float(np.mean([r["reason"] == "metal_implant" for r in metal])) if metal else None),
            "by_site_type": dict(Counter(r["site_type"] for r in rows if str(r["assessable"]) == "1"))}

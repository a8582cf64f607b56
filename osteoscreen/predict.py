"""Offline scoring of DICOM files (`osteoscreen predict`): the worker's pipeline without the node."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from .config import Settings
from .findings import REASON_NOT_SCREENING_IMAGE, REASON_UNREADABLE_PIXELS
from .node.routing import classify
from .pipeline.dicom_io import set_jpeg2000_threads
from .pipeline.screen import StudyImage, screen_study
from .reports.heatmap import build_heatmap
from .reports.sr import build_sr
from .scanners import models_from_settings


def _record(path: Path, sop_uid: str | None, assessable: bool, reason: str | None, sites=(), detail=None) -> dict:
    record = {"file": str(path), "sop_instance_uid": sop_uid, "assessable": assessable, "reason": reason,
              "sites": [s.to_json() for s in sites]}
    if detail:
        record["detail"] = detail
    return record


def predict_files(paths: list[Path], settings: Settings, out: Path | None = None,
                  calibration: Path | None = None) -> Iterator[dict]:
    model = models_from_settings(settings, calibration)
    set_jpeg2000_threads(settings.decode_threads)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            yield _record(path, None, False, REASON_UNREADABLE_PIXELS, detail=f"not readable as DICOM: {exc}")
            continue
        decision = classify(ds, settings.routing)
        sop_uid = str(ds.get("SOPInstanceUID", "")) or None
        if not decision.eligible:
            yield _record(path, sop_uid, False, REASON_NOT_SCREENING_IMAGE, detail=decision.reason)
            continue
        result = screen_study([StudyImage(ds, decision.region, decision.view)], model,
                              heatmaps=out is not None)[0]
        if out is not None:
            stem = path.stem
            build_sr([ds], result.sites, model.info).save_as(out / f"{stem}.sr.dcm", enforce_file_format=True)
            if result.display is not None:
                build_heatmap(ds, result.display, result.heatmap, result.sites, model.info,
                              display_scale=result.display_scale).save_as(out / f"{stem}.heatmap.dcm",
                                                                          enforce_file_format=True)
        yield _record(path, sop_uid, result.assessable, result.reason, result.sites)

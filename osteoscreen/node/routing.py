"""Routing rules: which received instances are screening candidates, and which region and view.

Everything is accepted by the listener; these rules only decide whether the worker looks at it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..config import Routing

# Radiograph storage classes a screening image can arrive as (PS3.4 B.5).
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
}


@dataclass
class Decision:
    eligible: bool
    region: str | None  # hip | lumbar
    view: str | None  # ap | lat
    reason: str | None  # why not eligible


def _text(ds: Dataset, *keywords: str) -> str:
    parts = []
    for kw in keywords:
        value = ds.get(kw)
        if value:
            parts.append(str(value))
    return " ".join(parts).upper()


def _region(ds: Dataset, rules: Routing) -> str | None:
    described = _text(ds, "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName",
                      "RequestedProcedureDescription", "PerformedProcedureStepDescription")
    # Lumbar first: "LUMBAR SPINE AND PELVIS" protocols exist, but BodyPartExamined decides when set.
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    for region, words in (("lumbar", rules.lumbar_keywords), ("hip", rules.hip_keywords)):
        if body_part and any(w in body_part for w in words):
            return region
    for region, words in (("lumbar", rules.lumbar_keywords), ("hip", rules.hip_keywords)):
        if any(w in described for w in words):
            return region
    return None


def _view(ds: Dataset, rules: Routing) -> str | None:
    position = str(ds.get("ViewPosition", "")).upper().strip()
    if position in rules.ap_views:
        return "ap"
    if position in rules.lateral_views:
        return "lat"
    described = _text(ds, "ViewName", "SeriesDescription", "ProtocolName")
    tokens = set(described.replace("/", " ").replace("-", " ").split())
    if tokens & {"LAT", "LATERAL", "LL", "RL"}:
        return "lat"
    if tokens & {"AP", "PA", "FRONTAL"}:
        return "ap"
    return None


def classify(ds: Dataset, rules: Routing) -> Decision:
    """Decide from the header whether an instance is a screening candidate. The pixels decide later
    whether it is assessable: a header never makes an image assessable on its own."""
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        name = sop_class.name if sop_class.is_valid else "unknown SOP class"
        return Decision(False, None, None, f"not a radiograph storage class ({name})")
    modality = str(ds.get("Modality", "")).upper()
    if modality not in [m.upper() for m in rules.modalities]:
        return Decision(False, None, None, f"modality {modality or 'missing'} not routed")
    region = _region(ds, rules)
    if region is None:
        part = str(ds.get("BodyPartExamined", "")) or "not stated"
        return Decision(False, None, None, f"body part not hip, pelvis or lumbar spine (BodyPartExamined: {part})")
    view = _view(ds, rules)
    if view is None:
        return Decision(False, region, None, "view not AP or lateral")
    if region == "hip" and view != "ap":
        return Decision(False, region, view, "hip screening needs an AP view")
    return Decision(True, region, view, None)

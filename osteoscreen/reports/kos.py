"""The Key Object Selection document that flags a study's positive images (TID 2010).

Made only when at least one assessable site falls in a positive category (osteoporosis by default),
so that a PACS worklist or viewer shows the study as having key images. Content::

    Of Interest (DCM 113000, CID 7010)
      observer context: the algorithm as device observer (TID 1002, the SR's device UID)
      Key Object Description (TEXT): one line per positive site, then the disclaimer
      the source images with a positive site (IMAGE), then the osteoscreen SR of this report
      (COMPOSITE), so that a viewer opening the key objects finds the report

Patient and study come from the first source image, as in the SR; UIDs are derived from the study,
the model version, the sources and the predecessor SR, so building again from the same inputs gives
the same SeriesInstanceUID and SOPInstanceUID.
"""
from __future__ import annotations

from collections.abc import Iterable

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes as dicom_codes

from ..findings import SITES, ModelInfo, SiteFinding, worst_site
from . import codes
from .sr import algorithm_equipment, copy_character_set, site_label, source_header
from .uids import derived_uid

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
LINE_BREAK = "\r\n"  # between the lines of the Key Object Description (UT allows CR and LF)


def positive_findings(findings: Iterable[SiteFinding],
                      positive_categories: Iterable[str] = ("osteoporosis",)) -> list[SiteFinding]:
    """The assessable findings whose category is one of `positive_categories`."""
    wanted = set(positive_categories)
    return [f for f in findings if f.assessable and f.category in wanted]


def description(positives: list[SiteFinding]) -> str:
    """Key Object Description: one line per positive site (its worst finding), then the disclaimer."""
    lines = []
    for site in SITES:
        worst = worst_site([f for f in positives if f.site == site])
        if worst is None:
            continue
        t_score = "" if worst.t_score is None else f", estimated T-score {worst.t_score:+.1f}"
        fused = f" (one estimate from {1 + len(worst.fused_with)} views combined)" if worst.fused_with else ""
        lines.append(f"{site_label(site)}: {worst.category}{t_score}{fused}")
    return LINE_BREAK.join([*lines, codes.DISCLAIMER])


def _device_observer(model: ModelInfo, manufacturer: str) -> hd.sr.ObserverContext:
    """TID 1002 with the algorithm as device observer (the same device UID as in the SR)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(model.name, "device-observer"), name="osteoscreen",
        manufacturer_name=manufacturer, model_name=model.name)
    return hd.sr.ObserverContext(observer_type=dicom_codes.cid270.Device,
                                 observer_identifying_attributes=device)


def build_kos(sources: list[pydicom.Dataset], findings: list[SiteFinding], model: ModelInfo, *,
              positive_categories: Iterable[str] = ("osteoporosis",), series_number: int = 9903,
              series_description: str = "osteoscreen positive findings", instance_number: int = 1,
              manufacturer: str = "osteoscreen", institution_name: str | None = None,
              predecessor_sr_uid: str | None = None,
              sr: pydicom.Dataset | None = None) -> pydicom.Dataset | None:
    """The Key Object Selection document of the screened `sources` of one study, or None when no
    assessable finding is in `positive_categories` (see the module docstring for its content).

    `sr`: the osteoscreen SR of the same report, referenced so that the key objects lead to it.
    `predecessor_sr_uid`: the SR this report supersedes (as for build_sr); it changes the UIDs.
    """
    if not sources:
        raise ValueError("build_kos needs at least one source image")
    positives = positive_findings(findings, positive_categories)
    if not positives:
        return None
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    flagged = {f.source_sop_instance_uid for f in positives}
    missing = sorted(flagged - by_uid.keys())
    if missing:
        raise ValueError(f"positive findings refer to images not among the sources: {missing}")
    study_uid = str(sources[0].StudyInstanceUID)
    if sr is not None and str(sr.StudyInstanceUID) != study_uid:
        raise ValueError("the SR to reference belongs to another study")
    # Source order; headers only (no pixel data is needed to reference an image).
    selected = [source_header(ds) for uid, ds in by_uid.items() if uid in flagged]
    referenced = selected + ([sr] if sr is not None else [])
    header = source_header(sources[0])
    source_uids = sorted(by_uid)
    kos = hd.ko.KeyObjectSelectionDocument(
        # highdicom takes patient and study from evidence[0]; the first source's header replaces
        # them below, so that they come from the same image as in the SR and heatmaps.
        evidence=referenced,
        content=hd.ko.KeyObjectSelection(
            document_title=codes.OF_INTEREST,
            referenced_objects=referenced,
            observer_device_context=_device_observer(model, manufacturer),
            description=description(positives)),
        series_instance_uid=derived_uid(study_uid, "kos-series", model.version),
        series_number=series_number,
        sop_instance_uid=derived_uid(study_uid, "kos", model.version, *source_uids, predecessor_sr_uid or ""),
        instance_number=instance_number,
        manufacturer=manufacturer,
        institution_name=institution_name,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=series_description,
        contributing_equipment=[algorithm_equipment(model, manufacturer)],
        specific_character_set=None,
    )
    copy_character_set(kos, header)
    kos.copy_patient_and_study_information(header)
    return kos

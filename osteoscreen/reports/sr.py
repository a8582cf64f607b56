"""The bone-density report: a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Content tree (IHE AI Results as the guide)::

    Imaging Measurement Report (TID 1500)
      language, device observer (TID 1004: the algorithm), procedure reported (LN 43468-8)
      Imaging Measurements
        Measurement Group (TID 1501), one per site of each source image
          tracking identifier = site key ("left_hip"), tracking UID (source SOP UID + site)
          finding site (+ laterality), algorithm identification (TID 4019)
          Estimated T-score (derivation SCT "Estimated"), Probability of <class> x 3
          Estimated T-score with finding site Neck of femur (SCT 29627003)   [hips, when estimated]
          Bone density category (WHO) = SCT Normal/Osteopenia/Osteoporosis   [assessable sites]
          Reason not assessable = private reason code                     [not assessable sites]
          Source of Measurement = the source image, then every other image whose estimate of
                                  the site was fused into this one (lumbar AP + lateral)
      Qualitative Evaluations (UMLS C0034375)     study level
        Worst-site bone density category, Study summary (TEXT), Use limitation (TEXT)
"""
from __future__ import annotations

from copy import deepcopy

import highdicom as hd
import pydicom
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.valuerep import DA, TM

from ..findings import CLASSES, ModelInfo, SiteFinding, one_decimal, worst_site
from . import codes
from .uids import derived_uid

# Type 2 Patient/Study attributes that highdicom reads from the first source.
_TYPE2_HEADER = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                 "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_DATE_TIME = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}


def source_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of `ds` without pixels whose Type 2 patient/study attributes are present and valid.

    Sources from the field may omit empty Type 2 attributes or carry values highdicom rejects
    (Patient's Sex "U", malformed dates); those become empty rather than failing the report.
    """
    header = pydicom.Dataset()
    for element in ds:
        if element.keyword != "PixelData":
            header.add(deepcopy(element))
    for keyword in _TYPE2_HEADER:
        header.setdefault(keyword, "")
    if header.PatientSex not in ("M", "F", "O"):
        header.PatientSex = ""
    for keyword, vr_class in _DATE_TIME.items():
        try:
            vr_class(header[keyword].value)
        except ValueError:
            header[keyword].value = ""
    return header


def copy_character_set(target: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Copy Specific Character Set verbatim (highdicom rejects valid values such as ['', 'ISO 2022 IR 87'])."""
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet


def site_label(site: str) -> str:
    """Human-readable site name ("left hip")."""
    return site.replace("_", " ")


def algorithm_equipment(model: ModelInfo, manufacturer: str) -> hd.ContributingEquipment:
    """Contributing Equipment item naming the algorithm (DCM 109102 Processing Equipment)."""
    return hd.ContributingEquipment(
        manufacturer=manufacturer, purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name, software_versions=model.version,
        contribution_description=f"Bone density estimation by {model.name} {model.version} "
                                 f"(sha256:{model.checksum}); {codes.DISCLAIMER}")


def calibration_text(finding: SiteFinding) -> str:
    """Which calibration produced an estimate: "calibration:<id>", or "calibration:none"."""
    return f"calibration:{finding.calibration['id']}" if finding.calibration else "calibration:none"


def _algorithm(model: ModelInfo, manufacturer: str, finding: SiteFinding) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the model, with the calibration as a parameter."""
    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=[f"sha256:{model.checksum}", calibration_text(finding)],
        family=codes.ARTIFICIAL_INTELLIGENCE, manufacturer=manufacturer)


def _interval_properties(finding: SiteFinding, value: float) -> hd.sr.MeasurementProperties | None:
    """TID 310 properties of the estimated T-score: its prediction interval as offsets above and
    below the reported value, and the interval's coverage."""
    if finding.t_score_interval is None:
        return None
    low, high = (one_decimal(v) for v in finding.t_score_interval)
    properties = hd.sr.MeasurementProperties(upper_measurement_uncertainty=one_decimal(max(0.0, high - value)),
                                             lower_measurement_uncertainty=one_decimal(max(0.0, value - low)))
    properties.append(hd.sr.NumContentItem(name=codes.INTERVAL_LEVEL, value=float(finding.interval_level),
                                           unit=codes.NO_UNITS, relationship_type=RelationshipTypeValues.HAS_PROPERTIES))
    return properties


def _observation_context(model: ModelInfo, manufacturer: str) -> hd.sr.ObservationContext:
    """TID 1001 with the algorithm as device observer."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(model.name, "device-observer"), name="osteoscreen",
        manufacturer_name=manufacturer, model_name=model.name)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=dicom_codes.cid270.Device,
        observer_identifying_attributes=device))


def _measurements(finding: SiteFinding) -> list[hd.sr.Measurement]:
    """Estimated T-score and class probabilities, where the finding has them."""
    out = []
    if finding.t_score is not None:  # to one decimal, as DXA reports it
        value = one_decimal(finding.t_score)
        out.append(hd.sr.Measurement(name=codes.ESTIMATED_T_SCORE, value=value, unit=codes.T_SCORE_UNIT,
                                     derivation=codes.ESTIMATED, properties=_interval_properties(finding, value)))
    _, laterality = codes.SITE_ANATOMY[finding.site]
    for region, value in (finding.regions or {}).items():
        if region in codes.REGION_ANATOMY and value is not None:  # e.g. femoral neck within the hip
            out.append(hd.sr.Measurement(
                name=codes.ESTIMATED_T_SCORE, value=one_decimal(value), unit=codes.T_SCORE_UNIT, derivation=codes.ESTIMATED,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.REGION_ANATOMY[region], laterality=laterality)]))
    probabilities = finding.probabilities or {}
    for cls in CLASSES:
        if cls in probabilities:
            out.append(hd.sr.Measurement(name=codes.PROBABILITY_CODES[cls],
                                         value=float(probabilities[cls]), unit=codes.NO_UNITS))
    return out


def _evaluation(finding: SiteFinding) -> hd.sr.QualitativeEvaluation | None:
    """The WHO category of an assessable site, or the reason a site is not assessable."""
    if not finding.assessable:
        value = codes.reason_code(finding.reason) if finding.reason else codes.NOT_ASSESSABLE
        return hd.sr.QualitativeEvaluation(codes.NOT_ASSESSABLE_REASON, value)
    if finding.category is not None:
        return hd.sr.QualitativeEvaluation(codes.BONE_DENSITY_CATEGORY, codes.CATEGORY_CODES[finding.category])
    return None


def _site_group(finding: SiteFinding, model: ModelInfo, manufacturer: str,
                sop_classes: dict[str, str]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 measurement group for one site of one source image. A fused estimate names every
    image it came from as a Source of Measurement (the group's own image first)."""
    anatomy, laterality = codes.SITE_ANATOMY[finding.site]
    evaluation = _evaluation(finding)
    sources = [(finding.source_sop_class_uid, finding.source_sop_instance_uid)]
    sources += [(sop_classes[uid], uid) for uid in finding.fused_with if uid in sop_classes]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(finding.source_sop_instance_uid, finding.site, "tracking"),
            identifier=finding.site),
        finding_sites=[hd.sr.FindingSite(anatomic_location=anatomy, laterality=laterality)],
        algorithm_id=_algorithm(model, manufacturer, finding),
        measurements=_measurements(finding),
        qualitative_evaluations=[evaluation] if evaluation is not None else None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(referenced_sop_class_uid=sop_class,
                                                            referenced_sop_instance_uid=uid)
                       for sop_class, uid in sources])


def study_summary(findings: list[SiteFinding]) -> str:
    """One line for the study: its worst site, or that no site could be assessed."""
    worst = worst_site(findings)
    if worst is None:
        return "No site could be assessed."
    t_score = "" if worst.t_score is None else f", estimated T-score {worst.t_score:+.1f}"
    if worst.t_score_interval is not None:
        low, high = worst.t_score_interval
        t_score += f" ({100 * worst.interval_level:.0f} % interval {low:+.1f} to {high:+.1f})"
    fused = sorted({site_label(f.site) for f in findings if f.assessable and f.fused_with})
    views = f" {', '.join(fused)}: one estimate from several views combined." if fused else ""
    return f"Worst site: {site_label(worst.site)}, {worst.category}{t_score}.{views}"


def calibration_summary(findings: list[SiteFinding]) -> str:
    """Which site calibrations produced the study's estimates (id, date, cases), or that none did."""
    used = {f.calibration["id"]: f.calibration for f in findings if f.assessable and f.calibration}
    parts = [f"{c['id']} for {c.get('scanner') or 'this scanner'} ({str(c.get('created', ''))[:10]}; "
             f"{c.get('n_labelled', 0)} DXA-labelled and {c.get('n_unlabelled', 0)} unlabelled studies)"
             for c in used.values()]
    if parts:
        return "Site calibration: " + "; ".join(parts) + "."
    return ("No site calibration for this scanner: estimates and intervals come from the model's own "
            "validation data (synthetic phantoms of its training scanners).")


def _study_evaluations(findings: list[SiteFinding], model: ModelInfo) -> ContainerContentItem:
    """TID 1500 Qualitative Evaluations container: worst-site category, summary, use limitation."""
    worst = worst_site(findings)
    container = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        CodeContentItem(name=codes.STUDY_CATEGORY,
                        value=codes.CATEGORY_CODES[worst.category] if worst else codes.NOT_ASSESSABLE,
                        relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=codes.STUDY_SUMMARY, value=study_summary(findings),
                        relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=codes.USE_LIMITATION, value=f"{codes.DISCLAIMER}. {model.description}",
                        relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=codes.CALIBRATION, value=calibration_summary(findings),
                        relationship_type=RelationshipTypeValues.CONTAINS),
    ])
    return container


def _report(findings: list[SiteFinding], model: ModelInfo, manufacturer: str,
            sop_classes: dict[str, str]) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree."""
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model, manufacturer),
        procedure_reported=codes.PROCEDURE_XR,
        imaging_measurements=[_site_group(f, model, manufacturer, sop_classes) for f in findings])
    report[0].ContentSequence.append(_study_evaluations(findings, model))
    return report


def build_sr(sources: list[pydicom.Dataset], findings: list[SiteFinding], model: ModelInfo, *,
             series_number: int = 9901, series_description: str = "osteoscreen bone density SR",
             instance_number: int = 1, predecessor: pydicom.Dataset | None = None,
             manufacturer: str = "osteoscreen", institution_name: str | None = None) -> pydicom.Dataset:
    """The SR for the screened `sources` of one study (see the module docstring for its content).

    UIDs are derived from the study, the model version, the sources and the predecessor, so
    building again from the same inputs gives the same SeriesInstanceUID and SOPInstanceUID.
    `predecessor` is an earlier SR of this study that this one supersedes.
    """
    if not sources:
        raise ValueError("build_sr needs at least one source image")
    if not findings:
        raise ValueError("build_sr needs at least one finding")
    study_uid = str(sources[0].StudyInstanceUID)
    source_uids = sorted(str(ds.SOPInstanceUID) for ds in sources)
    predecessor_uid = str(predecessor.SOPInstanceUID) if predecessor is not None else ""
    header = source_header(sources[0])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[header, *sources[1:]],
        content=_report(findings, model, manufacturer,
                        {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in sources}),
        series_instance_uid=derived_uid(study_uid, "sr-series", model.version),
        series_number=series_number,
        sop_instance_uid=derived_uid(study_uid, model.version, *source_uids, predecessor_uid),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=series_description,
        institution_name=institution_name,
        is_complete=True,
        is_verified=False,
        performed_procedure_codes=[codes.PROCEDURE_XR],
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[algorithm_equipment(model, manufacturer)],
        coding_schemes=[codes.coding_scheme_identification()],
        specific_character_set=None,
    )
    copy_character_set(sr, header)
    return sr

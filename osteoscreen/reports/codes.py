"""Coded concepts written into osteoscreen's result objects.

Standard codes (checked against pydicom 3.0's PS3.16 concept dictionary unless noted):

- SCT 17621005 "Normal" (CID 222 and others); SCT 312894000 "Osteopenia" and SCT 64859006
  "Osteoporosis" (SNOMED CT disorder/finding concepts; not in any DICOM CID, so not in pydicom's
  dictionary) — the bone-density categories.
- SCT 310651003 "Proximal Femur" (CID 7304/8134), SCT 122496007 "Lumbar spine" (CID 4);
  laterality SCT 7771000 "Left", SCT 24028007 "Right" (CID 244).
- LN 43468-8 "XR unspecified body region" (CID 100 Quantitative Diagnostic Imaging Procedures) — the
  procedure reported; the anatomy is carried by the finding sites.
- SCT 414135002 "Estimated" (derivation of the T-score), DCM 123110 "Artificial Intelligence"
  (CID 7162, algorithm family), DCM 109102 "Processing Equipment" (CID 7005: equipment that processed
  instances to create new ones), DCM 121322 "Source image for image processing operation" (CID 7202).
- UMLS C0034375 "Qualitative Evaluations": the TID 1500 container for study-level evaluations (as
  used by DCMTK's TID 1500 implementation, libcmr).
- DCM 113000 "Of Interest" (CID 7010 Key Object Selection Document Title): the title of the Key
  Object Selection document flagging the images with a positive site (its Key Object Description,
  DCM 113012, is added by highdicom).
- SCT 371886008 "+, range of upper measurement uncertainty" and SCT 371885007 "-, range of lower
  measurement uncertainty" (TID 310 Measurement Properties, as highdicom writes them): the
  prediction interval of an estimated T-score as offsets above and below the value; its coverage
  is the private PI-LEVEL property beside them.
- UCUM "1" "no units" (CID 7181) for probabilities in [0, 1]; UCUM "{T-score}" (a UCUM annotation,
  dimensionless) for the estimated T-score.

Private coding scheme ``99OSTEOSCREEN`` (version 1, declared in every SR's Coding Scheme
Identification Sequence) for concepts that have no standard code:

====================  =====================================================================
Code value            Meaning
====================  =====================================================================
BMD-CATEGORY          Bone density category (WHO) — concept name; value an SCT category
T-SCORE-EST           Estimated T-score — from a radiograph, not a DXA measurement
P-NORMAL etc.         Probability of normal bone density / osteopenia / osteoporosis
NA-REASON             Reason not assessable — concept name; value one of the reason codes
SITE-NOT-FOUND …      One code per reason in ``findings.REASON_TEXT`` (see ``REASON_CODES``)
STUDY-CATEGORY        Worst-site bone density category — study-level summary
NOT-ASSESSABLE        Not assessable — study-level value when no site could be assessed
STUDY-SUMMARY         Study summary (TEXT)
PI-LEVEL              Prediction interval coverage (NUM, property of an estimated T-score)
CALIBRATION           Calibration (TEXT): which site calibration produced the estimates, or none
USE-LIMITATION        Use limitation (TEXT): synthetic-phantom training, not for diagnostic use
====================  =====================================================================
"""
from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

from ..findings import (
    REASON_IMPLANT,
    REASON_LOW_LOCALISATION_CONFIDENCE,
    REASON_NOT_SCREENING_IMAGE,
    REASON_OUT_OF_DISTRIBUTION,
    REASON_SCANNER_NOT_CALIBRATED,
    REASON_SITE_NOT_FOUND,
    REASON_TEXT,
    REASON_UNREADABLE_PIXELS,
    REASON_UNSUPPORTED_VIEW,
)

PRIVATE_SCHEME = "99OSTEOSCREEN"
PRIVATE_SCHEME_VERSION = "1"


def _private(value: str, meaning: str) -> Code:
    """A code of the private 99OSTEOSCREEN scheme."""
    return Code(value, PRIVATE_SCHEME, meaning)


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item that declares the private scheme."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="osteoscreen private codes",
        version=PRIVATE_SCHEME_VERSION,
        responsible_organization="osteoscreen open-source project",
    )


# Standard codes
PROCEDURE_XR = Code("43468-8", "LN", "XR unspecified body region")
PROXIMAL_FEMUR = Code("310651003", "SCT", "Proximal Femur")
FEMORAL_NECK = Code("29627003", "SCT", "Neck of femur")
# DXA reporting regions a site's measurement group may add (the site's own estimate is total hip).
REGION_ANATOMY = {"femoral_neck": FEMORAL_NECK}
LUMBAR_SPINE = Code("122496007", "SCT", "Lumbar spine")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
ESTIMATED = Code("414135002", "SCT", "Estimated")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
SOURCE_IMAGE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
NO_UNITS = Code("1", "UCUM", "no units")
OF_INTEREST = Code("113000", "DCM", "Of Interest")  # Key Object Selection document title
T_SCORE_UNIT = Code("{T-score}", "UCUM", "T-score")

CATEGORY_CODES = {
    "normal": Code("17621005", "SCT", "Normal"),
    "osteopenia": Code("312894000", "SCT", "Osteopenia"),
    "osteoporosis": Code("64859006", "SCT", "Osteoporosis"),
}

# site -> (anatomic location, laterality or None)
SITE_ANATOMY = {
    "left_hip": (PROXIMAL_FEMUR, LEFT),
    "right_hip": (PROXIMAL_FEMUR, RIGHT),
    "lumbar_spine": (LUMBAR_SPINE, None),
}

# Private codes
BONE_DENSITY_CATEGORY = _private("BMD-CATEGORY", "Bone density category (WHO)")
ESTIMATED_T_SCORE = _private("T-SCORE-EST", "Estimated T-score")
PROBABILITY_CODES = {
    "normal": _private("P-NORMAL", "Probability of normal bone density"),
    "osteopenia": _private("P-OSTEOPENIA", "Probability of osteopenia"),
    "osteoporosis": _private("P-OSTEOPOROSIS", "Probability of osteoporosis"),
}
NOT_ASSESSABLE_REASON = _private("NA-REASON", "Reason not assessable")
REASON_CODES = {
    reason: _private(value, REASON_TEXT[reason].capitalize())
    for reason, value in (
        (REASON_SITE_NOT_FOUND, "SITE-NOT-FOUND"),
        (REASON_LOW_LOCALISATION_CONFIDENCE, "LOW-LOC-CONF"),
        (REASON_UNSUPPORTED_VIEW, "UNSUPPORTED-VIEW"),
        (REASON_UNREADABLE_PIXELS, "UNREADABLE-PIXEL"),
        (REASON_NOT_SCREENING_IMAGE, "NOT-SCREENING"),
        (REASON_IMPLANT, "METAL-IMPLANT"),
        (REASON_OUT_OF_DISTRIBUTION, "OUT-OF-DISTRIB"),
        (REASON_SCANNER_NOT_CALIBRATED, "NOT-CALIBRATED"),
    )
}
STUDY_CATEGORY = _private("STUDY-CATEGORY", "Worst-site bone density category")
NOT_ASSESSABLE = _private("NOT-ASSESSABLE", "Not assessable")
STUDY_SUMMARY = _private("STUDY-SUMMARY", "Study summary")
USE_LIMITATION = _private("USE-LIMITATION", "Use limitation")
INTERVAL_LEVEL = _private("PI-LEVEL", "Prediction interval coverage")
CALIBRATION = _private("CALIBRATION", "Calibration")
UPPER_UNCERTAINTY = Code("371886008", "SCT", "+, range of upper measurement uncertainty")
LOWER_UNCERTAINTY = Code("371885007", "SCT", "-, range of lower measurement uncertainty")

# The statement every result object carries as text (SR and burned into the heatmap).
DISCLAIMER = "Synthetic-phantom research model - NOT FOR DIAGNOSTIC USE"


def reason_code(reason: str) -> Code:
    """The private code of a not-assessable reason; ValueError for a reason outside the vocabulary."""
    try:
        return REASON_CODES[reason]
    except KeyError:
        raise ValueError(f"no code for not-assessable reason {reason!r}; add it to REASON_CODES") from None

"""Read osteoscreen's own SR (see ``sr.py``) back into SiteFindings."""
from __future__ import annotations

import pydicom
from pydicom.sr.coding import Code

from ..findings import SiteFinding
from . import codes

_IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
_MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")
_TRACKING_IDENTIFIER = Code("112039", "DCM", "Tracking Identifier")
_FINDING_SITE = Code("363698007", "SCT", "Finding Site")
_ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
_REGION_BY_CODE = {(c.scheme_designator, c.value): region for region, c in codes.REGION_ANATOMY.items()}

_CATEGORY_BY_CODE = {(c.scheme_designator, c.value): cls for cls, c in codes.CATEGORY_CODES.items()}
_REASON_BY_CODE = {(c.scheme_designator, c.value): reason for reason, c in codes.REASON_CODES.items()}


def _key(code_item: pydicom.Dataset) -> tuple[str, str]:
    """(scheme, value) of a code sequence item."""
    value = code_item.get("CodeValue") or code_item.get("LongCodeValue") or code_item.get("URNCodeValue")
    return str(code_item.CodingSchemeDesignator), str(value)


def _is(item: pydicom.Dataset, code: Code) -> bool:
    """Whether a content item's concept name is `code`."""
    names = item.get("ConceptNameCodeSequence")
    return bool(names) and _key(names[0]) == (code.scheme_designator, code.value)


def _children(item: pydicom.Dataset, code: Code) -> list[pydicom.Dataset]:
    """Direct child content items named `code`."""
    return [child for child in item.get("ContentSequence", []) if _is(child, code)]


def _descendants(item: pydicom.Dataset, code: Code) -> list[pydicom.Dataset]:
    """Content items named `code` anywhere below `item`."""
    found = []
    for child in item.get("ContentSequence", []):
        if _is(child, code):
            found.append(child)
        found += _descendants(child, code)
    return found


def _number(item: pydicom.Dataset) -> float:
    """Value of a NUM content item, preferring the exact FloatingPointValue."""
    measured = item.MeasuredValueSequence[0]
    value = measured.get("FloatingPointValue")
    return float(value if value is not None else measured.NumericValue)


def _code_value(item: pydicom.Dataset) -> tuple[str, str]:
    """(scheme, value) of a CODE content item's value."""
    return _key(item.ConceptCodeSequence[0])


def _finding(group: pydicom.Dataset) -> SiteFinding:
    """One measurement group back into a SiteFinding."""
    site = str(_children(group, _TRACKING_IDENTIFIER)[0].TextValue)
    images = [child.ReferencedSOPSequence[0] for child in group.ContentSequence if child.ValueType == "IMAGE"]
    reference = images[0]  # the group's own image; any further ones were fused into its estimate
    finding = SiteFinding(site=site, source_sop_instance_uid=str(reference.ReferencedSOPInstanceUID),
                          source_sop_class_uid=str(reference.ReferencedSOPClassUID), assessable=True,
                          fused_with=[str(other.ReferencedSOPInstanceUID) for other in images[1:]])
    for item in _children(group, codes.BONE_DENSITY_CATEGORY):
        finding.category = _CATEGORY_BY_CODE[_code_value(item)]
    for item in _children(group, codes.NOT_ASSESSABLE_REASON):
        finding.assessable = False
        finding.reason = _REASON_BY_CODE.get(_code_value(item))
    for item in _children(group, codes.ESTIMATED_T_SCORE):
        sites = _children(item, _FINDING_SITE)  # a measurement of a region within the site names it
        region = _REGION_BY_CODE.get(_code_value(sites[0])) if sites else None
        if region is None:
            finding.t_score = _number(item)
            upper, lower = _children(item, codes.UPPER_UNCERTAINTY), _children(item, codes.LOWER_UNCERTAINTY)
            if upper and lower:
                finding.t_score_interval = (round(finding.t_score - _number(lower[0]), 1),
                                            round(finding.t_score + _number(upper[0]), 1))
                level = _children(item, codes.INTERVAL_LEVEL)
                finding.interval_level = _number(level[0]) if level else None
        else:
            finding.regions = {**(finding.regions or {}), region: _number(item)}
    if finding.regions and finding.t_score is not None and finding.site.endswith("_hip"):
        finding.regions = {"total_hip": finding.t_score, **finding.regions}
    for item in _descendants(group, _ALGORITHM_PARAMETERS):
        name, _, value = str(item.TextValue).partition(":")
        if name == "calibration" and value != "none":
            finding.calibration = {"id": value}
    probabilities = {cls: _number(items[0]) for cls, code in codes.PROBABILITY_CODES.items()
                     if (items := _children(group, code))}
    finding.probabilities = probabilities or None
    return finding


def read_sr(ds: pydicom.Dataset) -> list[SiteFinding]:
    """The site findings of an osteoscreen SR, in document order (boxes are not stored)."""
    groups = [group
              for container in _children(ds, _IMAGING_MEASUREMENTS)
              for group in _children(container, _MEASUREMENT_GROUP)]
    return [_finding(group) for group in groups]

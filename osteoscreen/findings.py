"""The vocabulary every stage shares: sites, WHO categories, and the finding records.

This module sits at the bottom of the import graph: pipeline, model, reports and store all use it,
and it imports nothing from the project.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SITES = ("left_hip", "right_hip", "lumbar_spine")
CLASSES = ("normal", "osteopenia", "osteoporosis")

# Reasons a site or an image is "not assessable"; machine-readable, stored and written into the SR.
REASON_SITE_NOT_FOUND = "site_not_found"
REASON_LOW_LOCALISATION_CONFIDENCE = "low_localisation_confidence"
REASON_UNSUPPORTED_VIEW = "unsupported_view"
REASON_UNREADABLE_PIXELS = "unreadable_pixels"
REASON_NOT_SCREENING_IMAGE = "not_screening_image"
REASON_IMPLANT = "metal_implant"
REASON_OUT_OF_DISTRIBUTION = "out_of_distribution"
REASON_SCANNER_NOT_CALIBRATED = "scanner_not_calibrated"

REASON_TEXT = {
    REASON_SITE_NOT_FOUND: "site not found in the image",
    REASON_LOW_LOCALISATION_CONFIDENCE: "site located with low confidence",
    REASON_UNSUPPORTED_VIEW: "view not supported for this site",
    REASON_UNREADABLE_PIXELS: "pixel data could not be decoded",
    REASON_NOT_SCREENING_IMAGE: "not a hip, pelvis or lumbar-spine radiograph",
    REASON_IMPLANT: "metal implant in the site",
    REASON_OUT_OF_DISTRIBUTION: "image unlike the training data",
    REASON_SCANNER_NOT_CALIBRATED: "no calibration for this scanner",
}


def one_decimal(value: float | None) -> float | None:
    """T-scores are reported to one decimal, as DXA reports them (never "-0.0")."""
    return None if value is None else round(float(value), 1) + 0.0


def who_category(t_score: float) -> str:
    """WHO band of a DXA T-score: normal >= -1.0, osteoporosis <= -2.5, osteopenia between."""
    if t_score >= -1.0:
        return "normal"
    if t_score <= -2.5:
        return "osteoporosis"
    return "osteopenia"


def severity(category: str | None) -> int:
    """Order categories so that the study finding is the worst site (-1 for not assessable)."""
    return -1 if category is None else CLASSES.index(category)


@dataclass
class SiteLocation:
    """Where a site lies in the source image, in source pixel coordinates (rows, columns)."""

    site: str
    box: tuple[int, int, int, int]  # row0, col0, row1, col1 (exclusive ends)
    confidence: float
    method: str = "atlas"  # "unet" (learned localiser) or "atlas" (classical fallback)


@dataclass
class SiteFinding:
    """The model's answer for one site of one source image."""

    site: str
    source_sop_instance_uid: str
    source_sop_class_uid: str
    assessable: bool
    category: str | None = None
    probabilities: dict[str, float] | None = None
    t_score: float | None = None
    reason: str | None = None
    box: tuple[int, int, int, int] | None = None
    confidence: float | None = None
    # DXA reporting regions within the site, estimated T-score each (hips: "total_hip", which is the
    # site's t_score, and "femoral_neck"); None where the model reports none.
    regions: dict[str, float] | None = None
    # Other source images whose estimate of the same site was fused into this one (lumbar AP + lateral).
    fused_with: list[str] = field(default_factory=list)
    # Prediction interval of t_score at interval_level (split-conformal); None where the calibration
    # has too few cases of this site type for that level, or there is no calibration.
    t_score_interval: tuple[float, float] | None = None
    interval_level: float | None = None
    # The calibration that produced the estimate (model.calibration.Calibration.summary()), None if none.
    calibration: dict | None = None
    # Out-of-distribution distance over the gate's threshold (> 1: refused); None where not scored.
    ood_score: float | None = None

    def to_json(self) -> dict:
        out = {
            "site": self.site,
            "class": self.category,
            "probabilities": self.probabilities,
            "t_score": one_decimal(self.t_score),
            "t_score_interval": (None if self.t_score_interval is None
                                 else [one_decimal(v) for v in self.t_score_interval]),
            "interval_level": self.interval_level,
            "assessable": self.assessable,
            "reason": self.reason,
            "calibration": None if self.calibration is None else self.calibration.get("id"),
        }
        if self.regions:
            out["regions"] = {k: one_decimal(v) for k, v in self.regions.items()}
        if self.fused_with:
            out["fused_with"] = list(self.fused_with)
        return out


@dataclass
class ImageResult:
    """Everything the pipeline learned from one source image."""

    sop_instance_uid: str
    sop_class_uid: str
    assessable: bool
    reason: str | None = None
    sites: list[SiteFinding] = field(default_factory=list)
    # Display-ready radiograph (float32 in [0, 1], bone bright) and the Grad-CAM map on the same grid,
    # kept for the heatmap Secondary Capture; not persisted.
    display: object | None = None
    heatmap: object | None = None
    display_scale: float = 1.0  # display pixels per source pixel


@dataclass
class ModelInfo:
    """Identity of the algorithm, written into every result object (TID 4019)."""

    name: str
    version: str
    checksum: str  # sha256 of the checkpoint file
    description: str = (
        "Research model trained only on synthetic phantoms; not validated on patients; "
        "not for diagnostic use."
    )


def worst_site(findings: list[SiteFinding]) -> SiteFinding | None:
    """The study-level finding: the assessable site with the worst category, lowest T-score first."""
    scored = [f for f in findings if f.assessable and f.category is not None]
    if not scored:
        return None
    return max(scored, key=lambda f: (severity(f.category), -(f.t_score if f.t_score is not None else 0.0)))

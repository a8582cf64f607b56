"""The heatmap: an RGB Secondary Capture of the radiograph with the Grad-CAM overlay and the result.

Layout: the display-sized radiograph in grey, the Grad-CAM map blended in colour (jet colormap)
where it exceeds ``HEAT_FLOOR``, each site box outlined in its category colour with a small site tag,
and below the image a black text band (so that text never hides anatomy) with one line per site,
the model name/version/checksum and the not-for-diagnostic-use statement.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from ..findings import REASON_TEXT, SITES, ModelInfo, SiteFinding
from . import codes
from .sr import algorithm_equipment, copy_character_set, site_label, source_header
from .uids import derived_uid

HEAT_FLOOR = 0.2  # heat at or below this is not drawn
HEAT_RAMP = 0.3  # heat above the floor over which the overlay fades in
OVERLAY_ALPHA = 0.5  # opacity of the overlay where the heat is fully on
CATEGORY_COLOURS = {
    "normal": (40, 210, 90),
    "osteopenia": (255, 170, 0),
    "osteoporosis": (255, 50, 50),
    None: (170, 170, 170),  # not assessable
}
WHITE, LIGHT_GREY, YELLOW = (255, 255, 255), (200, 200, 200), (255, 230, 0)


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colormap: values in [0, 1] to RGB floats in [0, 1] (blue → cyan → yellow → red)."""
    return np.clip(np.stack([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2), 1.5 - np.abs(4 * x - 1)],
                            axis=-1), 0.0, 1.0)


def overlay(display: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Grey radiograph with the heatmap blended in colour where it is meaningful; HxWx3 uint8."""
    grey = np.repeat(np.clip(display, 0.0, 1.0)[..., None], 3, axis=-1)
    heat = np.clip(heatmap, 0.0, 1.0)
    alpha = OVERLAY_ALPHA * np.clip((heat - HEAT_FLOOR) / HEAT_RAMP, 0.0, 1.0)[..., None]
    return np.round(255 * (grey * (1 - alpha) + jet(heat) * alpha)).astype(np.uint8)


def _font(width: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in font, sized to the image width."""
    return ImageFont.load_default(size=max(12, round(width / 50)))


def _colour(finding: SiteFinding) -> tuple[int, int, int]:
    """Box and text colour of a site: its category, or grey when not assessable."""
    return CATEGORY_COLOURS[finding.category if finding.assessable else None]


def site_text(finding: SiteFinding) -> str:
    """One line of result for a site."""
    if not finding.assessable:
        return f"{site_label(finding.site)}: not assessable: {REASON_TEXT.get(finding.reason, finding.reason)}"
    t_score = "" if finding.t_score is None else f", estimated T-score {finding.t_score:+.1f}"
    if finding.t_score is not None and finding.t_score_interval is not None:
        low, high = finding.t_score_interval
        t_score += f" ({100 * finding.interval_level:.0f} % interval {low:+.1f} to {high:+.1f})"
    calibration = f"; calibration {finding.calibration['id']}" if finding.calibration else ""
    return f"{site_label(finding.site)}: {finding.category}{t_score}{calibration}"


def _draw_boxes(image: Image.Image, sites: list[SiteFinding], scale: float) -> None:
    """Outline each site box (source pixels × scale) and tag it with the site name."""
    draw = ImageDraw.Draw(image)
    font = _font(image.width)
    line = max(2, round(image.width / 400))
    for finding in sites:
        if finding.box is None:
            continue
        r0, c0, r1, c1 = (round(v * scale) for v in finding.box)
        colour = _colour(finding)
        draw.rectangle((c0, r0, c1 - 1, r1 - 1), outline=colour, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), site_label(finding.site), font=font)
        tag_h = bottom + 2
        y = r0 - tag_h if r0 - tag_h >= 0 else r0
        draw.rectangle((c0, y, c0 + right + 4, y + tag_h), fill=colour)
        draw.text((c0 + 2, y), site_label(finding.site), fill=(0, 0, 0), font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Word-wrap `text` to lines no wider than `width` pixels, breaking words that alone are wider."""
    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width

    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while not fits(word) and len(word) > 1:
            cut = next((i for i in range(len(word) - 1, 0, -1) if fits(word[:i])), 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def _text_band(width: int, entries: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """A black band, `width` wide, with the coloured text entries wrapped to fit."""
    font = _font(width)
    margin = font.size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [(line, colour) for text, colour in entries for line in _wrap(measure, text, font, width - 2 * margin)]
    step = round(font.size * 1.3)
    band = Image.new("RGB", (width, 2 * margin + step * len(lines)))
    draw = ImageDraw.Draw(band)
    for i, (line, colour) in enumerate(lines):
        draw.text((margin, margin + i * step), line, fill=colour, font=font)
    return band


def render(display: np.ndarray, heatmap: np.ndarray, sites: list[SiteFinding], model: ModelInfo,
           display_scale: float) -> np.ndarray:
    """The heatmap picture: overlay with boxes on top, text band below; HxWx3 uint8."""
    if display.shape != heatmap.shape or display.ndim != 2:
        raise ValueError(f"display {display.shape} and heatmap {heatmap.shape} must be the same 2-D grid")
    image = Image.fromarray(overlay(display, heatmap))
    ordered = sorted(sites, key=lambda f: SITES.index(f.site))
    _draw_boxes(image, ordered, display_scale)
    entries = [(site_text(f), _colour(f)) for f in ordered] or [("No screening site found", LIGHT_GREY)]
    entries.append((f"Model: {model.name} {model.version} (sha256:{model.checksum[:12]})", WHITE))
    if any(f.assessable for f in ordered) and float(np.max(heatmap, initial=0.0)) > HEAT_FLOOR:
        entries.append(("Colour overlay: Grad-CAM, the regions that drove the estimate", LIGHT_GREY))
    entries.append((codes.DISCLAIMER, YELLOW))
    band = _text_band(image.width, entries)
    return np.vstack([np.asarray(image), np.asarray(band)])


def _source_reference(source: pydicom.Dataset) -> pydicom.Dataset:
    """Source Image Sequence item pointing at the radiograph."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(codes.SOURCE_IMAGE_FOR_PROCESSING)]
    return item


def build_heatmap(source: pydicom.Dataset, display: np.ndarray, heatmap: np.ndarray | None,
                  findings: list[SiteFinding], model: ModelInfo, *, display_scale: float,
                  series_number: int = 9902, series_description: str = "osteoscreen heatmap",
                  manufacturer: str = "osteoscreen", report_uid: str | None = None) -> pydicom.Dataset:
    """Secondary Capture (RGB) of `source` with the Grad-CAM overlay and burned-in results.

    `display` and `heatmap` are float HxW in [0, 1] on the same grid (no heatmap: no overlay);
    `display_scale` is display pixels per source pixel (boxes are in source pixels). Only findings
    of `source` are drawn.
    UIDs derive from the source SOP Instance UID, the model version and `report_uid` (the SR this
    heatmap goes with; series: study + version): the same report gives the same heatmap, and a
    re-report, whose findings may differ, gives a new one.
    """
    sites = [f for f in findings if f.source_sop_instance_uid == str(source.SOPInstanceUID)]
    display = np.asarray(display, dtype=np.float32)
    heat = np.zeros_like(display) if heatmap is None else np.asarray(heatmap, dtype=np.float32)
    pixels = render(display, heat, sites, model, display_scale)
    header = source_header(source)
    study_uid = str(source.StudyInstanceUID)
    ds = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        # highdicom requires an orientation for PATIENT; the source's own value replaces it below.
        coordinate_system="PATIENT", patient_orientation=("L", "F"),
        study_instance_uid=study_uid,
        series_instance_uid=derived_uid(study_uid, "heatmap-series", model.version),
        series_number=series_number,
        sop_instance_uid=derived_uid(str(source.SOPInstanceUID), model.version, "heatmap",
                                     *((report_uid,) if report_uid else ())),
        instance_number=max(1, int(source.get("InstanceNumber") or 1)),
        manufacturer=manufacturer, manufacturer_model_name=model.name, software_versions=model.version,
        series_description=series_description,
        contributing_equipment=[algorithm_equipment(model, manufacturer)])
    copy_character_set(ds, header)
    ds.copy_patient_and_study_information(header)
    ds.PatientOrientation = header.get("PatientOrientation", "")
    ds.Laterality = ""  # Type 2C; a series of heatmaps of several images has no single laterality
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    ds.SecondaryCaptureDeviceManufacturer = manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = model.name
    ds.SecondaryCaptureDeviceSoftwareVersions = model.version
    ds.DerivationDescription = (f"Grad-CAM overlay and results of {model.name} {model.version}; "
                                f"{codes.DISCLAIMER}")
    ds.SourceImageSequence = [_source_reference(source)]
    return ds

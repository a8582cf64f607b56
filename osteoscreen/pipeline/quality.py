"""The quality gate: decide on the pixels, never on the header, whether a site may be scored.

Checks, in the order the pipeline runs them (each gives a machine-readable reason, findings.REASON_*):
- *anatomy present*: a pelvis or lumbar radiograph shows its sites to the localiser with at least a
  modest confidence somewhere; when no expected site reaches ANATOMY_MIN_CONFIDENCE the image is not
  a hip or spine radiograph whatever its header says (other anatomy, other modality): every site is
  "not_screening_image";
- *localisation confidence* (in screen.py, MIN_LOCALISATION_CONFIDENCE);
- *metal in the site*: arthroplasty, screws and rods attenuate far more than bone, so they are the
  brightest, texture-free, sharply bounded plateaus of a radiograph. A site is refused when a thick
  plateau at the top of the image's range overlaps its box (`metal_in_site`);
- *out of distribution* (after the model, in screen.py): the crop's pooled features lie farther
  from the training crops of that site type than the checkpoint's threshold (Mahalanobis distance).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

ANATOMY_MIN_CONFIDENCE = 0.2

# Metal: pixels within PLATEAU_DEPTH of the image's top value (after the display LUTs, [0, 1]),
# kept only where a disc of METAL_CORE_MM radius fits inside (cortex and clipped bone are thin or
# textured and vanish under that erosion), summing to METAL_MIN_AREA_MM2 inside the site box.
PLATEAU_DEPTH = 0.04
METAL_CORE_MM = 1.5
METAL_MIN_AREA_MM2 = 12.0
TOP_QUANTILE = 0.9995
RING_MM = 3.0  # the border ring sampled 1-3 mm outside a plateau
METAL_MIN_STEP = 0.3  # median drop from the plateau to its border ring, in units of the image's range


def anatomy_present(confidences: list[float]) -> bool:
    """True when at least one expected site was found with a confidence the anatomy could give."""
    return any(c >= ANATOMY_MIN_CONFIDENCE for c in confidences)


def _disc(radius_mm: float, spacing_mm: float) -> np.ndarray:
    r = max(1, int(round(radius_mm / spacing_mm)))
    return np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r


def metal_mask(pixels: np.ndarray, spacing_mm: float, debug: list | None = None) -> np.ndarray:
    """Thick plateaus at the top of the image's range that fall off steeply at their border: where
    metal lies (boolean, same grid). Bone the window clipped also forms plateaus, but its border
    fades into bone only a little darker; metal drops to the bone or soft tissue around it."""
    sample = pixels[::2, ::2]
    top = float(np.quantile(sample, TOP_QUANTILE))
    low = float(np.quantile(sample, 0.05))
    span = max(top - low, 1e-6)
    plateau = pixels >= top - PLATEAU_DEPTH * span
    disc = _disc(METAL_CORE_MM, spacing_mm)
    thick = ndimage.binary_dilation(ndimage.binary_erosion(plateau, structure=disc), structure=disc) & plateau
    labels, n = ndimage.label(thick)
    out = np.zeros_like(thick)
    if n == 0:
        return out
    near = ndimage.binary_dilation(thick, structure=_disc(1.0, spacing_mm))
    far = ndimage.binary_dilation(thick, structure=_disc(RING_MM, spacing_mm))
    ring = far & ~near
    ring_labels = np.where(ring, ndimage.grey_dilation(labels, footprint=_disc(RING_MM, spacing_mm)), 0)
    for k in range(1, n + 1):
        values = pixels[ring_labels == k]
        step = (top - float(np.median(values))) / span if values.size else 0.0
        if debug is not None:
            debug.append((k, int((labels == k).sum()), step))
        if step >= METAL_MIN_STEP:
            out |= labels == k
    return out


def metal_area_mm2(mask: np.ndarray, box, spacing_mm: float) -> float:
    """Area of metal inside box (working pixels: row0, col0, row1, col1)."""
    r0, c0, r1, c1 = (int(round(v)) for v in box)
    r0, c0 = max(0, r0), max(0, c0)
    return float(mask[r0:max(r0, r1), c0:max(c0, c1)].sum()) * spacing_mm * spacing_mm


def metal_in_site(mask: np.ndarray, box, spacing_mm: float) -> bool:
    return metal_area_mm2(mask, box, spacing_mm) >= METAL_MIN_AREA_MM2

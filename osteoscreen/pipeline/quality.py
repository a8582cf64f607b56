"""The quality gate: decide on the pixels, never on the header, whether a site may be scored.

Checks, in the order the pipeline runs them (each gives a machine-readable reason, findings.REASON_*):
- *anatomy present*: a pelvis or lumbar radiograph shows its sites to the localiser with at least a
  modest confidence somewhere; when no expected site reaches ANATOMY_MIN_CONFIDENCE the image is not
  a hip or spine radiograph whatever its header says (other anatomy, other modality): every site is
  "not_screening_image". On phantoms the learned localiser gives clean sites at least 0.65 and
  chests, swapped regions, noise and blank images at most 0.004; the atlas fallback reaches 0.35
  on some of those, hence 0.4;
- *localisation confidence* (in screen.py, MIN_LOCALISATION_CONFIDENCE);
- *metal in the site*, twice. Before the model, a classical check (`MetalDetector`): arthroplasty,
  screws and rods attenuate far more than bone, so where the window leaves them unclipped they are
  thick plateaus at the top of the image's range that drop steeply to the bone around them. Tuned
  strict (no clean phantom site fires), it catches the obvious cases for any checkpoint. After the
  model, its implant head (trained on crops labelled `<site>_implant`) catches the rest: metal the
  window clipped together with dense bone looks like a plateau with a gentle border;
- *out of distribution* (after the model, in screen.py): the crop's pooled features lie farther
  from the training crops of that site type than the checkpoint's threshold (Mahalanobis distance).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

ANATOMY_MIN_CONFIDENCE = 0.4

# Metal: pixels within PLATEAU_DEPTH of the image's top value (after the display LUTs, [0, 1]),
# kept only where a disc of METAL_CORE_MM radius fits inside (cortex and clipped bone are thin or
# textured and vanish under that erosion), summing to METAL_MIN_AREA_MM2 inside the site box.
PLATEAU_DEPTH = 0.04
METAL_CORE_MM = 1.5
METAL_MIN_AREA_MM2 = 12.0
TOP_QUANTILE = 0.9995
RING_MM = 3.0  # the border ring sampled 1-3 mm outside a plateau
METAL_MIN_STEP = 0.5  # median drop from the plateau to its border ring, in units of the image's range


def anatomy_present(confidences: list[float]) -> bool:
    """True when at least one expected site was found with a confidence the anatomy could give."""
    return any(c >= ANATOMY_MIN_CONFIDENCE for c in confidences)


def _radius_px(radius_mm: float, spacing_mm: float) -> int:
    return max(1, int(round(radius_mm / spacing_mm)))


def _disc(radius_mm: float, spacing_mm: float) -> np.ndarray:
    """The disc the morphology below works with: pixels within the radius (Euclidean)."""
    r = _radius_px(radius_mm, spacing_mm)
    return np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r


# Morphology with a disc, from Euclidean distance transforms: exactly scipy's binary_erosion,
# binary_dilation and grey_dilation with the disc of that radius (tests/test_quality.py compares them),
# but one pass over the image instead of one per element of a 13 × 13 disc (40 ms → 5 ms a site).
def _eroded(mask: np.ndarray, r: int) -> np.ndarray:
    """binary_erosion(mask, disc of radius r): outside the image counts as background."""
    padded = np.pad(mask, r + 1)
    return (ndimage.distance_transform_edt(padded) > r)[r + 1:-(r + 1), r + 1:-(r + 1)]


def _dilated(mask: np.ndarray, r: int) -> np.ndarray:
    """binary_dilation(mask, disc of radius r)."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    return ndimage.distance_transform_edt(~mask) <= r


def _largest_label_near(labels: np.ndarray, r: int) -> np.ndarray:
    """grey_dilation(labels, footprint=disc of radius r), mode 'reflect' as scipy's default: for each
    pixel the largest label within r. One distance transform per label, over that label's window."""
    if r >= min(labels.shape):  # numpy's padding reflects differently once it is wider than the array
        return ndimage.grey_dilation(labels, footprint=_disc(r, 1.0))
    padded = np.pad(labels, r, mode="symmetric")  # numpy's "symmetric" is scipy's "reflect"
    out = np.zeros_like(padded)
    for k, box in enumerate(ndimage.find_objects(padded), start=1):
        if box is None:
            continue
        window = tuple(slice(max(0, s.start - r), min(n, s.stop + r)) for s, n in zip(box, padded.shape))
        near = ndimage.distance_transform_edt(padded[window] != k) <= r
        out[window] = np.where(near, np.maximum(out[window], k), out[window])
    return out[r:-r, r:-r]


class MetalDetector:
    """Thick plateaus at the top of the image's range that fall off steeply at their border: where
    metal lies. Bone the window clipped also forms plateaus, but its border fades into bone only a
    little darker; metal drops to the bone or soft tissue around it. The image's range is measured
    once; plateaus are analysed only around the boxes asked about (a few ms a site)."""

    def __init__(self, pixels: np.ndarray, spacing_mm: float):
        self.pixels, self.spacing_mm = pixels, spacing_mm
        sample = pixels[::2, ::2]
        self.top = float(np.quantile(sample, TOP_QUANTILE))
        self.span = max(self.top - float(np.quantile(sample, 0.05)), 1e-6)

    def mask(self, box, debug: list | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """Metal within box (working pixels: row0, col0, row1, col1) and the mask's origin."""
        margin = int(np.ceil(2 * RING_MM / self.spacing_mm))
        rows, cols = self.pixels.shape
        r0, c0 = max(0, int(box[0]) - margin), max(0, int(box[1]) - margin)
        r1, c1 = min(rows, int(np.ceil(box[2])) + margin), min(cols, int(np.ceil(box[3])) + margin)
        patch = self.pixels[r0:r1, c0:c1]
        plateau = patch >= self.top - PLATEAU_DEPTH * self.span
        core = _radius_px(METAL_CORE_MM, self.spacing_mm)
        thick = _dilated(_eroded(plateau, core), core) & plateau
        labels, n = ndimage.label(thick)
        out = np.zeros_like(thick)
        if n:
            ring_r = _radius_px(RING_MM, self.spacing_mm)
            distance = ndimage.distance_transform_edt(~thick)  # the two dilations of the ring at once
            ring = (distance <= ring_r) & (distance > _radius_px(1.0, self.spacing_mm))
            owner = np.where(ring, _largest_label_near(labels, ring_r), 0)
            for k in range(1, n + 1):
                values = patch[owner == k]
                step = (self.top - float(np.median(values))) / self.span if values.size else 0.0
                if debug is not None:
                    debug.append((k, int((labels == k).sum()), step))
                if step >= METAL_MIN_STEP:
                    out |= labels == k
        return out, (r0, c0)

    def area_mm2(self, box, debug: list | None = None) -> float:
        mask, (r0, c0) = self.mask(box, debug)
        br0, bc0 = max(0, int(round(box[0])) - r0), max(0, int(round(box[1])) - c0)
        br1, bc1 = int(round(box[2])) - r0, int(round(box[3])) - c0
        return float(mask[br0:max(br0, br1), bc0:max(bc0, bc1)].sum()) * self.spacing_mm ** 2

    def in_site(self, box) -> bool:
        return self.area_mm2(box) >= METAL_MIN_AREA_MM2

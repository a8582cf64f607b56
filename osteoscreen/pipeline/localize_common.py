"""What both site localisers share: which images they accept, resampling, and the local contrast
normalisation their inputs go through.

`localize` (the atlas localiser and the entry `locate_sites`) and `localize_net` (the learned one)
both import this module and neither imports the other back: `localize` asks `localize_net` first,
`localize_net` needs nothing of `localize`. The atlas file (`localize_atlas`) is built with
`resample` too.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

NORMALISE_SIGMA_MM = 12.0
SMOOTH_MM = 2.0
MIN_EXTENT_MM = 80.0  # smaller images cannot hold a site
SUPPORTED = (("hip", "ap"), ("lumbar", "ap"), ("lumbar", "lat"))  # (region, view) pairs with sites


def resample(image: np.ndarray, spacing_mm: tuple[float, float], target_mm: float) -> np.ndarray:
    """Area-average to `target_mm` pixels: integer block means, then a small linear zoom."""
    img = np.asarray(image, dtype=np.float32)
    blocks = [max(1, int(target_mm / s)) for s in spacing_mm]
    rows, cols = (img.shape[0] // blocks[0]) * blocks[0], (img.shape[1] // blocks[1]) * blocks[1]
    img = img[:rows, :cols].reshape(rows // blocks[0], blocks[0], cols // blocks[1], blocks[1]).mean(axis=(1, 3))
    zoom = [s * b / target_mm for s, b in zip(spacing_mm, blocks)]
    return ndimage.zoom(img, zoom, order=1) if any(abs(z - 1) > 1e-3 for z in zoom) else img


def normalise(img: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Local contrast normalisation (minus a 12 mm Gaussian mean, over the local spread): invariant
    to offset, gain and slow soft-tissue gradients."""
    sigma = NORMALISE_SIGMA_MM / pixel_mm
    img = ndimage.gaussian_filter(img, SMOOTH_MM / pixel_mm)  # texture and noise are not landmarks
    centred = img - ndimage.gaussian_filter(img, sigma)
    spread = np.sqrt(ndimage.gaussian_filter(centred * centred, sigma)) + 1e-6
    out = centred / (spread + 0.1 * float(np.median(spread)))
    return np.clip(out, -3, 3).astype(np.float32)


def usable_image(image: np.ndarray, spacing_mm: tuple[float, float], region: str, view: str) -> np.ndarray | None:
    """The image as float32 when a site of region/view could be found in it at all (supported view,
    2-D, finite, positive spacing, large enough to hold a site), else None. Both localisers start here."""
    if (region, view) not in SUPPORTED:
        return None
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(spacing_mm) <= 0 or not np.isfinite(img).all():
        return None
    if min(n * s for n, s in zip(img.shape, spacing_mm)) < MIN_EXTENT_MM:
        return None
    return img

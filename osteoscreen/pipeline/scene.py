"""Descriptors of a whole radiograph's processing: what a site calibration reads beside the crops.

A scanner's processing chain (look-up table, window, dynamic-range compression, edge enhancement,
grid) varies from image to image, and the error it causes in a T-score estimate is shared by every
site of the image (docs/CALIBRATION.md: after calibration the two hips of a pelvis share most of
their error). The crops show that processing only over a few centimetres of bone; the whole image
shows it over soft tissue, bone and background. These descriptors summarise it:
- the intensity distribution inside the field (the look-up table and the window): 15 quantiles,
  the mean and the standard deviation;
- a band-pass pyramid (0.5-32 mm): the standard deviation and mean absolute value of each of 7
  bands (edge enhancement raises the fine bands, dynamic-range compression lowers the coarse ones);
- the gradient magnitude's median, 90th and 99th percentiles (sharpness);
- the amplitude of column and row stripes (an anti-scatter grid's lines);
- quantiles of the 4-8 mm band (local contrast).
They describe pixels only (nothing of the patient), are computed on the working grid
(dicom_io.WORKING_SPACING_MM) and ignore an eighth of the image on each side, where collimation
borders lie. `model.calibration.feature_sets` sets them beside each crop's channel statistics.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

QUANTILES = (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99)
BANDS_MM = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # Gaussian sigmas between which the bands lie
COARSE_MM = 2.0  # the coarse bands are taken on this grid (a 32 mm blur on a 0.5 mm grid is slow)
SCENE_SIZE = len(QUANTILES) + 2 + 2 * len(BANDS_MM) + 3 + 2 + 3  # 39


def scene_descriptors(pixels: np.ndarray, spacing_mm: float) -> np.ndarray:
    """SCENE_SIZE descriptors (float64) of a radiograph's display values on a grid of `spacing_mm`."""
    x = np.asarray(pixels, np.float64)
    h, w = x.shape
    inner = x[h // 8: h - h // 8, w // 8: w - w // 8]
    if inner.size < 64:  # a thumbnail: its whole area
        inner = x
    out = list(np.percentile(inner, QUANTILES)) + [inner.mean(), inner.std()]
    fine = [ndimage.gaussian_filter(inner, s / spacing_mm) for s in BANDS_MM if s <= COARSE_MM]
    bands = [inner - fine[0]] + [a - b for a, b in zip(fine, fine[1:])]
    step = max(1, int(round(COARSE_MM / spacing_mm)))
    coarse = fine[-1][::step, ::step]
    grid = spacing_mm * step
    # the coarse grid's image already carries the last fine blur; each further blur adds what is missing
    blurs = [coarse] + [ndimage.gaussian_filter(coarse, np.sqrt(s ** 2 - COARSE_MM ** 2) / grid)
                        for s in BANDS_MM if s > COARSE_MM]
    bands += [a - b for a, b in zip(blurs, blurs[1:])]
    out += [b.std() for b in bands] + [np.abs(b).mean() for b in bands]
    gy, gx = np.gradient(fine[0])
    out += list(np.percentile(np.hypot(gx, gy), (50, 90, 99)))
    high = inner - ndimage.uniform_filter1d(inner, 9, axis=1)
    out += [high.mean(axis=0).std(), high.mean(axis=1).std()]
    out += list(np.percentile(bands[BANDS_MM.index(4.0)], (5, 50, 95)))  # the 4-8 mm band (bands[k]: sigma k to k+1)
    return np.nan_to_num(np.asarray(out, np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # a blank image: zeros, not NaN

"""Site crops for the model: square, undistorted, intensity-normalised.

A square around the located box keeps context (S4: masking the surroundings hurt) and avoids
distortion (S1, S2). Left hips are mirrored so that every hip looks like a right hip: the network
then learns one anatomy, not two.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dicom_io import resample

CROP_SIZE = 128
CONTEXT = 1.15  # side of the square relative to the longer side of the box

SITE_TYPES = ("hip", "lumbar_ap", "lumbar_lat")


def site_type(site: str, view: str) -> int:
    if site in ("left_hip", "right_hip"):
        return 0
    return 1 if view == "ap" else 2


@dataclass
class Crop:
    pixels: np.ndarray  # float32 CROP_SIZE², raw [0,1] values (normalised later, so training can jitter)
    origin: tuple[float, float]  # row, col of the crop's top-left in working pixels
    side: float  # crop side in working pixels
    mirrored: bool


def square_crop(image: np.ndarray, box: tuple[float, float, float, float], mirrored: bool,
                size: int = CROP_SIZE, context: float = CONTEXT) -> Crop:
    """Cut a square of side context·max(h, w) centred on box (working coordinates), pad with the
    image median where it leaves the image, resize to size²."""
    r0, c0, r1, c1 = box
    side = max(r1 - r0, c1 - c0) * context
    side_px = max(8, int(round(side)))
    top = int(round((r0 + r1) / 2 - side_px / 2))
    left = int(round((c0 + c1) / 2 - side_px / 2))
    out = np.full((side_px, side_px), float(np.median(image[::4, ::4])), dtype=np.float32)
    rows, cols = image.shape
    sr0, sc0 = max(0, top), max(0, left)
    sr1, sc1 = min(rows, top + side_px), min(cols, left + side_px)
    if sr1 > sr0 and sc1 > sc0:
        out[sr0 - top:sr1 - top, sc0 - left:sc1 - left] = image[sr0:sr1, sc0:sc1]
    pixels = resample(out, size / side_px)
    if pixels.shape != (size, size):  # rounding in resample
        pixels = np.pad(pixels, ((0, max(0, size - pixels.shape[0])), (0, max(0, size - pixels.shape[1]))),
                        mode="edge")[:size, :size]
    if mirrored:
        pixels = pixels[:, ::-1].copy()
    return Crop(pixels=pixels.astype(np.float32), origin=(float(top), float(left)), side=float(side_px),
                mirrored=mirrored)


def normalise(pixels: np.ndarray, jitter: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """S0's 2σ z-transform: z = (x − μ) / ((2 + ε)σ), clipped to [−1, 1]; ε ~ U(−jitter, jitter)
    during training makes the model robust to exposure and windowing."""
    mu, sigma = float(pixels.mean()), float(pixels.std()) + 1e-6
    eps = 0.0 if not jitter else float((rng or np.random.default_rng()).uniform(-jitter, jitter))
    return np.clip((pixels - mu) / ((2.0 + eps) * sigma), -1.0, 1.0).astype(np.float32)


def edge_taper(size: int, feather: float) -> np.ndarray:
    """size×size weights: 1 inside, falling to 0 along a raised cosine over the outer `feather`
    share of each side (0: all ones)."""
    n = int(round(size * feather))
    ramp = np.ones(size, dtype=np.float32)
    if n > 0:
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float32) + 0.5) / n)
        ramp[:n], ramp[size - n:] = edge, edge[::-1]
    return np.outer(ramp, ramp)


def paste_map(cam: np.ndarray, crop: Crop, shape: tuple[int, int], feather: float = 0.0) -> np.ndarray:
    """Put a crop-sized map back onto the working grid (the inverse of square_crop). `feather`
    fades the map out towards the crop's border (`edge_taper`), so that a display shows no hard
    square where the crop ends."""
    if feather:
        cam = cam * edge_taper(cam.shape[0], feather)
    cam = cam[:, ::-1] if crop.mirrored else cam
    side = int(round(crop.side))
    big = resample(np.ascontiguousarray(cam, dtype=np.float32), side / cam.shape[0])[:side, :side]
    out = np.zeros(shape, dtype=np.float32)
    top, left = int(crop.origin[0]), int(crop.origin[1])
    rows, cols = shape
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(rows, top + big.shape[0]), min(cols, left + big.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = big[r0 - top:r1 - top, c0 - left:c1 - left]
    return out

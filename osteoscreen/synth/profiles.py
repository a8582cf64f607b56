"""Synthetic scanner profiles: the detector and image-processing chain a phantom is exposed through.

Real radiographs differ between hospitals far more in *how* they were acquired and processed than in
the anatomy they show (Jang et al. 2021 lost 0.17 AUC on an external hospital). A profile fixes the
ranges from which `phantoms.expose` draws every exposure nuisance: pixel pitch, stored bits,
MONOCHROME1 share, scatter, dynamic-range compression (strength and kernel), edge enhancement
(strength and kernel), the look-up table's shape (power-law gamma or a film-like S-curve), the display
window percentiles, dose (quantum noise), detector blur (a Gaussian MTF, sigma in mm, which also
correlates the noise), anti-scatter grid lines (fine periodic stripes, aliased by the pixel pitch) and
collimation borders (outside the collimated field the image is near-white, as when unexposed, or
near-black, as when the modality masks it).

`TRAINING_PROFILES` (synthA-C) together span about the ranges the generator used before profiles
existed. `HELD_OUT_PROFILE` (synthD) is never drawn unless asked for: it pairs an S-curve LUT with
strong, wide edge enhancement, a coarser pixel pitch, a stationary grid's stripes and hard
dynamic-range compression, so that a model trained on A-C can be tested on D to measure domain shift.
All four are invented; none imitates a real product.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MANUFACTURER = "Osteoscreen Phantom Works"

Range = tuple[float, float]


@dataclass(frozen=True)
class ScannerProfile:
    """Ranges of one synthetic detector + processing chain (every range is drawn uniformly)."""

    name: str
    model_name: str  # ManufacturerModelName
    station_name: str  # StationName
    detector_type: str  # DetectorType: DIRECT | SCINTILLATOR | STORAGE
    spacing_mm: Range  # detector pitch
    bits: tuple[int, ...]  # BitsStored choices
    monochrome1_p: float  # probability of MONOCHROME1
    scatter: Range  # scatter fraction (of a 40 mm blur of the primary)
    compression: Range  # dynamic-range compression strength
    compression_mm: Range  # its low-pass kernel (Gaussian sigma, mm)
    edge: Range  # edge-enhancement (unsharp mask) strength
    edge_kernel_mm: Range  # its kernel (Gaussian sigma, mm)
    lut: str  # "gamma" | "scurve"
    gamma: Range  # power of the gamma LUT (drawn log-uniformly)
    scurve_slope: Range  # slope of the S-curve LUT (logistic, over the window 0..1)
    scurve_centre: Range  # its centre (0..1 of the window)
    window_lo_pct: Range  # lower window percentile of the processed image
    window_hi_pct: Range  # upper window percentile (before a 0-15 % head-room)
    dose: Range  # unattenuated photons per 0.15 mm pixel
    mtf_sigma_mm: Range  # detector blur; 0 for none
    grid_p: float  # probability that grid lines show
    grid_period_mm: Range  # grid line period (aliased by the pixel pitch)
    grid_amplitude: Range  # stripe amplitude in log-exposure units
    grid_axis: str  # "rows" (horizontal stripes) | "columns" (vertical stripes) | "either"
    collimation_p: float  # probability of collimation borders
    collimation: str  # "black" | "white" | "either"
    collimation_frac: Range  # border width per side, fraction of the image's extent
    manufacturer: str = MANUFACTURER

    def __post_init__(self):
        if self.lut not in ("gamma", "scurve"):
            raise ValueError(f"lut must be gamma or scurve, got {self.lut!r}")
        if self.grid_axis not in ("rows", "columns", "either") or self.collimation not in ("black", "white", "either"):
            raise ValueError("grid_axis must be rows|columns|either and collimation black|white|either")
        for name in ("spacing_mm", "scatter", "compression", "compression_mm", "edge", "edge_kernel_mm", "gamma",
                     "scurve_slope", "scurve_centre", "window_lo_pct", "window_hi_pct", "dose", "mtf_sigma_mm",
                     "grid_period_mm", "grid_amplitude", "collimation_frac"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{self.name}.{name}: empty range {lo, hi}")


PROFILES: dict[str, ScannerProfile] = {
    # Fine-pitch indirect flat panel, sharp, low noise, moving grid (no lines), electronic shutters.
    "synthA": ScannerProfile(
        name="synthA", model_name="Lumen FP-43", station_name="PHANTOM-A", detector_type="SCINTILLATOR",
        spacing_mm=(0.139, 0.160), bits=(14, 16), monochrome1_p=0.2,
        scatter=(0.05, 0.18), compression=(0.5, 0.8), compression_mm=(25.0, 35.0),
        edge=(0.2, 0.6), edge_kernel_mm=(1.2, 2.0),
        lut="gamma", gamma=(0.85, 1.25), scurve_slope=(6.0, 6.0), scurve_centre=(0.5, 0.5),
        window_lo_pct=(0.1, 1.5), window_hi_pct=(99.2, 99.95), dose=(6e4, 1.2e5), mtf_sigma_mm=(0.04, 0.10),
        grid_p=0.0, grid_period_mm=(0.2, 0.2), grid_amplitude=(0.0, 0.0), grid_axis="either",
        collimation_p=0.3, collimation="black", collimation_frac=(0.01, 0.06)),
    # Storage-phosphor (CR-like) plate: coarser, blurrier, noisier, little processing, unexposed
    # (white) borders, mostly MONOCHROME1.
    "synthB": ScannerProfile(
        name="synthB", model_name="Stratum SP-2", station_name="PHANTOM-B", detector_type="STORAGE",
        spacing_mm=(0.160, 0.200), bits=(12, 14), monochrome1_p=0.7,
        scatter=(0.12, 0.30), compression=(0.4, 0.6), compression_mm=(40.0, 60.0),
        edge=(0.0, 0.3), edge_kernel_mm=(0.8, 1.5),
        lut="gamma", gamma=(0.75, 1.10), scurve_slope=(6.0, 6.0), scurve_centre=(0.5, 0.5),
        window_lo_pct=(0.5, 2.0), window_hi_pct=(99.0, 99.8), dose=(2e4, 6e4), mtf_sigma_mm=(0.12, 0.22),
        grid_p=0.0, grid_period_mm=(0.2, 0.2), grid_amplitude=(0.0, 0.0), grid_axis="either",
        collimation_p=0.5, collimation="white", collimation_frac=(0.01, 0.07)),
    # Direct-conversion panel: mid pitch, crisp, wider unsharp mask, occasional faint grid lines.
    "synthC": ScannerProfile(
        name="synthC", model_name="Vireo DR-35", station_name="PHANTOM-C", detector_type="DIRECT",
        spacing_mm=(0.143, 0.190), bits=(14, 15), monochrome1_p=0.3,
        scatter=(0.10, 0.30), compression=(0.3, 0.6), compression_mm=(20.0, 30.0),
        edge=(0.3, 0.8), edge_kernel_mm=(2.0, 3.0),
        lut="gamma", gamma=(1.0, 1.33), scurve_slope=(6.0, 6.0), scurve_centre=(0.5, 0.5),
        window_lo_pct=(0.1, 2.0), window_hi_pct=(99.0, 99.95), dose=(3e4, 9e4), mtf_sigma_mm=(0.06, 0.14),
        grid_p=0.3, grid_period_mm=(0.22, 0.28), grid_amplitude=(0.006, 0.012), grid_axis="rows",
        collimation_p=0.2, collimation="either", collimation_frac=(0.01, 0.05)),
    # Held out: film-like S-curve, strong and wide edge enhancement, hard dynamic-range compression,
    # coarse pitch, a stationary grid whose lines alias into visible vertical stripes, black shutters.
    "synthD": ScannerProfile(
        name="synthD", model_name="Meridian CX", station_name="PHANTOM-D", detector_type="SCINTILLATOR",
        spacing_mm=(0.205, 0.250), bits=(12,), monochrome1_p=0.5,
        scatter=(0.04, 0.12), compression=(0.75, 0.95), compression_mm=(12.0, 20.0),
        edge=(1.0, 1.6), edge_kernel_mm=(2.5, 4.0),
        lut="scurve", gamma=(1.0, 1.0), scurve_slope=(6.0, 9.0), scurve_centre=(0.42, 0.58),
        window_lo_pct=(0.5, 2.0), window_hi_pct=(99.3, 99.9), dose=(3e4, 8e4), mtf_sigma_mm=(0.10, 0.18),
        grid_p=1.0, grid_period_mm=(0.18, 0.22), grid_amplitude=(0.015, 0.03), grid_axis="columns",
        collimation_p=0.6, collimation="black", collimation_frac=(0.02, 0.08)),
}
TRAINING_PROFILES: tuple[ScannerProfile, ...] = (PROFILES["synthA"], PROFILES["synthB"], PROFILES["synthC"])
HELD_OUT_PROFILE: ScannerProfile = PROFILES["synthD"]


def get_profile(profile: ScannerProfile | str) -> ScannerProfile:
    """A profile by name (or the profile itself)."""
    if isinstance(profile, ScannerProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown scanner profile {profile!r}; known: {sorted(PROFILES)}") from None


def draw_profile(rng: np.random.Generator, profiles=None) -> ScannerProfile:
    """One profile drawn uniformly from `profiles` (names or profiles; default TRAINING_PROFILES)."""
    if isinstance(profiles, (str, ScannerProfile)):
        profiles = (profiles,)
    pool = TRAINING_PROFILES if profiles is None else tuple(get_profile(p) for p in profiles)
    if not pool:
        raise ValueError("no scanner profiles to draw from")
    return pool[int(rng.integers(len(pool)))]

"""Find the screening sites: both proximal femurs on a pelvis AP, L1–L4 on a lumbar AP or lateral.

`locate_sites` is the entry the pipeline calls. It asks the learned localiser first
(`localize_net`: a small U-Net trained on phantom truth boxes, method "unet"); for every site
whose learned confidence is below `LEARNED_GATE` (0.5, the pipeline's own gate), and for all sites
when the weights file is missing, it runs the classical atlas localiser below
(`locate_sites_atlas`, method "atlas") and keeps whichever of the two is more confident. The header
cross-check comes last: when the caller passes the header's laterality ("L"/"R" from
ImageLaterality or Laterality) and a femur of the *other* side is what the anatomy shows, that
femur's confidence is multiplied by `LATERALITY_MISMATCH` (the pipeline then refuses it).

The classical localiser: atlas registration, no learning. The atlas is the mean of a few phantoms
without pose, a data file shipped in models/ (`localize_atlas`: drawn by `synth.phantoms.mean_anatomy`
through scripts/build_localiser_atlas.py, read once per process). Image and atlas are brought to 2 mm pixels
and locally contrast-normalised (minus a 12 mm Gaussian mean, divided by the local standard
deviation), which removes exposure, gain, offset, soft-tissue thickness and most of a gamma. Each site
template (the site's truth landmarks plus a margin of context) is then matched by normalised
cross-correlation (FFT, the image transformed once per search): an exhaustive search over scale
(0.84–1.28) and rotation (±5°) at 4 mm, refined at 2 mm. Boxes are the atlas landmarks carried
through the found similarity transform, in the input image's pixel coordinates.

Confidence is the refined correlation mapped linearly from 0.38 (0) to 0.62 (1). For hips it is
multiplied by a pair factor: the two femurs must sit where the atlas puts them relative to each other
(error under 10 % of the inter-hip distance costs nothing, over 25 % gives 0). A chest, abdomen or
other image offers no such pair, so it scores 0; so does a single-hip film (not supported yet).

Hips are searched on their own side of the image (the patient's right on the image's left unless
`patient_left_on_image_right` is False). Lateral lumbar views are tried facing both ways.
About 20 ms for an image already at 0.5 mm, 40-60 ms from full detector resolution (2 cores).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage

from ..findings import SiteLocation
from . import localize_net
from .localize_atlas import AtlasError, load_atlas
from .localize_common import usable_image
from .localize_common import normalise as _normalise
from .localize_common import resample as _resample

WORK_MM = 2.0
COARSE = 2  # the exhaustive search runs at COARSE * WORK_MM
SCALES = tuple(float(s) for s in np.exp(np.linspace(math.log(0.84), math.log(1.28), 6)))
ANGLES = (-5.0, 0.0, 5.0)
FINE_SCALES = (0.96, 1.0, 1.04)
FINE_ANGLES = (-2.5, 0.0, 2.5)
# Atlas margin (rows, cols) around a site's landmarks: lumbar templates reach T12 and the sacrum,
# which tell the levels apart.
CONTEXT_MM = {"hip": (24.0, 24.0), "lumbar": (55.0, 30.0)}
NCC_FLOOR, NCC_GOOD = 0.38, 0.62  # correlation mapped to confidence 0 and 1
PAD_FRACTION = 0.35  # how far (of a template's size) a site may hang over the image edge
HIP_SIDE_FRACTION = 0.62  # a hip is searched in this fraction of the width on its side
PAIR_OK, PAIR_SLACK = 0.10, 0.15  # femur pair geometry error that costs nothing / everything
LEARNED_GATE = 0.5  # below this learned confidence a site is also tried with the atlas
LATERALITY_MISMATCH = 0.2  # confidence factor for a femur of the side the header does not name


@dataclass(frozen=True)
class _Template:
    pixels: np.ndarray  # normalised atlas patch at WORK_MM
    points: np.ndarray  # (N, 2) landmark rows, cols in the patch's pixels
    origin: np.ndarray  # the patch's top-left in atlas pixels


@dataclass
class _Match:
    ncc: float
    points: np.ndarray | None  # landmarks in the searched image's pixels
    scale: float
    angle: float  # degrees


@lru_cache(maxsize=None)
def _templates(region: str, view: str) -> dict[str, _Template]:
    """Site templates cut from the atlas, keyed by site name (hip sites by the side the atlas shows)."""
    kind = "hip" if region == "hip" else "lumbar"
    shipped = load_atlas(kind, view)
    if abs(shipped.pixel_mm - WORK_MM) > 1e-9:
        raise AtlasError(f"the {kind} {view} atlas is at {shipped.pixel_mm} mm, the localiser works at {WORK_MM} mm: "
                         "rebuild it (scripts/build_localiser_atlas.py)")
    atlas = _normalise(shipped.attenuation, WORK_MM)
    out = {}
    for site, points_mm in shipped.landmarks_mm.items():
        pts = points_mm / WORK_MM
        margin = np.array(CONTEXT_MM[kind]) / WORK_MM
        r0, c0 = np.floor(pts.min(axis=0) - margin).astype(int)
        r1, c1 = np.ceil(pts.max(axis=0) + margin).astype(int)
        r0, c0 = max(r0, 0), max(c0, 0)
        patch = atlas[r0:r1, c0:c1]
        out[site] = _Template(np.ascontiguousarray(patch), pts - np.array([r0, c0]), np.array([r0, c0], float))
    return out


def _similarity(scale: float, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


@lru_cache(maxsize=4096)
def _warped(key: tuple[str, str, str], scale: float, angle_deg: float, factor: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Template `key` = (region, view, site) scaled, rotated and shrunk by `factor`: the zero-mean
    patch, its landmark points and its norm (cached: the search grid is fixed)."""
    t = _templates(key[0], key[1])[key[2]]
    fwd = _similarity(scale / factor, angle_deg)
    h, w = t.pixels.shape
    corners = np.array([[0, 0], [0, w], [h, 0], [h, w]], dtype=float) - np.array([h, w]) / 2
    out_shape = np.ceil(np.abs(corners @ fwd.T).max(axis=0) * 2).astype(int) + 1
    c_in, c_out = np.array([h, w]) / 2, out_shape / 2
    inv = np.linalg.inv(fwd)
    patch = ndimage.affine_transform(t.pixels, inv, offset=c_in - inv @ c_out, output_shape=tuple(out_shape),
                                     order=1, cval=0.0)
    patch = (patch - patch.mean()).astype(np.float32)
    return patch, (t.points - c_in) @ fwd.T + c_out, float(np.sqrt(np.square(patch, dtype=np.float64).sum()))


class _Correlator:
    """Normalised cross-correlation of many templates with one image: the image's FFT and its
    integral images are computed once (circular correlation is exact on the valid positions)."""

    def __init__(self, image: np.ndarray):
        self.shape = image.shape
        self.fshape = tuple(sp_fft.next_fast_len(n, real=True) for n in image.shape)
        self.spectrum = sp_fft.rfft2(image.astype(np.float32), self.fshape)
        pad = np.pad(image.astype(np.float64), ((1, 0), (1, 0)))
        self.s1 = pad.cumsum(0).cumsum(1)
        self.s2 = np.square(pad).cumsum(0).cumsum(1)

    def _window(self, table: np.ndarray, h: int, w: int) -> np.ndarray:
        return table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]

    def ncc(self, patch: np.ndarray, norm: float) -> np.ndarray | None:
        """NCC map over the valid positions (top-left corners), or None when the patch is too big."""
        h, w = patch.shape
        H, W = self.shape
        if h > H or w > W or norm <= 0:
            return None
        corr = sp_fft.irfft2(self.spectrum * sp_fft.rfft2(patch[::-1, ::-1], self.fshape), self.fshape)
        corr = corr[h - 1:H, w - 1:W]
        s1, s2 = self._window(self.s1, h, w), self._window(self.s2, h, w)
        var = np.maximum(s2 - s1 * s1 / (h * w), 1e-6 * h * w)
        return corr / (norm * np.sqrt(var))


def _best_match(image: _Correlator, key, scales, angles, factor: int) -> _Match:
    """Exhaustive NCC search over scales and angles; landmarks in the correlator's image pixels."""
    best = _Match(-1.0, None, 1.0, 0.0)
    for scale in scales:
        for angle in angles:
            patch, pts, norm = _warped(key, round(scale, 4), angle, factor)
            ncc = image.ncc(patch, norm)
            if ncc is None:
                continue
            r, c = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
            if ncc[r, c] > best.ncc:
                best = _Match(float(ncc[r, c]), pts + np.array([r, c]), scale, angle)
    return best


def _register(image: np.ndarray, key: tuple[str, str, str], cols: slice) -> _Match:
    """Coarse-to-fine registration of template `key` inside the column range `cols` of `image`
    (normalised, WORK_MM); landmarks in `image` pixels. The region is padded with the normalised
    mean (0) so that anatomy cut by the field edge can still match."""
    shape = np.array(_templates(key[0], key[1])[key[2]].pixels.shape)
    pad = (shape * max(SCALES) * PAD_FRACTION).astype(int)
    region = np.pad(image[:, cols], ((pad[0], pad[0]), (pad[1], pad[1])))
    offset = np.array([-pad[0], (cols.start or 0) - pad[1]])
    coarse = _best_match(_Correlator(region[::COARSE, ::COARSE]), key, SCALES, ANGLES, COARSE)
    if coarse.points is None:
        return coarse
    # Refine at full WORK_MM resolution in a window around the coarse answer.
    centre = coarse.points.mean(axis=0) * COARSE
    half = shape * coarse.scale * 0.75 + 8
    r0, c0 = max(0, int(centre[0] - half[0])), max(0, int(centre[1] - half[1]))
    window = region[r0:int(centre[0] + half[0]), c0:int(centre[1] + half[1])]
    fine = _best_match(_Correlator(window), key, [coarse.scale * f for f in FINE_SCALES],
                       [coarse.angle + a for a in FINE_ANGLES], 1)
    if fine.points is None or fine.ncc < coarse.ncc:
        coarse.points = coarse.points * COARSE + offset
        return coarse
    fine.points = fine.points + np.array([r0, c0]) + offset
    return fine


def _box(points: np.ndarray, to_source: np.ndarray, shape) -> tuple[int, int, int, int]:
    """Axis-aligned box (exclusive ends) around working-grid points, in source pixels, clipped."""
    src = points * to_source
    r0, c0 = np.floor(src.min(axis=0)).astype(int)
    r1, c1 = np.ceil(src.max(axis=0)).astype(int)
    return (max(0, int(r0)), max(0, int(c0)), min(shape[0], int(r1)), min(shape[1], int(c1)))


def _confidence(ncc: float) -> float:
    return float(np.clip((ncc - NCC_FLOOR) / (NCC_GOOD - NCC_FLOOR), 0.0, 1.0))


def _pair_factor(m_left: _Match, m_right: _Match) -> float:
    """1 when the two femurs (image-left, image-right) sit where the atlas puts them relative to
    each other, falling to 0 as the error grows: a chest or an abdomen has no such pair."""
    templates = _templates("hip", "ap")
    t_left, t_right = templates["right_hip"], templates["left_hip"]
    atlas = (t_right.points + t_right.origin).mean(axis=0) - (t_left.points + t_left.origin).mean(axis=0)
    expected = _similarity((m_left.scale + m_right.scale) / 2, (m_left.angle + m_right.angle) / 2) @ atlas
    found = m_right.points.mean(axis=0) - m_left.points.mean(axis=0)
    error = float(np.linalg.norm(found - expected) / np.linalg.norm(expected))
    return float(np.clip(1.0 - (error - PAIR_OK) / PAIR_SLACK, 0.0, 1.0))


def _locate_hips(work, to_source, shape, patient_left_on_image_right) -> list[SiteLocation]:
    """Each femur on its side of the image; the atlas's image-left femur is the patient's right hip
    in standard orientation."""
    width = work.shape[1]
    side = int(width * HIP_SIDE_FRACTION)
    m_left = _register(work, ("hip", "ap", "right_hip"), slice(0, side))
    m_right = _register(work, ("hip", "ap", "left_hip"), slice(width - side, width))
    if m_left.points is None or m_right.points is None:
        return []
    pair = _pair_factor(m_left, m_right)
    names = ("right_hip", "left_hip") if patient_left_on_image_right else ("left_hip", "right_hip")
    return [SiteLocation(name, _box(m.points, to_source, shape), _confidence(m.ncc) * pair, method="atlas")
            for name, m in zip(names, (m_left, m_right))]


def _locate_lumbar(work, view, to_source, shape) -> list[SiteLocation]:
    """L1-L4 on an AP or lateral view; lateral views are also tried mirrored (patient facing right)."""
    width = work.shape[1]
    key = ("lumbar", view, "lumbar_spine")
    best = _register(work, key, slice(0, width))
    if view == "lat":
        mirrored = _register(work[:, ::-1], key, slice(0, width))
        if mirrored.points is not None and mirrored.ncc > best.ncc:
            mirrored.points = np.column_stack([mirrored.points[:, 0], width - mirrored.points[:, 1]])
            best = mirrored
    if best.points is None:
        return []
    return [SiteLocation("lumbar_spine", _box(best.points, to_source, shape), _confidence(best.ncc),
                         method="atlas")]


def warm_up() -> None:
    """Load the learned localiser and build every atlas now (about 1.5 s), so that a worker pays it
    at start-up, not on a study."""
    localize_net.warm_up()
    for region, view in (("hip", "ap"), ("lumbar", "ap"), ("lumbar", "lat")):
        _templates(region, view)


def locate_sites(image: np.ndarray, spacing_mm: tuple[float, float], region: str, view: str,
                 *, patient_left_on_image_right: bool = True,
                 image_laterality: str | None = None) -> list[SiteLocation]:
    """Boxes (source pixels, exclusive ends) and confidences for the sites of `region` ("hip":
    left_hip and right_hip on an AP view; "lumbar": lumbar_spine on an AP or lateral view): learned
    first, the atlas for each site the net is not sure of (see the module docstring).

    `image` is bone-bright with any offset and scale, `spacing_mm` its (row, col) pixel size,
    `patient_left_on_image_right` from PatientOrientation, `image_laterality` the header's
    ImageLaterality/Laterality if any. An unsupported region/view or an unusable image gives an
    empty list; anatomy that is not there gives low confidence."""
    learned = localize_net.locate_sites_learned(image, spacing_mm, region, view,
                                                patient_left_on_image_right=patient_left_on_image_right)
    if learned is not None and all(loc.confidence >= LEARNED_GATE for loc in learned):
        found = learned
    else:
        atlas = {loc.site: loc for loc in locate_sites_atlas(
            image, spacing_mm, region, view, patient_left_on_image_right=patient_left_on_image_right)}
        if learned is None:
            found = list(atlas.values())
        else:
            found = [loc if loc.confidence >= LEARNED_GATE or loc.site not in atlas
                     or atlas[loc.site].confidence <= loc.confidence else atlas[loc.site] for loc in learned]
    return _check_laterality(found, region, image_laterality)


def _check_laterality(found: list[SiteLocation], region: str, image_laterality: str | None) -> list[SiteLocation]:
    """A header naming one side (L or R) makes a femur of the other side, found by anatomy, low."""
    side = (image_laterality or "").strip().upper()
    if region != "hip" or side not in ("L", "R"):
        return found
    named = "left_hip" if side == "L" else "right_hip"
    for loc in found:
        if loc.site != named:
            loc.confidence *= LATERALITY_MISMATCH
    return found


def locate_sites_atlas(image: np.ndarray, spacing_mm: tuple[float, float], region: str, view: str,
                       *, patient_left_on_image_right: bool = True) -> list[SiteLocation]:
    """The classical localiser alone (method "atlas"): boxes (source pixels, exclusive ends) and
    confidences for the sites of `region`.

    `image` is bone-bright with any offset and scale, `spacing_mm` its (row, col) pixel size. An
    unsupported region/view or an unusable image gives an empty list; anatomy that is not there
    gives low confidence."""
    img = usable_image(image, spacing_mm, region, view)
    if img is None:
        return []
    work = _normalise(_resample(img, spacing_mm, WORK_MM), WORK_MM)
    to_source = np.array([img.shape[0] / work.shape[0], img.shape[1] / work.shape[1]])
    if region == "hip":
        return _locate_hips(work, to_source, img.shape, patient_left_on_image_right)
    return _locate_lumbar(work, view, to_source, img.shape)

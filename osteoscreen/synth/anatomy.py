"""Shared phantom primitives: the patient and its T-scores (`Patient`, `draw_patient`, `draw_neck_t`),
how a T-score shows in bone (`Bone`), the coarse anatomy grid with its path-length layers (`Canvas`)
and the analytic solids every bone is drawn from (`Solid`: tubes, ellipsoids, rings, plates), with
soft-tissue helpers (body chords, bowel gas) and trabecular stripes. Draws no scene itself: the hip,
lumbar and other scenes build on these; `phantoms` describes the whole method."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

GRID_MM = 0.5
T_RANGE = (-4.5, 2.0)
CLASS_BANDS = ((-1.0, 2.0), (-2.5, -1.0), (-4.5, -2.5))  # normal, osteopenia, osteoporosis
MU_SOFT = 0.021  # per mm, water at an effective ~60 keV
MU_BONE = 0.050  # per mm, cortical bone
MU_METAL = 0.80  # per mm, steel / cobalt-chrome at an effective ~60 keV, hardened (titanium: density factor 0.35)
METAL_CLIP = (1.5, 3.0)  # metal attenuation from which processing starts / fully clips it above the window
NECK_T_SHIFT = (-0.3, 0.25)  # femoral neck T = total hip T + N(mean, sd): the neck usually reads lower
SITE_T_NOISE = 0.3
BONE_MASK_MM = 1.0  # bone path length above which a pixel counts as bone in the whole-bone mask


# ----------------------------------------------------------------------------------------------
# Patient
# ----------------------------------------------------------------------------------------------
@dataclass
class Patient:
    latent_t: float
    t_scores: dict[str, float]
    age: int
    sex: str
    height_m: float
    weight_kg: float
    size: float  # bone size factor, 1.0 for a 1.65 m adult
    neck_t: dict[str, float] = field(default_factory=dict)  # hip site → femoral-neck T (absent: = site T)

    @property
    def bmi(self) -> float:
        return self.weight_kg / self.height_m ** 2


def draw_patient(rng: np.random.Generator) -> Patient:
    """Draw T first (classes roughly balanced), then covariates that only weakly follow it."""
    lo, hi = CLASS_BANDS[int(rng.integers(3))]
    latent = float(rng.uniform(lo, hi))
    sites = {s: float(np.clip(latent + rng.normal(0.0, SITE_T_NOISE), *T_RANGE))
             for s in ("left_hip", "right_hip", "lumbar_spine")}
    sex = "F" if rng.random() < 0.7 else "M"
    age = int(np.clip(round(66.0 - 1.7 * latent + rng.normal(0.0, 9.0)), 40, 95))
    height = float(np.clip(rng.normal(1.62 if sex == "F" else 1.76, 0.07), 1.40, 2.00))
    bmi = float(np.clip(rng.normal(26.5, 4.5), 17.0, 42.0))
    size = height / 1.65 * float(rng.uniform(0.96, 1.04))
    return Patient(latent, sites, age, sex, height, bmi * height ** 2, size)


def draw_neck_t(patient: Patient, rng: np.random.Generator) -> dict[str, float]:
    """Femoral-neck T of both hips: the site (total hip) T plus N(-0.3, 0.25), within T_RANGE."""
    return {site: float(np.clip(patient.t_scores[site] + rng.normal(*NECK_T_SHIFT), *T_RANGE))
            for site in ("left_hip", "right_hip")}


@dataclass
class Bone:
    """How a T-score shows in bone: trabecular fraction, cortex, and the Singh/vertebral pattern."""

    t: float

    @property
    def trabecular(self) -> float:
        return max(0.05, 0.24 * (1.0 + 0.15 * self.t))

    @property
    def cortex(self) -> float:
        return max(0.5, 1.0 + 0.10 * self.t)

    @property
    def cortical_density(self) -> float:
        return 1.0 + 0.03 * self.t

    def group(self, threshold: float, floor: float = 0.0) -> float:
        """Visibility of a trabecular group that fades below `threshold` (Singh grading)."""
        return floor + (1.0 - floor) / (1.0 + math.exp(-(self.t - threshold) / 0.45))


# ----------------------------------------------------------------------------------------------
# Canvas and primitives
# ----------------------------------------------------------------------------------------------
def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _chord(r, d2):
    """Path length through a circle of radius r at squared distance d2 from its centre."""
    return 2.0 * np.sqrt(np.maximum(np.square(r) - d2, 0.0))


def _local(X, Y, centre, angle):
    """Coordinates in a frame centred at `centre` whose u-axis points at `angle` (radians)."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = X - centre[0], Y - centre[1]
    return c * dx + s * dy, -s * dx + c * dy


def _mirror(arc, lat):
    """An arc of parametric angles drawn for the image-right side, mirrored for lat = -1."""
    return arc if lat > 0 else (math.pi - arc[1], math.pi - arc[0])


class Canvas:
    """The coarse anatomy grid over the detector field with its layers of path lengths (mm).

    Anatomy coordinates are mm, x toward the image's right, y toward the feet; the pose maps them
    into the field: field = magnification * R(angle) * anatomy + shift (origin at field centre)."""

    def __init__(self, field_mm, angle, magnification, shift, rng, grid_mm=GRID_MM):
        self.field = (float(field_mm[0]), float(field_mm[1]))
        rows, cols = (max(8, int(round(f / grid_mm))) for f in self.field)
        self.shape = (rows, cols)
        self.step = (self.field[0] / rows, self.field[1] / cols)
        self.angle, self.mag, self.shift = angle, magnification, shift
        fy = ((np.arange(rows, dtype=np.float32) + 0.5) * self.step[0] - self.field[0] / 2 - shift[1])
        fx = ((np.arange(cols, dtype=np.float32) + 0.5) * self.step[1] - self.field[1] / 2 - shift[0])
        c, s = math.cos(angle), math.sin(angle)
        self.X = ((c * fx[None, :] + s * fy[:, None]) / magnification).astype(np.float32)
        self.Y = ((-s * fx[None, :] + c * fy[:, None]) / magnification).astype(np.float32)
        self.soft = np.zeros(self.shape, np.float32)
        self.cort = np.zeros(self.shape, np.float32)
        self.trab = np.zeros(self.shape, np.float32)
        self.metal = np.zeros(self.shape, np.float32)  # steel-equivalent path, mm (implants, foreign bodies)
        self.regions: dict[str, dict[str, np.ndarray]] = {}  # site → DXA region → anatomy points
        white = rng.standard_normal(self.shape, dtype=np.float32)
        fine = ndimage.gaussian_filter(white, 1.0) - ndimage.gaussian_filter(white, 3.0)
        self.fine = fine / (fine.std() + 1e-6)
        wob = ndimage.gaussian_filter(rng.standard_normal(self.shape, dtype=np.float32), 5.0)
        self.wobble = wob / (wob.std() + 1e-6)
        self.wobble2 = np.roll(self.wobble, (rows // 3, cols // 3), axis=(0, 1))

    def to_field(self, points) -> np.ndarray:
        """Anatomy points (N, 2) as (x, y) → field mm from the top-left corner as (row_mm, col_mm)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = self.mag * (c * p[:, 0] - s * p[:, 1]) + self.shift[0] + self.field[1] / 2
        y = self.mag * (s * p[:, 0] + c * p[:, 1]) + self.shift[1] + self.field[0] / 2
        return np.stack([y, x], axis=1)

    def window(self, x0, y0, x1, y1):
        """Grid slices covering an anatomy bounding box, or None when it lies outside the field."""
        f = self.to_field([(x0, y0), (x1, y0), (x0, y1), (x1, y1)])
        r0 = max(0, int(f[:, 0].min() / self.step[0]) - 1)
        r1 = min(self.shape[0], int(f[:, 0].max() / self.step[0]) + 2)
        c0 = max(0, int(f[:, 1].min() / self.step[1]) - 1)
        c1 = min(self.shape[1], int(f[:, 1].max() / self.step[1]) + 2)
        if r1 <= r0 or c1 <= c0:
            return None
        return np.s_[r0:r1, c0:c1]


class Solid:
    """One bone as a union of primitive solids; cortex = outer chord - inner chord.

    Each primitive is evaluated only over its own bounding window; `commit` merges them on the
    union window and adds the bone to the canvas."""

    def __init__(self, cv: Canvas):
        self.cv = cv
        self.parts = []  # (slices, fn(X, Y) -> (outer, inner))
        self.sl = self.X = self.Y = None

    def _add(self, bbox, fn):
        sl = self.cv.window(*bbox)
        if sl is not None:
            self.parts.append((sl, fn))

    def tube(self, p0, p1, r0, r1, cortex, cortex1=None):
        """A cone frustum with rounded ends from p0 (radius r0, cortex) to p1 (radius r1, cortex1)."""
        r = max(r0, r1)
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        norm = dx * dx + dy * dy
        c1 = cortex if cortex1 is None else cortex1

        def fn(X, Y):
            t = np.clip(((X - p0[0]) * dx + (Y - p0[1]) * dy) / norm, 0.0, 1.0)
            d2 = np.square(X - (p0[0] + t * dx)) + np.square(Y - (p0[1] + t * dy))
            rad = r0 + (r1 - r0) * t
            return _chord(rad, d2), _chord(np.maximum(rad - cortex - (c1 - cortex) * t, 0.0), d2)
        self._add((min(p0[0], p1[0]) - r, min(p0[1], p1[1]) - r, max(p0[0], p1[0]) + r, max(p0[1], p1[1]) + r), fn)

    def ellipsoid(self, centre, a, b, depth, angle, cortex):
        """An ellipsoid with semi-axes a (along `angle`), b, and depth/2 along the beam."""
        ai, bi, di = max(a - cortex, 0.5), max(b - cortex, 0.5), max(depth - 2 * cortex, 0.0)

        def fn(X, Y):
            u, v = _local(X, Y, centre, angle)
            q = np.square(u / a) + np.square(v / b)
            qi = np.square(u / ai) + np.square(v / bi)
            return depth * np.sqrt(np.maximum(1.0 - q, 0.0)), di * np.sqrt(np.maximum(1.0 - qi, 0.0))
        m = max(a, b)
        self._add((centre[0] - m, centre[1] - m, centre[0] + m, centre[1] + m), fn)

    def ring(self, centre, a, b, angle, radius, cortex, arc=None):
        """A tube bent along an ellipse (semi-axes a, b), optionally only over `arc` = (phi0, phi1)
        of the ellipse's parametric angle, with tapered ends."""
        def fn(X, Y):
            u, v = _local(X, Y, centre, angle)
            rho = np.sqrt(np.square(u / a) + np.square(v / b)) + 1e-6
            d2 = np.square((rho - 1.0) * np.sqrt(u * u + v * v) / rho)
            r = radius
            if arc is not None:
                phi = np.arctan2(v / b, u / a)
                mid, half = (arc[0] + arc[1]) / 2, (arc[1] - arc[0]) / 2
                off = np.abs(np.mod(phi - mid + math.pi, 2 * math.pi) - math.pi)
                r = radius * np.clip((half - off) / 0.25 + 0.5, 0.0, 1.0)
            return _chord(r, d2), _chord(np.maximum(r - cortex, 0.0), d2)
        m = max(a, b) + radius
        self._add((centre[0] - m, centre[1] - m, centre[0] + m, centre[1] + m), fn)

    def plate(self, bbox, thickness, cortex):
        """A flat bone seen face-on: `thickness(X, Y)` in mm (soft-edged), two cortical layers."""
        def fn(X, Y):
            t = thickness(X, Y)
            return t, np.maximum(t - 2 * cortex, 0.0)
        self._add(bbox, fn)

    def commit(self, bone: Bone, density=None, mask=None, cortical=None):
        """Add the solid to the canvas: cortex with T-dependent density (`cortical(solid)`, per pixel,
        default `bone.cortical_density`), trabecular path times the local trabecular fraction
        (`density(solid)`, default uniform with band-pass texture)."""
        if not self.parts:
            return
        r0 = min(sl[0].start for sl, _ in self.parts)
        r1 = max(sl[0].stop for sl, _ in self.parts)
        c0 = min(sl[1].start for sl, _ in self.parts)
        c1 = max(sl[1].stop for sl, _ in self.parts)
        self.sl = np.s_[r0:r1, c0:c1]
        self.X, self.Y = self.cv.X[self.sl], self.cv.Y[self.sl]
        outer = np.zeros(self.X.shape, np.float32)
        inner = np.zeros(self.X.shape, np.float32)
        for sl, fn in self.parts:
            o, i = fn(self.cv.X[sl], self.cv.Y[sl])
            local = np.s_[sl[0].start - r0:sl[0].stop - r0, sl[1].start - c0:sl[1].stop - c0]
            np.maximum(outer[local], o, out=outer[local])
            np.maximum(inner[local], i, out=inner[local])
        if density is None:
            fraction = bone.trabecular * (0.8 + 0.15 * bone.group(-1.5) * self.cv.fine[self.sl])
        else:
            fraction = density(self)
        cortical_density = bone.cortical_density if cortical is None else cortical(self)
        self.cv.cort[self.sl] += np.maximum(outer - inner, 0.0) * cortical_density
        self.cv.trab[self.sl] += inner * np.maximum(fraction, 0.0)
        if mask is not None:
            mask[self.sl] |= outer > 0.5


def _ellipse_inside(X, Y, centre, a, b, angle, soft=1.5):
    """Soft-edged inside-ellipse mask (edge width ~ `soft` mm)."""
    u, v = _local(X, Y, centre, angle)
    rho = np.sqrt(np.square(u / a) + np.square(v / b)) + 1e-6
    distance = (rho - 1.0) * np.sqrt(u * u + v * v) / rho  # signed, approximately in mm
    return _sigmoid(-distance / soft)


def _body_chord(X, centre_x, width, depth):
    """Soft-tissue path through an elliptic body cross-section at each image column."""
    return depth * np.sqrt(np.maximum(1.0 - np.square(2.0 * (X - centre_x) / width), 0.0))


def _gas(cv: Canvas, rng, region, count):
    """Bowel gas: soft-edged blobs of missing tissue (a nuisance, unrelated to T)."""
    x0, y0, x1, y1 = region
    for _ in range(count):
        c = (rng.uniform(x0, x1), rng.uniform(y0, y1))
        a, b = rng.uniform(8, 30), rng.uniform(6, 20)
        sl = cv.window(c[0] - a - 24, c[1] - a - 24, c[0] + a + 24, c[1] + a + 24)
        if sl is None:
            continue
        inside = _ellipse_inside(cv.X[sl], cv.Y[sl], c, a, b, rng.uniform(0, math.pi), soft=4.0)
        cv.soft[sl] -= rng.uniform(15, 35) * inside


def _stripes(phase, wobble, fine):
    """Irregular trabecular lines: a cosine whose phase wanders and whose contrast varies."""
    return np.cos(phase + 2.0 * wobble) * (0.7 + 0.3 * np.tanh(fine))

"""Radiograph phantoms whose bone density follows a known T-score, and only the pixels show it.

How an image is made
--------------------
1. *Patient*: a latent T-score (one WHO class drawn uniformly, then T uniform within the class band,
   T in [-4.5, 2]); each site gets latent + N(0, 0.3), so hips and spine agree but not exactly. Age
   drifts weakly with low T (r about -0.3); sex, height and BMI are drawn independently of T. Each hip
   also gets a femoral-neck T (`draw_neck_t`): the site's (total hip) T + N(-0.3, 0.25), clipped, as
   in DXA where the neck usually reads lower than the total hip.
2. *Anatomy* on a coarse grid (about 0.5 mm) covering the detector field. Every bone is an analytic
   solid (spheres, cones, ellipsoids, elliptic tubes, plates); each pixel receives the X-ray *path
   length* through cortical and trabecular bone (chords of the solids: cortex is the outer chord minus
   the inner one, so tangential cortex shows as a bright line), soft tissue (body contour from BMI),
   gas, and metal (a layer of its own). A similarity pose (rotation, translation, magnification)
   places the anatomy in the field. A study may add (`StudyExtras`, drawn once per study so that all
   views agree, and drawing nothing from the generator while rendering):
   - *implants* (`implants` module): a total hip arthroplasty (head and neck resected; prosthetic
     head, acetabular shell, stem in the canal, optional cement mantle on the bone layer), a dynamic
     hip screw with side plate, or three cannulated neck screws; lumbar pedicle screws with tulip heads
     and two rods at 2-3 consecutive vertebrae within L1-L4 (AP: converging, nearly end-on; lateral:
     both sides superimposed);
   - *lumbar findings* (`LumbarFindings`): osteophytes (dense beaks at end-plate margins: lateral
     margins in AP, anterior in the lateral view; bone density that is not the vertebra's mineral,
     a confounder as in DXA), one wedge compression fracture in L1-L4 (lateral: anterior height lost;
     AP: lower body; compacted, denser trabeculae), and a stronger scoliotic C-curve (Cobb angle
     about 15-40 degrees, AP view only);
   - *foreign bodies* per image (coins, ECG electrodes with lead wires, clips, buttons, jewellery),
     in field coordinates, clear of every site box.
3. *Bone density* from T: trabecular volume fraction f0(T) = 0.24 (1 + 0.15 T), cortical thickness
   x (1 + 0.10 T), cortical density x (1 + 0.03 T), and the trabecular *pattern*: in the femoral neck
   the Singh groups (secondary/trochanteric fade first, then the principal tensile arcs, the
   principal compressive fan last; Ward's triangle widens); in vertebrae horizontal trabeculae fade
   before vertical ones. Textures are oriented cosine stripes with a smooth random phase wobble plus
   band-pass noise, so no two phantoms share a pattern. In the femoral neck (between the head and the
   trochanteric region, blended over 4 mm) fraction, Singh groups, cortex thickness and density
   follow the neck T; head, trochanters and shaft follow the site's total-hip T.
4. *Exposure* through a scanner profile (`profiles`: three training profiles and one held out; each
   fixes the ranges of everything below; nuisances, independent of T): attenuation A = mu_soft * soft
   + mu_bone * bone + mu_metal * metal (metal about 16 times cortical bone); scatter (a blurred
   fraction of the primary), log, dynamic-range compression and edge enhancement of random strength
   and kernel size. The display window comes from percentiles of the metal-free image; behind thick
   metal only scatter arrives and processing clips it above the window, so metal is the brightest,
   sharply bounded, texture-less region (thin titanium may stay just below). Detector blur (Gaussian
   MTF) smooths the coarse image, which is bilinearly up-sampled to the detector pitch with torch;
   quantum noise (its sigma follows exp(A/2), dose random) is added at the detector pitch, coloured by
   the detector blur; anti-scatter grid lines (a fine cosine, aliased by the pitch into stripes) and
   collimation borders (near-white, unexposed; or black, masked) may follow; then a random window, a
   LUT (power-law gamma or film-like S-curve), gain, offset, stored bits and MONOCHROME1 or 2.
The same generator draws the localiser's atlas (`mean_anatomy`): unposed phantoms averaged, without
metal, foreign bodies or findings (bit-identical to the atlas before these existed).
Image orientation is the standard display: patient's right on image left for AP/PA views (left_hip on
the image's right side), anterior on image left for the lateral lumbar view.

Site truth boxes, in detector pixels (row0, col0, row1, col1), exclusive ends:
- hip: superior border the top of the acetabular roof (sourcil), inferior border one lesser-
  trochanter length (its height along the shaft) below the lesser trochanter's lower edge, medial
  border the lateral margin of the teardrop, lateral border 5 mm lateral of the greater trochanter
  (the crop of Jang et al. 2021);
- hip regions (`Rendered.regions`): the DXA femoral-neck box (12 mm along the neck axis, 44 mm
  across, at the neck's middle; its bounding box in pixels) and the greater trochanter (its central
  part, lateral of the neck region);
- lumbar_spine: the smallest rectangle around the L1-L4 vertebral bodies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import implants as _implants
from .profiles import ScannerProfile, draw_profile, get_profile

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
HIP_SITES = {+1: "left_hip", -1: "right_hip"}  # +1: femur on the image's right (patient's left)


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


# ----------------------------------------------------------------------------------------------
# Femur and pelvis (AP)
# ----------------------------------------------------------------------------------------------
@dataclass
class FemurShape:
    head: tuple[float, float]
    radius: float
    neck_angle: float  # radians below the horizontal, lateral-down
    neck_length: float
    shaft_tilt: float  # radians, the shaft runs medially as it descends
    joint_space: float


def _draw_femur_shape(rng, lat: int, separation: float, size: float) -> FemurShape:
    return FemurShape(head=(lat * separation / 2, 0.0), radius=23.0 * size * rng.uniform(0.95, 1.05),
                      neck_angle=math.radians(rng.uniform(36, 46)),
                      neck_length=50.0 * size * rng.uniform(0.92, 1.08),
                      shaft_tilt=math.radians(rng.uniform(5, 10)), joint_space=rng.uniform(3.0, 5.0))


def _neck_region(shape: FemurShape, size: float) -> tuple[float, float, float]:
    """The femoral neck along its axis from the head centre: where the neck's own T applies (a0, a1)
    and the centre of the DXA neck box (12 mm along the axis, across the neck at its narrow middle)."""
    a0, a1 = shape.radius - 4.0 * size, shape.neck_length - 12.0 * size
    return a0, a1, (shape.radius + a1) / 2


def _neck_weight(X, Y, H, n, a0, a1, half_width):
    """Indicator of the femoral neck: between a0 and a1 along the neck axis, within half_width across
    it, with linear 4 mm ramps at its borders (exactly 0 beyond them)."""
    dx, dy = X - H[0], Y - H[1]
    a, b = dx * n[0] + dy * n[1], dx * n[1] - dy * n[0]
    ramp = np.minimum(np.minimum(a - a0, a1 - a), half_width - np.abs(b))
    return np.clip(ramp / 4.0 + 0.5, 0.0, 1.0)


def _femur(cv: Canvas, shape: FemurShape, lat: int, bone: Bone, size: float, mask=None,
           neck_bone: Bone | None = None, implant=None) -> dict:
    """Proximal femur (head, neck, trochanters, shaft) with Singh trabecular groups; returns the
    landmarks that bound the hip crop and (under "regions") the DXA regions' corner points.

    `neck_bone`: the femoral neck's own density (trabecular fraction, Singh groups, neck cortex and
    its density) between the head and the trochanteric region; `implant`: metal (implants.HipImplant);
    a total hip arthroplasty removes the head and most of the neck."""
    H, R = np.array(shape.head), shape.radius
    n = np.array([lat * math.cos(shape.neck_angle), math.sin(shape.neck_angle)])
    J = H + n * shape.neck_length  # where the neck axis meets the shaft axis
    s = np.array([-lat * math.sin(shape.shaft_tilt), math.cos(shape.shaft_tilt)])
    med = np.array([-lat, 0.0])
    sz, k = size, bone.cortex
    gt = J + np.array([lat * 8.0, -14.0]) * sz
    gt_a, gt_b = 17.0 * sz, 23.0 * sz
    lt_r = 9.0 * sz
    lt = J + s * 46.0 * sz + med * 15.0 * sz
    split = neck_bone is not None and neck_bone.t != bone.t
    resect = implant is not None and implant.resects_head
    a0, a1, a_box = _neck_region(shape, sz)
    sol = Solid(cv)
    if resect:  # total hip: head and neck cut at the neck's base, a stump remains
        sol.tube(J - n * 14.0 * sz, J, 19.5 * sz, 21.0 * sz, 2.0 * k)
    elif split:
        kn = neck_bone.cortex
        M = H + n * a1
        r_m = 15.5 * sz + 5.5 * sz * a1 / shape.neck_length
        sol.ellipsoid(H, R, R, 2 * R, 0.0, 1.6 * k)
        sol.tube(H, M, 15.5 * sz, r_m, 2.0 * kn)
        sol.tube(M, J, r_m, 21.0 * sz, 2.0 * k)
    else:
        sol.ellipsoid(H, R, R, 2 * R, 0.0, 1.6 * k)
        sol.tube(H, J, 15.5 * sz, 21.0 * sz, 2.0 * k)
    sol.tube(J + s * 4.0 * sz, J + s * 80.0 * sz, 23.0 * sz, 15.5 * sz, 2.5 * k, 6.0 * k)
    sol.ellipsoid(gt, gt_a, gt_b, 36.0 * sz, math.radians(lat * 8), 1.5 * k)
    sol.tube(gt, J + s * 75.0 * sz, 12.0 * sz, 15.5 * sz, 1.5 * k, 6.0 * k)  # lateral wall below the trochanter
    sol.ellipsoid(lt, lt_r * 1.3, lt_r, 16.0 * sz, math.atan2(s[1], s[0]) + lat * 0.5, 1.5 * k)
    sol.tube(J + s * 80.0 * sz, J + s * 320.0, 15.5 * sz, 14.0 * sz, 6.0 * k)
    if split:
        neck = (neck_bone, H, n, a0, a1, 24.0 * sz)
        sol.commit(bone, lambda so: _singh_density(so, H, R, J, s, lat, bone, sz, neck), mask,
                   lambda so: bone.cortical_density + (neck_bone.cortical_density - bone.cortical_density)
                   * _neck_weight(so.X, so.Y, H, n, a0, a1, 24.0 * sz))
    else:
        sol.commit(bone, lambda so: _singh_density(so, H, R, J, s, lat, bone, sz), mask)
    if implant is not None:
        p = lat * np.array([s[1], -s[0]])  # across the shaft, toward lateral

        def cement(bbox, fn):
            sl = cv.window(*bbox)
            if sl is not None:
                cv.cort[sl] += fn(cv.X[sl], cv.Y[sl])
        geometry = {"H": H, "R": R, "Racet": R + shape.joint_space, "n": n, "J": J, "s": s, "p": p,
                    "lat": lat, "sz": sz}
        _implants.hip_implant(cv, implant, geometry, cement)
    teardrop = H + med * (R + shape.joint_space + 10.0 * sz) + np.array([0.0, 12.0 * sz])
    q = np.array([n[1], -n[0]])
    neck_box = [H + n * (a_box + da) + q * db for da in (-6.0 * sz, 6.0 * sz) for db in (-22.0 * sz, 22.0 * sz)]
    gt_c = gt + np.array([lat * 0.3 * gt_a, -0.1 * gt_b])  # the trochanter's lateral, upper part
    trochanter = [gt_c + np.array([du, dv]) for du in (-0.4 * gt_a, 0.4 * gt_a) for dv in (-0.45 * gt_b, 0.45 * gt_b)]
    return {"top": H + np.array([0.0, -R - shape.joint_space - 4.0]),
            "bottom": lt + s * 3.0 * lt_r,  # one lesser-trochanter length below its lower edge
            "medial": teardrop - med * 4.5 * sz,  # lateral margin of the teardrop
            "lateral": gt + np.array([lat * (gt_a + 5.0), 0.0]),
            "teardrop": teardrop,
            "regions": {"femoral_neck": np.array(neck_box), "greater_trochanter": np.array(trochanter)}}


def _singh_density(sol: Solid, H, R, J, s, lat, bone: Bone, size, neck=None):
    """Trabecular fraction over the proximal femur: principal compressive fan from the calcar into
    the head, principal tensile arcs from below the greater trochanter over the neck into the head,
    secondary/trochanteric texture elsewhere, fatty medullary canal down the shaft. `neck` =
    (neck bone, H, n, a0, a1, half width): inside the femoral neck, fraction and Singh groups follow
    the neck's own T."""
    X, Y = sol.X, sol.Y
    wob, wob2, fine = sol.cv.wobble[sol.sl], sol.cv.wobble2[sol.sl], sol.cv.fine[sol.sl]
    calcar = J + s * 35.0 * size + np.array([-lat * 13.0 * size, 0.0])
    axis = H + np.array([0.0, -0.6 * R]) - calcar
    length = float(np.hypot(*axis))
    u, v = _local(X, Y, calcar, math.atan2(axis[1], axis[0]))
    w_c = np.exp(-np.square(v) / (2 * (0.5 * R) ** 2)) * _sigmoid(u / 6.0)
    s_c = _stripes(np.arctan2(v, np.maximum(u, 1.0)) * (length / 2.6) * 2 * math.pi, wob, fine)
    centre_t = (H + J) / 2 + np.array([0.0, 50.0 * size])
    r_t = np.hypot(X - centre_t[0], Y - centre_t[1])
    r_mid = float(np.hypot(*(H - centre_t))) + 0.25 * R
    w_t = np.exp(-np.square(r_t - r_mid) / (2 * (0.3 * R) ** 2)) * _sigmoid((Y - (H[1] - 0.7 * R)) / 3.0)
    s_t = _stripes(r_t * (2 * math.pi / 2.6), wob2, fine)
    a_s, a_t, a_c = bone.group(-0.8), bone.group(-2.3), bone.group(-3.6, floor=0.35)
    trabecular = bone.trabecular
    if neck is not None:
        nb, w = neck[0], _neck_weight(X, Y, *neck[1:])
        a_s = a_s + (nb.group(-0.8) - a_s) * w
        a_t = a_t + (nb.group(-2.3) - a_t) * w
        a_c = a_c + (nb.group(-3.6, floor=0.35) - a_c) * w
        trabecular = trabecular + (nb.trabecular - trabecular) * w
    along = (X - J[0]) * s[0] + (Y - J[1]) * s[1]
    canal = 0.12 + 0.88 * _sigmoid((65.0 * size - along) / 8.0)
    pattern = (0.45 + 0.55 * a_c * w_c * (1 + 0.8 * s_c) + 0.45 * a_t * w_t * (1 + 0.8 * s_t)
               + 0.3 * a_s * (1 + 0.5 * fine))
    return trabecular * canal * pattern


def _hemipelvis(cv: Canvas, shape: FemurShape, lat: int, bone: Bone, size: float, teardrop):
    """One innominate bone: ilium (body, wing, posterior column), pubis and ischium as plates; the
    lines a radiograph shows where cortex runs along the beam (acetabular cup and sourcil, teardrop,
    iliac crest, pelvic brim, obturator ring, rami) as tubes added on top."""
    sz, k = size, bone.cortex
    H, R = shape.head, shape.radius + shape.joint_space
    wing = (H[0] * 0.92, -82.0 * sz)
    body = (H[0] - lat * 10 * sz, H[1] - R - 20 * sz)
    column = (H[0] - lat * 30 * sz, H[1] + 5 * sz)
    pubis = (lat * 14 * sz, 32 * sz)
    ischium = (lat * 62 * sz, 74 * sz)

    def thickness(X, Y):
        w = 13.0 * _ellipse_inside(X, Y, wing, 64 * sz, 46 * sz, lat * math.radians(15), 2.0)
        w = np.maximum(w, 40.0 * _ellipse_inside(X, Y, body, 34 * sz, 24 * sz, lat * 0.6, 4.0))
        w = np.maximum(w, 30.0 * _ellipse_inside(X, Y, column, 12 * sz, 36 * sz, lat * 0.15, 3.0))
        w = np.maximum(w, 22.0 * _ellipse_inside(X, Y, pubis, 9 * sz, 20 * sz, 0.0, 2.0))
        return np.maximum(w, 30.0 * _ellipse_inside(X, Y, ischium, 15 * sz, 14 * sz, 0.0, 2.5))
    plates = Solid(cv)
    x0, x1 = sorted((H[0] + lat * 75 * sz, -lat * 5.0))
    plates.plate((x0 - 20, -150 * sz, x1 + 20, 110 * sz), thickness, 1.8 * k)
    plates.commit(bone)
    lines = Solid(cv)
    # Cup: a ring over the superior and medial arc (parametric angle -pi/2 is the top), sourcil.
    lines.ring(H, R + 3.5, R + 3.5, 0.0, 3.0, 1.3 * k, arc=_mirror((-math.pi - 0.9, -0.75), lat))
    lines.ring(H, R + 2.0, R + 2.0, 0.0, 2.5, 2.5 * k, arc=_mirror((-2.3, -0.75), lat))
    lines.ring(teardrop, 4.5 * sz, 11.0 * sz, 0.0, 2.0, 1.0 * k)
    lines.ring(wing, 64 * sz, 46 * sz, lat * math.radians(15), 4.5, 1.6 * k, arc=_mirror((-math.pi + 0.25, 0.15), lat))
    lines.ring((0.0, -28.0 * sz), 64 * sz, 60 * sz, 0.0, 3.0, 1.3 * k, arc=_mirror((-0.75, 1.45), lat))  # brim
    lines.ring((lat * 50 * sz, 44 * sz), 22 * sz, 27 * sz, lat * math.radians(25), 5.5 * sz, 1.4 * k)  # obturator
    lines.tube((pubis[0], pubis[1] - 12 * sz), (H[0] - lat * R * 0.8, H[1] + 10 * sz), 6.0 * sz, 7.0 * sz, 1.2 * k)
    lines.commit(bone)


def _sacrum(cv: Canvas, size: float, bone: Bone, top: float, centre_x: float = 0.0, length: float = 120.0):
    """Sacrum: a tapering plate with alae, four pairs of dark foramina and the median crest."""
    sz = size
    bot = top + length * sz

    def thickness(X, Y):
        frac = np.clip((Y - top) / (bot - top), 0, 1)
        half = (58 - 46 * frac) * sz
        m = _sigmoid((half - np.abs(X - centre_x)) / 2.0) * _sigmoid((Y - top) / 2.0) * _sigmoid((bot - Y) / 3.0)
        holes = np.zeros_like(X)
        for i in range(4):
            y = top + (22 + 20 * i) * sz
            for side in (-1, 1):
                c = (centre_x + side * (20 - 3 * i) * sz, y)
                holes = np.maximum(holes, _ellipse_inside(X, Y, c, 4.5 * sz, 4.0 * sz, 0.0, 1.0))
        return 24.0 * m * (1 - 0.7 * holes)
    sol = Solid(cv)
    sol.plate((centre_x - 66 * sz, top - 8, centre_x + 66 * sz, bot + 10), thickness, 1.2 * bone.cortex)
    sol.tube((centre_x, top + 5), (centre_x, bot - 10), 4.0, 3.0, 1.5)
    sol.commit(bone)


def _pelvis_scene(cv: Canvas, p: Patient, rng, masks: bool, extras: StudyExtras | None = None) -> dict:
    sz, bmi = p.size, p.bmi
    body_w = min(430.0, (330 + 6.0 * (bmi - 25)) * sz)
    depth = (190 + 6.0 * (bmi - 25)) * sz
    thigh_w = (165 + 4.0 * (bmi - 25)) * sz
    split = _sigmoid((cv.Y - 125 * sz) / 12.0)
    cv.soft += (1 - split) * _body_chord(cv.X, 0.0, body_w, depth)
    for lat in (-1, 1):
        cv.soft += split * _body_chord(cv.X, lat * (thigh_w / 2 + 4), thigh_w, depth * 0.85)
    _gas(cv, rng, (-110 * sz, -140 * sz, 110 * sz, -30 * sz), int(rng.integers(2, 8)))
    pitch = (27.0 + DISC_MM) * sz
    _lumbar_ap_column(cv, p, Bone(p.t_scores["lumbar_spine"]), ("L4", "L5"), (0.0, -175 * sz - pitch), rng)
    pelvis = Bone((p.t_scores["left_hip"] + p.t_scores["right_hip"]) / 2)
    _sacrum(cv, sz, pelvis, top=-140 * sz)
    separation = 178.0 * sz * (1.03 if p.sex == "F" else 0.98)
    sites = {}
    for lat in (-1, 1):
        site = HIP_SITES[lat]
        shape = _draw_femur_shape(rng, lat, separation, sz)
        bone = Bone(p.t_scores[site])
        mask = np.zeros(cv.shape, bool) if masks else None
        neck = Bone(p.neck_t[site]) if site in p.neck_t else None
        implant = extras.implants.get(site) if extras is not None else None
        marks = _femur(cv, shape, lat, bone, sz, mask, neck, implant)
        _hemipelvis(cv, shape, lat, bone, sz, marks["teardrop"])
        sites[site] = (np.array([marks[k] for k in ("top", "bottom", "medial", "lateral")]), mask)
        cv.regions[site] = marks["regions"]
    return sites


# ----------------------------------------------------------------------------------------------
# Lumbar spine (AP and lateral)
# ----------------------------------------------------------------------------------------------
LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
_WIDTH = {"T12": 40.0, "L1": 42.0, "L2": 44.0, "L3": 47.0, "L4": 50.0, "L5": 52.0}
_HEIGHT = {"T12": 24.0, "L1": 25.5, "L2": 26.5, "L3": 27.0, "L4": 27.0, "L5": 26.0}
_DEPTH = {"T12": 30.0, "L1": 31.0, "L2": 33.0, "L3": 34.0, "L4": 35.0, "L5": 35.0}
_TRANSVERSE = {"T12": 10.0, "L1": 16.0, "L2": 22.0, "L3": 30.0, "L4": 24.0, "L5": 22.0}
DISC_MM = 10.0


def _vertebral_density(sol: Solid, centre, angle, bone: Bone):
    """Trabecular fraction in a body: vertical and horizontal trabeculae; horizontal fade first."""
    u, v = _local(sol.X, sol.Y, centre, angle)
    wob, wob2, fine = sol.cv.wobble[sol.sl], sol.cv.wobble2[sol.sl], sol.cv.fine[sol.sl]
    s_v = _stripes(u * (2 * math.pi / 2.4), wob, fine)
    s_h = _stripes(v * (2 * math.pi / 2.8), wob2, fine)
    a_h, a_v = bone.group(-1.6), bone.group(-3.4, floor=0.5)
    return bone.trabecular * (0.45 + 0.4 * a_v * (1 + 0.7 * s_v) + 0.35 * a_h * (1 + 0.7 * s_h)
                              + 0.15 * fine)


def _vertebral_body(sol: Solid, centre, w, h, d, angle, bone: Bone, wedge: float = 0.0):
    """Body as an elliptic cylinder (width w across the image, depth d along the beam, height h),
    waisted sides and end plates; cortex from outer - inner chords. `wedge` > 0: a wedge compression
    fracture seen laterally, the side at u = -w/2 (anterior) `wedge` times lower than the other."""
    k = bone.cortex

    def fn(X, Y):
        u, v = _local(X, Y, centre, angle)
        half = w / 2 * (1.0 - 0.06 * (1.0 - np.square(np.clip(2 * v / h, -1, 1))))
        rows = _sigmoid((h / 2 - np.abs(v)) / 0.5)
        rows_in = _sigmoid((h / 2 - 1.2 * k - np.abs(v)) / 0.5)
        outer = d * np.sqrt(np.maximum(1 - np.square(u / half), 0)) * rows
        inner = (d - 2 * k) * np.sqrt(np.maximum(1 - np.square(u / (half - 1.1 * k)), 0)) * rows_in
        return outer, inner

    def wedged(X, Y):
        u, v = _local(X, Y, centre, angle)
        hh = h / 2 * (1.0 - wedge * np.clip(0.5 - u / w, 0.0, 1.0))
        half = w / 2 * (1.0 - 0.06 * (1.0 - np.square(np.clip(v / hh, -1, 1))))
        rows = _sigmoid((hh - np.abs(v)) / 0.5)
        rows_in = _sigmoid((hh - 1.2 * k - np.abs(v)) / 0.5)
        outer = d * np.sqrt(np.maximum(1 - np.square(u / half), 0)) * rows
        inner = (d - 2 * k) * np.sqrt(np.maximum(1 - np.square(u / (half - 1.1 * k)), 0)) * rows_in
        return outer, inner
    m = max(w, h) * 0.75
    sol._add((centre[0] - m, centre[1] - m, centre[0] + m, centre[1] + m), wedged if wedge else fn)


def _body_corners(centre, w, h, angle, wedge: float = 0.0):
    c, s = math.cos(angle), math.sin(angle)
    return [(centre[0] + c * du - s * dv, centre[1] + s * du + c * dv)
            for du in (-w / 2, w / 2) for dv in (-h / 2 * (1 - wedge * (du < 0)), h / 2 * (1 - wedge * (du < 0)))]


# ----------------------------------------------------------------------------------------------
# Lumbar findings: osteophytes, a wedge compression fracture, scoliosis
# ----------------------------------------------------------------------------------------------
LUMBAR_FINDING_RATES = {"osteophytes": 0.12, "compression": 0.06, "scoliosis": 0.08}
LUMBAR_FINDINGS = tuple(LUMBAR_FINDING_RATES)
_DISCS = tuple(zip(LEVELS[:-1], LEVELS[1:]))  # T12/L1 ... L4/L5
_FRACTURE_LEVELS, _FRACTURE_WEIGHTS = ("L1", "L2", "L3", "L4"), (0.35, 0.3, 0.2, 0.15)


@dataclass(frozen=True)
class LumbarFindings:
    """Study-level lumbar findings (both views show the same ones)."""

    osteophytes: tuple[tuple[str, int, float, float, float], ...] = ()  # (level, end -1 upper / +1 lower,
    #                                                 spur length mm on the image-left, image-right, anterior margin)
    compression: tuple[str, float] | None = None  # (level, anterior height loss as a fraction)
    scoliosis: float = 0.0  # lateral curve amplitude, mm (signed); 0 = none

    @property
    def labels(self) -> tuple[str, ...]:
        out = []
        if self.osteophytes:
            out.append("osteophytes")
        if self.compression is not None:
            out.append(f"compression:{self.compression[0]}")
        if self.scoliosis:
            out.append("scoliosis")
        return tuple(out)


def draw_lumbar_findings(rng: np.random.Generator, forced=None) -> LumbarFindings:
    """Random findings at LUMBAR_FINDING_RATES, or exactly `forced`: names "osteophytes",
    "compression" (or "compression:L2"), "scoliosis" (an empty tuple: none)."""
    u = rng.random(3)
    if forced is None:
        wanted = {name: bool(x < rate) for x, (name, rate) in zip(u, LUMBAR_FINDING_RATES.items())}
        level = None
    else:
        names = [str(f).split(":")[0] for f in forced]
        bad = [f for f in names if f not in LUMBAR_FINDINGS]
        if bad:
            raise ValueError(f"unknown lumbar findings {bad}; known: {LUMBAR_FINDINGS}")
        wanted = {name: name in names for name in LUMBAR_FINDINGS}
        level = next((str(f).split(":")[1] for f in forced if str(f).startswith("compression:")), None)
        if level is not None and level not in _FRACTURE_LEVELS:
            raise ValueError(f"compression fractures are drawn in {_FRACTURE_LEVELS}, got {level!r}")
    # Parameters are drawn whether or not they are used: the stream does not depend on the findings.
    discs = rng.permutation(len(_DISCS))[:int(rng.integers(1, 4))]
    spurs = rng.uniform(2.0, 7.0, size=(len(_DISCS), 2, 3)) * (rng.random((len(_DISCS), 2, 3)) < 0.75)
    drawn_level = _FRACTURE_LEVELS[int(rng.choice(len(_FRACTURE_LEVELS), p=_FRACTURE_WEIGHTS))]
    wedge = float(rng.uniform(0.2, 0.45))
    amplitude = float(rng.uniform(10.0, 24.0) * rng.choice([-1.0, 1.0]))
    osteophytes = ()
    if wanted["osteophytes"]:
        spurs[discs, :, 2] = np.maximum(spurs[discs, :, 2], 2.5)  # at least the anterior spurs show
        osteophytes = tuple((_DISCS[i][j], (1, -1)[j], *map(float, spurs[i, j])) for i in sorted(discs) for j in (0, 1))
    return LumbarFindings(osteophytes=osteophytes,
                          compression=(level or drawn_level, wedge) if wanted["compression"] else None,
                          scoliosis=amplitude if wanted["scoliosis"] else 0.0)


@dataclass
class StudyExtras:
    """What a study adds to the normal anatomy, drawn once per study (all views agree)."""

    implants: dict = field(default_factory=dict)  # site → implants.HipImplant | implants.SpineFusion
    lumbar: LumbarFindings | None = None


def _spurs(cv: Canvas, spurs, at, w, h, depth, lateral: bool):
    """Osteophytes: solid, dense beaks at end-plate margins, pointing outward and toward the disc,
    tapering to their tip; `depth` mm of bone along the beam (the rim is seen tangentially). `at(du,
    dv)` maps body-local mm to anatomy mm; `spurs` = [(end, lengths (image-left, image-right,
    anterior))]."""
    sol = Solid(cv)
    beak = math.radians(35)
    for end, lengths in spurs:
        sides = ((-1, lengths[2]),) if lateral else ((-1, lengths[0]), (1, lengths[1]))
        for side, length in sides:
            if length <= 0:
                continue
            base = np.array(at(side * (w / 2 - 1.5), end * (h / 2 - 1.0)))
            tip = np.array(at(side * (w / 2 + length * math.cos(beak)), end * (h / 2 + length * math.sin(beak))))
            r0 = 1.6 + 0.15 * length

            def fn(X, Y, base=base, tip=tip, r0=r0):
                d = tip - base
                t = np.clip(((X - base[0]) * d[0] + (Y - base[1]) * d[1]) / float(d @ d), 0.0, 1.0)
                d2 = np.square(X - base[0] - t * d[0]) + np.square(Y - base[1] - t * d[1])
                rad = r0 * (1.0 - 0.75 * t)
                return depth * np.sqrt(np.maximum(1.0 - d2 / np.square(rad), 0.0)), np.zeros_like(X)
            sol._add((min(base[0], tip[0]) - r0, min(base[1], tip[1]) - r0, max(base[0], tip[0]) + r0,
                      max(base[1], tip[1]) + r0), fn)
    sol.commit(Bone(0.5))


def _lumbar_ap_column(cv: Canvas, p: Patient, bone: Bone, levels, origin, rng, mask=None, mask_levels=(),
                      extras: StudyExtras | None = None):
    """Vertebrae in AP view stacked from `origin` (centre of the first level listed): bodies, pedicle
    rings, laminae, spinous and transverse processes, 12th ribs on T12. Returns body corners.
    `extras`: a scoliotic curve, a compression fracture, osteophytes, pedicle screws and rods."""
    sz = p.size
    y = origin[1]
    corners = {}
    scoliosis = rng.normal(0, 0.02)
    findings = extras.lumbar if extras is not None and extras.lumbar is not None else LumbarFindings()
    fusion = extras.implants.get("lumbar_spine") if extras is not None else None
    span = 6 * (27.0 + DISC_MM) * sz  # a C-shaped curve from above the first level to below the last
    pedicles = {}
    for i, level in enumerate(levels):
        w, h, d = _WIDTH[level] * sz, _HEIGHT[level] * sz, _DEPTH[level] * sz
        if i:
            y += (_HEIGHT[levels[i - 1]] * sz + h) / 2 + DISC_MM * sz
        c = (origin[0] + scoliosis * (y - origin[1]) * 0.5, y)
        tilt, curve = scoliosis, 0.0
        if findings.scoliosis:
            phase = math.pi * (y - origin[1] + 0.5 * (27.0 + DISC_MM) * sz) / span
            c = (c[0] + findings.scoliosis * math.sin(phase), y)
            curve = math.atan(findings.scoliosis * math.pi / span * math.cos(phase))
            tilt = scoliosis + curve
        density_factor, h_body = 1.0, h
        if findings.compression is not None and findings.compression[0] == level:
            h_body = h * (1.0 - 0.35 * findings.compression[1])  # the AP view sees the mean height loss
            density_factor = 1.0 + 0.8 * findings.compression[1]  # compacted trabeculae
        corners[level] = _body_corners(c, w, h_body, tilt)
        body = Solid(cv)
        _vertebral_body(body, c, w, h_body, d, tilt, bone)
        if density_factor == 1.0:
            body.commit(bone, lambda so, c=c, tilt=tilt: _vertebral_density(so, c, tilt, bone),
                        mask if level in mask_levels else None)
        else:
            body.commit(bone, lambda so, c=c, tilt=tilt: density_factor * _vertebral_density(so, c, tilt, bone),
                        mask if level in mask_levels else None)
        ends = [(end, lengths) for lv, end, *lengths in findings.osteophytes if lv == level]
        if ends:
            ct, st = math.cos(tilt), math.sin(tilt)
            _spurs(cv, ends, lambda du, dv, c=c, ct=ct, st=st: (c[0] + ct * du - st * dv, c[1] + st * du + ct * dv),
                   w, h_body, 10.0, lateral=False)
        cc, sc = math.cos(curve), math.sin(curve)

        def P(x, y_, c=c, cc=cc, sc=sc, curve=curve):
            """Posterior elements follow the scoliotic curve's tilt (identity without one)."""
            if not curve:
                return (x, y_)
            dx, dy = x - c[0], y_ - c[1]
            return (c[0] + cc * dx - sc * dy, c[1] + sc * dx + cc * dy)
        post = Solid(cv)
        for side in (-1, 1):
            ped = P(c[0] + side * (w / 2 - 8 * sz), c[1] - h / 2 + 9 * sz)
            pedicles.setdefault(level, []).append(ped)
            post.ring(ped, 4.5 * sz, 7.0 * sz, curve, 1.8, 1.0 * bone.cortex)
            root = P(c[0] + side * (w / 2 - 4 * sz), c[1] - h / 2 + 11 * sz)
            tip = P(c[0] + side * (w / 2 + _TRANSVERSE[level] * sz), c[1] - h / 2 + 13 * sz)
            post.tube(root, tip, 4.0 * sz, 3.0 * sz, 1.2 * bone.cortex)
            if level == "T12":
                rib0 = P(c[0] + side * (w / 2 + 6 * sz), c[1] - h / 2 + 5 * sz)
                post.tube(rib0, (rib0[0] + side * 70 * sz, rib0[1] + 60 * sz), 5.0 * sz, 3.5 * sz, 1.2 * bone.cortex)
        post.ellipsoid(P(c[0], c[1] + h / 2 - 2 * sz), 4.5 * sz, 11.0 * sz, 14.0, curve, 1.5 * bone.cortex)
        lam = P(c[0], c[1] + 2 * sz)
        post.plate((lam[0] - w / 2, lam[1] - h / 2, lam[0] + w / 2, lam[1] + h / 2),
                   lambda X, Y, lam=lam, w=w, h=h, curve=curve: 7.0 * _ellipse_inside(X, Y, lam, w / 2 - 5 * sz,
                                                                                      h / 2 - 2 * sz, curve),
                   1.0)
        post.commit(bone)
    if fusion is not None:
        _implants.pedicle_screws_ap(cv, fusion, pedicles)
    return corners


def _lumbar_ap_scene(cv: Canvas, p: Patient, rng, masks: bool, extras: StudyExtras | None = None) -> dict:
    sz, bmi = p.size, p.bmi
    cv.soft += _body_chord(cv.X, 0.0, min(440.0, (310 + 6.0 * (bmi - 25)) * sz), (200 + 6.5 * (bmi - 25)) * sz)
    for side in (-1, 1):  # psoas shadows: soft-tissue wedges beside the spine
        sl = cv.window(side * 45 * sz - 60, -120 * sz, side * 45 * sz + 60, 200 * sz)
        if sl is not None:
            cv.soft[sl] += 12.0 * _ellipse_inside(cv.X[sl], cv.Y[sl], (side * 45 * sz, 60 * sz), 28 * sz, 120 * sz,
                                                  side * 0.25, 6.0)
    _gas(cv, rng, (-130 * sz, -60 * sz, 130 * sz, 150 * sz), int(rng.integers(3, 10)))
    bone = Bone(p.t_scores["lumbar_spine"])
    mask = np.zeros(cv.shape, bool) if masks else None
    pitch = (27.0 + DISC_MM) * sz
    corners = _lumbar_ap_column(cv, p, bone, LEVELS, (0.0, -3 * pitch), rng, mask, ("L1", "L2", "L3", "L4"), extras)
    pelvis = Bone(p.latent_t)
    l5 = np.mean(corners["L5"], axis=0)
    _sacrum(cv, sz, pelvis, top=l5[1] + (13 + DISC_MM) * sz, centre_x=l5[0])
    il = Solid(cv)
    for side in (-1, 1):  # iliac wings with their crests at the L4-L5 level
        wing = (l5[0] + side * 110 * sz, l5[1] + 60 * sz)

        def thickness(X, Y, wing=wing, side=side):
            return 9.0 * _ellipse_inside(X, Y, wing, 64 * sz, 46 * sz, side * math.radians(15), 2.0)
        il.plate((wing[0] - 70 * sz, wing[1] - 70 * sz, wing[0] + 70 * sz, wing[1] + 70 * sz), thickness, pelvis.cortex)
        il.ring(wing, 64 * sz, 46 * sz, side * math.radians(15), 4.5, 1.6 * pelvis.cortex,
                arc=_mirror((-math.pi + 0.25, 0.15), side))
    il.commit(pelvis)
    box_pts = np.array([pt for lv in ("L1", "L2", "L3", "L4") for pt in corners[lv]])
    return {"lumbar_spine": (box_pts, mask)}


def _lumbar_lat_scene(cv: Canvas, p: Patient, rng, masks: bool, extras: StudyExtras | None = None) -> dict:
    """Lateral lumbar spine, anterior on image left: lordotic column of bodies with end plates,
    pedicles, facets and spinous processes; iliac wing and S1 below L5; 12th rib over T12. `extras`:
    a wedge compression fracture, anterior osteophytes, pedicle screws and rods (a scoliotic curve
    does not show in this view)."""
    sz, bmi = p.size, p.bmi
    back = (95.0 + 25 + 3.0 * (bmi - 25)) * sz  # spinous tips plus back fat
    depth = (265 + 8.0 * (bmi - 25)) * sz
    width = min(460.0, (320 + 6.0 * (bmi - 25)) * sz)
    cv.soft += _body_chord(cv.X, back - depth / 2, depth, width) * _sigmoid((back - cv.X) / 3.0)
    _gas(cv, rng, (-200 * sz, -80 * sz, -50 * sz, 150 * sz), int(rng.integers(3, 9)))
    bone = Bone(p.t_scores["lumbar_spine"])
    mask = np.zeros(cv.shape, bool) if masks else None
    lordosis = rng.uniform(10, 25) * sz
    pitch = (27.0 + DISC_MM) * sz
    findings = extras.lumbar if extras is not None and extras.lumbar is not None else LumbarFindings()
    fusion = extras.implants.get("lumbar_spine") if extras is not None else None
    frames = {}
    corners = {}
    y = -3 * pitch
    for i, level in enumerate(LEVELS):
        h, d, w = _HEIGHT[level] * sz, _DEPTH[level] * sz, _WIDTH[level] * sz
        if i:
            y += (_HEIGHT[LEVELS[i - 1]] * sz + h) / 2 + DISC_MM * sz
        x = lordosis * (y / (3 * pitch)) ** 2
        ang = -math.atan(2 * lordosis * y / (3 * pitch) ** 2)  # bodies tilt with the curve
        c = (x, y)
        fractured = findings.compression is not None and findings.compression[0] == level
        wedge = findings.compression[1] if fractured else 0.0
        corners[level] = _body_corners(c, d, h, ang, wedge)
        body = Solid(cv)
        _vertebral_body(body, c, d, h, w, ang, bone, wedge)
        if wedge:
            body.commit(bone, lambda so, c=c, ang=ang: (1.0 + 0.8 * wedge) * _vertebral_density(so, c, ang, bone),
                        mask if level in ("L1", "L2", "L3", "L4") else None)
        else:
            body.commit(bone, lambda so, c=c, ang=ang: _vertebral_density(so, c, ang, bone),
                        mask if level in ("L1", "L2", "L3", "L4") else None)
        ca, sa = math.cos(ang), math.sin(ang)

        def at(du, dv, x=x, y=y, ca=ca, sa=sa):
            return (x + ca * du - sa * dv, y + sa * du + ca * dv)
        frames[level] = (at, d, h, sz)
        ends = [(end, lengths) for lv, end, *lengths in findings.osteophytes if lv == level]
        if ends:
            _spurs(cv, ends, at, d, h * (1 - wedge), 0.55 * w, lateral=True)
        post = Solid(cv)
        post.tube(at(d / 2, -h / 2 + 6 * sz), at(d / 2 + 16 * sz, -h / 2 + 6 * sz), 5.0 * sz, 4.5 * sz, 1.0 * bone.cortex)
        post.ellipsoid(at(d / 2 + 21 * sz, -h / 2 + 5 * sz), 8 * sz, 11 * sz, 20.0, 0.3, 1.2 * bone.cortex)
        post.ellipsoid(at(d / 2 + 21 * sz, h / 2 + 4 * sz), 6 * sz, 8 * sz, 16.0, 0.3, 1.2 * bone.cortex)
        post.tube(at(d / 2 + 24 * sz, 2 * sz), at(d / 2 + 58 * sz, 8 * sz), 6.5 * sz, 5.0 * sz, 1.2 * bone.cortex)
        if level == "T12":
            post.tube(at(d / 2 + 10 * sz, -4 * sz), at(-40 * sz, 70 * sz), 5.0, 4.0, 1.2 * bone.cortex)
        post.commit(bone)
    if fusion is not None:
        _implants.pedicle_screws_lat(cv, fusion, frames)
    pelvis = Bone(p.latent_t)
    l5 = np.mean(corners["L5"], axis=0)
    il = Solid(cv)
    wing = (l5[0] + 25 * sz, l5[1] + 75 * sz)
    il.plate((wing[0] - 80 * sz, wing[1] - 70 * sz, wing[0] + 80 * sz, wing[1] + 70 * sz),
             lambda X, Y: 14.0 * _ellipse_inside(X, Y, wing, 70 * sz, 60 * sz, 0.4, 2.0), 1.2 * pelvis.cortex)
    il.ring(wing, 70 * sz, 60 * sz, 0.4, 5.0, 1.5 * pelvis.cortex, arc=(-math.pi + 0.3, -0.1))
    il.commit(pelvis)
    # Sacrum: S1-S3 bodies along a curve down and back from a sloping S1 end plate.
    slope = -rng.uniform(0.55, 0.8)
    centre = np.array([l5[0] + 6 * sz, l5[1] + (_HEIGHT["L5"] / 2 + DISC_MM + 14) * sz])
    for i, (d, h) in enumerate(((40.0, 28.0), (32.0, 22.0), (24.0, 18.0))):
        sacral = Solid(cv)
        angle = slope - 0.25 * i
        _vertebral_body(sacral, tuple(centre), d * sz, h * sz, 40.0 * sz, angle, pelvis)
        sacral.commit(pelvis)
        centre = centre + np.array([-math.sin(angle), math.cos(angle)]) * (h + 4.0) * sz
    box_pts = np.array([pt for lv in ("L1", "L2", "L3", "L4") for pt in corners[lv]])
    return {"lumbar_spine": (box_pts, mask)}


# ----------------------------------------------------------------------------------------------
# Chest (PA), only to test that non-screening images are skipped
# ----------------------------------------------------------------------------------------------
def _chest_scene(cv: Canvas, p: Patient, rng, masks: bool, extras: StudyExtras | None = None) -> dict:
    sz, bmi = p.size, p.bmi
    width, depth = min(420.0, (310 + 5.0 * (bmi - 25)) * sz), (220 + 5.0 * (bmi - 25)) * sz
    cv.soft += _body_chord(cv.X, 0.0, width, depth) * _sigmoid((cv.Y + 170 * sz) / 8.0)
    for side in (-1, 1):  # lungs: air replaces ~80 % of the tissue; the heart takes room on the left
        centre = (side * 72 * sz, -20 * sz)
        sl = cv.window(centre[0] - 80 * sz, -170 * sz, centre[0] + 80 * sz, 150 * sz)
        if sl is None:
            continue
        X, Y = cv.X[sl], cv.Y[sl]
        lung = _ellipse_inside(X, Y, centre, 58 * sz, 115 * sz, 0.0, 4.0)
        lung = lung * _sigmoid((60 * sz + 25 * sz * np.square((X - centre[0]) / (60 * sz)) - Y) / 4.0)
        if side > 0:
            lung = lung * (1 - _ellipse_inside(X, Y, (30 * sz, 55 * sz), 70 * sz, 50 * sz, -0.3, 5.0))
        cv.soft[sl] -= 0.8 * 150 * sz * np.sqrt(np.maximum(1 - np.square((X - centre[0]) / (60 * sz)), 0)) * lung
    bone = Bone(p.latent_t)
    spine = Solid(cv)
    for i in range(12):  # thoracic bodies, simplified
        spine.ellipsoid((0.0, -180 * sz + i * 30 * sz), 17 * sz, 11 * sz, 26.0, 0.0, 1.0 * bone.cortex)
    spine.commit(bone)
    ribs = Solid(cv)
    for i in range(10):
        y0 = -150 * sz + i * 22 * sz
        for side in (-1, 1):
            ribs.ring((side * 25 * sz, y0 + 45 * sz), (70 + 3 * i) * sz, 50 * sz, side * 0.35, 4.5 * sz,
                      1.2 * bone.cortex, arc=_mirror((-math.pi + 0.6, -0.3), side))
    for side in (-1, 1):  # clavicles
        ribs.tube((side * 20 * sz, -150 * sz), (side * 150 * sz, -175 * sz), 6.0 * sz, 5.0 * sz, 1.5 * bone.cortex)
    ribs.commit(bone)
    return {}


# ----------------------------------------------------------------------------------------------
# Lower leg (AP tibia and fibula with the knee), only to test that non-screening bone is refused
# ----------------------------------------------------------------------------------------------
def _leg_scene(cv: Canvas, p: Patient, rng, masks: bool, extras: StudyExtras | None = None) -> dict:
    sz, bmi = p.size, p.bmi
    joint = -120.0 * sz  # the knee joint sits high in the field, the tibial shaft fills the rest
    thigh, calf = (135 + 4.0 * (bmi - 25)) * sz, (105 + 3.0 * (bmi - 25)) * sz
    width = calf + (thigh - calf) * _sigmoid((joint - 30 * sz - cv.Y) / 25.0) \
        - 25 * sz * _sigmoid((cv.Y - joint - 150 * sz) / 30.0)  # thigh, calf, then the ankle's taper
    cv.soft += _body_chord(cv.X, 0.0, width, width * 0.95)
    bone = Bone(p.latent_t)
    k = bone.cortex
    femur = Solid(cv)
    femur.tube((3 * sz, joint - 260 * sz), (2 * sz, joint - 70 * sz), 13 * sz, 16 * sz, 4.0 * k, 2.5 * k)
    femur.tube((2 * sz, joint - 70 * sz), (0.0, joint - 25 * sz), 16 * sz, 34 * sz, 2.5 * k, 1.2 * k)
    for side in (-1, 1):  # condyles
        femur.ellipsoid((side * 21 * sz, joint - 18 * sz), 20 * sz, 17 * sz, 55 * sz, 0.0, 1.2 * k)
    femur.commit(bone)
    patella = Solid(cv)
    patella.ellipsoid((2 * sz, joint - 38 * sz), 21 * sz, 24 * sz, 22 * sz, 0.1, 1.5 * k)
    patella.commit(bone)
    tibia = Solid(cv)
    tibia.ellipsoid((0.0, joint + 14 * sz), 39 * sz, 12 * sz, 50 * sz, 0.0, 1.0 * k)  # plateau
    tibia.tube((0.0, joint + 18 * sz), (-2 * sz, joint + 85 * sz), 35 * sz, 15 * sz, 1.2 * k, 3.5 * k)
    tibia.tube((-2 * sz, joint + 85 * sz), (-4 * sz, joint + 400 * sz), 15 * sz, 12 * sz, 3.5 * k, 3.0 * k)
    tibia.commit(bone)
    fibula = Solid(cv)
    fibula.ellipsoid((33 * sz, joint + 38 * sz), 10 * sz, 11 * sz, 20 * sz, 0.3, 1.0 * k)
    fibula.tube((33 * sz, joint + 45 * sz), (27 * sz, joint + 400 * sz), 7 * sz, 6 * sz, 2.0 * k)
    fibula.commit(bone)
    return {}


SCENES = {("hip", "ap"): _pelvis_scene, ("lumbar", "ap"): _lumbar_ap_scene,
          ("lumbar", "lat"): _lumbar_lat_scene, ("chest", "pa"): _chest_scene, ("chest", "ap"): _chest_scene,
          ("leg", "ap"): _leg_scene}
FIELDS = {"hip": ((280, 350), (380, 430)), "lumbar": ((330, 430), (220, 300)), "chest": ((350, 430), (350, 430)),
          "leg": ((380, 430), (180, 240))}


# ----------------------------------------------------------------------------------------------
# Rendering and exposure
# ----------------------------------------------------------------------------------------------
@dataclass
class Rendered:
    """The coarse attenuation image and per-site truth before exposure to a detector."""

    attenuation: np.ndarray  # coarse grid, log attenuation (bone bright)
    field_mm: tuple[float, float]
    sites: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)  # field-mm points, mask
    metal: np.ndarray | None = None  # coarse grid, metal path (mm), None when the image has no metal
    regions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # site → DXA region → field-mm points
    foreign_bodies: int = 0  # how many foreign bodies were placed
    bone: np.ndarray | None = None  # coarse grid, True where any bone lies in the beam (with masks=True)


def _field_box(points_mm: np.ndarray) -> tuple[float, float, float, float]:
    return (float(points_mm[:, 0].min()), float(points_mm[:, 1].min()),
            float(points_mm[:, 0].max()), float(points_mm[:, 1].max()))


def render(kind: str, view: str, patient: Patient, rng: np.random.Generator, *, masks: bool = False,
           pose: bool = True, field_mm: tuple[float, float] | None = None, extras: StudyExtras | None = None,
           foreign=()) -> Rendered:
    """Lay out one view of one patient and return its attenuation image on the coarse grid.

    `extras` (implants, lumbar findings) and `foreign` (implants.ForeignBody, placed clear of the site
    boxes) draw nothing from `rng`: without them the image is what it was before they existed."""
    (h0, h1), (w0, w1) = FIELDS[kind]
    drawn = (rng.uniform(h0, h1), rng.uniform(w0, w1))
    field_mm = field_mm or drawn
    if pose:
        angle, mag = math.radians(rng.uniform(-5, 5)), rng.uniform(1.0, 1.08)
        shift = (rng.uniform(-18, 18), rng.uniform(-15, 15))
    else:
        angle, mag, shift = 0.0, 1.06, (0.0, 0.0)
    if kind == "lumbar":  # fields are centred near L3/L4, lateral ones over the posterior elements
        shift = (shift[0] - (25.0 if view == "lat" else 0.0), shift[1] + 12.0)
    cv = Canvas(field_mm, angle, mag, shift, rng)
    sites = SCENES[(kind, view)](cv, patient, rng, masks, extras)
    truth = {s: (cv.to_field(pts), m) for s, (pts, m) in sites.items()}
    placed = _implants.place_foreign_bodies(cv, foreign, [_field_box(p) for p, _ in truth.values()]) if foreign else 0
    att = MU_SOFT * np.maximum(cv.soft, 0.0) + MU_BONE * (cv.cort + cv.trab)
    metal = None
    if cv.metal.any():
        metal = np.maximum(cv.metal, 0.0)
        att = att + MU_METAL * metal
    regions = {s: {name: cv.to_field(pts) for name, pts in r.items()} for s, r in cv.regions.items()}
    bone = (cv.cort + cv.trab) > BONE_MASK_MM if masks else None
    return Rendered(att.astype(np.float32), field_mm, truth, metal, regions, placed, bone)


def _wide_blur(image: np.ndarray, sigma_mm: float, step_mm: float, stride: int) -> np.ndarray:
    """A Gaussian blur of many millimetres, computed on a decimated copy and interpolated back."""
    small = ndimage.gaussian_filter(image[::stride, ::stride], sigma_mm / (stride * step_mm))
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(small))[None, None], size=image.shape,
                         mode="bilinear", align_corners=False)[0, 0].numpy()


def _processing(att: np.ndarray, step_mm: float, rng,
                profile: ScannerProfile | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scatter, log, dynamic-range compression and edge enhancement of random strength (within the
    profile's ranges) on the coarse grid; returns (presentation values, relative noise sigma per
    coarse pixel)."""
    prof = profile if profile is not None else draw_profile(rng)
    primary = np.exp(-att)
    signal = primary + rng.uniform(*prof.scatter) * _wide_blur(primary, 40.0, step_mm, 8)
    log = -np.log(np.maximum(signal, 1e-9))
    strength, kernel = rng.uniform(*prof.compression), rng.uniform(*prof.compression_mm)
    log = log - strength * (_wide_blur(log, kernel, step_mm, 4) - log.mean())
    strength, kernel = rng.uniform(*prof.edge), rng.uniform(*prof.edge_kernel_mm)
    log = log + strength * (log - ndimage.gaussian_filter(log, kernel / step_mm))
    sigma = 1.0 / np.sqrt(np.maximum(signal, 1e-9))
    return log.astype(np.float32), sigma.astype(np.float32)


def mean_anatomy(kind: str, view: str, count: int = 8) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """The localiser's atlas: mean attenuation of `count` unposed phantoms (T = -1.25, anatomy and
    body habitus varying) on one fixed field, its pixel size in mm, and the mean site landmarks
    (field mm, rows and columns). No metal, foreign bodies or lumbar findings: plain anatomy."""
    rng = np.random.default_rng(20240607)
    (h0, h1), (w0, w1) = FIELDS[kind]
    field_mm = ((h0 + h1) / 2, (w0 + w1) / 2)
    images, marks = [], {}
    for _ in range(count):
        patient = draw_patient(rng)
        patient.t_scores = dict.fromkeys(patient.t_scores, -1.25)
        r = render(kind, view, patient, rng, pose=False, field_mm=field_mm)
        images.append(r.attenuation)
        for site, (points, _) in r.sites.items():
            marks.setdefault(site, []).append(points)
    mean = np.mean(images, axis=0)
    return mean, field_mm[0] / mean.shape[0], {s: np.mean(p, axis=0) for s, p in marks.items()}


@dataclass
class Exposure:
    pixels: np.ndarray  # uint16 stored values
    bits_stored: int
    photometric: str
    spacing_mm: float
    profile: str = ""  # ScannerProfile.name
    window: tuple[float, float] | None = None  # (centre, width) over the collimated, metal-free field
    collimation: str = ""  # "", "black" or "white"
    grid_lines: bool = False


def _noise_box(blur_px: float) -> int:
    """Width of the box that colours the quantum noise for a detector blur of `blur_px` (Gaussian sigma,
    pixels): 0 (white) below 0.35, 2 (sigma 0.5) below 0.75, else 3 (sigma 0.82)."""
    return 0 if blur_px < 0.35 else 2 if blur_px < 0.75 else 3


def _detector_noise(shape, box: int, gen: torch.Generator) -> torch.Tensor:
    """Quantum noise at the detector pitch, coloured by a `box`-wide moving sum along both axes (a
    few whole-image additions). Its standard deviation is `box` (1 when white): scale it by 1/box."""
    if not box:
        return torch.randn(shape, generator=gen)
    noise = torch.randn((shape[0] + box - 1, shape[1] + box - 1), generator=gen)
    for axis, n in ((1, shape[1]), (0, shape[0])):
        total = noise.narrow(axis, 0, n) + noise.narrow(axis, 1, n)
        for k in range(2, box):
            total.add_(noise.narrow(axis, k, n))
        noise = total
    return noise


def _lut(profile: ScannerProfile, top: int, rng) -> np.ndarray:
    """Presentation index 0..65535 → stored value: offset + gain * shape(x), shape a power-law gamma
    or a film-like S-curve (logistic, normalised to 0..1 over the window)."""
    gamma = math.exp(rng.uniform(math.log(profile.gamma[0]), math.log(profile.gamma[1])))
    slope, centre = rng.uniform(*profile.scurve_slope), rng.uniform(*profile.scurve_centre)
    offset = rng.uniform(0.0, 0.06) * top
    gain = rng.uniform(0.75, 0.98) * (top - offset)
    x = np.linspace(0.0, 1.0, 65536)
    if profile.lut == "scurve":
        lo, hi = 1 / (1 + math.exp(slope * centre)), 1 / (1 + math.exp(-slope * (1 - centre)))
        shape = (1 / (1 + np.exp(-slope * (x - centre))) - lo) / (hi - lo)
    else:
        shape = x ** gamma
    return offset + gain * shape


def display_window(values: np.ndarray) -> tuple[float, float]:
    """(centre, width) over the 0.5-99.5 % range of stored values, as a modality's processing sets it."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    return round(float(lo + hi) / 2.0, 1), round(max(float(hi - lo), 2.0), 1)


def expose(r: Rendered, rng: np.random.Generator, *, photometric: str | None = None,
           profile: ScannerProfile | str | None = None) -> tuple[Exposure, dict]:
    """Put the coarse image on a detector through a scanner profile (None: one of the training
    profiles drawn from `rng`): processing, up-sampling, noise, detector blur, grid lines, window,
    collimation, LUT, bits, photometric. Returns the exposure and the site boxes in detector pixels."""
    prof = draw_profile(rng) if profile is None else get_profile(profile)
    spacing = round(float(rng.uniform(*prof.spacing_mm)), 4)  # as the header will state it
    shape = tuple(int(round(f / spacing)) for f in r.field_mm)
    step = r.field_mm[0] / r.attenuation.shape[0]
    log, sigma = _processing(r.attenuation, step, rng, prof)
    dose = rng.uniform(*prof.dose) * (spacing / 0.15) ** 2  # photons per detector pixel, unattenuated
    metal = None if r.metal is None else r.metal > 0.3
    sample = log[::2, ::2] if metal is None else log[::2, ::2][~metal[::2, ::2]]  # windows ignore metal
    lo, hi = np.percentile(sample, [rng.uniform(*prof.window_lo_pct), rng.uniform(*prof.window_hi_pct)])
    hi = hi + rng.uniform(0.0, 0.15) * (hi - lo)
    if metal is not None:  # behind thick metal only scatter arrives: clipped above the window (white)
        clip = np.clip((MU_METAL * r.metal - METAL_CLIP[0]) / (METAL_CLIP[1] - METAL_CLIP[0]), 0.0, 1.0)
        log = log + clip * np.maximum(hi + 0.3 * (hi - lo) - log, 0.0)
    mtf_mm = rng.uniform(*prof.mtf_sigma_mm)  # detector blur: on the signal (coarse grid) and the noise
    log = ndimage.gaussian_filter(log, mtf_mm / step, truncate=3.0) if mtf_mm > 0 else log
    box = _noise_box(mtf_mm / spacing)
    coarse = torch.from_numpy(np.stack([log, sigma / (math.sqrt(dose) * max(box, 1))]))[None]
    fine = F.interpolate(coarse, size=shape, mode="bilinear", align_corners=False)[0]
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    noise = _detector_noise(shape, box, gen)
    img = fine[0].add_(fine[1].mul_(noise))
    grid = rng.random() < prof.grid_p  # grid parameters are drawn always: same seed, same rest
    period, amplitude = rng.uniform(*prof.grid_period_mm), rng.uniform(*prof.grid_amplitude)
    phase = rng.uniform(0, 2 * math.pi)
    axis = {"rows": 0, "columns": 1}.get(prof.grid_axis, int(rng.integers(2)))
    if grid:  # point-sampled by the pixel pitch, the fine grid aliases into coarser stripes
        coords = (torch.arange(shape[axis], dtype=torch.float64) + 0.5) * spacing
        stripes = (amplitude * torch.cos(2 * math.pi * coords / period + phase)).float()
        img.add_(stripes[:, None] if axis == 0 else stripes[None, :])
    idx = img.sub_(float(lo)).mul_(65535.0 / float(hi - lo)).clamp_(0, 65535).to(torch.int32)
    boxes = {s: _box(pts, spacing, shape) for s, (pts, _) in r.sites.items()}
    collimation, field_sl = _collimate(idx, noise, max(box, 1), boxes, spacing, prof, rng)
    bits = int(rng.choice(list(prof.bits)))
    top = 2 ** bits - 1
    drawn = "MONOCHROME1" if rng.random() < prof.monochrome1_p else "MONOCHROME2"  # drawn always: same seed, same rest
    photometric = photometric or drawn
    lut = _lut(prof, top, rng)
    if photometric == "MONOCHROME1":
        lut = top - lut
    pixels = np.take(np.clip(np.round(lut), 0, top).astype(np.uint16), idx.numpy())
    window = None
    if collimation or metal is not None:  # a modality sets its window on the anatomy, not on borders or metal
        view = pixels[field_sl][::4, ::4]
        keep = np.ones(view.shape, bool)
        if metal is not None:
            rows = (np.arange(field_sl[0].start, field_sl[0].stop, 4) + 0.5) * metal.shape[0] / shape[0]
            cols = (np.arange(field_sl[1].start, field_sl[1].stop, 4) + 0.5) * metal.shape[1] / shape[1]
            keep = ~metal[np.minimum(rows, metal.shape[0] - 1).astype(np.intp)[:, None],
                          np.minimum(cols, metal.shape[1] - 1).astype(np.intp)[None, :]]
        window = display_window(view[keep] if keep.any() else view)
    return Exposure(pixels, bits, photometric, spacing, prof.name, window, collimation, bool(grid)), boxes


COLLIMATION_CLEARANCE_MM = 12.0  # borders keep this far from every site box


def _collimate(idx: torch.Tensor, noise: torch.Tensor, noise_sd: float, boxes: dict, spacing: float,
               prof: ScannerProfile, rng):
    """Collimation borders on the presentation index: outside a rectangle the image is near-white
    (unexposed but for scatter, with noise) or black (masked by the modality). The rectangle keeps
    clear of the site boxes. Returns ("" | "black" | "white", the collimated field's slices)."""
    rows, cols = idx.shape
    apply = rng.random() < prof.collimation_p  # all parameters are drawn always: same seed, same rest
    fractions = rng.uniform(*prof.collimation_frac, size=4)
    white = {"black": False, "white": True}.get(prof.collimation, bool(rng.random() < 0.5))
    level = rng.uniform(0.9, 0.97)
    clear = int(round(COLLIMATION_CLEARANCE_MM / spacing))
    top, left = int(fractions[0] * rows), int(fractions[1] * cols)
    bottom, right = rows - int(fractions[2] * rows), cols - int(fractions[3] * cols)
    for r0, c0, r1, c1 in boxes.values():
        top, left = min(top, max(r0 - clear, 0)), min(left, max(c0 - clear, 0))
        bottom, right = max(bottom, min(r1 + clear, rows)), max(right, min(c1 + clear, cols))
    field_sl = np.s_[top:bottom, left:right]
    if not apply or (top, left, bottom, right) == (0, 0, rows, cols):
        return "", np.s_[0:rows, 0:cols]
    for band in (np.s_[:top, :], np.s_[bottom:, :], np.s_[top:bottom, :left], np.s_[top:bottom, right:]):
        if white:
            values = noise[band].mul(0.01 * 65535.0 / noise_sd).add_(level * 65535.0)
            idx[band] = values.clamp_(0, 65535).to(torch.int32)
        else:
            idx[band] = 0
    return ("white" if white else "black"), field_sl


def _box(points_mm: np.ndarray, spacing: float, shape) -> tuple[int, int, int, int]:
    """Smallest pixel box (exclusive ends) around field-mm points, clipped to the image."""
    rows, cols = points_mm[:, 0] / spacing, points_mm[:, 1] / spacing
    return (max(0, int(math.floor(rows.min()))), max(0, int(math.floor(cols.min()))),
            min(shape[0], int(math.ceil(rows.max()))), min(shape[1], int(math.ceil(cols.max()))))


def upsample_mask(mask: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of a coarse boolean mask to the detector grid."""
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(np.intp)
    return mask[rows[:, None], cols[None, :]]

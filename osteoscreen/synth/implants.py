"""Metal on the phantoms: orthopaedic implants at the screening sites and foreign bodies elsewhere.

Metal is a layer of its own on the canvas (`Canvas.metal`, path length in mm of steel-equivalent
metal; titanium counts with a density factor of 0.35, gold and copper above 1). Its attenuation
(`phantoms.MU_METAL`, 16 times cortical bone) leaves almost no primary radiation behind a stem, a
prosthetic head or a pedicle screw, only scatter. The display window ignores metal (as a modality's
histogram analysis does) and processing clips thick metal above it (`phantoms.METAL_CLIP`), so metal
shows as the brightest, sharply bounded regions without texture, at the top of the look-up table;
thin titanium may stay just below.

Hip (AP pelvis), one per site:
- "tha": total hip arthroplasty. The femoral head and most of the neck are resected (the femur is drawn
  without them); a prosthetic head (28-36 mm) sits in a hemispherical metal acetabular shell (opening
  inferolaterally at 38-50 degrees), a trunnion runs down the old neck axis into a tapered stem in the
  femoral canal (110-160 mm), optionally with a bone-cement mantle (bone-like density, on the cortical
  layer).
- "dhs": dynamic hip screw. A lag screw up the neck axis into the head, its barrel through the lateral
  cortex, a side plate along the lateral shaft cortex (seen edge-on: 19 mm of metal along the beam)
  and 2-4 cortical screws across the shaft.
- "screws": three cannulated screws parallel to the neck axis, with washers at the lateral cortex.
Lumbar (AP and lateral, same levels): pedicle screws at 2-3 consecutive vertebrae within L1-L4, tulip
heads and two longitudinal rods. In the AP view the screws converge toward the midline and are seen
almost end-on (short, very dense); in the lateral view both sides' screws and rods superimpose.

Foreign bodies (coins, ECG electrodes with their lead wire, clips, buttons, jewellery) are drawn in
field coordinates at the first of a few pre-drawn candidate positions whose extent keeps clear of
every site box (plus a margin); if none is clear the object is left out.

All random choices are drawn up front (`draw_hip_implant`, `draw_fusion`, `draw_foreign_bodies`),
so rendering draws nothing from the generator and the views of one study agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HIP_IMPLANT_KINDS = ("tha", "dhs", "screws")
HIP_IMPLANT_WEIGHTS = (0.6, 0.2, 0.2)
FUSION_LEVELS = ("L1", "L2", "L3", "L4")
FOREIGN_KINDS = ("coin", "ecg", "clip", "button", "jewellery")
FOREIGN_MARGIN_MM = 10.0
TITANIUM = 0.35  # attenuation of titanium relative to steel (phantoms.MU_METAL is steel)
MIN_RADIUS_MM = 0.75  # thinner wires are drawn this thick with their attenuation scaled down


def _chord(r, d2):
    return 2.0 * np.sqrt(np.maximum(np.square(r) - d2, 0.0))


def _segment(X, Y, p0, p1):
    """Position t in [0, 1] along the segment p0-p1 nearest to each point, and its squared distance."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    norm = max(dx * dx + dy * dy, 1e-9)
    t = np.clip(((X - p0[0]) * dx + (Y - p0[1]) * dy) / norm, 0.0, 1.0)
    return t, np.square(X - (p0[0] + t * dx)) + np.square(Y - (p0[1] + t * dy))


# ----------------------------------------------------------------------------------------------
# Metal primitives: each returns (bbox, fn(X, Y) -> path length in mm)
# ----------------------------------------------------------------------------------------------
def cylinder(p0, p1, r0, r1=None, thread=0.0, pitch=2.0):
    """A rod in the image plane from p0 (radius r0) to p1 (radius r1), rounded ends; `thread` is the
    relative depth of a screw thread of `pitch` mm."""
    r1 = r0 if r1 is None else r1
    scale = 1.0
    if max(r0, r1) < MIN_RADIUS_MM:  # keep thin wires visible on the 0.5 mm grid, same attenuation
        scale, r0, r1 = (max(r0, r1) / MIN_RADIUS_MM) ** 2, MIN_RADIUS_MM, MIN_RADIUS_MM
    length = math.hypot(p1[0] - p0[0], p1[1] - p0[1])

    def fn(X, Y):
        t, d2 = _segment(X, Y, p0, p1)
        rad = r0 + (r1 - r0) * t
        if thread:
            rad = rad * (1.0 - thread * (0.5 + 0.5 * np.cos(2 * math.pi * t * length / pitch)))
        return scale * _chord(rad, d2)
    r = max(r0, r1)
    return (min(p0[0], p1[0]) - r, min(p0[1], p1[1]) - r, max(p0[0], p1[0]) + r, max(p0[1], p1[1]) + r), fn


def sphere(centre, r):
    def fn(X, Y):
        return _chord(r, np.square(X - centre[0]) + np.square(Y - centre[1]))
    return (centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r), fn


def shell(centre, r_out, r_in, normal):
    """A hemispherical shell whose opening faces `normal` (in the image plane)."""
    def fn(X, Y):
        dx, dy = X - centre[0], Y - centre[1]
        d2 = dx * dx + dy * dy
        dome = np.clip(0.5 - (dx * normal[0] + dy * normal[1]) / 0.5, 0.0, 1.0)
        return (_chord(r_out, d2) - _chord(r_in, d2)) * dome
    return (centre[0] - r_out, centre[1] - r_out, centre[0] + r_out, centre[1] + r_out), fn


def slab(p0, p1, half_width, thickness):
    """Constant path `thickness` over a stadium of `half_width` around the segment p0-p1 (a plate seen
    edge-on, a screw seen nearly end-on, a flat disc when p0 == p1)."""
    def fn(X, Y):
        _, d2 = _segment(X, Y, p0, p1)
        return thickness * np.clip((half_width - np.sqrt(d2)) / 0.5 + 0.5, 0.0, 1.0)
    r = half_width + 1.0
    return (min(p0[0], p1[0]) - r, min(p0[1], p1[1]) - r, max(p0[0], p1[0]) + r, max(p0[1], p1[1]) + r), fn


def torus(centre, radius, tube, aspect=1.0, angle=0.0):
    """A wire ring of `radius` seen at a tilt (`aspect` = minor/major axis of its projection)."""
    scale = 1.0
    if tube < MIN_RADIUS_MM:
        scale, tube = (tube / MIN_RADIUS_MM) ** 2, MIN_RADIUS_MM
    c, s = math.cos(angle), math.sin(angle)

    def fn(X, Y):
        dx, dy = X - centre[0], Y - centre[1]
        u, v = c * dx + s * dy, (-s * dx + c * dy) / aspect
        return scale * _chord(tube, np.square(np.sqrt(u * u + v * v) - radius))
    r = radius + tube + 1.0
    return (centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r), fn


def outline(p0, p1, radius, tube):
    """A wire bent into a stadium (paper-clip loop): distance `radius` around the segment p0-p1."""
    scale = 1.0
    if tube < MIN_RADIUS_MM:
        scale, tube = (tube / MIN_RADIUS_MM) ** 2, MIN_RADIUS_MM

    def fn(X, Y):
        _, d2 = _segment(X, Y, p0, p1)
        return scale * _chord(tube, np.square(np.sqrt(d2) - radius))
    r = radius + tube + 1.0
    return (min(p0[0], p1[0]) - r, min(p0[1], p1[1]) - r, max(p0[0], p1[0]) + r, max(p0[1], p1[1]) + r), fn


def add_metal(cv, parts, density: float = 1.0) -> None:
    """Add primitives given in anatomy coordinates to the canvas's metal layer."""
    for bbox, fn in parts:
        sl = cv.window(*bbox)
        if sl is not None:
            cv.metal[sl] += density * fn(cv.X[sl], cv.Y[sl])


def add_metal_field(cv, parts, density: float = 1.0) -> None:
    """Add primitives given in field coordinates (x = column mm, y = row mm from the top-left)."""
    for (x0, y0, x1, y1), fn in parts:
        r0, r1 = max(0, int(y0 / cv.step[0]) - 1), min(cv.shape[0], int(y1 / cv.step[0]) + 2)
        c0, c1 = max(0, int(x0 / cv.step[1]) - 1), min(cv.shape[1], int(x1 / cv.step[1]) + 2)
        if r1 <= r0 or c1 <= c0:
            continue
        Y = ((np.arange(r0, r1, dtype=np.float32) + 0.5) * cv.step[0])[:, None]
        X = ((np.arange(c0, c1, dtype=np.float32) + 0.5) * cv.step[1])[None, :]
        cv.metal[r0:r1, c0:c1] += density * fn(X, Y)


# ----------------------------------------------------------------------------------------------
# Hip
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HipImplant:
    kind: str  # "tha" | "dhs" | "screws"
    head_radius: float = 14.0  # tha: prosthetic head
    cup_inclination: float = 0.75  # tha: radians from the horizontal
    cup_shell: float = 3.5  # tha: metal shell thickness, mm
    stem_length: float = 130.0  # tha: mm below the neck-shaft junction
    cemented: bool = False  # tha
    plate_length: float = 90.0  # dhs
    plate_screws: int = 3  # dhs
    density: float = 1.0  # steel / cobalt-chrome = 1; titanium about 0.35

    @property
    def resects_head(self) -> bool:
        return self.kind == "tha"


def draw_hip_implant(rng: np.random.Generator, kind: str | None = None) -> HipImplant:
    """One hip implant; `kind` None draws tha / dhs / screws (60/20/20 %)."""
    drawn = HIP_IMPLANT_KINDS[int(rng.choice(len(HIP_IMPLANT_KINDS), p=HIP_IMPLANT_WEIGHTS))]
    kind = kind or drawn
    if kind not in HIP_IMPLANT_KINDS:
        raise ValueError(f"hip implant must be one of {HIP_IMPLANT_KINDS}, got {kind!r}")
    return HipImplant(kind=kind, head_radius=float(rng.choice([14.0, 16.0, 18.0])),
                      cup_inclination=math.radians(rng.uniform(38, 50)), cup_shell=float(rng.uniform(3.0, 4.5)),
                      stem_length=float(rng.uniform(110, 160)), cemented=bool(rng.random() < 0.5),
                      plate_length=float(rng.uniform(60, 120)), plate_screws=int(rng.integers(2, 5)),
                      density=float(rng.choice([1.0, TITANIUM])))


def hip_implant(cv, spec: HipImplant, g: dict, add_cement=None) -> None:
    """Draw `spec` into the metal layer around a femur whose geometry `g` holds (anatomy mm): head H,
    radius R, acetabular radius Racet, neck direction n (head → junction), neck length L, junction J,
    shaft direction s, lateral unit p, side lat, size sz. `add_cement(bbox, fn)` adds bone-like
    material (cement) to the cortical layer."""
    H, R, n, J, s, p, sz = g["H"], g["R"], g["n"], g["J"], g["s"], g["p"], g["sz"]
    med = -p
    sin_ns = abs(n[0] * s[1] - n[1] * s[0])  # neck-shaft angle's sine: how fast the neck axis leaves the shaft
    if spec.kind == "tha":
        lat = g["lat"]
        m = np.array([lat * math.sin(spec.cup_inclination), math.cos(spec.cup_inclination)])
        r_out = g["Racet"] + 1.0
        parts = [shell(H, r_out, r_out - spec.cup_shell, m), sphere(H, spec.head_radius),
                 cylinder(H, J - n * 4.0 * sz, 6.5, 7.5)]
        top, tip = J - s * 6.0 * sz, J + s * spec.stem_length * sz
        r_top, r_tip = 10.0 * sz, 4.5 * sz
        parts += [cylinder(top, tip, r_top, r_tip),
                  cylinder(J + s * 6.0 * sz + med * 5.0 * sz, J + s * 45.0 * sz + med * 2.0 * sz, 7.5 * sz, 5.0 * sz)]
        add_metal(cv, parts, spec.density)
        if spec.cemented and add_cement is not None:
            def mantle(X, Y):
                t, d2 = _segment(X, Y, top, tip)
                rad = r_top + (r_tip - r_top) * t
                return 1.1 * (_chord(rad + 2.5, d2) - _chord(rad, d2))
            r = r_top + 3.5
            add_cement((min(top[0], tip[0]) - r, min(top[1], tip[1]) - r, max(top[0], tip[0]) + r,
                        max(top[1], tip[1]) + r), mantle)
    elif spec.kind == "dhs":
        E = J + n * (21.0 * sz / max(sin_ns, 0.3))  # the neck axis meets the lateral cortex
        tip = H - n * 0.55 * R
        thread_start = tip + n * 24.0
        plate_top = E + p * 3.0 + n * 2.0
        along = float(np.dot(plate_top - J, s))
        plate_end = J + s * (along + spec.plate_length * sz) + p * (16.0 * sz + 3.0)
        parts = [cylinder(E + n * 4.0, thread_start, 4.0),
                 cylinder(thread_start, tip, 6.3, 6.0, thread=0.35, pitch=3.0),
                 cylinder(E + n * 3.0, E - n * 38.0, 6.5), slab(plate_top, plate_end, 2.9, 19.0)]
        for i in range(spec.plate_screws):
            f = (i + 1) / (spec.plate_screws + 1)
            a = plate_top + (plate_end - plate_top) * (0.25 + 0.75 * f)
            parts.append(cylinder(a + p * 2.0, a + med * (33.0 * sz + 2.0), 2.25, thread=0.3, pitch=1.75))
        add_metal(cv, parts, spec.density)
    elif spec.kind == "screws":
        q = np.array([n[1], -n[0]])  # perpendicular to the neck axis, in the image plane
        E = J + n * (19.0 * sz / max(sin_ns, 0.3))
        tip = H - n * 0.5 * R
        parts = []
        for off in (-8.0 * sz, 0.0, 8.0 * sz):
            a, b = E + q * off, tip + q * off * 0.8
            mid = b + (a - b) / np.linalg.norm(a - b) * 16.0
            parts += [cylinder(a, mid, 3.2), cylinder(mid, b, 3.6, 3.4, thread=0.3, pitch=2.5),
                      cylinder(a + n * 2.0, a, 6.0)]  # washer, seen edge-on
        add_metal(cv, parts, spec.density)
    else:
        raise ValueError(f"unknown hip implant {spec.kind!r}")


# ----------------------------------------------------------------------------------------------
# Lumbar
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpineFusion:
    levels: tuple[str, ...]  # consecutive vertebrae within L1-L4 carrying pedicle screws
    screw_radius: float = 3.25
    screw_length: float = 45.0
    convergence: float = 0.3  # radians toward the midline
    rod_radius: float = 2.75
    density: float = TITANIUM  # titanium by default


def draw_fusion(rng: np.random.Generator) -> SpineFusion:
    count = int(rng.integers(2, 4))
    start = int(rng.integers(0, len(FUSION_LEVELS) - count + 1))
    return SpineFusion(levels=FUSION_LEVELS[start:start + count], screw_radius=float(rng.uniform(3.0, 3.5)),
                       screw_length=float(rng.uniform(40, 50)), convergence=math.radians(rng.uniform(12, 22)),
                       rod_radius=float(rng.uniform(2.5, 3.0)),
                       density=float(rng.choice([TITANIUM, 1.0], p=[0.7, 0.3])))


def pedicle_screws_ap(cv, spec: SpineFusion, pedicles: dict) -> None:
    """AP view: `pedicles[level] = (left point, right point, size)` (anatomy mm, image left first)."""
    parts, heads = [], {-1: [], 1: []}
    r = spec.screw_radius
    projected = spec.screw_length * math.sin(spec.convergence)
    thickness = min(spec.screw_length, 2 * r / math.sin(spec.convergence))
    for level in spec.levels:
        if level not in pedicles:
            continue
        for side, point in zip((-1, 1), pedicles[level][:2]):
            point = np.asarray(point, float)
            entry, tip = point + np.array([side * 2.0, 0.0]), point - np.array([side * projected, 0.0])
            parts.append(slab(entry, tip, r, thickness))
            parts.append(slab(point, point, 6.0, 11.0))  # tulip head over the pedicle
            heads[side].append(point)
    for side, pts in heads.items():
        for a, b in zip(pts[:-1], pts[1:]):
            parts.append(cylinder(a, b, spec.rod_radius))
        if pts:  # rods overhang the end screws a little
            parts.append(cylinder(pts[0], pts[0] + np.array([0.0, -6.0]), spec.rod_radius))
            parts.append(cylinder(pts[-1], pts[-1] + np.array([0.0, 6.0]), spec.rod_radius))
    add_metal(cv, parts, spec.density)


def pedicle_screws_lat(cv, spec: SpineFusion, frames: dict) -> None:
    """Lateral view: `frames[level] = at(du, dv)`, a function from body-local mm (du toward posterior,
    dv toward the feet) to anatomy mm, and the body's depth d and height h."""
    parts, heads = [], []
    r = spec.screw_radius
    for level in spec.levels:
        if level not in frames:
            continue
        at, d, h, sz = frames[level]
        entry = np.array(at(d / 2 + 22 * sz, -h / 2 + 6.5 * sz))
        tip = np.array(at(-d / 2 + 0.22 * d, -h / 2 + 9.0 * sz))
        for offset in (0.0, 1.2):  # the left and right screws superimpose, slightly magnified apart
            shift = np.array([0.0, offset])
            parts.append(cylinder(entry + shift, tip + shift, r, r * 0.85, thread=0.3, pitch=2.5))
        head = np.array(at(d / 2 + 27 * sz, -h / 2 + 6.0 * sz))
        parts.append(slab(head, head, 6.0, 20.0))
        heads.append(head)
    for a, b in zip(heads[:-1], heads[1:]):
        parts.append(cylinder(a, b, spec.rod_radius))
        parts.append(cylinder(a + np.array([1.0, 0.0]), b + np.array([1.0, 0.0]), spec.rod_radius))
    add_metal(cv, parts, spec.density)


# ----------------------------------------------------------------------------------------------
# Foreign bodies
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForeignBody:
    kind: str  # coin | ecg | clip | button | jewellery
    size: float  # characteristic radius, mm
    angle: float  # radians
    aspect: float  # projection of a tilted ring
    candidates: tuple[tuple[float, float], ...]  # (row, col) fractions of the field
    wire: tuple[tuple[float, float], ...] = ()  # ECG lead: successive steps (dx, dy) in mm

    @property
    def extent(self) -> float:
        """Radius of a circle around the object's anchor that holds all of it, mm."""
        reach = float(np.linalg.norm(np.cumsum(self.wire, axis=0), axis=1).max()) if self.wire else 0.0
        return self.size + reach + 3.0


def draw_foreign_bodies(rng: np.random.Generator, rate: float) -> tuple[ForeignBody, ...]:
    """With probability `rate`, 1-3 foreign bodies (each with 16 candidate positions)."""
    if not rate or rng.random() >= rate:
        return ()
    bodies = []
    for _ in range(int(rng.integers(1, 4))):
        kind = FOREIGN_KINDS[int(rng.integers(len(FOREIGN_KINDS)))]
        size = {"coin": rng.uniform(8.0, 13.0), "ecg": rng.uniform(2.0, 2.6), "clip": rng.uniform(12.0, 18.0),
                "button": rng.uniform(5.5, 9.0), "jewellery": rng.uniform(6.0, 12.0)}[kind]
        cands = tuple((float(a), float(b)) for a, b in rng.uniform(0.06, 0.94, size=(16, 2)))
        wire = ()
        if kind == "ecg":
            heading = rng.uniform(0, 2 * math.pi)
            steps = []
            for _ in range(int(rng.integers(3, 6))):
                heading += rng.normal(0, 0.5)
                length = rng.uniform(10, 20)
                steps.append((float(length * math.cos(heading)), float(length * math.sin(heading))))
            wire = tuple(steps)
        bodies.append(ForeignBody(kind, float(size), float(rng.uniform(0, math.pi)), float(rng.uniform(0.3, 1.0)),
                                  cands, wire))
    return tuple(bodies)


def _foreign_parts(fb: ForeignBody, c: np.ndarray):
    """Primitives of one foreign body anchored at field point c = (x, y); and its density factor."""
    r, ca, sa = fb.size, math.cos(fb.angle), math.sin(fb.angle)
    if fb.kind == "coin":
        return [slab(c, c, r, 1.8), torus(c, r - 0.7, 0.7)], 1.5  # copper-nickel
    if fb.kind == "ecg":  # snap stud and eyelet (the gel pad is radiolucent), then the lead wire
        parts = [slab(c, c, r, 4.0), torus(c, r + 2.3, 0.6)]
        point = c
        for step in fb.wire:
            nxt = point + np.array(step)
            parts.append(cylinder(point, nxt, 0.45))
            point = nxt
        return parts, 0.8
    if fb.kind == "clip":  # a paper clip: two nested wire loops
        axis = np.array([ca, sa]) * r * 0.5
        return [outline(c - axis, c + axis, 4.0, 0.5), outline(c - axis * 0.6, c + axis * 0.9, 2.6, 0.5)], 1.0
    if fb.kind == "button":  # a metal button with four holes (holes: negative thin discs)
        parts = [slab(c, c, r, 1.4), torus(c, r - 0.6, 0.7)]
        for k in range(4):
            a = fb.angle + k * math.pi / 2
            h = c + 0.3 * r * np.array([math.cos(a), math.sin(a)])
            bbox, fn = slab(h, h, 0.9, -1.4)
            parts.append((bbox, fn))
        return parts, 0.7
    if fb.kind == "jewellery":  # a ring or pendant: wire ring (tilted) with a small bead
        bead = c + np.array([ca, sa]) * r
        return [torus(c, r, 0.9, fb.aspect, fb.angle), sphere(bead, 1.8)], 3.0  # gold, silver
    raise ValueError(f"unknown foreign body {fb.kind!r}")


def place_foreign_bodies(cv, bodies, avoid_boxes) -> int:
    """Draw each body at its first candidate position that keeps `FOREIGN_MARGIN_MM` clear of every
    box in `avoid_boxes` (field mm: row0, col0, row1, col1); returns how many were placed."""
    placed = 0
    field_h, field_w = cv.field
    for fb in bodies:
        reach = fb.extent + FOREIGN_MARGIN_MM
        for fr, fc in fb.candidates:
            y, x = fr * field_h, fc * field_w
            clear = all(y + reach <= b[0] or y - reach >= b[2] or x + reach <= b[1] or x - reach >= b[3]
                        for b in avoid_boxes)
            if clear:
                parts, density = _foreign_parts(fb, np.array([x, y]))
                add_metal_field(cv, parts, density)
                placed += 1
                break
    return placed

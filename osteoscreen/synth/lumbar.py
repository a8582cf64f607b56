"""Lumbar spine scenes, AP and lateral (`_lumbar_ap_scene`, `_lumbar_lat_scene`): T12-L5 vertebral
bodies with vertical and horizontal trabeculae, posterior elements, the sacrum and iliac wings, and
pedicle screws with rods (drawn by `implants`); the study's lumbar findings (`LumbarFindings`:
osteophytes, a wedge compression fracture, scoliosis) and `StudyExtras`. The hip scene draws its
L4-L5 and sacrum with `_lumbar_ap_column` and `_sacrum` from here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import implants as _implants
from .anatomy import (Bone, Canvas, Patient, Solid, _body_chord, _ellipse_inside, _gas, _local, _mirror, _sigmoid,
                      _stripes)

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

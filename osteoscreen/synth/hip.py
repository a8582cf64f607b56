"""Hip AP scene (`_pelvis_scene`): the proximal femur with Singh trabecular groups and its own
femoral-neck density, the hemipelvis (ilium, pubis, ischium and the lines a radiograph shows), the
sacrum and L4-L5 above them, and hip implants (drawn by `implants`). Returns the hip sites' crop
landmarks; the DXA femoral-neck and greater-trochanter regions go to the canvas."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import implants as _implants
from .anatomy import (Bone, Canvas, Patient, Solid, _body_chord, _ellipse_inside, _gas, _local, _mirror, _sigmoid,
                      _stripes)
from .lumbar import DISC_MM, StudyExtras, _lumbar_ap_column, _sacrum

HIP_SITES = {+1: "left_hip", -1: "right_hip"}  # +1: femur on the image's right (patient's left)


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

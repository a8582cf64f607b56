"""The non-screening scenes: a chest (PA or AP: lungs, heart, thoracic spine, ribs, clavicles) and a
lower leg (AP knee, tibia and fibula). They carry no screening site; tests use them to check that
such images are skipped (chest) or refused (leg)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .anatomy import Bone, Canvas, Patient, Solid, _body_chord, _ellipse_inside, _mirror, _sigmoid

if TYPE_CHECKING:
    from .lumbar import StudyExtras


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

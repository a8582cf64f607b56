"""The scene registry: which function draws each (kind, view), and each kind's ranges of field size
(mm: rows, then columns) from which `exposure.render` draws the detector field."""
from __future__ import annotations

from .hip import _pelvis_scene
from .lumbar import _lumbar_ap_scene, _lumbar_lat_scene
from .other_anatomy import _chest_scene, _leg_scene

SCENES = {("hip", "ap"): _pelvis_scene, ("lumbar", "ap"): _lumbar_ap_scene,
          ("lumbar", "lat"): _lumbar_lat_scene, ("chest", "pa"): _chest_scene, ("chest", "ap"): _chest_scene,
          ("leg", "ap"): _leg_scene}
FIELDS = {"hip": ((280, 350), (380, 430)), "lumbar": ((330, 430), (220, 300)), "chest": ((350, 430), (350, 430)),
          "leg": ((380, 430), (180, 240))}

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

Modules
-------
The code lives in modules by anatomy; this module keeps the description above and re-exports every
name it defined before the split, so `from osteoscreen.synth.phantoms import ...` keeps working:
- `anatomy`: shared primitives: constants, `Patient` and its T-scores, `Bone`, `Canvas`, `Solid` and
  the soft-tissue and texture helpers;
- `hip`: the pelvis AP scene (femur, Singh groups, femoral-neck region, hemipelvis, hip implants);
- `lumbar`: the lumbar AP and lateral scenes, the sacrum, `LumbarFindings` and `StudyExtras`;
- `other_anatomy`: the non-screening chest and lower-leg scenes;
- `scenes`: the registry `SCENES` (kind, view) -> scene and the field sizes `FIELDS`;
- `exposure`: `render`, `expose` (processing, noise, collimation, LUT), `mean_anatomy`,
  `display_window`, `_box`, `upsample_mask`.
Imports run one way: the scene modules import `anatomy` (and `hip` imports `lumbar` for L4-L5 and
the sacrum), `scenes` imports the scene modules, `exposure` imports `scenes`.
"""
from .anatomy import (BONE_MASK_MM, Bone, CLASS_BANDS, Canvas, GRID_MM, METAL_CLIP, MU_BONE, MU_METAL, MU_SOFT,
                      NECK_T_SHIFT, Patient, SITE_T_NOISE, Solid, T_RANGE, draw_neck_t, draw_patient, _body_chord,
                      _chord, _ellipse_inside, _gas, _local, _mirror, _sigmoid, _stripes)  # noqa: F401
from .hip import (FemurShape, HIP_SITES, _draw_femur_shape, _femur, _hemipelvis, _neck_region, _neck_weight,
                  _pelvis_scene, _singh_density)  # noqa: F401
from .lumbar import (DISC_MM, LEVELS, LUMBAR_FINDINGS, LUMBAR_FINDING_RATES, LumbarFindings, StudyExtras,
                     draw_lumbar_findings, _DEPTH, _DISCS, _FRACTURE_LEVELS, _FRACTURE_WEIGHTS, _HEIGHT, _TRANSVERSE,
                     _WIDTH, _body_corners, _lumbar_ap_column, _lumbar_ap_scene, _lumbar_lat_scene, _sacrum, _spurs,
                     _vertebral_body, _vertebral_density)  # noqa: F401
from .other_anatomy import _chest_scene, _leg_scene  # noqa: F401
from .scenes import FIELDS, SCENES  # noqa: F401
from .exposure import (COLLIMATION_CLEARANCE_MM, Exposure, Rendered, display_window, expose, mean_anatomy, render,
                       upsample_mask, _box, _collimate, _detector_noise, _field_box, _lut, _noise_box, _processing,
                       _wide_blur)  # noqa: F401

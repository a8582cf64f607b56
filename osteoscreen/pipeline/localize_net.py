"""Learned site localiser: a small U-Net that paints each site's truth box, trained on phantoms.

Input
-----
The image as the pipeline gives it (bone bright, any offset, gain and pixel size) is area-averaged to
`PIXEL_MM` (4 mm) pixels, locally contrast-normalised exactly as the atlas localiser does
(`localize_common.normalise`: minus a 12 mm Gaussian mean, over the local spread) and placed in the centre
of a `CANVAS` x `CANVAS` canvas (128 x 4 mm = 512 mm, more than a 43 cm detector). A second input
channel is 1 on the image and 0 on the padding, so that the net knows where the field ends. An
image larger than the canvas is shrunk a little more (coarser pixels) to fit.

Output: filled box masks, not landmarks
---------------------------------------
Four sigmoid maps on the same 4 mm grid, each the site's *truth box* painted with its pixel
coverage (1 inside, the covered fraction on the edge pixels, 0 outside):

- 0 `femur_gt_left`: the proximal femur whose greater trochanter points to the image's left,
- 1 `femur_gt_right`: the one whose greater trochanter points to the image's right,
- 2 `lumbar_ap`: L1-L4 on an AP view,
- 3 `lumbar_lat`: L1-L4 on a lateral view (trained facing both ways).

Why box masks: the thing the pipeline needs *is* the box (the hip box is a crop defined by the
sourcil, the teardrop, the lesser and greater trochanters, not the bone outline), so the net
learns it directly and no landmark-to-box rule sits between net and answer; a filled mask is an easy,
dense target that trains in minutes from a few hundred phantoms; and it carries its own confidence
(a real site gives one solid rectangle of high probability, anything else gives faint, ragged or
oddly sized blobs). Coverage-valued edges make the edges sub-pixel: the edge is read from the two
boundary pixels (`_edge`), which brings the 4 mm grid to about 1 mm.

Femurs are channelled by *anatomy* (which way the greater trochanter points), not by image half:
training mirrors pelvises (swapping the two channels) and cuts single-hip films out of them, so the
net cannot lean on position. Patient sides then come from the header's orientation: in the standard
display (`patient_left_on_image_right`) the trochanter of the patient's right femur points to the
image's left, so channel 0 is `right_hip`; when PatientOrientation says the image is flipped,
channel 0 is `left_hip`.

Anatomy cross-checks (each one sets the confidence of the sites involved near 0):
- on a pelvis both femurs' trochanters point away from the midline: the `femur_gt_left` femur must lie
  to the left of the `femur_gt_right` one, at about the same height (`_pair_check`);
- when the header names one side (ImageLaterality/Laterality "L" or "R", passed by the caller as
  `image_laterality`), a femur of the other side found by anatomy is marked low
  (`localize.locate_sites`).

Confidence
----------
For each channel the thresholded map (p > 0.5) is split into connected blobs and the one with the
largest probability mass is the site. Its confidence is
    mean probability inside the blob's bounding box  x  how well the blob fills that box
    x  a size factor (1 while the box's height and width in mm lie within the range seen in
       training, widened by 25 %, falling to 0 at 1.7 times outside it).
On unseen phantoms (seeds 40 000+/50 000+, with scanner profiles) sites score 0.65-0.97 (means
0.88 hip, 0.87 lumbar AP, 0.80 lateral), none below 0.5, at mean IoU 0.95 / 0.94 / 0.93 against the
truth boxes; chests, the other region, noise and blank images score at most 0.004. The checkpoint
keeps its validation numbers (`training/localiser.py`).

Network: 231 k parameters (widths 8-16-32-48-64), stored in float16 (0.5 MB). Cost: about 7 ms for
the net at the coarse size (2 threads); 10 ms per image from the pipeline's 0.5 mm grid, 14 ms from
full detector resolution, resampling included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..findings import SiteLocation
from .localize_common import normalise, usable_image  # shared with the atlas localiser (`localize`)

PIXEL_MM = 4.0
CANVAS = 128
CHANNELS = ("femur_gt_left", "femur_gt_right", "lumbar_ap", "lumbar_lat")
WIDTHS = (8, 16, 32, 48, 64)
THRESHOLD = 0.5
SIZE_SLACK, SIZE_ZERO = 1.25, 1.7  # size factor: 1 within the training range x slack, 0 beyond x zero
PAIR_MAX_TILT = 0.3  # femur pair: row difference over column distance (about 17 degrees)
WEIGHTS_PATH = Path(__file__).resolve().parent.parent.parent / "models" / "localiser-v1.pt"


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------
def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LocaliserNet(nn.Module):
    """A four-level U-Net (input 2 x 128 x 128, output one logit map per channel at full size); the
    bottleneck at 8 x 8 sees the whole canvas, which tells a pelvis from a spine or a chest."""

    def __init__(self, widths=WIDTHS, n_in: int = 2, n_out: int = len(CHANNELS)):
        super().__init__()
        self.arch = {"widths": list(widths), "n_in": n_in, "n_out": n_out}
        self.down = nn.ModuleList()
        c = n_in
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.head(x)


@dataclass
class Loaded:
    net: LocaliserNet
    size_range_mm: np.ndarray  # (channels, 2 [height, width], 2 [low, high])
    info: dict


@lru_cache(maxsize=4)
def _load(path: str) -> Loaded | None:
    """The checkpoint at `path`, once per process; None when there is no such file."""
    p = Path(path)
    if not p.is_file():
        return None
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    net = LocaliserNet(**ckpt["arch"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    net.eval()
    return Loaded(net, np.asarray(ckpt["size_range_mm"], dtype=np.float64),
                  {k: v for k, v in ckpt.items() if k not in ("state_dict",)})


def loaded() -> Loaded | None:
    """The shipped localiser (`WEIGHTS_PATH`, looked up at call time), or None when it is missing."""
    return _load(str(WEIGHTS_PATH))


def warm_up() -> None:
    """Load the weights and run the net once (first-call allocations), so that a study does not pay it."""
    model = loaded()
    if model is not None:
        with torch.inference_mode():
            model.net(torch.zeros(1, 2, CANVAS, CANVAS))


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------
@dataclass
class Geometry:
    """Where the coarse image sits: canvas offset (rows, cols), its size, and source pixels per coarse pixel."""

    offset: tuple[int, int]
    size: tuple[int, int]
    to_source: tuple[float, float]
    source_shape: tuple[int, int]
    pixel_mm: tuple[float, float]


def coarse_size(shape, spacing_mm) -> tuple[int, int]:
    """Rows, cols of the coarse image: about PIXEL_MM pixels, coarser when that would not fit the canvas."""
    extent = [n * s for n, s in zip(shape, spacing_mm)]
    pixel = max(PIXEL_MM, max(extent) / CANVAS)
    return tuple(int(min(CANVAS, max(1, round(e / pixel)))) for e in extent)  # type: ignore[return-value]


def to_coarse(image: np.ndarray, spacing_mm) -> np.ndarray:
    """Area-average (exact fractional areas: adaptive average pooling) to the coarse grid."""
    size = coarse_size(image.shape, spacing_mm)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, size)[0, 0].numpy()


def place(normalised: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """The two input channels on the canvas: the normalised image and its validity mask."""
    h, w = normalised.shape
    out = np.zeros((2, CANVAS, CANVAS), np.float32)
    out[0, offset[0]:offset[0] + h, offset[1]:offset[1] + w] = normalised
    out[1, offset[0]:offset[0] + h, offset[1]:offset[1] + w] = 1.0
    return out


def prepare(image: np.ndarray, spacing_mm) -> tuple[np.ndarray, Geometry]:
    img = np.asarray(image, dtype=np.float32)
    coarse = to_coarse(img, spacing_mm)
    h, w = coarse.shape
    pixel_mm = (img.shape[0] * spacing_mm[0] / h, img.shape[1] * spacing_mm[1] / w)
    offset = ((CANVAS - h) // 2, (CANVAS - w) // 2)
    x = place(normalise(coarse, float(np.mean(pixel_mm))), offset)
    return x, Geometry(offset, (h, w), (img.shape[0] / h, img.shape[1] / w), img.shape, pixel_mm)


def box_target(boxes: np.ndarray) -> np.ndarray:
    """Channels x CANVAS x CANVAS coverage masks of canvas-pixel boxes (row0, col0, row1, col1; NaN: absent)."""
    k = np.arange(CANVAS, dtype=np.float32)
    out = np.zeros((len(boxes), CANVAS, CANVAS), np.float32)
    for c, b in enumerate(boxes):
        if np.isnan(b).any():
            continue
        rows = np.clip(np.minimum(k + 1, b[2]) - np.maximum(k, b[0]), 0, 1)
        cols = np.clip(np.minimum(k + 1, b[3]) - np.maximum(k, b[1]), 0, 1)
        out[c] = rows[:, None] * cols[None, :]
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
@dataclass
class Detection:
    box: np.ndarray  # canvas pixels, float: row0, col0, row1, col1 (pixel k spans [k, k+1))
    mean_p: float
    fill: float
    size_factor: float

    @property
    def confidence(self) -> float:
        value = self.mean_p * self.fill * self.size_factor
        return float(np.clip(value, 0.0, 1.0)) if np.isfinite(value) else 0.0


def _edge(profile: np.ndarray, first: int, last: int) -> tuple[float, float]:
    """Sub-pixel start and end of a coverage profile whose thresholded run is first..last (inclusive):
    exact when one boundary pixel is partly covered and its outer neighbour is empty."""
    n = len(profile)
    before = profile[first - 1] if first > 0 else 0.0
    after = profile[last + 1] if last + 1 < n else 0.0
    start = first + float(np.clip(1.0 - profile[first], 0, 1)) - float(np.clip(before, 0, 1))
    end = last + 1 - float(np.clip(1.0 - profile[last], 0, 1)) + float(np.clip(after, 0, 1))
    return start, max(end, start + 0.5)


def _size_factor(height_mm: float, width_mm: float, size_range: np.ndarray) -> float:
    factor = 1.0
    for value, (lo, hi) in zip((height_mm, width_mm), size_range):
        ratio = max(lo / SIZE_SLACK / max(value, 1e-3), value / (hi * SIZE_SLACK), 1.0)
        factor *= float(np.clip(1.0 - math.log(ratio) / math.log(SIZE_ZERO / SIZE_SLACK), 0.0, 1.0))
    return factor


def detect(prob: np.ndarray, pixel_mm, size_range: np.ndarray) -> Detection:
    """The site in one probability map (canvas): the thresholded blob with the largest mass."""
    threshold = THRESHOLD if prob.max() >= THRESHOLD else max(float(prob.max()) / 2, 1e-6)
    labels, n = ndimage.label(prob >= threshold)
    if n == 0:
        return Detection(np.array([0.0, 0.0, 1.0, 1.0]), 0.0, 0.0, 0.0)
    mass = ndimage.sum_labels(prob, labels, index=np.arange(1, n + 1))
    blob = labels == int(np.argmax(mass)) + 1
    rows, cols = np.nonzero(blob)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    inside = prob[r0:r1 + 1, c0:c1 + 1]
    mean_p, fill = float(inside.mean()), float(blob.sum() / inside.size)
    # Sub-pixel edges from the profiles through the middle half of the blob (not its corners).
    hr, hc = (r1 - r0 + 1) // 4, (c1 - c0 + 1) // 4  # never empty: at least half the run remains
    col_core, row_core = slice(c0 + hc, c1 + 1 - hc), slice(r0 + hr, r1 + 1 - hr)
    top, bottom = _edge(prob[:, col_core].mean(axis=1), r0, r1)
    left, right = _edge(prob[row_core, :].mean(axis=0), c0, c1)
    size = _size_factor((bottom - top) * pixel_mm[0], (right - left) * pixel_mm[1], size_range)
    return Detection(np.array([top, left, bottom, right]), mean_p, fill, size)


def _pair_check(left: Detection, right: Detection) -> float:
    """1 when the femur whose trochanter points image-left lies left of the other, at about the same
    height (both trochanters point away from the pelvic midline); else 0. A femur found alone passes."""
    if min(left.confidence, right.confidence) < 0.25:
        return 1.0
    lc, rc = (left.box[1] + left.box[3]) / 2, (right.box[1] + right.box[3]) / 2
    lr, rr = (left.box[0] + left.box[2]) / 2, (right.box[0] + right.box[2]) / 2
    if lc >= rc or abs(lr - rr) > PAIR_MAX_TILT * (rc - lc):
        return 0.0
    return 1.0


def _to_source(box: np.ndarray, geo: Geometry) -> tuple[int, int, int, int]:
    r0 = (box[0] - geo.offset[0]) * geo.to_source[0]
    c0 = (box[1] - geo.offset[1]) * geo.to_source[1]
    r1 = (box[2] - geo.offset[0]) * geo.to_source[0]
    c1 = (box[3] - geo.offset[1]) * geo.to_source[1]
    H, W = geo.source_shape
    r0, c0 = min(max(0, int(math.floor(r0))), H - 1), min(max(0, int(math.floor(c0))), W - 1)
    r1, c1 = max(min(H, int(math.ceil(r1))), r0 + 1), max(min(W, int(math.ceil(c1))), c0 + 1)
    return (r0, c0, r1, c1)


def predict(model: Loaded, x: np.ndarray) -> np.ndarray:
    """Probability maps (channels x CANVAS x CANVAS) for one prepared input."""
    with torch.inference_mode():
        return torch.sigmoid(model.net(torch.from_numpy(x)[None]))[0].numpy()


def locate_sites_learned(image: np.ndarray, spacing_mm: tuple[float, float], region: str, view: str,
                         *, patient_left_on_image_right: bool = True) -> list[SiteLocation] | None:
    """The sites of `region`/`view` found by the net (method "unet"), with their confidences; None
    when the weights are missing. Same contract as `localize.locate_sites`."""
    model = loaded()
    if model is None:
        return None
    img = usable_image(image, spacing_mm, region, view)
    if img is None:
        return []
    x, geo = prepare(img, spacing_mm)
    prob = predict(model, x)
    if region == "lumbar":
        c = CHANNELS.index("lumbar_ap" if view == "ap" else "lumbar_lat")
        det = detect(prob[c], geo.pixel_mm, model.size_range_mm[c])
        return [SiteLocation("lumbar_spine", _to_source(det.box, geo), det.confidence, method="unet")]
    gt_left = detect(prob[0], geo.pixel_mm, model.size_range_mm[0])
    gt_right = detect(prob[1], geo.pixel_mm, model.size_range_mm[1])
    pair = _pair_check(gt_left, gt_right)
    # In the standard display the patient's right femur is the one whose trochanter points image-left.
    names = ("right_hip", "left_hip") if patient_left_on_image_right else ("left_hip", "right_hip")
    return [SiteLocation(name, _to_source(d.box, geo), d.confidence * pair, method="unet")
            for name, d in zip(names, (gt_left, gt_right))]

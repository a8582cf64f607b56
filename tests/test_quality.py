"""The quality gate on real pipeline runs: implants, anatomy the header does not match, other
modalities, and the out-of-distribution check. Whatever the header says, only the pixels make a
site assessable."""
from copy import deepcopy

import numpy as np
import pytest
import torch

from osteoscreen.config import DEFAULT_MODEL
from osteoscreen.findings import (REASON_IMPLANT, REASON_NOT_SCREENING_IMAGE, REASON_OUT_OF_DISTRIBUTION)
from osteoscreen.model.inference import LoadedModel
from osteoscreen.pipeline.dicom_io import load_radiograph
from osteoscreen.pipeline.quality import MetalDetector
from osteoscreen.pipeline.screen import screen_image
from osteoscreen.synth import make_study


@pytest.fixture(scope="module")
def model():
    return LoadedModel(DEFAULT_MODEL, device="cpu", threads=1)


def with_pixels(ds, pixels: np.ndarray):
    """The same header (a pelvis or lumbar DX) over other pixels."""
    out = deepcopy(ds)
    top = 2 ** int(out.BitsStored) - 1
    out.PixelData = np.clip(pixels, 0, top).astype(np.uint16).tobytes()
    out.Rows, out.Columns = pixels.shape
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        if keyword in out:
            delattr(out, keyword)
    return out


def ct_like_slice(shape, rng) -> np.ndarray:
    """An axial CT-like section (body ellipse, organs, a vertebra ring) at radiograph size."""
    rows, cols = shape
    y, x = np.mgrid[:rows, :cols]
    cy, cx = rows / 2, cols / 2
    img = np.where(((y - cy) / (0.35 * rows)) ** 2 + ((x - cx) / (0.45 * cols)) ** 2 < 1, 1000.0, 0.0)
    for _ in range(6):
        oy, ox = cy + rng.uniform(-0.2, 0.2) * rows, cx + rng.uniform(-0.3, 0.3) * cols
        r = rng.uniform(0.04, 0.1) * rows
        img += np.where((y - oy) ** 2 + (x - ox) ** 2 < r * r, rng.uniform(-300, 300), 0.0)
    ring = np.hypot(y - (cy + 0.2 * rows), x - cx)
    img += np.where(np.abs(ring - 0.05 * rows) < 0.012 * rows, 1500.0, 0.0)
    return img + rng.normal(0, 30, shape) + 500


def assert_all_refused(result, reason):
    assert not result.assessable and result.reason == reason
    assert result.sites and all(not s.assessable and s.reason == reason and s.category is None for s in result.sites)


def test_metal_implant_in_one_hip_refuses_that_hip_only(model):
    image = make_study("hip", np.random.default_rng(4101), implants=("left_hip",))[0]
    assert image.sites["left_hip"].implant and not image.sites["right_hip"].implant
    result = screen_image(image.dataset, "hip", "ap", model)
    by_site = {s.site: s for s in result.sites}
    assert by_site["left_hip"].reason == REASON_IMPLANT and not by_site["left_hip"].assessable
    assert by_site["right_hip"].assessable and by_site["right_hip"].category is not None


@pytest.mark.parametrize("seed", [4201, 4202])
def test_spinal_screws_refuse_the_lumbar_spine(model, seed):
    for image in make_study("lumbar", np.random.default_rng(seed), implants=("lumbar_spine",)):
        result = screen_image(image.dataset, "lumbar", image.view, model)
        assert [s.reason for s in result.sites] == [REASON_IMPLANT], image.view


def test_metal_detector_ignores_clean_phantoms():
    """Bone the window clipped is not metal: no clean phantom site shows any."""
    for i in range(6):
        for kind in ("hip", "lumbar"):
            for image in make_study(kind, np.random.default_rng(4300 + i)):
                rad = load_radiograph(image.dataset)
                detector = MetalDetector(rad.pixels, rad.spacing_mm[0])
                for site, truth in image.sites.items():
                    box = [v * rad.scale for v in truth.box]
                    assert detector.area_mm2(box) == 0.0, (kind, image.view, site)


def test_chest_with_a_pelvis_header_is_not_a_screening_image(model):
    pelvis = make_study("hip", np.random.default_rng(4401))[0].dataset
    chest = make_study("chest", np.random.default_rng(4402))[0].dataset
    disguised = deepcopy(chest)
    for keyword in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ViewPosition"):
        setattr(disguised, keyword, pelvis[keyword].value)
    assert_all_refused(screen_image(disguised, "hip", "ap", model), REASON_NOT_SCREENING_IMAGE)


@pytest.mark.parametrize("region, view", [("hip", "ap"), ("lumbar", "ap"), ("lumbar", "lat")])
def test_other_modality_under_a_radiograph_header_is_not_a_screening_image(model, region, view):
    kind = "hip" if region == "hip" else "lumbar"
    header = make_study(kind, np.random.default_rng(4501), views=(view,))[0].dataset
    rng = np.random.default_rng(4502)
    ct = ct_like_slice((int(header.Rows), int(header.Columns)), rng)
    assert_all_refused(screen_image(with_pixels(header, ct), region, view, model), REASON_NOT_SCREENING_IMAGE)


@pytest.mark.parametrize("fill", ["uniform", "noise"])
def test_blank_or_noise_under_a_perfect_header_is_not_a_screening_image(model, fill):
    header = make_study("hip", np.random.default_rng(4601))[0].dataset
    shape = (int(header.Rows), int(header.Columns))
    pixels = np.full(shape, 2000.0) if fill == "uniform" else np.random.default_rng(4602).uniform(0, 4000, shape)
    assert_all_refused(screen_image(with_pixels(header, pixels), "hip", "ap", model), REASON_NOT_SCREENING_IMAGE)


def test_hip_film_routed_as_lumbar_is_refused(model):
    hip = make_study("hip", np.random.default_rng(4701))[0].dataset
    result = screen_image(hip, "lumbar", "ap", model)
    assert not result.assessable and result.sites[0].category is None


def test_out_of_distribution_gate_refuses_far_crops(tmp_path, model):
    """A checkpoint whose training features sat far from everything refuses every crop, with the
    reason, and keeps the box it found."""
    ckpt = deepcopy(model.checkpoint)
    width = ckpt["arch"]["widths"][-1]
    ckpt["ood"] = {str(st): {"mean": [1e3] * width, "precision": np.eye(width).tolist(), "threshold": 10.0}
                   for st in range(3)}
    path = tmp_path / "far.pt"
    torch.save(ckpt, path)
    strict = LoadedModel(path, device="cpu")
    image = make_study("hip", np.random.default_rng(4801))[0]
    result = screen_image(image.dataset, "hip", "ap", strict)
    assert [s.reason for s in result.sites] == [REASON_OUT_OF_DISTRIBUTION] * 2
    assert all(s.box is not None and s.t_score is None for s in result.sites)
    # and the same image passes the shipped model's own gate
    assert screen_image(image.dataset, "hip", "ap", model).assessable


def test_metal_detector_finds_a_thick_plateau_that_drops_steeply():
    """The classical check in isolation: a stem-like plateau far above the bone around it is metal;
    the same shape only a little brighter than its surroundings (clipped bone) is not."""
    rng = np.random.default_rng(4901)
    image = 0.3 + 0.05 * rng.standard_normal((400, 400))
    image[100:300, 150:250] += 0.2  # bone
    metal = image.copy()
    metal[120:280, 185:215] = 1.0  # a 15 mm wide stem at 0.5 mm pixels, saturated
    box = (100, 150, 300, 250)
    assert MetalDetector(metal, 0.5).area_mm2(box) > 500
    clipped = image.copy()
    clipped[120:280, 185:215] = np.clip(clipped[120:280, 185:215], None, 0.52)  # bone the window clipped
    assert MetalDetector(clipped, 0.5).area_mm2(box) == 0.0


def test_disc_morphology_from_distance_transforms_is_scipys():
    """The metal check's erosion, dilation and largest-label dilation (distance transforms) give
    exactly what scipy's binary_erosion, binary_dilation and grey_dilation give with the disc."""
    from scipy import ndimage

    from osteoscreen.pipeline import quality

    rng = np.random.default_rng(11)
    for trial in range(46):
        shape = tuple(rng.integers(5, 90, size=2)) if trial < 40 else [(2, 30), (3, 3), (1, 9), (7, 2), (4, 50), (9, 9)][trial - 40]
        blobs = ndimage.gaussian_filter(rng.random(shape), sigma=rng.uniform(0.5, 4))
        mask = blobs > np.quantile(blobs, rng.uniform(0.3, 0.97))
        if trial % 10 == 0:
            mask[:] = trial % 20 == 0  # all background, all foreground
        for r in (1, 2, 3, 6, 8):
            disc = quality._disc(r, 1.0)
            assert np.array_equal(quality._eroded(mask, r), ndimage.binary_erosion(mask, structure=disc)), (trial, r)
            assert np.array_equal(quality._dilated(mask, r), ndimage.binary_dilation(mask, structure=disc)), (trial, r)
            labels, _ = ndimage.label(mask)
            assert np.array_equal(quality._largest_label_near(labels, r),
                                  ndimage.grey_dilation(labels, footprint=disc)), (trial, r)


def test_metal_mask_is_the_one_scipy_morphology_gives_on_phantoms_with_metal():
    """MetalDetector.mask against the same check written with scipy's morphology (as it first was),
    on pelvis phantoms with implants, their sites and boxes around the whole image."""
    from scipy import ndimage

    from osteoscreen.pipeline import quality

    def reference(detector, box):
        margin = int(np.ceil(2 * quality.RING_MM / detector.spacing_mm))
        rows, cols = detector.pixels.shape
        r0, c0 = max(0, int(box[0]) - margin), max(0, int(box[1]) - margin)
        r1, c1 = min(rows, int(np.ceil(box[2])) + margin), min(cols, int(np.ceil(box[3])) + margin)
        patch = detector.pixels[r0:r1, c0:c1]
        plateau = patch >= detector.top - quality.PLATEAU_DEPTH * detector.span
        disc = quality._disc(quality.METAL_CORE_MM, detector.spacing_mm)
        thick = ndimage.binary_dilation(ndimage.binary_erosion(plateau, structure=disc), structure=disc) & plateau
        labels, n = ndimage.label(thick)
        out = np.zeros_like(thick)
        if n:
            ring_disc = quality._disc(quality.RING_MM, detector.spacing_mm)
            ring = ndimage.binary_dilation(thick, structure=ring_disc) & ~ndimage.binary_dilation(
                thick, structure=quality._disc(1.0, detector.spacing_mm))
            owner = np.where(ring, ndimage.grey_dilation(labels, footprint=ring_disc), 0)
            for k in range(1, n + 1):
                values = patch[owner == k]
                step = (detector.top - float(np.median(values))) / detector.span if values.size else 0.0
                if step >= quality.METAL_MIN_STEP:
                    out |= labels == k
        return out

    found = 0
    for i in range(3):
        for image in make_study("hip", np.random.default_rng(4500 + i), implants=("left_hip", "right_hip")):
            rad = load_radiograph(image.dataset)
            detector = MetalDetector(rad.pixels, rad.spacing_mm[0])
            boxes = [[v * rad.scale for v in truth.box] for truth in image.sites.values()]
            boxes.append([0, 0, *rad.pixels.shape])
            for box in boxes:
                mask, _ = detector.mask(box)
                assert np.array_equal(mask, reference(detector, box))
                found += int(mask.any())
    assert found >= 3  # the comparison covered masks with metal in them, not only empty ones

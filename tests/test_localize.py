"""Site localisation on synthetic radiographs: boxes against the phantoms' truth, laterality,
confidence, and refusal of anatomy that is not there."""
import time

import numpy as np
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from osteoscreen.pipeline.localize import locate_sites
from osteoscreen.synth import make_study

N_STUDIES = 20


def bone_bright(ds) -> tuple[np.ndarray, tuple[float, float]]:
    """What the pipeline hands the localiser: LUTs applied, MONOCHROME1 inverted, full resolution."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.float32), ds).astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() - values
    return values, tuple(float(v) for v in ds.PixelSpacing)


def iou(a, b) -> float:
    r0, c0, r1, c1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


@pytest.fixture(scope="module")
def located():
    """(view, site, IoU, confidence, box centre column / width) for every site of 20 pelvis studies and
    20 lumbar AP + LAT studies, plus the time per image."""
    rows, seconds = [], []
    for kind, seed0 in (("hip", 40_000), ("lumbar", 50_000)):
        for i in range(N_STUDIES):
            for image in make_study(kind, np.random.default_rng(seed0 + i)):
                pixels, spacing = bone_bright(image.dataset)
                start = time.perf_counter()
                found = locate_sites(pixels, spacing, kind, image.view)
                seconds.append(time.perf_counter() - start)
                assert sorted(f.site for f in found) == sorted(image.sites)
                for f in found:
                    rows.append((f"{kind} {image.view}", f.site, iou(f.box, image.sites[f.site].box), f.confidence,
                                 (f.box[1] + f.box[3]) / 2 / pixels.shape[1]))
    return rows, seconds


def test_boxes_match_the_truth(located):
    rows, seconds = located
    for group in ("hip ap", "lumbar ap", "lumbar lat"):
        ious = [r[2] for r in rows if r[0] == group]
        print(f"{group}: n={len(ious)} mean IoU {np.mean(ious):.3f}, min {np.min(ious):.3f}")
    print(f"localisation: {1000 * np.mean(seconds):.0f} ms/image (full detector resolution)")
    good = [r for r in rows if r[2] >= 0.5 and r[3] >= 0.5]
    assert len(good) >= 0.95 * len(rows)
    for group in ("hip ap", "lumbar ap", "lumbar lat"):
        assert sum(r[0] == group for r in rows) >= N_STUDIES


def test_hip_laterality(located):
    rows, _ = located
    for group, site, _, _, centre in rows:
        if site == "left_hip":  # patient's left on the image's right in standard orientation
            assert centre > 0.5
        elif site == "right_hip":
            assert centre < 0.5


def test_mirrored_pelvis_swaps_the_labels():
    image = make_study("hip", np.random.default_rng(60_000))[0]
    pixels, spacing = bone_bright(image.dataset)
    width = pixels.shape[1]
    found = locate_sites(pixels[:, ::-1], spacing, "hip", "ap", patient_left_on_image_right=False)
    for f in found:
        r0, c0, r1, c1 = f.box
        assert iou((r0, width - c1, r1, width - c0), image.sites[f.site].box) > 0.5 and f.confidence >= 0.5


def test_chest_is_not_a_pelvis():
    for i in range(3):
        image = make_study("chest", np.random.default_rng(70_000 + i))[0]
        pixels, spacing = bone_bright(image.dataset)
        found = locate_sites(pixels, spacing, "hip", "ap")
        print("chest as hip:", [(f.site, round(f.confidence, 2)) for f in found])
        assert all(f.confidence < 0.5 for f in found)


def test_unsupported_requests_give_nothing():
    flat = np.zeros((400, 400), np.float32)
    assert locate_sites(flat, (0.5, 0.5), "hip", "lat") == []
    assert locate_sites(flat, (0.5, 0.5), "chest", "pa") == []
    assert all(f.confidence < 0.5 for f in locate_sites(flat, (0.5, 0.5), "lumbar", "ap"))
    assert locate_sites(np.zeros((10, 10), np.float32), (0.5, 0.5), "hip", "ap") == []

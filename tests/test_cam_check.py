"""Grad-CAM on bone: the measures by hand on small arrays, then the shipped model on a few phantoms."""
import json

import numpy as np
import pytest

from osteoscreen.config import DEFAULT_MODEL
from osteoscreen.pipeline.crops import square_crop
from osteoscreen.training.cam_check import bone_fractions, crop_region, main, mask_to_grid


def test_bone_fractions_by_hand():
    heatmap = np.zeros((6, 6))
    heatmap[1, 1], heatmap[1, 2], heatmap[3, 3], heatmap[4, 4] = 1.0, 0.5, 0.25, 0.25
    heatmap[0, 5] = 9.0  # outside the region: must not count
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True  # 4 bone pixels, two of them with CAM mass 1.0 and 0.5
    mask[0, 5] = True
    region = (1, 1, 5, 5)  # 16 pixels
    r = bone_fractions(heatmap, mask, region)
    assert r["cam_on_bone"] == pytest.approx(1.5 / 2.0)
    assert r["chance"] == pytest.approx(4 / 16)
    assert r["pointing_hit"] is True and r["region_pixels"] == 16
    heatmap[4, 4] = 3.0  # the peak moves off bone
    r = bone_fractions(heatmap, mask, region)
    assert r["cam_on_bone"] == pytest.approx(1.5 / 4.75) and r["pointing_hit"] is False
    assert r["chance"] == pytest.approx(0.25)  # chance does not depend on the CAM
    soft = mask.astype(float) * 0.5  # soft masks weigh each pixel by its bone fraction
    r = bone_fractions(heatmap, soft, region)
    assert r["cam_on_bone"] == pytest.approx(0.75 / 4.75) and r["chance"] == pytest.approx(2 / 16)
    assert r["pointing_hit"] is False
    empty = bone_fractions(np.zeros((6, 6)), mask, region)
    assert empty["cam_on_bone"] is None and empty["pointing_hit"] is None and empty["chance"] == pytest.approx(0.25)


def test_mask_to_grid_is_the_bone_fraction_per_pixel():
    mask = np.zeros((4, 6), bool)
    mask[0, 0] = mask[0, 1] = mask[1, 1] = True  # 3 of the top-left 2x2 block
    mask[2:4, 4:6] = True  # all of the bottom-right block
    m = mask_to_grid(mask, 0.5, (2, 3))
    assert m == pytest.approx(np.array([[0.75, 0, 0], [0, 0, 1.0]]))
    assert mask_to_grid(mask, 0.5, (3, 4)).shape == (3, 4)  # padded like the pipeline's heatmap
    assert mask_to_grid(mask, 1.0, (4, 6)) == pytest.approx(mask.astype(float))


def test_crop_region_is_the_square_the_model_saw():
    image = np.random.default_rng(0).random((400, 300)).astype(np.float32)
    for box in [(100, 80, 220, 150), (10, 5, 90, 60), (300, 200, 399, 299)]:
        crop = square_crop(image, box, mirrored=False)
        top, left, side = int(crop.origin[0]), int(crop.origin[1]), int(crop.side)
        expected = (max(0, top), max(0, left), min(400, top + side), min(300, left + side))
        got = crop_region(box, 1.0, image.shape)
        assert all(abs(a - b) <= 1 for a, b in zip(got, expected)), (box, got, expected)
    # on a grid with half the pixels the square halves
    r0, c0, r1, c1 = crop_region((100, 80, 220, 150), 0.5, (200, 150))
    assert (r1 - r0) == pytest.approx(120 * 1.15 / 2, abs=1) and (r0 + r1) / 2 == pytest.approx(80, abs=1)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="shipped model not present")
def test_shipped_model_on_a_few_phantoms(capsys):
    assert main(["--model", str(DEFAULT_MODEL), "--studies", "2", "--seed", "3", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["site_types"]) == {"hip", "lumbar_ap", "lumbar_lat"}
    assert report["site_types"]["hip"]["n_sites"] == 4  # two studies, two hips each
    assert report["site_types"]["lumbar_ap"]["n_sites"] == 2 and report["site_types"]["lumbar_lat"]["n_sites"] == 2
    measured = [r for r in report["sites"] if r.get("cam_on_bone") is not None]
    assert measured  # sites the pipeline's gates refuse are counted, not measured
    assert all(r["assessable"] or r["reason"] for r in report["sites"])
    for r in measured:
        assert 0.0 <= r["cam_on_bone"] <= 1.0
        assert 0.0 < r["chance"] < 1.0  # the crop holds bone and not only bone
        assert isinstance(r["pointing_hit"], bool)
    for s in report["site_types"].values():
        if s["n_measured"]:
            for key in ("cam_on_bone", "chance"):
                assert 0.0 <= s[key]["mean"] <= 1.0 and 0.0 <= s[key]["median"] <= 1.0
            assert 0.0 <= s["pointing_hit_rate"] <= 1.0


def test_cli_rejects_a_missing_model(tmp_path):
    assert main(["--model", str(tmp_path / "none.pt"), "--studies", "1"]) == 2

"""pipeline.scene: the whole image's descriptors follow the processing a site calibration reads."""
import numpy as np
from scipy import ndimage

from osteoscreen.pipeline.dicom_io import load_radiograph
from osteoscreen.pipeline.scene import BANDS_MM, QUANTILES, SCENE_SIZE, scene_descriptors
from osteoscreen.synth import make_study

FINE_SD = len(QUANTILES) + 2  # index of the 0-0.5 mm band's standard deviation
STRIPES = len(QUANTILES) + 2 + 2 * len(BANDS_MM) + 3  # the column stripes' amplitude


def _image():
    rad = load_radiograph(make_study("hip", np.random.default_rng(5), profile="synthA")[0].dataset)
    return rad.pixels.astype(np.float64), rad.spacing_mm[0]


def test_descriptors_are_finite_deterministic_and_sized():
    x, spacing = _image()
    d = scene_descriptors(x, spacing)
    assert d.shape == (SCENE_SIZE,) and np.isfinite(d).all()
    assert np.array_equal(d, scene_descriptors(x.copy(), spacing))
    assert np.all(np.diff(d[:len(QUANTILES)]) >= 0)  # quantiles in order
    assert np.isfinite(scene_descriptors(np.zeros((6, 5)), 0.5)).all()  # a blank thumbnail: no NaN


def test_descriptors_move_with_the_processing():
    x, spacing = _image()
    base = scene_descriptors(x, spacing)
    sharpened = x + 1.5 * (x - ndimage.gaussian_filter(x, 3.0 / spacing))  # edge enhancement
    assert scene_descriptors(sharpened, spacing)[FINE_SD] > 1.5 * base[FINE_SD]
    striped = x + 0.02 * np.cos(np.arange(x.shape[1]) * 2.2)[None, :]  # a grid's column stripes
    assert scene_descriptors(striped, spacing)[STRIPES] > 3 * base[STRIPES]
    assert scene_descriptors(x ** 2.0, spacing)[7] < base[7]  # a gamma moves the median (quantile 50)

"""The atlas localiser's shipped atlas (models/localiser-atlas-v1.npz): it is what the phantom
generator draws (rebuilt here in memory), its hash is checked on load, and the localiser finds the
same sites with it as with an atlas drawn by the generator at run time (the behaviour before the
atlas became a file). The pipeline itself never imports synth/."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from osteoscreen.pipeline import localize, localize_atlas
from osteoscreen.pipeline.localize_atlas import ATLAS_PATH, ATLAS_SHA256, AtlasError
from osteoscreen.pipeline.localize_common import normalise, resample
from osteoscreen.synth import make_study
from osteoscreen.synth.phantoms import mean_anatomy

from .test_localize import bone_bright

REGION_VIEWS = (("hip", "ap"), ("lumbar", "ap"), ("lumbar", "lat"))


@pytest.fixture(scope="module")
def anatomy():
    """mean_anatomy for every (kind, view) of the atlas, drawn once (about 7 s)."""
    return {kv: mean_anatomy(*kv) for kv in localize_atlas.VIEWS}


@pytest.fixture(scope="module")
def rebuilt(anatomy):
    return localize_atlas.atlas_arrays(lambda kind, view: anatomy[(kind, view)], localize.WORK_MM)


@pytest.fixture
def fresh_caches():
    """Templates and warped patches are cached per process: start and end with empty caches."""
    def clear():
        localize_atlas._read.cache_clear()
        localize._templates.cache_clear()
        localize._warped.cache_clear()
    clear()
    yield
    clear()


def test_shipped_atlas_has_its_recorded_hash():
    data = ATLAS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == ATLAS_SHA256
    assert len(data) < 400_000  # float32 at 2 mm, deflated: about 230 kB


def test_shipped_atlas_is_what_the_generator_draws(rebuilt):
    with np.load(ATLAS_PATH, allow_pickle=False) as npz:
        shipped = {name: npz[name] for name in npz.files}
    assert sorted(shipped) == sorted(rebuilt)
    for name, array in rebuilt.items():
        assert shipped[name].dtype == array.dtype and shipped[name].shape == array.shape, name
        # Same code and libraries give the same bits (scripts/build_localiser_atlas.py --check); another
        # platform may differ in the last bits of the rendering.
        np.testing.assert_allclose(shipped[name], array, rtol=1e-5, atol=1e-5, err_msg=name)


def test_atlas_bytes_are_deterministic(rebuilt):
    data = localize_atlas.atlas_bytes(rebuilt)
    assert data == localize_atlas.atlas_bytes(dict(reversed(list(rebuilt.items()))))
    views = localize_atlas.views_from_arrays(rebuilt)
    assert set(views) == set(localize_atlas.VIEWS)
    assert sorted(views[("hip", "ap")].landmarks_mm) == ["left_hip", "right_hip"]
    assert all(v.pixel_mm == localize.WORK_MM and v.attenuation.dtype == np.float32 for v in views.values())


def test_templates_are_those_the_generator_gave(anatomy, fresh_caches):
    """The templates `_templates` built from synth.phantoms.mean_anatomy before: the same crops of the
    same atlas, bit for bit where the rendering is (as with the libraries the atlas was built with),
    and within the rendering's last bits otherwise (numpy 2.4.6 draws hip_ap 5e-7 apart; see
    test_shipped_atlas_is_what_the_generator_draws)."""
    for region, view in REGION_VIEWS:
        kind = "hip" if region == "hip" else "lumbar"
        att, grid_mm, marks = anatomy[(kind, view)]
        atlas = normalise(resample(att, (grid_mm, grid_mm), localize.WORK_MM), localize.WORK_MM)
        templates = localize._templates(region, view)
        assert sorted(templates) == sorted(marks)
        for site, points_mm in marks.items():
            pts = points_mm / localize.WORK_MM
            margin = np.array(localize.CONTEXT_MM[kind]) / localize.WORK_MM
            r0, c0 = np.maximum(np.floor(pts.min(axis=0) - margin).astype(int), 0)
            r1, c1 = np.ceil(pts.max(axis=0) + margin).astype(int)
            t = templates[site]
            np.testing.assert_allclose(t.pixels, atlas[r0:r1, c0:c1], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(t.origin, [r0, c0])
            np.testing.assert_array_equal(t.points, pts - np.array([r0, c0]))


def test_localisation_is_unchanged(rebuilt, monkeypatch, fresh_caches):
    """The same boxes and confidences from the shipped file as from an atlas drawn now."""
    images = [(kind, image) for kind, seed in (("hip", 40_003), ("lumbar", 50_003))
              for image in make_study(kind, np.random.default_rng(seed))]

    def run():
        return [[(f.site, f.box, f.confidence)
                 for f in localize.locate_sites_atlas(*bone_bright(image.dataset), kind, image.view)]
                for kind, image in images]

    shipped = run()
    drawn = localize_atlas.views_from_arrays(rebuilt)
    localize._templates.cache_clear()
    localize._warped.cache_clear()
    monkeypatch.setattr(localize, "load_atlas", lambda kind, view: drawn[(kind, view)])
    assert run() == shipped
    assert len(shipped) == 3 and all(len(found) >= 1 for found in shipped)


def test_damaged_or_missing_atlas_is_refused(tmp_path, monkeypatch, fresh_caches):
    damaged = bytearray(ATLAS_PATH.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "atlas.npz").write_bytes(bytes(damaged))
    monkeypatch.setattr(localize_atlas, "ATLAS_PATH", tmp_path / "atlas.npz")
    with pytest.raises(AtlasError, match="sha256 .* not the"):
        localize_atlas.load_atlas("hip", "ap")
    monkeypatch.setattr(localize_atlas, "ATLAS_PATH", tmp_path / "missing.npz")
    with pytest.raises(AtlasError, match="cannot be read"):
        localize._templates("lumbar", "ap")


def test_the_pipeline_does_not_load_the_phantom_generator():
    code = ("import sys, numpy as np\n"
            "from osteoscreen.pipeline import localize, screen\n"
            "localize.warm_up()\n"
            "localize.locate_sites_atlas(np.zeros((400, 400), np.float32), (0.5, 0.5), 'hip', 'ap')\n"
            "print(sorted(m for m in sys.modules if m.startswith('osteoscreen.synth')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

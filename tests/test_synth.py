"""Synthetic phantoms: valid DX files, a truthful manifest, determinism, and a T-score that lives in
the pixels (not the header)."""
import csv

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEG2000Lossless
from scipy.stats import spearmanr

from osteoscreen.findings import who_category
from osteoscreen.synth import MANIFEST_COLUMNS, make_study, synthesize
from osteoscreen.synth.dicom_writer import write_dataset

from .conftest import dciodvfy_errors


def bone_bright(ds) -> np.ndarray:
    """Stored values → modality and VOI LUTs → MONOCHROME1 inverted: bone has the high values."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.float32), ds).astype(np.float32)
    return -values if ds.PhotometricInterpretation == "MONOCHROME1" else values


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One study of every kind, each in its own folder with its manifest."""
    root = tmp_path_factory.mktemp("synth")
    return {kind: synthesize(kind, 2, root / kind, seed=7, progress=False) for kind in ("hip", "lumbar", "chest")}


def read_manifest(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_every_kind_and_view_passes_dciodvfy(written):
    for kind, manifest in written.items():
        _, rows = read_manifest(manifest)
        for row in {r["view"]: r for r in rows}.values():
            assert dciodvfy_errors(manifest.parent / row["path"]) == [], (kind, row["view"])


def test_manifest_columns_and_truth(written):
    for kind, manifest in written.items():
        columns, rows = read_manifest(manifest)
        assert columns == MANIFEST_COLUMNS
        assert len(rows) == (4 if kind == "lumbar" else 2)
        for row in rows:
            ds = dcmread(manifest.parent / row["path"])
            assert row["sop_instance_uid"] == ds.SOPInstanceUID and row["study_instance_uid"] == ds.StudyInstanceUID
            assert int(row["age"]) == int(str(ds.PatientAge)[:3]) and row["sex"] == ds.PatientSex
            assert row["kind"] == kind and ds.Modality == "DX"
            sites = [s for s in ("left_hip", "right_hip", "lumbar_spine") if row[f"{s}_t_score"]]
            assert sites == {"hip": ["left_hip", "right_hip"], "lumbar": ["lumbar_spine"], "chest": []}[kind]
            for site in sites:
                t = float(row[f"{site}_t_score"])
                assert -4.5 <= t <= 2.0 and row[f"{site}_class"] == who_category(t)
                r0, c0, r1, c1 = map(int, row[f"{site}_box"].split())
                assert 0 <= r0 < r1 <= ds.Rows and 0 <= c0 < c1 <= ds.Columns
            if sites:
                worst = min(sites, key=lambda s: float(row[f"{s}_t_score"]))
                assert row["true_t_score"] == row[f"{worst}_t_score"] and row["true_class"] == row[f"{worst}_class"]
            else:
                assert row["true_class"] == row["true_t_score"] == ""
    _, lumbar = read_manifest(written["lumbar"])
    assert lumbar[0]["study_instance_uid"] == lumbar[1]["study_instance_uid"] != lumbar[2]["study_instance_uid"]
    assert {r["view"] for r in lumbar} == {"ap", "lat"}


def test_hip_boxes_follow_standard_orientation(written):
    _, rows = read_manifest(written["hip"])
    for row in rows:
        ds = dcmread(written["hip"].parent / row["path"])
        assert list(ds.PatientOrientation) == ["L", "F"] and ds.ViewPosition == "AP"
        left = list(map(int, row["left_hip_box"].split()))
        right = list(map(int, row["right_hip_box"].split()))
        assert (left[1] + left[3]) / 2 > ds.Columns / 2 > (right[1] + right[3]) / 2


def test_same_seed_same_pixels_and_truth(tmp_path):
    a = synthesize("lumbar", 1, tmp_path / "a", seed=3, progress=False)
    b = synthesize("lumbar", 1, tmp_path / "b", seed=3, progress=False)
    c = synthesize("lumbar", 1, tmp_path / "c", seed=4, progress=False)
    assert a.read_text() == b.read_text() != c.read_text()
    for name in ("lumbar_00001_ap.dcm", "lumbar_00001_lat.dcm"):
        assert np.array_equal(dcmread(a.parent / name).pixel_array, dcmread(b.parent / name).pixel_array)
    one = make_study("hip", np.random.default_rng(11))[0]
    two = make_study("hip", np.random.default_rng(11))[0]
    assert one.dataset.PixelData == two.dataset.PixelData and one.sites.keys() == two.sites.keys()
    assert all(one.sites[s].t_score == two.sites[s].t_score and one.sites[s].box == two.sites[s].box for s in one.sites)


def test_t_score_shows_in_the_pixels_of_the_site():
    """Mean bone intensity over the site, relative to the soft tissue around it and to the image's
    range, rises with T across phantoms whose exposure, gamma, noise, size and body habitus vary."""
    t_scores, contrast = [], []
    for i in range(30):
        image = make_study("hip", np.random.default_rng(500 + i))[0]
        values = bone_bright(image.dataset)
        lo, hi = np.percentile(values[::4, ::4], [1, 99])
        for truth in image.sites.values():
            r0, c0, r1, c1 = truth.box
            box, bone = values[r0:r1, c0:c1], truth.mask[r0:r1, c0:c1]
            contrast.append((box[bone].mean() - np.median(box[~bone])) / (hi - lo))
            t_scores.append(truth.t_score)
    rho = spearmanr(t_scores, contrast)[0]
    print(f"Spearman rho(T, bone contrast) = {rho:.2f} over {len(t_scores)} hips")
    assert rho > 0.5
    assert {who_category(t) for t in t_scores} == {"normal", "osteopenia", "osteoporosis"}


def test_monochrome1_stores_inverted_values():
    m1 = make_study("lumbar", np.random.default_rng(21), views=("ap",), photometric="MONOCHROME1")[0]
    m2 = make_study("lumbar", np.random.default_rng(21), views=("ap",), photometric="MONOCHROME2")[0]
    top = 2 ** m1.dataset.BitsStored - 1
    assert m1.dataset.PhotometricInterpretation == "MONOCHROME1" and m1.dataset.PresentationLUTShape == "INVERSE"
    assert np.array_equal(m1.dataset.pixel_array.astype(int), top - m2.dataset.pixel_array.astype(int))
    for image in (m1, m2):  # once displayed, bone is bright either way
        values = bone_bright(image.dataset)
        bone = image.sites["lumbar_spine"].mask
        assert values[bone].mean() > np.median(values[~bone])


def test_jpeg2000_lossless_round_trip(tmp_path):
    image = make_study("lumbar", np.random.default_rng(5), views=("lat",))[0]
    path = tmp_path / "j2k.dcm"
    write_dataset(image.dataset, path, JPEG2000Lossless)
    ds = dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(ds.pixel_array, image.dataset.pixel_array)
    assert image.dataset.file_meta.TransferSyntaxUID != JPEG2000Lossless  # the caller's copy is untouched
    assert dciodvfy_errors(path) == []


def test_unencodable_transfer_syntax_fails_clearly(tmp_path):
    image = make_study("hip", np.random.default_rng(1))[0]
    with pytest.raises(ValueError, match="not a transfer syntax"):
        write_dataset(image.dataset, tmp_path / "x.dcm", "1.2.3.4")
    with pytest.raises(ValueError, match="cannot write"):
        write_dataset(image.dataset, tmp_path / "x.dcm", "1.2.840.10008.1.2.4.50")  # 8-bit JPEG, 16-bit data
    with pytest.raises(ValueError):
        make_study("hip", np.random.default_rng(1), views=("lat",))
    with pytest.raises(ValueError):
        make_study("knee", np.random.default_rng(1))

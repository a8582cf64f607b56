"""Synthetic phantoms: valid DX files, a truthful manifest, determinism, and a T-score that lives in
the pixels (not the header); scanner profiles, metal, foreign bodies, lumbar findings and the
femoral-neck region."""
import csv

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEG2000Lossless
from scipy import ndimage
from scipy.stats import spearmanr

from osteoscreen.findings import who_category
from osteoscreen.synth import (HELD_OUT_PROFILE, MANIFEST_COLUMNS, PROFILES, TRAINING_PROFILES, make_study,
                               synthesize)
from osteoscreen.synth import phantoms
from osteoscreen.synth.dicom_writer import write_dataset
from osteoscreen.synth.implants import draw_foreign_bodies
from osteoscreen.synth.profiles import MANUFACTURER, draw_profile

OLD_COLUMNS = [
    "path", "kind", "view", "study_instance_uid", "sop_instance_uid", "true_class", "true_t_score",
    "left_hip_t_score", "right_hip_t_score", "lumbar_spine_t_score",
    "left_hip_class", "right_hip_class", "lumbar_spine_class",
    "left_hip_box", "right_hip_box", "lumbar_spine_box", "age", "sex", "bmi",
]
TRAINING_NAMES = {p.name for p in TRAINING_PROFILES}

from .conftest import dciodvfy_errors


def bone_bright(ds) -> np.ndarray:
    """Stored values → modality and VOI LUTs → MONOCHROME1 inverted: bone has the high values."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.float32), ds).astype(np.float32)
    return -values if ds.PhotometricInterpretation == "MONOCHROME1" else values


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One study of every kind, each in its own folder with its manifest."""
    root = tmp_path_factory.mktemp("synth")
    return {kind: synthesize(kind, 2, root / kind, seed=7, progress=False) for kind in ("hip", "lumbar", "chest", "leg")}


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
    assert MANIFEST_COLUMNS[:len(OLD_COLUMNS)] == OLD_COLUMNS  # old columns keep names and order
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
            assert sites == {"hip": ["left_hip", "right_hip"], "lumbar": ["lumbar_spine"], "chest": [], "leg": []}[kind]
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
            # New columns: profile in the header, no metal by default, neck T and box for hips.
            assert row["scanner_profile"] in TRAINING_NAMES
            profile = PROFILES[row["scanner_profile"]]
            assert ds.Manufacturer == MANUFACTURER and ds.ManufacturerModelName == profile.model_name
            assert ds.StationName == profile.station_name and ds.DetectorType == profile.detector_type
            assert profile.spacing_mm[0] <= float(ds.PixelSpacing[0]) <= profile.spacing_mm[1]
            assert row["foreign_body"] == "0"
            for site in ("left_hip", "right_hip", "lumbar_spine"):
                assert row[f"{site}_implant"] == ("0" if site in sites else "")
            assert (row["lumbar_findings"] == "") or kind == "lumbar"
            for site in ("left_hip", "right_hip"):
                if site not in sites:
                    assert row[f"{site}_neck_t_score"] == row[f"{site}_neck_box"] == ""
                    continue
                assert -4.5 <= float(row[f"{site}_neck_t_score"]) <= 2.0
                n0, m0, n1, m1 = map(int, row[f"{site}_neck_box"].split())
                r0, c0, r1, c1 = map(int, row[f"{site}_box"].split())
                assert r0 <= n0 < n1 <= r1 and c0 <= m0 < m1 <= c1  # the neck lies inside the hip crop
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


def test_kinds_with_the_same_seed_share_no_uid_or_accession(written):
    """`--kind hip --seed 7` and `--kind lumbar --seed 7` once made the same StudyInstanceUID, which
    the node merged into one study."""
    seen = {}
    for kind, manifest in written.items():
        for row in read_manifest(manifest)[1]:
            ds = dcmread(manifest.parent / row["path"])
            for key in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.AccessionNumber):
                assert seen.setdefault(str(key), kind) == kind, f"{key} of {kind} also in {seen[str(key)]}"


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


# ----------------------------------------------------------------------------------------------
# Scanner profiles
# ----------------------------------------------------------------------------------------------
def stored_bright(ds) -> np.ndarray:
    """Stored values with bone (and metal) high, before any VOI window."""
    values = ds.pixel_array.astype(np.int64)
    return (2 ** ds.BitsStored - 1) - values if ds.PhotometricInterpretation == "MONOCHROME1" else values


def count_in(mask, box) -> int:
    r0, c0, r1, c1 = box
    return int(mask[r0:r1, c0:c1].sum())


def vertical_stripes(ds) -> float:
    """Peak-to-median ratio of the spectrum of the high-passed column profile (grid lines: a sharp peak)."""
    profile = stored_bright(ds).astype(np.float64).mean(axis=0)
    high = profile - ndimage.uniform_filter1d(profile, 9)
    spectrum = np.abs(np.fft.rfft(high))[len(high) // 50:]
    return float(spectrum.max() / np.median(spectrum))


def test_held_out_profile_is_never_drawn_by_default_and_differs_clearly():
    assert len(PROFILES) == 4 and len(TRAINING_PROFILES) == 3 and HELD_OUT_PROFILE not in TRAINING_PROFILES
    assert {draw_profile(np.random.default_rng(i)).name for i in range(300)} == TRAINING_NAMES
    assert {draw_profile(np.random.default_rng(i), ["synthA", HELD_OUT_PROFILE]).name for i in range(50)} == {
        "synthA", HELD_OUT_PROFILE.name}
    held = HELD_OUT_PROFILE
    assert held.lut == "scurve" and {p.lut for p in TRAINING_PROFILES} == {"gamma"}
    assert held.edge[0] > max(p.edge[1] for p in TRAINING_PROFILES)
    assert held.spacing_mm[0] > max(p.spacing_mm[1] for p in TRAINING_PROFILES)
    assert len({p.model_name for p in PROFILES.values()}) == 4
    with pytest.raises(ValueError):
        make_study("hip", np.random.default_rng(1), profile="no-such-scanner")


def test_held_out_profile_shows_grid_lines_and_is_valid_dicom(tmp_path):
    held = make_study("hip", np.random.default_rng(8), profile=HELD_OUT_PROFILE, implants=("right_hip",),
                      foreign_body_rate=1.0)[0]
    trained = make_study("hip", np.random.default_rng(8), profile="synthA")[0]
    ds = held.dataset
    assert held.profile == HELD_OUT_PROFILE.name and ds.ManufacturerModelName == HELD_OUT_PROFILE.model_name
    assert float(ds.PixelSpacing[0]) >= HELD_OUT_PROFILE.spacing_mm[0]
    stripes, plain = vertical_stripes(ds), vertical_stripes(trained.dataset)
    print(f"grid-line spectral peak: held out {stripes:.1f}, synthA {plain:.1f}")
    assert stripes > 10 and stripes > 3 * plain
    path = tmp_path / "held_out_with_metal.dcm"
    write_dataset(ds, path)
    assert dciodvfy_errors(path) == []


# ----------------------------------------------------------------------------------------------
# Metal and foreign bodies
# ----------------------------------------------------------------------------------------------
def test_hip_implant_is_flagged_and_is_the_brightest_region():
    """Same patient, exposure and profile with and without a left hip arthroplasty."""
    metal = make_study("hip", np.random.default_rng(3), implants=("left_hip:tha",), profile="synthA")[0]
    plain = make_study("hip", np.random.default_rng(3), profile="synthA")[0]
    left, right = metal.sites["left_hip"], metal.sites["right_hip"]
    assert left.implant and left.implant_kind == "tha" and not right.implant and not plain.sites["left_hip"].implant
    values = stored_bright(metal.dataset)
    saturated = values >= values.max()
    assert count_in(saturated, left.box) > 20_000
    assert count_in(saturated, left.box) > 5 * count_in(saturated, right.box)
    top = values >= np.percentile(values, 99.5)  # the brightest values concentrate in the implanted site
    assert count_in(top, left.box) > 0.5 * top.sum()
    before = stored_bright(plain.dataset)
    assert count_in(before >= before.max(), plain.sites["left_hip"].box) < 0.2 * count_in(saturated, left.box)
    # texture-less: well inside the metal the stored value does not vary
    core = ndimage.binary_erosion(saturated, iterations=4)
    assert core.sum() > 5_000 and np.ptp(values[core]) == 0


def test_lumbar_fusion_shows_in_both_views():
    fused = make_study("lumbar", np.random.default_rng(4), implants=("lumbar_spine",), profile="synthA",
                       lumbar_findings=())
    plain = make_study("lumbar", np.random.default_rng(4), profile="synthA", lumbar_findings=())
    for with_metal, without in zip(fused, plain):
        assert with_metal.sites["lumbar_spine"].implant and not without.sites["lumbar_spine"].implant
        a, b = stored_bright(with_metal.dataset), stored_bright(without.dataset)
        box = with_metal.sites["lumbar_spine"].box
        assert count_in(a >= a.max(), box) > max(10_000, 3 * count_in(b >= b.max(), box)), with_metal.view


def test_manifest_flags_metal_and_foreign_bodies_deterministically(tmp_path):
    kw = dict(seed=5, implant_rate=1.0, foreign_body_rate=1.0, progress=False)
    first = synthesize("hip", 1, tmp_path / "a", **kw)
    again = synthesize("hip", 1, tmp_path / "b", **kw)
    assert first.read_text() == again.read_text()
    (row,) = read_manifest(first)[1]
    assert row["left_hip_implant"] == row["right_hip_implant"] == "1" and row["lumbar_spine_implant"] == ""
    assert row["foreign_body"] == "1" and row["scanner_profile"] in TRAINING_NAMES
    a, b = dcmread(first.parent / row["path"]), dcmread(again.parent / row["path"])
    assert np.array_equal(a.pixel_array, b.pixel_array)
    assert dciodvfy_errors(first.parent / row["path"]) == []
    with pytest.raises(ValueError):
        make_study("hip", np.random.default_rng(1), implants=("left_knee",))
    with pytest.raises(ValueError):
        make_study("hip", np.random.default_rng(1), implant_rate=1.5)


def test_foreign_bodies_stay_clear_of_the_sites():
    placed = 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        patient = phantoms.draw_patient(rng)
        bodies = draw_foreign_bodies(np.random.default_rng(100 + seed), 1.0)
        r = phantoms.render("hip", "ap", patient, rng, foreign=bodies)
        placed += r.foreign_bodies
        if r.metal is None:
            continue
        rows, cols = r.metal.shape
        for points, _ in r.sites.values():
            r0, c0 = np.floor(points.min(axis=0) / r.field_mm * (rows, cols)).astype(int)
            r1, c1 = np.ceil(points.max(axis=0) / r.field_mm * (rows, cols)).astype(int)
            assert r.metal[max(r0, 0):r1 + 1, max(c0, 0):c1 + 1].max() == 0
    assert placed >= 3


# ----------------------------------------------------------------------------------------------
# Femoral neck
# ----------------------------------------------------------------------------------------------
def test_neck_t_reads_lower_than_total_hip():
    diffs = []
    for i in range(1500):
        rng = np.random.default_rng(i)
        patient = phantoms.draw_patient(rng)
        neck = phantoms.draw_neck_t(patient, rng)
        diffs += [neck[s] - patient.t_scores[s] for s in neck if -3.5 < patient.t_scores[s] < 1.0]  # no clipping
    assert -0.34 < np.mean(diffs) < -0.26 and 0.21 < np.std(diffs) < 0.29
    image = make_study("hip", np.random.default_rng(2), profile="synthC")[0]
    for truth in image.sites.values():
        assert truth.regions["total_hip"] == truth.t_score and truth.regions["femoral_neck"] != truth.t_score
        assert truth.neck_box == truth.region_boxes["femoral_neck"]


def test_neck_t_shows_in_the_neck_and_not_in_the_trochanter():
    """Same generator state, only the femoral-neck T changed: the neck box brightens with it, the
    greater trochanter keeps its attenuation exactly and its pixels nearly."""
    def run(shift):
        rng = np.random.default_rng(77)
        patient = phantoms.draw_patient(rng)
        patient.neck_t = {s: float(np.clip(patient.t_scores[s] + shift, *phantoms.T_RANGE))
                          for s in ("left_hip", "right_hip")}
        r = phantoms.render("hip", "ap", patient, rng)
        exposure, _ = phantoms.expose(r, rng, profile="synthA", photometric="MONOCHROME2")
        return r, exposure
    (r_low, e_low), (r_high, e_high) = run(-1.5), run(+1.0)
    attenuation = r_high.attenuation - r_low.attenuation
    pixels = e_high.pixels.astype(np.float64) - e_low.pixels.astype(np.float64)
    grid = np.array(r_low.attenuation.shape) / np.array(r_low.field_mm)
    for site in ("left_hip", "right_hip"):
        means = {}
        for region in ("femoral_neck", "greater_trochanter"):
            points = r_low.regions[site][region]
            (a0, b0), (a1, b1) = (np.floor(points.min(axis=0) * grid).astype(int),
                                  np.ceil(points.max(axis=0) * grid).astype(int))
            r0, c0, r1, c1 = phantoms._box(points, e_low.spacing_mm, e_low.pixels.shape)
            changed = np.abs(attenuation[a0:a1, b0:b1]) > 1e-6
            means[region] = (attenuation[a0:a1, b0:b1].mean(), changed.mean(), pixels[r0:r1, c0:c1].mean())
        neck, trochanter = means["femoral_neck"], means["greater_trochanter"]
        print(site, "neck", np.round(neck, 3), "trochanter", np.round(trochanter, 3))
        # Denser neck bone; the trochanter's bone is untouched but for a corner where it meets the neck.
        assert neck[0] > 0.02 and neck[1] > 0.5 and trochanter[1] < 0.05
        assert neck[2] > 100 and neck[2] > 5 * abs(trochanter[2])  # pixels: the neck brightens, not the trochanter


# ----------------------------------------------------------------------------------------------
# Lumbar findings
# ----------------------------------------------------------------------------------------------
def test_lumbar_findings_in_manifest_when_forced_and_rare_by_default(tmp_path):
    manifest = synthesize("lumbar", 1, tmp_path, seed=2, lumbar_findings=("osteophytes", "compression:L2"),
                          progress=False)
    assert [r["lumbar_findings"] for r in read_manifest(manifest)[1]] == ["osteophytes;compression:L2"] * 2
    drawn = [phantoms.draw_lumbar_findings(np.random.default_rng(i)).labels for i in range(800)]
    for name, rate in phantoms.LUMBAR_FINDING_RATES.items():
        share = np.mean([any(label.split(":")[0] == name for label in labels) for labels in drawn])
        assert 0.4 * rate < share < 1.8 * rate, (name, share)
    assert np.mean([not labels for labels in drawn]) > 0.7
    with pytest.raises(ValueError):
        make_study("lumbar", np.random.default_rng(1), lumbar_findings=("fracture",))


def test_lumbar_findings_change_the_anatomy():
    def scene(view, findings):
        rng = np.random.default_rng(9)
        patient = phantoms.draw_patient(rng)
        extras = phantoms.StudyExtras(lumbar=phantoms.draw_lumbar_findings(np.random.default_rng(1), findings))
        return phantoms.render("lumbar", view, patient, rng, extras=extras)
    plain_ap, plain_lat = scene("ap", ()), scene("lat", ())
    box = plain_ap.sites["lumbar_spine"][0]
    # Osteophytes only add bone (not the vertebrae's mineral) and leave the L1-L4 bodies where they were.
    spurs = scene("ap", ("osteophytes",))
    added = spurs.attenuation - plain_ap.attenuation
    assert added.min() >= 0 and added.max() > 0.3 and np.array_equal(spurs.sites["lumbar_spine"][0], box)
    # A compression fracture of L1 lowers its body (AP) and removes anterior bone (lateral).
    compressed = scene("ap", ("compression:L1",)).sites["lumbar_spine"][0]
    assert compressed[:, 0].min() > box[:, 0].min() + 1.0
    assert (scene("lat", ("compression:L1",)).attenuation - plain_lat.attenuation).min() < -0.3
    # Scoliosis bends the column sideways.
    bent = scene("ap", ("scoliosis",)).sites["lumbar_spine"][0]
    assert abs(bent[:, 1].mean() - box[:, 1].mean()) > 5.0


def test_plain_anatomy_is_unchanged_without_extras():
    """No metal, no findings and a neck T equal to the site's: exactly the image the generator made
    before these existed (the localiser's atlas relies on it)."""
    for kind, view in (("hip", "ap"), ("lumbar", "ap"), ("lumbar", "lat")):
        def draw(neck: bool, **kw):
            rng = np.random.default_rng(12)
            patient = phantoms.draw_patient(rng)
            if neck:
                patient.neck_t = {s: patient.t_scores[s] for s in ("left_hip", "right_hip")}
            return phantoms.render(kind, view, patient, rng, **kw)
        base = draw(False)
        empty = phantoms.StudyExtras(lumbar=phantoms.LumbarFindings())
        for other in (draw(True), draw(False, extras=empty, foreign=())):
            assert np.array_equal(base.attenuation, other.attenuation) and other.metal is None


def test_an_interrupted_synthesis_leaves_no_manifest_that_looks_complete(tmp_path, monkeypatch):
    """The manifest appears only once every study is written (scripts skip a set whose manifest
    exists); a run into a folder that held a manifest removes it first."""
    import osteoscreen.synth as synth
    out = tmp_path / "set"
    assert synthesize("hip", 1, out, seed=2, progress=False) == out / "manifest.csv"
    real, written = synth.write_dataset, []

    def failing(ds, path, *args):
        if written:
            raise OSError("disk full")
        written.append(path)
        return real(ds, path, *args)

    monkeypatch.setattr(synth, "write_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        synthesize("hip", 3, out, seed=2, progress=False)
    assert not (out / "manifest.csv").exists() and (out / "manifest.csv.partial").exists()
    monkeypatch.setattr(synth, "write_dataset", real)
    assert len(read_manifest(synthesize("hip", 3, out, seed=2, progress=False))[1]) == 3
    assert not (out / "manifest.csv.partial").exists()

"""Site calibration (`osteoscreen calibrate`) and prediction intervals: the record, its fit on a
scanner's own phantoms (with and without DXA labels), its application per scanner, and what the
result objects say of it. The figures the issue asks for come from scripts/calibration_study.sh;
these tests check the mechanics on small sets."""
import csv
import json
from copy import deepcopy

import numpy as np
import pytest
import torch
from pydicom import dcmread

from osteoscreen.cli import main
from osteoscreen.config import DEFAULT_MODEL
from osteoscreen.model.calibration import (Calibration, CalibrationError, parse_scanner_key, scanner_key)
from osteoscreen.model.inference import LoadedModel, ScannerModels
from osteoscreen.pipeline.crops import CROP_SIZE, normalise
from osteoscreen.pipeline.scene import scene_descriptors
from osteoscreen.pipeline.screen import StudyImage, screen_studies, screen_study
from osteoscreen.reports.read import read_sr
from osteoscreen.synth import make_study, synthesize
from osteoscreen.training.recalibrate import class_weights, fit_line

from .conftest import dciodvfy_errors

SYNTH_D = "Osteoscreen Phantom Works|Meridian CX"


def _strip_labels(manifest, out):
    """A copy of a manifest without its T-score columns: unlabelled rows."""
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in row:
            if key.endswith("_t_score"):
                row[key] = ""
        row["path"] = str(manifest.parent / row["path"])
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    labelled = synthesize("hip", 22, root / "labelled", seed=51, profiles="synthD", progress=False)
    unlabelled = _strip_labels(synthesize("hip", 12, root / "unlab", seed=52, profiles="synthD", progress=False),
                               root / "unlabelled.csv")
    few = synthesize("hip", 6, root / "few", seed=53, profiles="synthD", progress=False)
    return {"root": root, "labelled": labelled, "unlabelled": unlabelled, "few": few}


@pytest.fixture(scope="module")
def fitted(sets):
    """Calibrations fitted through the CLI: supervised + unlabelled rows, and unlabelled only."""
    root = sets["root"]
    assert main(["calibrate", "--manifest", str(sets["labelled"]), "--manifest", str(sets["unlabelled"]),
                 "--out", str(root / "mixed.json"), "--quiet"]) == 0
    assert main(["calibrate", "--manifest", str(sets["unlabelled"]), "--out", str(root / "unlabelled.json"),
                 "--quiet"]) == 0
    return {"mixed": Calibration.load(root / "mixed.json"), "unlabelled": Calibration.load(root / "unlabelled.json"),
            "root": root}


# -- the record -------------------------------------------------------------------------------------
def test_record_round_trip_id_and_model_binding(tmp_path):
    model = LoadedModel(DEFAULT_MODEL, "cpu")
    cal = Calibration(created="2026-12-02T10:00:00+00:00", model=model.identity(), scanner=SYNTH_D,
                      t_correction={"hip": {"intercept": -0.5, "slope": 1.0}}, residuals={"hip": [0.1] * 20})
    path = cal.save(tmp_path / "c.json")
    again = Calibration.load(path)
    assert again.id == cal.id == again.content_id() and again.t_correction == cal.t_correction
    changed = Calibration(**{**again.__dict__, "id": "", "t_correction": {"hip": {"intercept": -0.4, "slope": 1.0}}})
    assert changed.id != cal.id  # the id follows the content
    other = Calibration(**{**again.__dict__, "id": "", "model": {"name": "x", "weights_sha256": "0" * 64}})
    with pytest.raises(CalibrationError, match="not for"):
        model.with_calibration(other)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CalibrationError):
        Calibration.load(tmp_path / "bad.json")
    # the correction applies to its site type only
    t = again.correct(np.array([-1.0, -1.0]), np.array([0, 1]))
    assert t.tolist() == [-1.5, -1.0]


def test_intervals_are_mondrian_and_absent_when_too_few():
    rng = np.random.default_rng(0)
    cal = Calibration(created="", model={"weights_sha256": ""},
                      residuals={"hip": rng.normal(0, 0.3, 200).tolist(), "lumbar_ap": rng.normal(0, 1.0, 200).tolist(),
                                 "lumbar_lat": [0.1] * 5})
    iv = cal.intervals(np.zeros(4), ["hip", "lumbar_ap", "lumbar_lat", "lumbar_fused"], 0.9)
    hip_w, ap_w = iv[0, 1] - iv[0, 0], iv[1, 1] - iv[1, 0]
    assert 0.8 < hip_w < 1.2 and 2.8 < ap_w < 3.8  # ±1.645 σ of each bin's own residuals
    assert np.isnan(iv[2]).all()  # 5 residuals cannot make a 90 % interval
    assert iv[3, 1] - iv[3, 0] == pytest.approx(ap_w)  # fused without its own: the wider view's
    p = cal.probability_at_most(np.array([-2.5, 0.0]), ["hip", "hip"], -2.5)
    assert 0.4 < p[0] < 0.6 and p[1] < 0.01


def test_scanner_keys():
    assert parse_scanner_key("Acme | FP-43|station=XR3") == {"manufacturer": "Acme", "model": "FP-43", "station": "XR3"}
    for bad in ("Acme", "|FP", "Acme|FP|room=3"):
        with pytest.raises(CalibrationError):
            parse_scanner_key(bad)
    ds = make_study("hip", np.random.default_rng(1), profile="synthD")[0].dataset
    assert scanner_key(ds) == SYNTH_D


def test_slope_is_shrunk_toward_one_and_prevalence_weighted():
    rng = np.random.default_rng(2)
    x = rng.normal(-1.5, 1.0, 12)
    y = 0.3 + 0.7 * x + rng.normal(0, 0.05, 12)
    few = fit_line(x, y, np.ones(12))
    x2 = rng.normal(-1.5, 1.0, 2000)
    many = fit_line(x2, 0.3 + 0.7 * x2 + rng.normal(0, 0.05, 2000), np.ones(2000))
    assert 0.7 < few["slope"] < 0.95 and many["slope"] == pytest.approx(0.7, abs=0.02)
    labels = np.array([2] * 30 + [1] * 10 + [0] * 10)  # enriched for osteoporosis, as DXA referrals are
    w = class_weights(labels)
    assert [w[labels == c].sum() for c in (0, 1, 2)] == pytest.approx([50 / 3] * 3)


# -- fitting ----------------------------------------------------------------------------------------
def test_calibrate_report_and_cross_validated_figures(fitted, capsys):
    cal = fitted["mixed"]
    assert cal.scanner == SYNTH_D and cal.n["labelled_studies"] == 22 and cal.n["unlabelled_studies"] == 12
    assert cal.n["by_site_type"]["hip"] == {"crops": 68, "labelled": 44}
    lab = cal.report["labelled"]
    before, after = lab["before"]["hip"], lab["after_cross_validated"]["hip"]
    assert after["n"] == before["n"] == 44 and after["mae_ci"][0] <= after["mae"] <= after["mae_ci"][1]
    # synthD reads too high before; the cross-fitted correction removes most of that
    assert before["bias"] > 0.2 and abs(after["bias"]) < before["bias"] / 2
    assert after["interval"]["n"] == 44 and before["interval"]["coverage"] < after["interval"]["coverage"]
    assert len(cal.residuals["hip"]) == 44 and "hip" in cal.t_correction and cal.temperature > 0
    u = cal.report["unlabelled"]
    assert u["refused_before"]["hip"]["rate"] > 0.3 and u["refused_after_in_sample"]["hip"]["rate"] < 0.1
    assert cal.ood and "0" in cal.ood


def test_too_little_data_is_exit_2(sets, capsys):
    out = sets["root"] / "x.json"
    assert main(["calibrate", "--manifest", str(sets["few"]), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not enough data" in err and "at least 20" in err
    assert not out.exists()
    assert main(["calibrate", "--manifest", str(sets["labelled"]), "--scanner", "nonsense", "--out", str(out)]) == 2


def test_unlabelled_calibration_cuts_refusals_but_not_of_other_anatomy(sets, fitted, tmp_path):
    cal = fitted["unlabelled"]
    assert cal.n["labelled_studies"] == 0 and "inherited_from_model" in cal.report
    base = LoadedModel(DEFAULT_MODEL, "cpu")
    assert cal.t_correction == base.calibration.t_correction  # the model's own, said to be unverified here
    rows = list(csv.DictReader(open(sets["labelled"])))
    images = [dcmread(sets["labelled"].parent / r["path"]) for r in rows[:10]]
    refused = {}
    for name, model in (("before", base), ("after", ScannerModels(base, {SYNTH_D: cal}))):
        refused[name] = sum(not f.assessable for ds in images
                            for f in screen_study([StudyImage(ds, "hip", "ap")], model, heatmaps=False)[0].sites)
    assert refused["before"] >= 6 and refused["after"] <= refused["before"] // 3
    # a chest and a tibia radiograph whose headers say pelvis, from the calibrated scanner: still refused
    pelvis = images[0]
    disguised = []
    for kind, seed in (("chest", 4402), ("leg", 4404)):
        ds = deepcopy(make_study(kind, np.random.default_rng(seed), profile="synthD")[0].dataset)
        for keyword in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ViewPosition"):
            setattr(ds, keyword, pelvis[keyword].value)
        disguised.append(ds)
    lumbar_as_hip = make_study("lumbar", np.random.default_rng(4403), profile="synthD")[1].dataset  # the lateral view
    for cal_ in (fitted["unlabelled"], fitted["mixed"]):
        models = ScannerModels(base, {SYNTH_D: cal_})
        for ds in (*disguised, lumbar_as_hip):
            result = screen_study([StudyImage(ds, "hip", "ap")], models, heatmaps=False)[0]
            assert not result.assessable, (cal_.id, [(f.site, f.reason) for f in result.sites])


def test_a_calibration_changes_only_its_own_scanner(fitted):
    base = LoadedModel(DEFAULT_MODEL, "cpu")
    models = ScannerModels(base, {SYNTH_D: fitted["mixed"]})
    other = make_study("hip", np.random.default_rng(77), profile="synthA")[0].dataset
    mine = make_study("hip", np.random.default_rng(78), profile="synthD")[0].dataset
    alone = screen_study([StudyImage(other, "hip", "ap")], base, heatmaps=False)[0].sites
    # both scanners' studies in one worker batch: the other scanner's findings are the base model's
    # (to float32 rounding: the batch differs)
    mixed = [r[0] for r in screen_studies([[StudyImage(other, "hip", "ap")], [StudyImage(mine, "hip", "ap")]], models,
                                          heatmaps=False)]
    for f, g in zip(mixed[0].sites, alone):
        assert f.t_score == pytest.approx(g.t_score, abs=1e-5) and f.category == g.category
        assert f.t_score_interval == pytest.approx(g.t_score_interval, abs=1e-5) and f.calibration is None
    assert all(f.calibration["id"] == fitted["mixed"].id for f in mixed[1].sites if f.assessable)
    assert any(f.assessable for f in mixed[1].sites)
    # required but absent: not assessable, with its reason; the calibrated scanner still answers
    strict = ScannerModels(base, {SYNTH_D: fitted["mixed"]}, require_calibration=True)
    result = screen_study([StudyImage(other, "hip", "ap")], strict, heatmaps=False)[0]
    assert not result.assessable and {f.reason for f in result.sites} == {"scanner_not_calibrated"}
    assert any(f.assessable for f in screen_study([StudyImage(mine, "hip", "ap")], strict, heatmaps=False)[0].sites)


def test_a_hip_reads_the_other_hip_of_its_pelvis_and_no_other_image(fitted):
    """The hips' feature correction reads the image's other hip (feature set channel_stats_image):
    crops pair by image and site type only, and a study's estimates do not depend on which other
    studies share its worker batch."""
    from osteoscreen.model.calibration import feature_sets
    stats = np.arange(12.0).reshape(4, 3)
    sets_ = feature_sets(np.zeros((4, 1)), stats, np.array([0, 0, 0, 1]), images=["a", "a", "b", "a"])
    pair = sets_["channel_stats_image"]
    assert pair[:, :3].tolist() == stats.tolist()
    assert pair[0, 3:].tolist() == pair[1, 3:].tolist() == stats[:2].mean(0).tolist()  # the two hips of image a
    assert pair[2, 3:].tolist() == stats[2].tolist() and pair[3, 3:].tolist() == stats[3].tolist()  # alone
    assert feature_sets(np.zeros((4, 1)), stats, np.zeros(4))["channel_stats_image"][:, 3:].tolist() == stats.tolist()
    cal = fitted["mixed"]
    assert cal.feature_correction["hip"]["features"] == "channel_stats_image_scene"  # and the image's descriptors
    assert cal.feature_correction["hip"]["sub_regions"] is True  # the neck of the same crop is corrected too
    model = LoadedModel(DEFAULT_MODEL, "cpu").with_calibration(cal)
    studies = [make_study("hip", np.random.default_rng(seed), profile="synthD")[0].dataset for seed in (78, 79)]
    alone = screen_study([StudyImage(studies[1], "hip", "ap")], model, heatmaps=False)[0].sites
    together = screen_studies([[StudyImage(ds, "hip", "ap")] for ds in studies], model, heatmaps=False)[1][0].sites
    assert sum(f.assessable for f in alone) == 2
    for f, g in zip(together, alone):
        assert f.t_score == pytest.approx(g.t_score, abs=1e-5)
        assert f.t_score_interval == pytest.approx(g.t_score_interval, abs=1e-5)
    # and the pairing matters: the same two crops read as two images give other estimates
    from osteoscreen.pipeline.localize import locate_sites
    from osteoscreen.pipeline.crops import square_crop
    from osteoscreen.pipeline.dicom_io import load_radiograph
    rad = load_radiograph(studies[1])
    located = {loc.site: loc for loc in locate_sites(rad.pixels, rad.spacing_mm, "hip", "ap")}
    crops = np.stack([normalise(square_crop(rad.pixels, located[s].box, mirrored=(s == "left_hip")).pixels)
                      for s in ("right_hip", "left_hip")])
    scenes = np.stack([scene_descriptors(rad.pixels, rad.spacing_mm[0])] * 2)
    paired = model.predict(crops, np.zeros((2, 7)), np.zeros(2, np.int64), images=[0, 0], scenes=scenes).t_scores
    apart = model.predict(crops, np.zeros((2, 7)), np.zeros(2, np.int64), images=[0, 1], scenes=scenes).t_scores
    assert np.abs(paired - apart).max() > 1e-3
    # the whole image's descriptors count too: another image's give other estimates, none an error
    rad0 = load_radiograph(studies[0])
    elsewhere = np.stack([scene_descriptors(rad0.pixels, rad0.spacing_mm[0])] * 2)
    assert np.abs(model.predict(crops, np.zeros((2, 7)), np.zeros(2, np.int64), images=[0, 0],
                                scenes=elsewhere).t_scores - paired).max() > 1e-3
    with pytest.raises(ValueError, match="whole image's descriptors"):
        model.predict(crops, np.zeros((2, 7)), np.zeros(2, np.int64), images=[0, 0])


def test_the_image_descriptors_enter_the_feature_sets_weighted_and_are_optional(sets, fitted):
    """feature_sets sets each crop's image descriptors (pipeline.scene) after the channel statistics
    in the SCENE_SETS, only where every crop has finite ones; a fit on them weights each standardised
    descriptor by SCENE_WEIGHT in its record's scale; samples without descriptors (extracted before
    they existed) calibrate on the sets without them, as before."""
    from osteoscreen.model.calibration import SCENE_SETS, feature_sets
    from osteoscreen.pipeline.scene import SCENE_SIZE
    from osteoscreen.training.calibrate import calibrate
    from osteoscreen.training.dataset import extract_samples
    from osteoscreen.training.feature_correction import SCENE_WEIGHT, fit_feature_correction
    stats, scenes = np.arange(12.0).reshape(4, 3), np.arange(8.0).reshape(4, 2)
    with_scenes = feature_sets(np.zeros((4, 1)), stats, np.zeros(4), images=["a", "a", "b", "b"], scenes=scenes)
    for name, without in SCENE_SETS.items():
        assert with_scenes[name][:, :-2].tolist() == with_scenes[without].tolist()
        assert with_scenes[name][:, -2:].tolist() == scenes.tolist()
    assert not set(SCENE_SETS) & set(feature_sets(np.zeros((4, 1)), stats, np.zeros(4)))
    scenes[1, 0] = np.nan
    assert not set(SCENE_SETS) & set(feature_sets(np.zeros((4, 1)), stats, np.zeros(4), scenes=scenes))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 10 + SCENE_SIZE)) * 3.0
    y = x[:, -1] * 0.1 + rng.normal(scale=0.05, size=40)
    fit = fit_feature_correction(x, y, np.ones(40), "channel_stats_scene", "gp")
    std = x.std(axis=0)
    assert np.allclose(fit["scale"][:10], std[:10]) and np.allclose(fit["scale"][10:], std[10:] / SCENE_WEIGHT)
    assert fit_feature_correction(x, y, np.ones(40), "channel_stats", "gp")["scale"] == pytest.approx(std.tolist())
    # a Samples cache of before: NaN descriptors, the hips' correction on their pelvis's channel statistics
    samples, _ = extract_samples([sets["labelled"]], progress=False, unlabelled=True)
    assert samples.scenes.shape == (len(samples), SCENE_SIZE) and np.isfinite(samples.scenes).all()
    samples.scenes = np.full_like(samples.scenes, np.nan)
    old = calibrate([], DEFAULT_MODEL, samples=samples, progress=False)
    assert old.feature_correction["hip"]["features"] == "channel_stats_image" and not old.reads_scenes
    assert fitted["mixed"].reads_scenes


def test_calibration_draws_benchmark_partitions_the_pool_and_scores_like_predict(sets, fitted):
    """bench.calibration_draws: a draw is the study script's (sorted studies, random.Random(seed)),
    labelled, unlabelled and left-out studies do not overlap, and its node-level figures are the
    calibrated model's own estimates and intervals."""
    import random
    from bench.calibration_draws import draw, node_figures
    from osteoscreen.training.dataset import extract_samples
    pool, _ = extract_samples([sets["labelled"]], progress=False)
    studies = sorted(set(pool.groups))
    random.Random(3).shuffle(studies)
    both, rest = draw(pool, 3, 8, 6)
    assert set(both.groups) == set(studies[:14]) and set(rest.groups) == set(studies[14:])
    assert set(both.groups[np.isfinite(both.t_scores)]) == set(studies[:8])
    model = LoadedModel(DEFAULT_MODEL, "cpu").with_calibration(fitted["mixed"])
    figures = node_figures(model, rest)
    pred = model.predict(np.stack([normalise(c) for c in rest.crops]), rest.covariates, rest.site_types,
                         images=rest.images, scenes=rest.scenes)
    answered = ~pred.out_of_distribution()
    err = (pred.t_scores - rest.t_scores)[answered]
    assert figures["sites"] == answered.sum() > 0 and figures["mae"] == pytest.approx(np.abs(err).mean())
    iv = fitted["mixed"].intervals(pred.t_scores, ["hip"] * len(rest), 0.9)[answered]
    inside = (iv[:, 0] <= rest.t_scores[answered]) & (rest.t_scores[answered] <= iv[:, 1])
    assert figures["coverage"] == pytest.approx(inside.mean()) and figures["lumbar_mae"] is None
    # the benchmark's shortcut: the network's outputs computed once, the calibration applied to them,
    # gives what predict gives, and calibrate fitted on ready outputs is the same calibration
    from bench.calibration_draws import node_figures_from_outputs
    from osteoscreen.training.calibrate import calibrate, network_outputs
    base = LoadedModel(DEFAULT_MODEL, "cpu")
    shortcut = node_figures_from_outputs(model, network_outputs(base, rest), rest)
    assert shortcut.keys() == figures.keys()
    assert all(shortcut[k] == pytest.approx(v, abs=1e-4) for k, v in figures.items() if v is not None)
    labelled, _ = draw(pool, 3, 20, 2)
    direct = calibrate([], DEFAULT_MODEL, samples=labelled, progress=False)
    ready = calibrate([], DEFAULT_MODEL, samples=labelled, progress=False, outputs=network_outputs(base, labelled))
    for part in ("t_correction", "residuals", "ood", "temperature"):
        assert json.dumps(getattr(ready, part)) == json.dumps(getattr(direct, part)), part
    with pytest.raises(ValueError, match="every row"):
        calibrate([], DEFAULT_MODEL, samples=labelled, progress=False, outputs=network_outputs(base, rest))


def test_objects_carry_interval_and_calibration(sets, fitted, tmp_path, capsys):
    rows = list(csv.DictReader(open(sets["labelled"])))
    files = [str(sets["labelled"].parent / r["path"]) for r in rows[:3]]
    cal_path = fitted["root"] / "mixed.json"
    assert main(["predict", "--json", "--calibration", str(cal_path), "--out", str(tmp_path), *files]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    sites = [s for r in records for s in r["sites"] if s["assessable"]]
    assert sites and all(s["calibration"] == fitted["mixed"].id and s["t_score_interval"] for s in sites)
    srs = sorted(tmp_path.glob("*.sr.dcm"))
    heatmaps = sorted(tmp_path.glob("*.heatmap.dcm"))
    assert len(srs) == 3 and heatmaps
    for path in srs + heatmaps:
        assert dciodvfy_errors(path) == [], path
    by_uid = {r["sop_instance_uid"]: r for r in records}
    for path in srs:
        ds = dcmread(path)
        for finding in read_sr(ds):
            if finding.assessable:
                record = next(s for s in by_uid[finding.source_sop_instance_uid]["sites"] if s["site"] == finding.site)
                assert list(finding.t_score_interval) == record["t_score_interval"] and finding.interval_level == 0.9
                assert finding.calibration == {"id": fitted["mixed"].id} and finding.t_score == record["t_score"]
        assert "Site calibration: " + fitted["mixed"].id in ds.to_json()  # the study-level calibration text
    assert main(["predict", "--calibration", str(tmp_path / "missing.json"), files[0]]) == 2


def test_config_calibrations_are_validated(tmp_path, fitted):
    from osteoscreen.config import ConfigError, load
    good = tmp_path / "good.yaml"
    good.write_text(f"calibrations:\n  '{SYNTH_D}': {fitted['root'] / 'mixed.json'}\nrequire_calibration: true\n")
    settings = load(good, environ={})
    assert settings.require_calibration and list(settings.calibrations) == [SYNTH_D]
    from osteoscreen.scanners import models_from_settings
    models = models_from_settings(settings)
    assert models.entries and models.require_calibration
    for text in ("calibrations:\n  'NoModel': x.json\n", f"calibrations:\n  '{SYNTH_D}': /nonexistent.json\n",
                 "interval_level: 1.5\n"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError):
            load(bad, environ={})


def test_from_node_takes_the_scanners_spooled_images(sets, tmp_path, capsys):
    """`calibrate --from-node --scanner KEY`: the node's own eligible images of that scanner (read from
    the spooled files' headers), and none of another scanner's."""
    from datetime import datetime, timedelta

    from osteoscreen.store.db import Database
    from osteoscreen.store.models import Instance, Study
    storage = tmp_path / "var"
    storage.mkdir()
    db = Database(f"sqlite:///{storage / 'osteoscreen.db'}")
    rows = list(csv.DictReader(open(sets["unlabelled"])))
    other = synthesize("hip", 2, tmp_path / "other", seed=54, progress=False)  # training profiles
    other_rows = [dict(r, path=str(other.parent / r["path"])) for r in csv.DictReader(open(other))]
    old = datetime(2020, 1, 1)
    with db.session() as s:
        for i, row in enumerate(rows + other_rows + rows[:1]):
            ds = dcmread(row["path"], stop_before_pixels=True)
            study = Study(study_uid=f"{ds.StudyInstanceUID}.{i}", status="screened")
            s.add(study)
            s.flush()
            s.add(Instance(study_id=study.id, sop_instance_uid=f"{ds.SOPInstanceUID}.{i}", path=row["path"],
                           sop_class_uid=str(ds.SOPClassUID), region="hip", view="ap", eligible=True,
                           received_at=old if i == len(rows) + len(other_rows) else datetime.now() - timedelta(days=1)))
        s.commit()
    db.dispose()
    out = tmp_path / "node.json"
    assert main(["calibrate", "--from-node", "--scanner", SYNTH_D, "--storage", str(storage), "--since",
                 (datetime.now() - timedelta(days=30)).date().isoformat(), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"node: {len(rows)} of {len(rows) + len(other_rows)} eligible spooled images are from {SYNTH_D}" in err
    cal = Calibration.load(out)
    assert cal.scanner == SYNTH_D and cal.n["unlabelled_studies"] == len(rows) and cal.n["labelled_studies"] == 0
    assert main(["calibrate", "--from-node", "--storage", str(storage), "--out", str(out)]) == 2  # no --scanner


def test_batchnorm_adaptation_mixes_source_and_target_and_travels_in_the_record():
    import copy

    import torch

    from osteoscreen.training.adapt import adapt_batchnorm
    base = LoadedModel(DEFAULT_MODEL, "cpu")
    x = torch.randn(24, 1, 128, 128, generator=torch.Generator().manual_seed(0)) * 0.4
    types = np.zeros(24, dtype=int)
    source = base.net.stem[1].running_mean.clone()
    with torch.no_grad():
        target = base.net.stem[0](x).double().mean(dim=(0, 2, 3)).float()
    pure = copy.deepcopy(base.net)
    adapt_batchnorm(pure, x, types, pseudo_count=0.0)
    assert torch.allclose(pure.stem[1].running_mean, target, atol=1e-4)  # the first layer: the target's moments
    held = copy.deepcopy(base.net)
    buffers = adapt_batchnorm(held, x, types, pseudo_count=24.0)  # as many pseudo-crops as crops: halfway
    assert torch.allclose(held.stem[1].running_mean, (source + target) / 2, atol=1e-4)
    cal = Calibration(created="", model=base.identity(), batchnorm={"pseudo_count": 24.0, "buffers": buffers})
    view = base.with_calibration(cal)
    assert torch.equal(view.net.stem[1].running_mean, held.stem[1].running_mean)
    assert torch.equal(base.net.stem[1].running_mean, source)  # the model itself is untouched


def test_feature_correction_takes_what_the_line_leaves(tmp_path):
    """Where the error varies from image to image with something the features see, the feature
    correction removes it and cross_fit keeps it; on features that carry nothing it gains nothing."""
    from osteoscreen.training.recalibrate import Labelled, cross_fit
    rng = np.random.default_rng(5)
    n = 240
    truth = rng.normal(-1.5, 1.1, n)
    features = rng.normal(0, 1, (n, 12))
    pred = truth + 0.3 + 0.5 * features[:, 0] + rng.normal(0, 0.1, n)  # processing-dependent error

    def labelled(f, p=pred):
        return Labelled(t_pred=p, t_true=truth, site_types=np.zeros(n, int), logits=np.zeros((n, 3)),
                        groups=np.repeat(np.arange(n // 2), 2).astype(str),
                        labels=np.where(truth <= -2.5, 2, np.where(truth < -1, 1, 0)),
                        region_pred={}, region_true={}, features=f)

    cf = cross_fit(labelled({"pooled": features}), 0.9)
    hip = cf.feature_report["hip"]
    assert cf.feature_choice == {"hip": ("pooled", "ridge", "site")} and hip["used"] == "pooled ridge"
    assert hip["mae"]["pooled ridge"] < 0.5 * hip["mae_line"]  # the line cannot remove the feature-dependent part
    assert np.abs(cf.corrected - truth).mean() == pytest.approx(hip["mae"]["pooled ridge"])
    noise = cross_fit(labelled({"pooled": rng.normal(0, 1, (n, 12))}), 0.9).feature_report["hip"]
    assert noise["mae"]["pooled ridge"] > 0.9 * noise["mae_line"]  # nothing to learn: about the line's error
    # an error that does not grow linearly with the feature: the Gaussian process wins, the linear fit cannot
    bent = truth + 0.3 + 0.8 * np.abs(features[:, 0]) + rng.normal(0, 0.1, n)
    alone = np.concatenate([features, features], axis=1)  # channel_stats_image of crops alone in their images
    curved = cross_fit(labelled({"channel_stats": features, "channel_stats_image": alone}, bent), 0.9)
    report = curved.feature_report["hip"]
    assert curved.feature_choice == {"hip": ("channel_stats_image", "gp", "site")}
    assert report["mae"]["channel_stats_image gp"] < 0.75 * report["mae"]["channel_stats ridge"]

    # applied per crop of its site type, only with the features given, and kept by the record; a
    # record without "features" and "kind" (made on 2026-12-02) is a ridge on the pooled features
    model = LoadedModel(DEFAULT_MODEL, "cpu")
    width = model.net.arch["widths"][-1]
    fit = {"mean": [0.0] * width, "scale": [1.0] * width, "coef": [0.5] + [0.0] * (width - 1), "intercept": 0.2,
           "alpha": 1.0, "n": 40}
    cal = Calibration(created="2026-12-02T10:00:00+00:00", model=model.identity(), scanner=SYNTH_D,
                      feature_correction={"hip": fit})
    feats = np.zeros((2, width))
    feats[:, 0] = [1.0, 2.0]
    assert cal.correct(np.array([-1.0, -1.0]), np.array([0, 1]), features={"pooled": feats}) == \
        pytest.approx([-0.3, -1.0])
    with pytest.raises(ValueError, match="features"):
        cal.correct(np.array([-1.0]), np.array([0]))
    with pytest.raises(ValueError, match="pooled"):
        cal.correct(np.array([-1.0]), np.array([0]), features={"channel_stats": feats[:1]})
    again = Calibration.load(cal.save(tmp_path / "f.json"))
    assert again.feature_correction == cal.feature_correction and again.id == cal.id
    for key, value in (("coef", [0.5]), ("features", "histogram"), ("kind", "forest"), ("intercept", float("nan"))):
        broken = again.to_json()
        broken["feature_correction"]["hip"][key] = value
        with pytest.raises(CalibrationError, match="malformed"):
            Calibration.from_json(broken)
    # at inference: the site T moves by the term of the crop's own pooled features; its neck T moves
    # by the same term where the fit says sub_regions (as calibrate now writes it), else not
    crops = np.random.default_rng(6).uniform(-1, 1, (2, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    cov, st = np.zeros((2, 7), np.float32), np.zeros(2, np.int64)
    plain = model.with_calibration(Calibration(**{**cal.__dict__, "id": "", "feature_correction": {}}))
    a, b = plain.predict(crops, cov, st), model.with_calibration(cal).predict(crops, cov, st)
    term = 0.2 + 0.5 * a.embeddings[:, 0]
    assert b.t_scores - a.t_scores == pytest.approx(term, abs=1e-6)
    assert a.region_t_scores and set(a.region_t_scores) == {"femoral_neck"}
    assert b.region_t_scores["femoral_neck"] == pytest.approx(a.region_t_scores["femoral_neck"])
    both = Calibration(**{**cal.__dict__, "id": "", "feature_correction": {"hip": {**fit, "sub_regions": True}}})
    c = model.with_calibration(both).predict(crops, cov, st)
    assert c.t_scores == pytest.approx(b.t_scores, abs=1e-9)
    assert c.region_t_scores["femoral_neck"] - a.region_t_scores["femoral_neck"] == pytest.approx(term, abs=1e-6)
    with pytest.raises(CalibrationError, match="malformed"):
        broken = both.to_json()
        broken["feature_correction"]["hip"]["sub_regions"] = "yes"
        Calibration.from_json(broken)


def test_a_sparse_site_type_borrows_the_feature_correction_of_every_site_type():
    """Where a processing chain moves the error of every site type with the same features, a site type
    with few labelled crops gains from a correction fitted on all of them: cross_fit measures it out
    of fold and keeps it, the record says so, and a site type below MIN_FEATURE_CASES gets no choice."""
    from osteoscreen.training.feature_correction import MIN_FEATURE_CASES
    from osteoscreen.training.recalibrate import Labelled, cross_fit, fit_corrections, fit_feature_corrections
    rng = np.random.default_rng(11)
    site_types = np.repeat([0, 1, 2], [180, 30, MIN_FEATURE_CASES - 4])
    n = len(site_types)
    truth = rng.normal(-1.5, 1.1, n)
    features = rng.normal(0, 1, (n, 60))
    pred = truth + 0.3 + 0.5 * features[:, 0] - 0.3 * features[:, 1] + rng.normal(0, 0.1, n)
    d = Labelled(t_pred=pred, t_true=truth, site_types=site_types, logits=np.zeros((n, 3)),
                 groups=np.arange(n).astype(str), labels=np.where(truth <= -2.5, 2, np.where(truth < -1, 1, 0)),
                 region_pred={}, region_true={}, features={"channel_stats": features})
    cf = cross_fit(d, 0.9)
    ap = cf.feature_report["lumbar_ap"]
    assert ap["mae"]["channel_stats ridge on all site types"] < 0.8 * ap["mae"]["channel_stats ridge"]
    assert cf.feature_choice["lumbar_ap"][2] == "all" and ap["used"].endswith("on all site types")
    assert "lumbar_lat" not in cf.feature_report and "lumbar_lat" not in cf.feature_choice
    every = np.arange(n)
    line = Calibration(created="", model={"weights_sha256": ""}, t_correction=fit_corrections(d, every))
    fits = fit_feature_corrections(d, every, line, cf.feature_choice)
    assert fits["lumbar_ap"]["fitted_on"] == "all site types" and fits["lumbar_ap"]["n"] == n


def test_a_site_type_keeps_its_default_feature_correction_unless_another_is_clearly_better():
    """Out of fold, a candidate replaces the site type's default only when its lower error is
    significant by study (few labelled crops make the lowest MAE a lottery); the line alone can win
    the same way; where the default's features are not at hand, the line alone is the default."""
    from osteoscreen.training.feature_correction import DEFAULTS, FALLBACK_DEFAULTS, SWITCH_P, label
    from osteoscreen.training.recalibrate import Labelled, _choose_feature_corrections
    rng = np.random.default_rng(21)
    n = 120
    truth = rng.normal(-1.5, 1.1, n)
    d = Labelled(t_pred=truth, t_true=truth, site_types=np.zeros(n, int), logits=np.zeros((n, 3)),
                 groups=np.repeat(np.arange(n // 2), 2).astype(str), labels=np.zeros(n, int),
                 region_pred={}, region_true={}, features={})
    default, ridge = DEFAULTS["hip"], ("channel_stats", "ridge", "site")
    line = truth + rng.normal(0, 0.5, n)
    shared = rng.normal(0, 0.25, n)
    # a hair better, by chance: each error 10 % larger or smaller at random
    close = {default: truth + shared, ridge: truth + shared * (1 + 0.1 * np.random.default_rng(103).choice([-1, 1], n))}
    chosen, report = _choose_feature_corrections(d, line, close)
    assert report["hip"]["mae"][label(ridge)] < report["hip"]["mae"][label(default)]
    assert report["hip"]["p_against_default"][label(ridge)] >= SWITCH_P
    assert chosen == {"hip": default} and report["hip"]["used"] == report["hip"]["default"] == label(default)
    clear = {default: truth + shared, ridge: truth + shared * 0.5}
    chosen, report = _choose_feature_corrections(d, line, clear)
    assert chosen == {"hip": ridge} and report["hip"]["p_against_default"][label(ridge)] < SWITCH_P
    from osteoscreen.training.calibrate import format_calibration_report
    text = format_calibration_report(Calibration(created="", model={"weights_sha256": "x"}, report={"labelled": {
        "before": {}, "after_cross_validated": {}, "folds": 10, "probabilities": "classifier",
        "ece_by_probability_mode": {"temperature": 0.02}, "feature_correction": report}}))
    assert ("hip         feature correction: channel_stats ridge (clearly better than the default, "
            "channel_stats_image_scene gp)") in text
    worse = {default: truth + rng.normal(0, 1.0, n)}  # the line alone is clearly better: no feature correction
    chosen, report = _choose_feature_corrections(d, line, worse)
    assert chosen == {} and report["hip"]["used"] is None and report["hip"]["p_against_default"]["line alone"] < SWITCH_P
    without = {ridge: truth + shared}  # no default among the candidates
    chosen, report = _choose_feature_corrections(d, line, without)
    assert report["hip"]["default"] is None and chosen == {"hip": ridge}  # it beats the line clearly
    # without the whole image's descriptors the default is the same set without them
    fallback = FALLBACK_DEFAULTS["hip"]
    chosen, report = _choose_feature_corrections(d, line, {fallback: truth + shared, ridge: truth + shared * 1.02})
    assert chosen == {"hip": fallback} and report["hip"]["default"] == label(fallback) == "channel_stats_image gp"


def test_gaussian_process_feature_correction_on_channel_statistics(tmp_path):
    """A Gaussian process fitted on the channel statistics is kept by its record and applied at
    inference to the statistics the node computes, the same as calibrate computes them; its hand-
    written Matérn kernel is scikit-learn's; a kernel ridge record of an earlier calibrate still applies."""
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern
    from osteoscreen.model.calibration import feature_term
    from osteoscreen.model.network import channel_statistics
    from osteoscreen.training.batches import predict_outputs
    from osteoscreen.training.dataset import Samples
    from osteoscreen.training.feature_correction import fit_feature_correction
    model = LoadedModel(DEFAULT_MODEL, "cpu")
    rng = np.random.default_rng(8)
    raw = rng.uniform(0, 1, (24, CROP_SIZE, CROP_SIZE)).astype(np.float32)
    samples = Samples(crops=raw, covariates=np.zeros((24, 7), np.float32), site_types=np.zeros(24, np.int64),
                      t_scores=np.zeros(24, np.float32), labels=np.zeros(24, np.int64), groups=np.arange(24).astype(str),
                      sites=np.full(24, "left_hip"))
    out = predict_outputs(model.net, samples, torch.device("cpu"), tta=model.tta)
    stats = out.channel_stats.numpy().astype(np.float64)
    widths = model.net.arch["widths"]
    assert stats.shape == (24, 2 * sum(widths))  # stem, stage 1, the Grad-CAM map, the last map
    assert stats[:, -2 * widths[3]:-widths[3]] == pytest.approx(out.features.numpy(), abs=1e-5)  # last map's means
    assert channel_statistics([torch.ones(2, 3, 4, 4)]).tolist() == [[1, 1, 1, 0, 0, 0]] * 2
    z = (stats[:, 0] - stats[:, 0].mean()) / stats[:, 0].std()
    residuals = np.abs(z) + 0.1 * rng.normal(size=24)
    fit = fit_feature_correction(stats, residuals, np.ones(24), "channel_stats", "gp")
    assert fit["kind"] == "gp" and len(fit["support"]) == 24 and len(fit["support"][0]) == stats.shape[1]
    # the posterior mean the record gives is scikit-learn's kernel against the support times the dual coefficients
    x = rng.normal(size=(5, stats.shape[1])) * np.asarray(fit["scale"]) + np.asarray(fit["mean"])
    kernel = ConstantKernel(fit["amplitude"]) * Matern(fit["length_scale"], nu=1.5)
    z = (x - np.asarray(fit["mean"])) / np.asarray(fit["scale"])
    assert feature_term(fit, x) == pytest.approx(
        fit["intercept"] + kernel(z, np.asarray(fit["support"])) @ np.asarray(fit["dual_coef"]), abs=1e-9)
    in_sample = feature_term(fit, stats)
    assert np.corrcoef(in_sample, residuals)[0, 1] > 0.9  # it learnt the bent error
    # a Gaussian-kernel ridge record (what calibrate fitted before the Gaussian process) applies as it did
    old = {"features": "channel_stats", "kind": "kernel", "mean": [0.0, 0.0], "scale": [1.0, 1.0],
           "support": [[0.0, 0.0], [1.0, 1.0]], "dual_coef": [1.0, -1.0], "gamma": 0.5, "intercept": 0.1, "n": 20}
    assert feature_term(old, np.array([[0.0, 1.0]])) == pytest.approx([0.1 + np.exp(-0.5) - np.exp(-0.5)])
    assert feature_term(old, np.array([[0.0, 0.0]])) == pytest.approx([0.1 + 1.0 - np.exp(-1.0)])
    for key, value in (("nu", 2.5), ("length_scale", float("inf")), ("dual_coef", [1.0])):
        broken = {**fit, key: value}
        cal = Calibration(created="2026-12-03T01:00:00+00:00", model=model.identity(), feature_correction={"hip": broken})
        with pytest.raises(CalibrationError, match="malformed"):
            Calibration.from_json(cal.to_json())
    cal = Calibration(created="2026-12-03T01:00:00+00:00", model=model.identity(), scanner=SYNTH_D,
                      feature_correction={"hip": fit})
    again = Calibration.load(cal.save(tmp_path / "k.json"))
    assert again.id == cal.id
    crops = np.stack([normalise(c) for c in raw[:4]])
    plain = model.with_calibration(Calibration(**{**cal.__dict__, "id": "", "feature_correction": {}}))
    a, b = plain.predict(crops, np.zeros((4, 7)), np.zeros(4, np.int64)), model.with_calibration(again).predict(
        crops, np.zeros((4, 7)), np.zeros(4, np.int64))
    assert a.channel_stats == pytest.approx(stats[:4], rel=1e-3, abs=1e-3)  # the node's statistics are calibrate's (to the SD's ddof)
    expected = again.correct(a.t_scores, np.zeros(4, int), features={"channel_stats": stats[:4]}) - a.t_scores
    assert b.t_scores - a.t_scores == pytest.approx(expected, abs=1e-4)
    assert np.ptp(b.t_scores - a.t_scores) > 0  # not a constant shift


def test_calibrations_made_before_feature_corrections_keep_their_ids():
    own = LoadedModel(DEFAULT_MODEL, "cpu").calibration  # the shipped model's, written before they existed
    assert own is not None and not own.feature_correction and own.content_id() == own.id


def test_report_of_a_calibration_made_with_one_feature_candidate_still_prints():
    """A calibration written on 2026-12-02 (one candidate: used true/false, mae_features) still reads."""
    from osteoscreen.training.calibrate import format_calibration_report
    cal = Calibration(created="2026-12-02T10:00:00+00:00", model={"weights_sha256": "x"}, report={"labelled": {
        "before": {}, "after_cross_validated": {}, "folds": 5, "probabilities": "classifier",
        "ece_by_probability_mode": {"temperature": 0.02},
        "feature_correction": {"hip": {"n": 40, "mae_line": 0.4, "mae_features": 0.3, "used": True},
                               "lumbar_ap": {"n": 20, "mae_line": 0.4, "mae_features": 0.5, "used": False}}}})
    text = format_calibration_report(cal)
    assert "hip         feature correction: pooled ridge; out-of-fold MAE 0.400 with the line alone, 0.300 pooled ridge" in text
    assert "lumbar_ap   feature correction: none (the line alone); out-of-fold MAE 0.400 with the line alone, 0.500" in text

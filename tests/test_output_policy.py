"""The output policy: its settings, and which result objects the worker writes and queues under each.

The worker runs the real shipped model on synthetic phantoms. Expectations come from the findings
the worker recorded, not from fixed model outputs; the phantoms are only chosen so that a sane model
calls one study positive (a pelvis drawn at T about -4) and one negative (T about +1.3).
"""
from __future__ import annotations

from copy import deepcopy
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from osteoscreen import worker as worker_module
from osteoscreen.cli import main
from osteoscreen.config import ConfigError, Destination, Output, Settings, load
from osteoscreen.model.inference import LoadedModel
from osteoscreen.node.routing import classify
from osteoscreen.store import queue
from osteoscreen.store.db import Database
from osteoscreen.store.models import Delivery, Finding, Job, Study, utcnow
from osteoscreen.synth import make_study
from osteoscreen.worker import Worker

from .conftest import dciodvfy_errors

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
KIND_CLASS = {"sr": SR_CLASS, "heatmap": SC_CLASS, "kos": KOS_CLASS}
# Phantom seeds (synth.phantoms.draw_patient): hips at T -4.5/-3.9, hips at +1.2/+1.3, lumbar spine at +1.5.
POSITIVE_SEED, NEGATIVE_SEED, LUMBAR_SEED = 1, 3, 10


# -- settings --------------------------------------------------------------------------------------
def test_output_defaults_and_config_file(tmp_path):
    o = load(None, environ={}).output
    assert (o.policy, o.kos, o.heatmaps, o.positive_categories) == ("all", True, True, ["osteoporosis"])
    assert (o.series_number_kos, o.series_description_kos) == (9903, "osteoscreen positive findings")
    shipped = load(Path(__file__).resolve().parent.parent / "config.yaml", environ={}).output
    assert shipped == o  # config.yaml documents every key with its default
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output:\n  policy: positives\n  kos: false\n  positive_categories: [osteopenia, osteoporosis]\n"
                   "  series_number_kos: 42\n  series_description_kos: flagged\n")
    o = load(cfg, environ={}).output
    assert (o.policy, o.kos, o.positive_categories) == ("positives", False, ["osteopenia", "osteoporosis"])
    assert (o.series_number_kos, o.series_description_kos) == (42, "flagged")


def test_environment_overrides_output(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output:\n  policy: positives\n  positive_categories: [osteoporosis]\n")
    o = load(cfg, environ={"OSTEOSCREEN_OUTPUT__POLICY": "sr_only", "OSTEOSCREEN_OUTPUT__KOS": "false",
                           "OSTEOSCREEN_OUTPUT__POSITIVE_CATEGORIES": "osteopenia, osteoporosis",
                           "OSTEOSCREEN_OUTPUT__SERIES_NUMBER_KOS": "77"}).output
    assert (o.policy, o.kos, o.positive_categories, o.series_number_kos) == (
        "sr_only", False, ["osteopenia", "osteoporosis"], 77)


@pytest.mark.parametrize("text", [
    "output:\n  policy: everything\n",
    "output:\n  policy: [all]\n",
    "output:\n  policy: ALL\n",
    "output:\n  positive_categories: []\n",
    "output:\n  positive_categories: [osteoporosis, severe]\n",
    "output:\n  positive_categories: 3\n",
    "output:\n  positive_categories: {osteoporosis: 1}\n",
    "output:\n  series_number_kos: many\n",
    "output:\n  kos_title: x\n",
])
def test_bad_output_settings_are_config_errors(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        load(cfg, environ={})


@pytest.mark.parametrize("env", [{"OSTEOSCREEN_OUTPUT__POLICY": "none"},
                                 {"OSTEOSCREEN_OUTPUT__POSITIVE_CATEGORIES": "osteoporosis,fracture"},
                                 {"OSTEOSCREEN_OUTPUT__POSITIVE_CATEGORIES": " , "}])
def test_bad_output_environment_is_a_config_error(env):
    with pytest.raises(ConfigError):
        load(None, environ=env)


def test_cli_bad_policy_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output:\n  policy: sometimes\n")
    # `predict` rather than `serve`: were the policy not checked, this would end (no such file), not serve.
    assert main(["predict", "--config", str(cfg), str(tmp_path / "missing.dcm")]) == 2
    err = capsys.readouterr().err
    assert "output.policy 'sometimes'" in err and "no such file" not in err and "Traceback" not in err


# -- the worker ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel(Settings().model_path, "cpu", threads=1)


def _write(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, list[Path]]:
    """positive: a pelvis at T about -4 (both hips); negative: a pelvis at T about +1.3;
    lumbar: a normal lumbar AP + lateral (T about +1.5) moved into the positive pelvis's study."""
    folder = tmp_path_factory.mktemp("phantoms")
    positive = make_study("hip", np.random.default_rng(POSITIVE_SEED), patient_index=POSITIVE_SEED)
    negative = make_study("hip", np.random.default_rng(NEGATIVE_SEED), patient_index=NEGATIVE_SEED)
    lumbar = [deepcopy(im.dataset) for im in make_study("lumbar", np.random.default_rng(LUMBAR_SEED),
                                                        patient_index=LUMBAR_SEED)]
    header = positive[0].dataset
    for ds in lumbar:
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                        "StudyDate", "StudyTime", "StudyID"):
            setattr(ds, keyword, header[keyword].value)
    paths = {"positive": _write([im.dataset for im in positive], folder),
             "negative": _write([im.dataset for im in negative], folder),
             "lumbar": _write(lumbar, folder)}
    assert len({p for group in paths.values() for p in group}) == 4  # four distinct images (no shared UID)
    return paths


def settings_for(storage: Path, **output) -> Settings:
    return Settings(storage=storage, destinations=[Destination("PACS", "127.0.0.1", 11112)],
                    output=Output(**output))


def receive(db: Database, settings: Settings, paths: list[Path]) -> None:
    """Record the images as the listener would (routing decides region and view), then settle."""
    with db.session() as session:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            decision = classify(ds, settings.routing)
            assert decision.eligible, decision.reason
            queue.record_instance(session, queue.InstanceMeta(
                study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), modality=str(ds.Modality),
                patient_id=None, patient_name=None, accession_number=None, study_date=None, age_years=None,
                sex=None, bmi=None, region=decision.region, view=decision.view, eligible=True,
                skip_reason=None), str(path), "MODALITY")
        session.commit()
        assert len(queue.settle_studies(session, 0, now=utcnow() + timedelta(seconds=1))) == 1


class Run:
    """One screening job through the real Worker, and what it left behind."""

    def __init__(self, db: Database, settings: Settings, model: LoadedModel, paths: list[Path]):
        receive(db, settings, paths)
        before = self.outbox_files(settings)
        assert Worker(settings, db, model=model).run_once()
        self.new_files = self.outbox_files(settings) - before
        self.datasets = {str(p): pydicom.dcmread(p) for p in self.new_files}
        with db.session() as session:
            study = session.scalars(select(Study)).one()
            job = session.scalars(select(Job).order_by(Job.id.desc())).first()
            assert (job.state, job.error) == ("done", None)
            self.study_status, self.last_report_uid = study.status, study.last_report_uid
            self.findings = session.scalars(select(Finding).where(Finding.job_id == job.id)).all()
            all_deliveries = session.scalars(select(Delivery)).all()
        # This job's deliveries: those of the files it wrote. An object an earlier job wrote too (same
        # derived UID, e.g. a heatmap of the same image) keeps its delivery row, pointed at the new file.
        self.deliveries = [d for d in all_deliveries if d.path in self.datasets]
        assert {d.path for d in all_deliveries} <= set(self.datasets) | {str(p) for p in before}
        self.categories = settings.output.positive_categories

    @staticmethod
    def outbox_files(settings: Settings) -> set[Path]:
        return {p for p in settings.outbox_dir.rglob("*.dcm") if "tmp" not in p.relative_to(settings.outbox_dir).parts}

    def kinds(self) -> list[str]:
        return sorted(d.kind for d in self.deliveries)

    def of_kind(self, kind: str) -> list[pydicom.Dataset]:
        return [self.datasets[d.path] for d in self.deliveries if d.kind == kind]

    def positive_images(self) -> set[str]:
        """Images with a positive site, from the findings the worker recorded."""
        return {f.sop_instance_uid for f in self.findings if f.assessable and f.category in self.categories}


def run(tmp_path: Path, model: LoadedModel, paths: list[Path], **output) -> Run:
    settings = settings_for(tmp_path / "var", **output)
    db = Database(settings.db_url)
    try:
        return Run(db, settings, model, paths)
    finally:
        db.dispose()


def expected_kinds(policy: str, positive: bool, images: int, heatmaps: bool = True, kos: bool = True) -> list[str]:
    if policy == "positives" and not positive:
        return []
    kinds = ["sr"]
    if heatmaps and policy != "sr_only":
        kinds += ["heatmap"] * images
    if kos and positive and policy != "sr_only":
        kinds.append("kos")
    return sorted(kinds)


def check_objects(result: Run, images: list[Path]) -> None:
    """Each queued object is a file in the outbox of its kind's SOP class; the KOS references exactly
    the images with a positive recorded finding, then the SR."""
    assert {d.path for d in result.deliveries} == set(result.datasets)  # one destination: one delivery a file
    for d in result.deliveries:
        ds = result.datasets[d.path]
        assert (ds.SOPClassUID, str(ds.SOPInstanceUID)) == (KIND_CLASS[d.kind], d.sop_instance_uid)
        assert str(ds.StudyInstanceUID) == str(pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID)
    for kos in result.of_kind("kos"):
        (sr,) = result.of_kind("sr")
        refs = [(item.ValueType, str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
                for item in kos.ContentSequence if "ReferencedSOPSequence" in item]
        assert {uid for kind, uid in refs if kind == "IMAGE"} == result.positive_images()
        assert len(refs) == len(result.positive_images()) + 1 and refs[-1] == ("COMPOSITE", str(sr.SOPInstanceUID))


@pytest.mark.parametrize("policy", ["all", "positives", "sr_only"])
@pytest.mark.parametrize("study", ["positive", "negative"])
def test_policy_decides_the_objects(tmp_path, model, phantoms, policy, study):
    images = phantoms[study]
    result = run(tmp_path, model, images, policy=policy)
    positive = bool(result.positive_images())
    # The phantoms' premise (not the model's exact output): a pelvis at T -4 is osteoporosis somewhere,
    # one at T +1.3 nowhere. If a new model breaks this, it is badly wrong (or pick other seeds).
    assert positive == (study == "positive"), [(f.site, f.category, f.t_score) for f in result.findings]
    assert result.kinds() == expected_kinds(policy, positive, len(images))
    # Findings are recorded whatever is sent: both hips of the pelvis.
    assert sorted(f.site for f in result.findings) == ["left_hip", "right_hip"]
    assert result.study_status == "screened"
    check_objects(result, images)
    if policy == "positives" and not positive:
        assert result.new_files == set() and result.last_report_uid is None
    else:
        (sr,) = result.of_kind("sr")
        assert result.last_report_uid == str(sr.SOPInstanceUID)


def test_mixed_study_kos_flags_only_the_positive_image(tmp_path, model, phantoms):
    """Pelvis positive, lumbar AP + lateral normal, one study: the KOS points at the pelvis alone."""
    images = phantoms["positive"] + phantoms["lumbar"]
    result = run(tmp_path, model, images)
    positive = result.positive_images()
    assert positive == {images[0].stem}, [(f.site, f.category) for f in result.findings]
    assert result.kinds() == expected_kinds("all", True, len(images))
    check_objects(result, images)
    (kos,) = result.of_kind("kos")
    path = next(p for p, ds in result.datasets.items() if ds is kos)
    assert dciodvfy_errors(path) == []
    assert kos.SeriesNumber == 9903 and kos.PatientID == pydicom.dcmread(images[0], stop_before_pixels=True).PatientID


@pytest.mark.parametrize("output, heatmaps_screened", [
    ({"policy": "all", "heatmaps": False}, False),
    ({"policy": "positives", "heatmaps": False}, False),
    ({"policy": "sr_only"}, False),
    ({"policy": "all", "kos": False}, True),
    ({"policy": "sr_only", "kos": True, "heatmaps": True}, False),
])
def test_heatmaps_and_kos_switches(tmp_path, model, phantoms, monkeypatch, output, heatmaps_screened):
    """`heatmaps: false` and `kos: false` hold under every policy; Grad-CAM runs only when a heatmap
    may be sent."""
    calls = []
    real = worker_module.screen_study

    def spy(images, model, heatmaps=True, **kw):
        calls.append(heatmaps)
        return real(images, model, heatmaps=heatmaps, **kw)

    monkeypatch.setattr(worker_module, "screen_study", spy)
    images = phantoms["positive"]
    result = run(tmp_path, model, images, **output)
    assert calls == [heatmaps_screened]
    positive = bool(result.positive_images())
    assert result.kinds() == expected_kinds(output["policy"], positive, len(images),
                                            heatmaps=output.get("heatmaps", True), kos=output.get("kos", True))
    check_objects(result, images)


def test_categories_setting_decides_positive(tmp_path, model, phantoms):
    """With every category positive, the normal pelvis is positive too: SR, heatmap and KOS."""
    images = phantoms["negative"]
    result = run(tmp_path, model, images, policy="positives",
                 positive_categories=["normal", "osteopenia", "osteoporosis"])
    assert result.positive_images() == {images[0].stem}
    assert result.kinds() == ["heatmap", "kos", "sr"]
    check_objects(result, images)


def test_a_reported_study_always_gets_its_superseding_sr(tmp_path, model, phantoms):
    """Under `positives` a study that was reported before gets a new SR even when it is now
    negative (the PACS must not keep a stale report as the latest), without a KOS; each SR names
    the one before it."""
    storage = tmp_path / "var"
    lumbar_ap, lumbar_lat = phantoms["lumbar"]
    db = Database(settings_for(storage).db_url)

    def predecessors(sr):
        return [ref.ReferencedSOPInstanceUID for item in sr.PredecessorDocumentsSequence
                for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    try:
        first = Run(db, settings_for(storage, policy="all"), model, [lumbar_ap])
        assert not first.positive_images(), "premise: the lumbar phantom at T +1.5 is not osteoporosis"
        (first_sr,) = first.of_kind("sr")
        assert first.kinds() == ["heatmap", "sr"]

        quiet = Run(db, settings_for(storage, policy="positives"), model, [lumbar_lat])  # a late image
        assert not quiet.positive_images()
        assert len(quiet.findings) == 2  # both lumbar views recorded by the second job
        (second_sr,) = quiet.of_kind("sr")
        assert "kos" not in quiet.kinds()
        assert predecessors(second_sr) == [first_sr.SOPInstanceUID]
        assert quiet.last_report_uid == str(second_sr.SOPInstanceUID)

        late = Run(db, settings_for(storage, policy="positives"), model, phantoms["positive"])
        assert late.positive_images(), "premise: the pelvis phantom at T -4 is osteoporosis"
        (sr,) = late.of_kind("sr")
        assert predecessors(sr) == [second_sr.SOPInstanceUID]
        assert [first_sr.InstanceNumber, second_sr.InstanceNumber, sr.InstanceNumber] == [1, 2, 3]
        assert late.last_report_uid == str(sr.SOPInstanceUID)
        (kos,) = late.of_kind("kos")
        assert kos.SOPInstanceUID not in (first_sr.SOPInstanceUID, second_sr.SOPInstanceUID)
        check_objects(late, phantoms["positive"])
    finally:
        db.dispose()

"""DXA outcomes and realised performance: `db outcomes import|match|list`, `db performance`, labelled
calibration rows from the node, and the dashboard's Performance page (test client and headless Chromium).

Studies and findings are written straight into the database (as tests/seed.py does); no model runs.
The figures are checked against counts worked out by hand below, not against evaluate's code."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from osteoscreen.cli import main
from osteoscreen.store.db import Database
from osteoscreen.store.models import AuditEvent, Finding, Instance, Job, Outcome, Study

ACME, BETA = "Acme|FP-43", "Beta|X1"

# patient, study date, accession, scanner, latest report's sites: (site, category, T, low, high, reason)
STUDIES = [
    ("P1", "20260301", "ACC1", ACME, [("left_hip", "osteoporosis", -2.8, -3.4, -2.2, None),
                                      ("right_hip", "osteopenia", -1.5, -2.1, -0.9, None)]),
    ("P2", "20260310", "ACC2", ACME, [("left_hip", "normal", -0.5, -1.1, 0.1, None),
                                      ("right_hip", "osteoporosis", -2.6, -3.2, -2.0, None)]),
    ("P3", "20260320", "ACC3", BETA, [("lumbar_spine", "osteopenia", -2.0, -2.6, -1.4, None),
                                      ("lumbar_spine", "osteopenia", -2.0, -2.6, -1.4, None)]),  # AP + LAT fused
    ("P4", "20260401", "ACC4", BETA, [("left_hip", None, None, None, None, "metal_implant"),
                                      ("right_hip", "normal", 0.2, -0.4, 0.8, None)]),
    ("P5", "20260101", "ACC5A", ACME, [("left_hip", "osteopenia", -1.9, -2.5, -1.3, None)]),
    ("P5", "20260201", "ACC5B", ACME, [("left_hip", "osteopenia", -1.8, -2.4, -1.2, None)]),
    ("P6", "20240101", "ACC6", ACME, [("left_hip", "osteopenia", -1.8, -2.4, -1.2, None)]),  # long before the DXA
    ("P8", "20260401", "ACC8A", BETA, [("lumbar_spine", "normal", -0.3, -0.9, 0.3, None)]),
    ("P8", "20260415", "ACC8B", BETA, [("lumbar_spine", "osteoporosis", -3.0, -3.6, -2.4, None)]),
]

DXA_CSV = """patient_id,dxa_date,left_hip_t_score,right_hip_t_score,lumbar_spine_t_score,left_hip_neck_t_score,accession
P1,2026-06-01,-3.0,-2.7,,-3.2,
P2,2026-06-01,-0.8,-2.2,,,
P3,2026-06-01,,,-2.7,,
P4,2026-06-01,-1.2,0.0,,,
P5,2026-05-01,-2.0,,,,
P6,2026-05-01,-2.0,,,,
P7,2026-05-01,,,-1.0,,
P8,2026-06-01,,,-2.9,,ACC8B
"""
# By hand, per compared study site (positive = osteoporosis; WHO: <= -2.5 osteoporosis, >= -1 normal):
#   site     estimate (class, T)   DXA (class, T)       cell  estimate - DXA  DXA inside interval
#   P1 L     osteoporosis -2.8     osteoporosis -3.0    TP    +0.2            yes
#   P1 R     osteopenia   -1.5     osteoporosis -2.7    FN    +1.2            no
#   P2 L     normal       -0.5     normal       -0.8    TN    +0.3            yes
#   P2 R     osteoporosis -2.6     osteopenia   -2.2    FP    -0.4            yes
#   P3 L1-4  osteopenia   -2.0     osteoporosis -2.7    FN    +0.7            no
#   P4 R     normal        0.2     normal        0.0    TN    +0.2            yes
#   P8 L1-4  osteoporosis -3.0     osteoporosis -2.9    TP    -0.1            yes   (the accession's study)
#   P4 L     not assessable (metal implant): counted apart
# P5: two studies in the window, no accession: ambiguous. P6: its study is 2 years older: unmatched.
# P7: no study: unmatched. P1's earlier report (normal) is superseded by its latest.
ERRORS = {"P1L": 0.2, "P1R": 1.2, "P2L": 0.3, "P2R": -0.4, "P3": 0.7, "P4R": 0.2, "P8": -0.1}


def wilson(k: int, n: int) -> list[float]:
    """The Wilson score interval, written out (z for 95 %)."""
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def add_study(s, i: int, patient: str, study_date: str, accession: str, scanner: str, sites: list[tuple],
              earlier: list[tuple] | None = None) -> Study:
    st = Study(study_uid=f"1.2.826.0.1.3680043.10.1460.7.{i}", patient_id=patient, patient_name=f"Test^{patient}",
               accession_number=accession, study_date=study_date, status="screened")
    s.add(st)
    s.flush()
    s.add(Instance(study_id=st.id, sop_instance_uid=f"{st.study_uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                   modality="DX", path=f"/spool/{i}.dcm", region="lumbar" if sites[0][0] == "lumbar_spine" else "hip",
                   view="ap", eligible=True, scanner=scanner))
    for report in ([earlier] if earlier else []) + [sites]:
        job = Job(study_id=st.id, state="done", attempts=1)
        s.add(job)
        s.flush()
        for k, (site, cat, t, low, high, reason) in enumerate(report):
            s.add(Finding(study_id=st.id, job_id=job.id, sop_instance_uid=f"{st.study_uid}.1.{k}", site=site,
                          assessable=cat is not None, category=cat, t_score=t, t_score_low=low, t_score_high=high,
                          interval_level=None if t is None else 0.9, scanner=scanner, reason=reason,
                          probabilities=None if cat is None else {cat: 0.8}, model_name="osteoscreen-osteonet",
                          model_version="0.3.0"))
    return st


def fill(url: str) -> None:
    db = Database(url)
    with db.session() as s:
        for i, (patient, day, acc, scanner, sites) in enumerate(STUDIES, 1):
            earlier = [("left_hip", "normal", 0.0, -0.6, 0.6, None)] if patient == "P1" else None
            add_study(s, i, patient, day, acc, scanner, sites, earlier)
        s.commit()
    db.dispose()


@pytest.fixture
def node(tmp_path, db_url):
    fill(db_url)
    path = tmp_path / "dxa.csv"
    path.write_text(DXA_CSV)
    return {"url": db_url, "csv": path, "tmp": tmp_path}


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def outcome_rows(url: str) -> list[tuple]:
    db = Database(url)
    try:
        with db.session() as s:
            return [(o.patient_id, o.dxa_date, o.accession, o.left_hip_t_score, o.right_hip_t_score,
                     o.lumbar_spine_t_score, o.match_status, o.study_uid)
                    for o in s.scalars(select(Outcome).order_by(Outcome.id))]
    finally:
        db.dispose()


def test_performance_figures_equal_the_hand_computed_ones(node, capsys):
    url = node["url"]
    rc, out, _ = run(capsys, "db", "outcomes", "import", str(node["csv"]), "--by", "alice", "--database-url", url,
                     "--json")
    assert rc == 0
    summary = json.loads(out)
    assert summary["counts"] == {"matched": 5, "unmatched": 2, "ambiguous": 1} and summary["created"] == 8

    rc, out, _ = run(capsys, "db", "performance", "--json", "--by", "month", "--database-url", url)
    assert rc == 0
    r = json.loads(out)
    tp, fp, tn, fn = 2, 1, 2, 2
    assert (r["n"], r["n_not_assessable"], r["tp"], r["fp"], r["tn"], r["fn"]) == (7, 1, tp, fp, tn, fn)
    assert r["sensitivity"] == pytest.approx(2 / 4) and r["specificity"] == pytest.approx(2 / 3)
    assert r["ppv"] == pytest.approx(2 / 3) and r["npv"] == pytest.approx(2 / 4)
    assert r["sensitivity_ci"] == pytest.approx(wilson(2, 4)) and r["specificity_ci"] == pytest.approx(wilson(2, 3))
    assert r["ppv_ci"] == pytest.approx(wilson(2, 3)) and r["npv_ci"] == pytest.approx(wilson(2, 4))
    errors = list(ERRORS.values())
    assert r["mae"] == pytest.approx((0.2 + 1.2 + 0.3 + 0.4 + 0.7 + 0.2 + 0.1) / 7)
    assert r["bias"] == pytest.approx((0.2 + 1.2 + 0.3 - 0.4 + 0.7 + 0.2 - 0.1) / 7)
    assert r["bias"] == pytest.approx(sum(errors) / len(errors))
    assert r["interval"]["n"] == 7 and r["interval"]["coverage"] == pytest.approx(5 / 7)
    assert r["outcomes"] == {"matched": 5, "unmatched": 2, "ambiguous": 1}
    assert r["not_assessable_reasons"] == {"metal_implant": 1}
    assert "femoral-neck" in r["femoral_neck"]

    acme, beta = r["groups"]["scanner"][ACME], r["groups"]["scanner"][BETA]
    assert (acme["n"], acme["tp"], acme["fp"], acme["tn"], acme["fn"], acme["n_not_assessable"]) == (4, 1, 1, 1, 1, 0)
    assert acme["sensitivity"] == acme["specificity"] == acme["ppv"] == acme["npv"] == pytest.approx(0.5)
    assert acme["mae"] == pytest.approx((0.2 + 1.2 + 0.3 + 0.4) / 4)
    assert acme["bias"] == pytest.approx((0.2 + 1.2 + 0.3 - 0.4) / 4)
    assert (beta["n"], beta["tp"], beta["fp"], beta["tn"], beta["fn"], beta["n_not_assessable"]) == (3, 1, 0, 1, 1, 1)
    assert beta["sensitivity"] == pytest.approx(1 / 2) and beta["specificity"] == pytest.approx(1.0)
    assert beta["ppv"] == pytest.approx(1.0) and beta["npv"] == pytest.approx(1 / 2)
    assert beta["mae"] == pytest.approx((0.7 + 0.2 + 0.1) / 3) and beta["bias"] == pytest.approx((0.7 + 0.2 - 0.1) / 3)
    hip, lumbar = r["groups"]["site_type"]["hip"], r["groups"]["site_type"]["lumbar_spine"]
    assert (hip["n"], hip["tp"], hip["fp"], hip["tn"], hip["fn"], hip["n_not_assessable"]) == (5, 1, 1, 2, 1, 1)
    assert hip["mae"] == pytest.approx((0.2 + 1.2 + 0.3 + 0.4 + 0.2) / 5)
    assert (lumbar["n"], lumbar["tp"], lumbar["fn"], lumbar["specificity"]) == (2, 1, 1, None)
    assert lumbar["bias"] == pytest.approx((0.7 - 0.1) / 2)
    assert list(r["groups"]["month"]) == ["2026-06"] and r["groups"]["month"]["2026-06"]["n"] == 7

    # narrowing: one scanner (any case), and DXA dates
    rc, out, _ = run(capsys, "db", "performance", "--json", "--scanner", "beta|x1", "--database-url", url)
    assert json.loads(out)["n"] == 3 and "month" not in json.loads(out)["groups"]
    rc, out, _ = run(capsys, "db", "performance", "--json", "--until", "2026-05-31", "--database-url", url)
    assert json.loads(out)["n"] == 0 and json.loads(out)["sensitivity"] is None
    rc, out, _ = run(capsys, "db", "performance", "--database-url", url)
    assert rc == 0 and "50 %" in out and ACME in out and "lumbar_spine" in out
    rc, _, err = run(capsys, "db", "performance", "--since", "2026-07-01", "--until", "2026-06-01",
                     "--database-url", url)
    assert rc == 2 and "after" in err


def test_unmatched_and_ambiguous_are_listed_and_a_second_import_changes_nothing(node, capsys):
    url = node["url"]
    rc, out, _ = run(capsys, "db", "outcomes", "import", str(node["csv"]), "--database-url", url)
    assert rc == 0
    problems = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\s+(\d+)\s+P\d.*$", out, re.M)}
    assert sorted(problems) == [6, 7, 8]  # P5 (ambiguous), P6 and P7 (unmatched), by line
    assert "ambiguous" in problems[6] and " 2 " in problems[6] and "accession" in problems[6]
    assert "unmatched" in problems[7] and "outside the 365 days" in problems[7]
    assert "unmatched" in problems[8] and "no screened study" in problems[8]
    assert "Test^" not in out  # no patient names
    before = outcome_rows(url)

    rc, out, _ = run(capsys, "db", "outcomes", "import", str(node["csv"]), "--database-url", url, "--json")
    again = json.loads(out)
    assert rc == 0 and again["changed_nothing"] and again["created"] == 0 and again["updated"] == []
    assert again["unchanged"] == 8 and again["stored"]["changed"] == 0
    rc, out, _ = run(capsys, "db", "outcomes", "import", str(node["csv"]), "--database-url", url)
    assert "unchanged" in out.splitlines()[-1]
    assert outcome_rows(url) == before

    rc, out, _ = run(capsys, "db", "outcomes", "list", "--unmatched", "--json", "--database-url", url)
    listed = json.loads(out)
    assert sorted((o["patient_id"], o["status"], o["candidates"], o["line"]) for o in listed) == \
        [("P5", "ambiguous", 2, 6), ("P6", "unmatched", 0, 7), ("P7", "unmatched", 0, 8)]
    rc, out, _ = run(capsys, "db", "outcomes", "list", "--database-url", url)
    assert rc == 0 and "8 DXA result(s)" in out

    # the audit trail: counts only, no patient ID
    db = Database(url)
    with db.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.event == "outcomes_imported")).all()
    db.dispose()
    assert len(events) == 3 and "matched 5" in events[0].detail
    assert not any(re.search(r"P\d", e.detail or "") for e in events)


def test_changed_values_are_an_update_and_reported(node, capsys):
    url = node["url"]
    assert main(["db", "outcomes", "import", str(node["csv"]), "--database-url", url]) == 0
    capsys.readouterr()
    changed = node["tmp"] / "changed.csv"
    changed.write_text(DXA_CSV.replace("P2,2026-06-01,-0.8,-2.2", "P2,2026-06-01,-0.8,-2.6"))
    rc, out, _ = run(capsys, "db", "outcomes", "import", str(changed), "--database-url", url, "--json")
    s = json.loads(out)
    assert rc == 0 and s["updated"] == [3] and s["unchanged"] == 7 and s["created"] == 0 and not s["changed_nothing"]
    rc, out, _ = run(capsys, "db", "outcomes", "import", str(node["csv"]), "--database-url", url)
    assert "1 updated (line 3)" in out
    rows = {r[0]: r for r in outcome_rows(url)}
    assert rows["P2"][4] == -2.2 and len(rows) == 8  # the original values back; no row added


@pytest.mark.parametrize("bad, what", [
    ("P3,2026-13-01,,,-2.7,,", "dxa_date"),
    ("P3,2026-06-01,,,low,,", "not a number"),
    ("P3,2026-06-01,,,-6.5,,", "outside [-6, 4]"),
    (",2026-06-01,,,-2.7,,", "patient_id is missing"),
    ("P3,2026-06-01,,,,,", "no T-score"),
])
def test_a_bad_row_imports_nothing_and_names_its_line(node, capsys, bad, what):
    url = node["url"]
    lines = DXA_CSV.splitlines()
    lines[3] = bad  # line 4 of the file
    path = node["tmp"] / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    rc, out, err = run(capsys, "db", "outcomes", "import", str(path), "--database-url", url)
    assert rc == 2 and "line 4:" in err and what in err and "nothing was imported" in err
    assert outcome_rows(url) == []
    # after a good import, a bad file leaves the stored rows as they were
    assert main(["db", "outcomes", "import", str(node["csv"]), "--database-url", url]) == 0
    before = outcome_rows(url)
    changed = path.read_text().replace("P1,2026-06-01,-3.0", "P1,2026-06-01,-1.0")
    path.write_text(changed)
    assert main(["db", "outcomes", "import", str(path), "--database-url", url]) == 2
    assert outcome_rows(url) == before


def test_the_header_is_checked(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    cases = {"patient_id,dxa_date,left_hip_t_score,name\nP1,2026-01-01,-1,X\n": "unknown column(s): 'name'",
             "patient_id,dxa_date,accession\nP1,2026-01-01,A\n": "no T-score column",
             "dxa_date,left_hip_t_score\n2026-01-01,-1\n": "missing column(s): patient_id",
             "patient_id,dxa_date,lumbar_spine_t_score\nP1,2026-01-01,-1\nP1,2026-01-01,-2\n": "line 3: the same"}
    for text, message in cases.items():
        path = tmp_path / "h.csv"
        path.write_text(text)
        rc, _, err = run(capsys, "db", "outcomes", "import", str(path), "--database-url", url)
        assert rc == 2 and message in err, err
    rc, _, err = run(capsys, "db", "outcomes", "import", str(tmp_path / "missing.csv"), "--database-url", url)
    assert rc == 2 and "cannot read" in err


def test_a_study_arriving_later_is_matched_by_the_next_import_or_match(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    fill(url)
    path = tmp_path / "dxa.csv"
    path.write_text(DXA_CSV)
    assert main(["db", "outcomes", "import", str(path), "--database-url", url]) == 0
    db = Database(url)
    with db.session() as s:  # P7's radiograph arrives after its DXA was imported
        add_study(s, 50, "P7", "20260420", "ACC7", BETA, [("lumbar_spine", "osteopenia", -1.4, -2.0, -0.8, None)])
        s.commit()
    db.dispose()
    capsys.readouterr()
    rc, out, _ = run(capsys, "db", "outcomes", "match", "--json", "--database-url", url)
    r = json.loads(out)
    assert rc == 0 and r["newly_matched"] == 1 and r["counts"] == {"matched": 6, "unmatched": 1, "ambiguous": 1}
    rc, out, _ = run(capsys, "db", "outcomes", "match", "--database-url", url)
    assert "unchanged" in out
    # a narrower window (config) unmatches what lies outside it; the next import says so
    monkeypatch.setenv("OSTEOSCREEN_OUTCOMES__MATCH_DAYS", "60")
    rc, out, _ = run(capsys, "db", "outcomes", "import", str(path), "--database-url", url, "--json")
    s = json.loads(out)
    # within 60 days of the DXA only P7 (11 days) and P8's ACC8B (47); P1-P4 (61-92 days) drop out
    assert s["counts"] == {"matched": 2, "unmatched": 6, "ambiguous": 0} and s["stored"]["no_longer_matched"] == 4
    monkeypatch.setenv("OSTEOSCREEN_OUTCOMES__MATCH_DAYS", "-1")
    rc, _, err = run(capsys, "db", "outcomes", "match", "--database-url", url)
    assert rc == 2 and "outcomes.match_days" in err


def test_an_accession_pins_the_study_and_a_later_dxa_of_a_matched_study_is_set_aside(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    fill(url)
    path = tmp_path / "dxa.csv"
    path.write_text("patient_id,dxa_date,left_hip_t_score,lumbar_spine_t_score,accession\n"
                    "P5,2026-05-01,-2.0,,ACC5A\n"  # pinned: no longer ambiguous
                    "P8,2026-06-01,,-2.9,NOPE\n"  # an accession the patient has no study with
                    "P5,2026-08-01,-2.2,,ACC5A\n")  # a second DXA of the same study
    rc, out, _ = run(capsys, "db", "outcomes", "import", str(path), "--database-url", url, "--json")
    s = json.loads(out)
    assert s["counts"] == {"matched": 2, "unmatched": 1, "ambiguous": 0}
    assert s["problems"][0]["line"] == 3 and "accession" in s["problems"][0]["reason"]
    rc, out, _ = run(capsys, "db", "performance", "--json", "--database-url", url)
    r = json.loads(out)
    assert r["n"] == 1 and r["n_later_dxa_set_aside"] == 1  # the earliest DXA after the radiograph counts
    assert r["mae"] is None and r["interval"]["coverage"] == 1.0  # MAE needs two sites (evaluate's rule)


# -- matched outcomes label the node's calibration rows -------------------------------------------------

def _header_only_dicom(path: Path, manufacturer: str, model: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Manufacturer, ds.ManufacturerModelName, ds.Modality = manufacturer, model, "DX"
    ds.save_as(path, enforce_file_format=True)


def test_matched_outcomes_label_the_calibration_rows_from_the_node(tmp_path, capsys):
    import argparse

    from osteoscreen.admin.node_cases import scanner_rows
    from osteoscreen.cli.calibrate import _node_manifest
    from osteoscreen.training.calibrate import MIN_LABELLED_STUDIES
    storage = tmp_path / "var"
    url = f"sqlite:///{storage / 'osteoscreen.db'}"
    storage.mkdir()
    n = MIN_LABELLED_STUDIES + 2
    db = Database(url)
    with db.session() as s:
        for i in range(n):
            st = add_study(s, i, f"Q{i}", "20260301", f"A{i}", ACME,
                           [("left_hip", "osteopenia", -1.5, -2.1, -0.9, None)])
            inst = s.scalars(select(Instance).where(Instance.study_id == st.id)).one()
            inst.path = str(tmp_path / f"{i}.dcm")
            _header_only_dicom(Path(inst.path), "Acme", "FP-43")
        s.commit()
    db.dispose()
    dxa = tmp_path / "dxa.csv"  # DXA for all but the last two studies
    dxa.write_text("patient_id,dxa_date,left_hip_t_score,right_hip_t_score,left_hip_neck_t_score\n" + "".join(
        f"Q{i},2026-04-01,{-1 - i / 10:.1f},-0.5,-2.0\n" for i in range(n - 2)))
    assert main(["db", "outcomes", "import", str(dxa), "--database-url", url]) == 0

    db = Database(url)
    with db.session() as s:
        rows, counts = scanner_rows(s, ACME)
    db.dispose()
    assert counts["matched"] == n and counts["labelled_studies"] == n - 2 == MIN_LABELLED_STUDIES
    labelled = [r for r in rows if r.get("left_hip_t_score") not in (None, "")]
    assert len(labelled) == n - 2 and {r["left_hip_neck_t_score"] for r in labelled} == {-2.0}
    assert sorted(r["left_hip_t_score"] for r in labelled) == pytest.approx(sorted(-1 - i / 10 for i in range(n - 2)))

    args = argparse.Namespace(scanner=ACME, since=None, out=str(tmp_path / "cal.json"), config=None,
                              database_url=url, storage=str(storage), manifest=[])
    capsys.readouterr()
    manifest = _node_manifest(args)
    assert f"{n - 2} of their studies have a matched DXA outcome" in capsys.readouterr().err
    written = list(csv.DictReader(open(manifest)))
    # the train manifest's columns: what `calibrate` counts as labelled studies (>= MIN_LABELLED_STUDIES)
    assert {"left_hip_t_score", "right_hip_t_score", "lumbar_spine_t_score", "left_hip_neck_t_score"} <= set(written[0])
    assert len({r["study_instance_uid"] for r in written if r["left_hip_t_score"]}) == MIN_LABELLED_STUDIES

    # fewer labelled studies than a supervised recalibration needs: the rows stay, unlabelled
    db = Database(url)
    with db.session() as s:
        for o in s.scalars(select(Outcome).where(Outcome.patient_id.in_(["Q0", "Q1"]))):
            s.delete(o)
        s.commit()
    db.dispose()
    manifest = _node_manifest(args)
    assert "left out" in capsys.readouterr().err
    written = list(csv.DictReader(open(manifest)))
    assert len(written) == n and not any(r["left_hip_t_score"] for r in written)


# -- the dashboard ---------------------------------------------------------------------------------------

def test_performance_page_and_the_admins_upload(tmp_path, capsys):
    from .test_dashboard import make_app, sign_in
    url = f"sqlite:///{tmp_path / 'o.db'}"
    fill(url)
    app, _, db = make_app(tmp_path, url)
    try:
        with app.test_client() as bob:  # read-only: sees the page, cannot upload
            sign_in(bob, "bob")
            page = bob.get("/performance")
            assert page.status_code == 200 and b"Performance against DXA" in page.data
            assert b"outcomes-upload" not in page.data
            assert bob.post("/outcomes/import", data={"csrf_token": "x"}).status_code == 403
        with app.test_client() as alice:
            assert alice.get("/performance").status_code == 302  # sign in first
            sign_in(alice, "alice")
            page = alice.get("/performance")
            assert b"outcomes-upload" in page.data
            token = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
            from io import BytesIO
            no_token = alice.post("/outcomes/import", data={"file": (BytesIO(DXA_CSV.encode()), "dxa.csv")},
                                  content_type="multipart/form-data")
            assert no_token.status_code == 400 and outcome_rows(url) == []
            bad = DXA_CSV.replace("P4,2026-06-01,-1.2", "P4,2026-06-01,x")
            resp = alice.post("/outcomes/import", data={"csrf_token": token, "file": (BytesIO(bad.encode()), "d.csv")},
                              content_type="multipart/form-data", follow_redirects=True)
            assert b"Not imported" in resp.data and b"line 5" in resp.data and outcome_rows(url) == []
            resp = alice.post("/outcomes/import", data={"csrf_token": token,
                                                        "file": (BytesIO(DXA_CSV.encode()), "dxa.csv")},
                              content_type="multipart/form-data", follow_redirects=True)
            assert resp.status_code == 200 and b"Imported 8 DXA result(s): 8 new" in resp.data
            assert len(outcome_rows(url)) == 8
            html = resp.data.decode()
            assert re.search(r'data-group="all".*?class="n">7<', html, re.S)
            assert re.search(r'data-key="Acme\|FP-43".*?class="n">4<', html, re.S)
            assert 'data-key="lumbar_spine"' in html and html.count('data-status="unmatched"') == 2
            assert 'data-status="ambiguous"' in html
            resp = alice.post("/outcomes/match", data={"csrf_token": token}, follow_redirects=True)
            assert b"Re-matched: 5 matched" in resp.data
            assert alice.get("/performance?by=month").status_code == 200
            assert alice.get("/performance?by=week").status_code == 400
            assert alice.get("/performance?from=nope").status_code == 400
        with db.session() as s:
            events = {e.event: e for e in s.scalars(select(AuditEvent))}
            assert events["outcomes_imported"].peer == "web:alice"
            assert "P4" not in (events["outcomes_import_refused"].detail or "")
            assert s.scalar(select(func.count()).select_from(Outcome)) == 8
    finally:
        db.dispose()


@pytest.mark.slow
def test_performance_page_in_chromium(tmp_path):
    from osteoscreen.web.server import WebServer

    from .browser import signed_in_page
    from .test_dashboard import make_app
    url = f"sqlite:///{tmp_path / 'o.db'}"
    fill(url)
    _, settings, db = make_app(tmp_path, url)
    settings.web.port = 0
    server = WebServer(settings, db)  # the dashboard's own server (waitress), as `osteoscreen web` runs it
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    csv_path = tmp_path / "dxa.csv"
    csv_path.write_text(DXA_CSV)
    try:
        with signed_in_page(base, "/performance", "alice") as page:
            assert page.inner_text("#outcome-counts").startswith("0 matched")
            page.click("nav a:has-text('Performance')")
            page.set_input_files("#outcomes-upload input[type=file]", str(csv_path))
            page.click("#outcomes-upload button[type=submit]")
            page.wait_for_selector(".flash")
            assert "Imported 8 DXA result(s)" in page.inner_text(".flash")
            assert page.inner_text("#outcome-counts").startswith("5 matched")
            total = page.locator("#performance tr[data-group='all']")
            assert total.locator(".n").inner_text() == "7"
            assert total.locator(".sensitivity").inner_text().startswith("50 %")
            assert page.locator("#unmatched tbody tr").count() == 3
    finally:
        server.stop()
        db.dispose()

"""`osteoscreen db list|show|stats|worklist|ack|export` on the seeded screening database (tests/seed.py),
on SQLite and PostgreSQL, run in-process through cli.main (and once as the installed console script)."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from osteoscreen.admin import queries, tables
from osteoscreen.cli import main
from tests.seed import PATIENT_NAMES, seed, uid


@pytest.fixture
def seeded(db_url, tmp_path):
    return seed(db_url, tmp_path / "outbox")


def run(capsys, url: str, *argv: str) -> tuple[int, str, str]:
    """cli.main in-process: (exit code, stdout, stderr); argparse's own errors exit via SystemExit."""
    try:
        rc = main(["db", *argv, "--database-url", url])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def listed(capsys, url: str, *flags: str) -> dict:
    rc, out, err = run(capsys, url, "list", "--json", "--limit", "0", *flags)
    assert rc == 0, err
    return json.loads(out)


def accessions(page: dict) -> list[str]:
    return sorted(item["accession_number"] for item in page["items"])


# -- list -------------------------------------------------------------------------------------------

def test_list_filters(seeded, capsys):
    url = seeded.url
    everything = listed(capsys, url)
    assert everything["total"] == 14 and len(everything["items"]) == 14
    # newest received first
    assert [i["accession_number"] for i in everything["items"][:2]] == ["ACC0014", "ACC0013"]
    cases = {
        ("--result", "osteoporosis"): ["ACC0004", "ACC0005", "ACC0012", "ACC0013"],  # not S10: re-reported normal
        ("--result", "normal"): ["ACC0001", "ACC0002", "ACC0006", "ACC0010"],
        ("--result", "not_assessable"): ["ACC0007"],
        ("--site", "lumbar_spine"): ["ACC0009"],
        ("--site", "left_hip", "--result", "osteopenia"): ["ACC0003"],
        ("--modality", "CR"): ["ACC0012"],
        ("--modality", "cr"): ["ACC0012"],
        ("--calling-ae", "CR_ROOM2"): ["ACC0012"],
        ("--model-version", "0.2.0"): ["ACC0013"],
        ("--assessable", "no"): ["ACC0007"],
        ("--from", "2026-11-09", "--to", "2026-11-12"): ["ACC0005", "ACC0006", "ACC0007", "ACC0008"],
        ("--positive", "yes"): ["ACC0004", "ACC0005", "ACC0012", "ACC0013"],
        ("--positive", "yes", "--acknowledged", "no"): ["ACC0004", "ACC0012", "ACC0013"],
        ("--acknowledged", "yes"): ["ACC0005"],
        ("--status", "skipped"): ["ACC0008"],
        ("--status", "failed"): ["ACC0011"],
        ("--status", "receiving"): ["ACC0014"],
        ("--patient", "PID0007"): ["ACC0007"],
        ("--patient", "ACC0009"): ["ACC0009"],
        ("--from", "2026-11-23"): ["ACC0013", "ACC0014"],
        ("--to", "2026-11-02"): ["ACC0001"],
    }
    for flags, expected in cases.items():
        page = listed(capsys, url, *flags)
        assert accessions(page) == expected, flags
        assert page["total"] == len(expected), flags
    assert len(listed(capsys, url, "--positive", "no")["items"]) == 10
    s10 = listed(capsys, url, "--patient", "ACC0010")["items"][0]
    assert s10["result"] == "normal" and s10["sites"]["left_hip"]["category"] == "normal"
    assert s10["positive"] is False


def test_list_limit_and_offset(seeded, capsys):
    first = listed(capsys, seeded.url)  # --limit 0: all
    rc, out, _ = run(capsys, seeded.url, "list", "--json", "--limit", "5", "--offset", "3")
    page = json.loads(out)
    assert rc == 0 and page["total"] == 14 and page["limit"] == 5 and page["offset"] == 3
    assert [i["study_uid"] for i in page["items"]] == [i["study_uid"] for i in first["items"][3:8]]
    rc, out, _ = run(capsys, seeded.url, "list")  # default limit 50 holds all 14
    assert rc == 0 and out.rstrip().splitlines()[-1] == "14 of 14 screenings (dates UTC)"
    rc, out, _ = run(capsys, seeded.url, "list", "--limit", "2")
    assert out.rstrip().splitlines()[-1] == "2 of 14 screenings (dates UTC)"


def test_list_text_table(seeded, capsys):
    rc, out, err = run(capsys, seeded.url, "list", "--limit", "0")
    assert rc == 0
    lines = out.rstrip("\n").splitlines()
    table, footer = lines[:-1], lines[-1]
    assert footer == "14 of 14 screenings (dates UTC)"
    assert len(table) == 2 + 14  # header, separator, one line per study
    header, separator = table[0], table[1]
    for name in ("received (UTC)", "patient ID", "name", "accession", "result", "lowest T", "sites", "status"):
        assert name in header
    assert set(separator) == {"-", " "}
    assert len({len(line) for line in table}) == 1  # aligned: every line of the table the same width
    # every column starts where its dashes start
    starts = [i for i, ch in enumerate(separator) if ch == "-" and (i == 0 or separator[i - 1] == " ")]
    for line in table:
        for s in starts[1:]:
            assert line[s - 2:s] == "  ", line
    by_accession = {line.split()[4]: line for line in table[2:]}  # date time pid name accession …
    s04 = by_accession["ACC0004"]
    assert "PID0004" in s04 and PATIENT_NAMES[4] in s04
    assert "L hip osteoporosis -2.9 · R hip normal -0.2" in s04 and "osteoporosis" in s04
    assert "2026-11-05 09:00" in s04 and "screened" in s04
    assert "L hip n/a (metal_implant) · R hip n/a (site_not_found)" in by_accession["ACC0007"]
    assert "not assessable" in by_accession["ACC0007"]
    assert "lumbar osteopenia -1.9" in by_accession["ACC0009"]
    assert "body part not hip" in by_accession["ACC0008"] and "skipped" in by_accession["ACC0008"]
    s05 = by_accession["ACC0005"].split()
    assert s05[-3:] == ["yes", "yes", "screened"]  # positive, acknowledged
    assert by_accession["ACC0004"].split()[-2:] == ["yes", "screened"]
    assert "L hip normal -0.9" in by_accession["ACC0010"] and "osteoporosis" not in by_accession["ACC0010"]
    assert "Test^Patient" not in err  # names go to stdout only, never the log


# -- show -------------------------------------------------------------------------------------------

def test_show_re_reported_study(seeded, capsys):
    rc, out, _ = run(capsys, seeded.url, "show", "ACC0010")
    assert rc == 0
    assert out.startswith(f"Study {uid(10)}\n")
    assert "PID0010" in out and PATIENT_NAMES[10] in out
    assert "normal (lowest T -0.9)" in out
    latest, earlier = out.index("Latest report: job"), out.index("Earlier report: job")
    assert latest < earlier
    latest_part, earlier_part = out[latest:earlier], out[earlier:out.index("Instances:")]
    assert "left_hip   normal" in latest_part and "osteoporosis" not in latest_part
    # each estimate's prediction interval, and the calibration behind it (or the model's own)
    assert "-1.5..-0.3 (90%)  model's own" in latest_part and "cal-seeded000001" in latest_part
    assert "left_hip   osteoporosis  -2.7" in earlier_part
    assert "Jobs: 2" in out and "Deliveries: 2" in out and "Acknowledgements: 0" in out
    # by Study Instance UID: the same study
    rc, out_by_uid, _ = run(capsys, seeded.url, "show", uid(10))
    assert rc == 0 and out_by_uid == out


def test_show_deliveries_failures_and_acknowledgements(seeded, capsys):
    _, out, _ = run(capsys, seeded.url, "show", "ACC0013")
    deliveries = out[out.index("Deliveries: 1"):out.index("Acknowledgements:")]
    assert "dead" in deliveries and " 8 " in deliveries and "C-STORE status 0xA700" in deliveries
    assert "model 0.2.0" in out
    _, out, _ = run(capsys, seeded.url, "show", "ACC0009")
    assert "Deliveries: 2" in out and "pending" in out and "association rejected" in out
    assert "Instances: 2" in out and "lumbar_spine" in out
    _, out, _ = run(capsys, seeded.url, "show", "ACC0011")
    assert "failed" in out and "RuntimeError: pixel data truncated" in out and "Reports: none" in out
    _, out, _ = run(capsys, seeded.url, "show", "ACC0005")
    acks = out[out.index("Acknowledgements: 1"):]
    assert "coordinator" in acks and "referred to DXA" in acks
    rc, out, _ = run(capsys, seeded.url, "show", "ACC0008")
    assert rc == 0 and "skipped (body part not hip" in out
    rc, out, _ = run(capsys, seeded.url, "show", "ACC0010", "--json")
    detail = json.loads(out)
    assert detail["screening"]["result"] == "normal"
    assert {f["category"] for f in detail["findings_history"] if f["site"] == "left_hip"} == {"normal", "osteoporosis"}


def test_show_unknown_study_exits_2(seeded, capsys):
    rc, out, err = run(capsys, seeded.url, "show", "nonexistent")
    assert rc == 2 and out == ""
    assert err.strip() == "osteoscreen: error: no study with Study Instance UID or Accession Number nonexistent"


# -- usage errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["list", "--from", "2026-13-01"], "--from '2026-13-01'"),
    (["list", "--to", "yesterday"], "--to 'yesterday'"),
    (["list", "--result", "maybe"], "result 'maybe'"),
    (["list", "--site", "skull"], "site 'skull'"),
    (["list", "--status", "lost"], "status 'lost'"),
    (["list", "--from", "2026-11-10", "--to", "2026-11-09"], "is after"),
    (["list", "--limit", "-1"], "--limit"),
    (["export", "--result", "maybe"], "result 'maybe'"),
    (["stats", "--from", "2026-02-30"], "--from '2026-02-30'"),
    (["stats", "--from", "2026-11-10", "--to", "2026-11-09"], "is after"),
    (["ack", "nonexistent", "--by", "alice"], "no study"),
    (["ack", "ACC0004", "--by", "x" * 65], "1-64"),
    (["ack", "ACC0004", "--by", "alice", "--revoke", "--note", "oops"], "--revoke"),
])
def test_usage_errors_exit_2(argv, message, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    seed(url, tmp_path / "outbox")
    rc, out, err = run(capsys, url, *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("osteoscreen: error: ") and message in err


def test_argparse_choices_exit_2(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for argv in (["list", "--positive", "maybe"], ["stats", "--by", "month"], ["ack", "ACC0004"]):
        rc, out, err = run(capsys, url, *argv)
        assert rc == 2 and out == "" and "usage:" in err


# -- worklist and acknowledgements ---------------------------------------------------------------------

def test_worklist(seeded, capsys):
    rc, out, _ = run(capsys, seeded.url, "worklist", "--json")
    assert rc == 0
    items = json.loads(out)
    assert [i["study_uid"] for i in items] == seeded.worklist
    s04 = items[0]
    assert s04["accession_number"] == "ACC0004" and s04["lowest_t_score"] == -2.9
    assert s04["days_waiting"] == (queries.utcnow() - datetime(2026, 11, 5, 9, 0, 20)).days

    rc, out, _ = run(capsys, seeded.url, "worklist")
    lines = out.rstrip("\n").splitlines()
    assert lines[0].split() == ["patient", "ID", "name", "accession", "received", "(UTC)", "result", "lowest",
                                "T", "days", "waiting"]
    assert [line.split()[0] for line in lines[2:-1]] == ["PID0004", "PID0012", "PID0013"]
    assert PATIENT_NAMES[12] in lines[3] and "-2.6" in lines[3]
    assert lines[-1].startswith("3 positive screenings awaiting follow-up")
    assert "PID0005" not in out  # acknowledged

    rc, out, _ = run(capsys, seeded.url, "worklist", "--all")
    lines = out.rstrip("\n").splitlines()
    assert lines[0].rstrip().endswith("acknowledged")
    assert [line.split()[0] for line in lines[2:-1]] == ["PID0004", "PID0005", "PID0012", "PID0013"]
    assert lines[3].rstrip().endswith("yes") and not lines[2].rstrip().endswith("yes")
    assert "1 acknowledged" in lines[-1]
    _, out, _ = run(capsys, seeded.url, "worklist", "--all", "--json")
    assert [i["acknowledged"] for i in json.loads(out)] == [False, True, False, False]


def test_ack_and_revoke(seeded, capsys):
    from sqlalchemy import select

    from osteoscreen.store.db import Database
    from osteoscreen.store.models import Acknowledgement, AuditEvent

    rc, out, err = run(capsys, seeded.url, "ack", "ACC0004", "--by", "alice", "--note", "referred to DXA")
    assert rc == 0 and out == f"study {uid(4)}: acknowledged by alice\n"
    assert "Test^Patient" not in out + err and "PID0004" not in out
    _, out, _ = run(capsys, seeded.url, "worklist", "--json")
    assert [i["study_uid"] for i in json.loads(out)] == [uid(12), uid(13)]
    _, out, _ = run(capsys, seeded.url, "show", uid(4))
    assert "Acknowledgements: 1" in out and "alice" in out and "referred to DXA" in out

    rc, out, _ = run(capsys, seeded.url, "ack", uid(4), "--by", "bob", "--revoke")
    assert rc == 0 and out == f"study {uid(4)}: 1 acknowledgement revoked by bob\n"
    _, out, _ = run(capsys, seeded.url, "worklist", "--json")
    assert [i["study_uid"] for i in json.loads(out)] == seeded.worklist
    rc, out, _ = run(capsys, seeded.url, "ack", uid(4), "--by", "bob", "--revoke")
    assert rc == 0 and "no standing acknowledgement" in out

    db = Database(seeded.url)
    try:
        with db.session() as s:
            events = [(e.event, e.study_uid, e.detail) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))
                      if e.event in ("acknowledged", "acknowledgement_revoked")]
            ack = s.scalars(select(Acknowledgement).where(Acknowledgement.by == "alice")).one()
            assert ack.note == "referred to DXA" and ack.revoked_by == "bob" and ack.revoked_at is not None
            assert ack.report_uid == f"{uid(4)}.99"
    finally:
        db.dispose()
    assert events == [("acknowledged", uid(4), "by alice"), ("acknowledgement_revoked", uid(4), "by bob")]


# -- statistics --------------------------------------------------------------------------------------

def test_stats_by_week(seeded, capsys):
    rc, out, _ = run(capsys, seeded.url, "stats", "--by", "week", "--from", "2026-11-02", "--to", "2026-11-29",
                     "--json")
    assert rc == 0
    st = json.loads(out)
    weeks = {p["period"]: p for p in st["periods"]}
    assert list(weeks) == ["2026-W45", "2026-W46", "2026-W47", "2026-W48"]
    assert weeks["2026-W45"]["received"] == 4 and weeks["2026-W45"]["positive"] == 1
    assert weeks["2026-W45"]["by_result"] == {"normal": 2, "osteopenia": 1, "osteoporosis": 1, "not_assessable": 0}
    assert weeks["2026-W46"]["by_result"]["not_assessable"] == 1 and weeks["2026-W46"]["skipped"] == 1
    assert weeks["2026-W47"]["failed"] == 1 and weeks["2026-W47"]["by_result"]["osteoporosis"] == 1  # not S10
    assert weeks["2026-W48"]["pending"] == 1
    assert st["totals"]["received"] == 14 and st["totals"]["positive"] == 4
    assert st["not_assessable_reasons"] == {"metal_implant": 1, "site_not_found": 1}
    assert st["skip_reasons"] == {"body part not hip, pelvis or lumbar spine": 1}

    rc, out, _ = run(capsys, seeded.url, "stats", "--from", "2026-11-02", "--to", "2026-11-29")  # week: default
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("2026-W", "total"))}
    # period received screened skipped failed pending normal osteopenia osteoporosis not-assessable positive rate
    assert rows["2026-W45"] == ["2026-W45", "4", "4", "0", "0", "0", "2", "1", "1", "0", "1", "25.0%"]
    assert rows["2026-W46"] == ["2026-W46", "4", "3", "1", "0", "0", "1", "0", "1", "1", "1", "50.0%"]
    assert rows["2026-W47"] == ["2026-W47", "4", "3", "0", "1", "0", "1", "1", "1", "0", "1", "33.3%"]
    assert rows["total"] == ["total", "14", "11", "1", "1", "1", "4", "2", "4", "1", "4", "40.0%"]
    header = next(line for line in out.splitlines() if line.startswith("period"))
    for name in ("received", "screened", "skipped", "failed", "pending", "normal", "osteopenia", "osteoporosis",
                 "not assessable", "positive rate"):
        assert name in header
    reasons = out[out.index("not assessable, by reason"):out.index("not screened (images), by reason")]
    assert "metal_implant" in reasons and "site_not_found" in reasons
    skips = out[out.index("not screened (images), by reason"):]
    assert "body part not hip, pelvis or lumbar spine      1" in skips


def test_stats_by_day(seeded, capsys):
    rc, out, _ = run(capsys, seeded.url, "stats", "--by", "day", "--from", "2026-11-09", "--to", "2026-11-12",
                     "--json")
    assert rc == 0
    days = {p["period"]: p for p in json.loads(out)["periods"]}
    assert list(days) == ["2026-11-09", "2026-11-10", "2026-11-11", "2026-11-12"]
    assert all(p["received"] == 1 for p in days.values())
    assert days["2026-11-09"]["positive"] == 1 and days["2026-11-09"]["positive_rate"] == 1.0
    assert days["2026-11-11"]["by_result"]["not_assessable"] == 1 and days["2026-11-11"]["positive_rate"] is None
    assert days["2026-11-12"]["skipped"] == 1
    rc, out, _ = run(capsys, seeded.url, "stats", "--by", "day", "--from", "2026-11-13", "--to", "2026-11-15")
    rows = [line.split() for line in out.splitlines() if line.startswith("2026-11-")]
    assert [r[0] for r in rows] == ["2026-11-13", "2026-11-14", "2026-11-15"]  # empty days listed too
    assert all(r[1:] == ["0"] * 10 + ["-"] for r in rows)
    assert "none" in out[out.index("not assessable, by reason"):]


# -- export -----------------------------------------------------------------------------------------

def test_export_csv(seeded, capsys, tmp_path):
    target = tmp_path / "screenings.csv"
    rc, out, err = run(capsys, seeded.url, "export", "--out", str(target))
    assert rc == 0 and out == ""
    assert err.strip() == f"14 screenings written to {target}"
    with target.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == queries.EXPORT_COLUMNS
    assert len(rows) == 14
    assert [r["accession_number"] for r in rows] == [f"ACC{i:04d}" for i in range(1, 15)]  # oldest first
    by_acc = {r["accession_number"]: r for r in rows}
    s10 = by_acc["ACC0010"]
    assert s10["left_hip_category"] == "normal" and s10["left_hip_t_score"] == "-0.9" and s10["result"] == "normal"
    assert (s10["left_hip_t_score_low"], s10["left_hip_t_score_high"], s10["left_hip_calibration"]) == ("-1.5", "-0.3", "")
    assert s10["right_hip_calibration"] == "cal-seeded000001"
    assert by_acc["ACC0007"]["left_hip_category"] == "not_assessable"
    assert by_acc["ACC0007"]["left_hip_reason"] == "metal_implant"
    assert by_acc["ACC0009"]["lumbar_spine_category"] == "osteopenia" and by_acc["ACC0009"]["left_hip_category"] == ""
    assert by_acc["ACC0012"]["modalities"] == "CR" and by_acc["ACC0012"]["calling_ae"] == "CR_ROOM2"
    assert by_acc["ACC0004"]["patient_name"] == PATIENT_NAMES[4]

    # filtered, to standard output
    rc, out, err = run(capsys, seeded.url, "export", "--positive", "yes", "--acknowledged", "no")
    assert rc == 0 and err == ""
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["study_uid"] for r in rows] == seeded.worklist
    rc, out, _ = run(capsys, seeded.url, "export", "--out", "-", "--from", "2026-11-23")
    assert [r["accession_number"] for r in csv.DictReader(io.StringIO(out))] == ["ACC0013", "ACC0014"]


def test_export_unwritable_path_exits_2(seeded, capsys, tmp_path):
    rc, _, err = run(capsys, seeded.url, "export", "--out", str(tmp_path / "missing" / "x.csv"))
    assert rc == 2 and "cannot write" in err


# -- the installed command ------------------------------------------------------------------------------

def test_console_script(seeded):
    script = Path(sys.executable).with_name("osteoscreen")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "osteoscreen.cli"]
    proc = subprocess.run([*cmd, "db", "worklist", "--database-url", seeded.url], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    assert [line.split()[0] for line in lines[2:-1]] == ["PID0004", "PID0012", "PID0013"]
    assert "Test^Patient" not in proc.stderr
    proc = subprocess.run([*cmd, "db", "show", "nonexistent", "--database-url", seeded.url], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "no study" in proc.stderr


# -- table rendering ------------------------------------------------------------------------------------

def test_render_aligns_truncates_and_right_aligns():
    text = tables.render(["name", "n"], [["short", 3], ["a much longer cell than allowed", 12], [None, None]],
                         widths={0: 10}, right=[1])
    lines = text.splitlines()
    assert lines == ["name         n",  # headers of right-aligned columns are right-aligned too
                     "----------  --",
                     "short        3",
                     "a much lo…  12",
                     "-            -"]
    assert len({len(line) for line in lines}) == 1
    with_footer = tables.render(["a", "b"], [["x", "y"]], footer=[["total", "1"]]).splitlines()
    assert with_footer[3] == with_footer[1] and with_footer[4] == "total  1"
    with pytest.raises(ValueError):
        tables.render(["a", "b"], [["only one"]])
    assert tables.truncate("abcdef", 4) == "abc…" and tables.truncate("abc", 3) == "abc"
    assert tables.cell("two\nlines") == "two lines"


def test_formatting_helpers():
    sites = {"left_hip": queries.SiteResult("left_hip", True, "osteoporosis", -2.94, None),
             "right_hip": queries.SiteResult("right_hip", True, "normal", 0.25, None),
             "lumbar_spine": queries.SiteResult("lumbar_spine", False, None, None, "metal_implant")}
    assert tables.site_summary(sites) == "L hip osteoporosis -2.9 · R hip normal +0.2 · lumbar n/a (metal_implant)"
    assert tables.site_summary({}) == ""
    assert tables.t_score(None) == "-" and tables.t_score(-1.26) == "-1.3" and tables.t_score(0.04) == "+0.0"
    assert tables.when(datetime(2026, 11, 2, 9, 5, 7)) == "2026-11-02 09:05"
    assert tables.when(datetime(2026, 11, 2, 9, 5, 7), seconds=True) == "2026-11-02 09:05:07"
    assert tables.result("not_assessable") == "not assessable" and tables.result(None) == "-"
    assert tables.percent(0.4) == "40.0%" and tables.percent(None) == "-"
    assert tables.dicom_date("20261117") == "2026-11-17" and tables.dicom_date(None) == "-"


def test_control_characters_from_dicom_text_never_reach_the_terminal():
    from osteoscreen.admin.tables import cell
    assert cell("Doe^Jane\x1b[2J\x07\r\nX") == "Doe^Jane [2J X"


def test_health_answers_from_heartbeats_for_container_checks(tmp_path, capsys):
    """`osteoscreen health --role R [--this-host] [--max-age S]`: exit 0 only when such a process wrote
    its heartbeat recently enough."""
    from datetime import timedelta

    from sqlalchemy import update

    from osteoscreen.store.db import Database
    from osteoscreen.store.heartbeat import Heartbeat
    from osteoscreen.store.models import ProcessHeartbeat, utcnow
    url = f"sqlite:///{tmp_path / 'h.db'}"
    db = Database(url)
    beat = Heartbeat(("work", "dispatch"), "test")
    with db.session() as s:
        beat.beat(s)

    def health(*argv):
        code = main(["health", "--database-url", url, *argv])
        capsys.readouterr()
        return code
    assert health("--role", "work") == 0 and health("--role", "dispatch", "--this-host") == 0
    assert health("--role", "listen") == 1
    with db.session() as s:  # 45 s silent: dead by default, alive for a check that allows a minute
        s.execute(update(ProcessHeartbeat).values(last_seen_at=utcnow() - timedelta(seconds=45)))
        s.commit()
    assert health("--role", "work") == 1 and health("--role", "work", "--max-age", "60") == 0
    db.dispose()
    assert health("--role", "work", "--database-url", f"sqlite:///{tmp_path / 'missing' / 'x.db'}") == 1

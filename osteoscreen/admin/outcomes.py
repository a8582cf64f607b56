"""DXA outcomes: a hospital's DXA results imported as the screening's reference standard, each matched
to the patient's screened study (`osteoscreen db outcomes import|match|list`, the dashboard upload).

A file is CSV with `patient_id`, `dxa_date` (YYYY-MM-DD), at least one of the T-score columns
(T_SCORE_COLUMNS: per site, for hips the total hip, and the femoral necks) and optionally `accession`.
It is read and checked whole before anything is written: one bad row (its line named) and nothing of
the file is imported. A row is keyed by (patient_id, dxa_date, accession): importing the same file
again changes nothing, the same key with other values updates the stored row.

Matching: a DXA result belongs to the patient's screened study (one with findings) whose study_date lies
at most `outcomes.match_days` days before the DXA date (or on it). With an accession the study must carry
it; without one, two or more studies in that window are *ambiguous* and none is *unmatched*: never a
guess. Matching is a function of the database as it stands, so every import and `db outcomes match`
re-match every stored row (studies arrive after their DXA; retention removes studies; match_days may
change). The figures use the matched study's latest report at the time they are computed.

Nothing here logs; the audit event carries counts only.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from ..store import queue
from ..store.models import Finding, Outcome, Study, utcnow

SITE_COLUMNS = {"left_hip": "left_hip_t_score", "right_hip": "right_hip_t_score",
                "lumbar_spine": "lumbar_spine_t_score"}  # hips: total hip
NECK_COLUMNS = ("left_hip_neck_t_score", "right_hip_neck_t_score")
T_SCORE_COLUMNS = (*SITE_COLUMNS.values(), *NECK_COLUMNS)  # as the train manifest names them
KNOWN_COLUMNS = ("patient_id", "dxa_date", "accession", *T_SCORE_COLUMNS)
T_RANGE = (-6.0, 4.0)
STATUSES = ("matched", "unmatched", "ambiguous")
NEW = "new"  # a row inserted by the import under way, before it is matched (never committed)
MAX_ERRORS_SHOWN = 20


class OutcomeFileError(ValueError):
    """The file cannot be imported (its header or a row is bad): nothing of it was imported."""


@dataclass
class DxaRow:
    line: int
    patient_id: str
    dxa_date: str  # YYYY-MM-DD
    accession: str  # "" when none
    t_scores: dict[str, float | None]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.patient_id, self.dxa_date, self.accession


# -- reading ---------------------------------------------------------------------------------------------

def read_file(path: Path | str) -> list[DxaRow]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise OutcomeFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse(raw)


def parse(data: bytes | str) -> list[DxaRow]:
    """The rows of an outcomes CSV; raises OutcomeFileError naming every bad line (the first few)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise OutcomeFileError("the file is not UTF-8 text (save the CSV as UTF-8)") from None
    reader = csv.reader(io.StringIO(data, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise OutcomeFileError("the file is empty") from None
    except csv.Error as exc:
        raise OutcomeFileError(f"line 1: {exc}") from None
    unknown = [h for h in header if h not in KNOWN_COLUMNS]
    if unknown:
        raise OutcomeFileError(f"unknown column(s): {', '.join(repr(h) for h in unknown)}; expected "
                               f"{', '.join(KNOWN_COLUMNS)}")
    missing = [c for c in ("patient_id", "dxa_date") if c not in header]
    if missing:
        raise OutcomeFileError(f"missing column(s): {', '.join(missing)}")
    if not any(c in header for c in T_SCORE_COLUMNS):
        raise OutcomeFileError(f"no T-score column: give at least one of {', '.join(T_SCORE_COLUMNS)}")
    if len(set(header)) != len(header):
        raise OutcomeFileError("a column appears twice in the header")
    rows, errors, seen = [], [], {}
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(f"line {reader.line_num}: {exc}")
            break
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # a blank line
        if len(cells) != len(header):
            errors.append(f"line {line}: {len(cells)} fields for {len(header)} columns")
            continue
        try:
            row = _row(line, dict(zip(header, (c.strip() for c in cells))))
        except ValueError as exc:
            errors.append(f"line {line}: {exc}")
            continue
        prior = seen.get(row.key)
        if prior is not None:
            if prior.t_scores != row.t_scores:
                errors.append(f"line {line}: the same patient, DXA date and accession as line {prior.line} "
                              "with other T-scores")
            continue  # an exact repetition: the first one stands
        seen[row.key] = row
        rows.append(row)
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n  … and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise OutcomeFileError(f"{len(errors)} bad row(s); nothing was imported:\n  " + "\n  ".join(shown) + more)
    if not rows:
        raise OutcomeFileError("the file has a header but no rows")
    return rows


def _row(line: int, values: dict[str, str]) -> DxaRow:
    patient = values.get("patient_id", "")
    if not patient:
        raise ValueError("patient_id is missing")
    if len(patient) > 64:
        raise ValueError("patient_id is longer than 64 characters")
    text = values.get("dxa_date", "")
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        day = date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"dxa_date {text!r} is not a date YYYY-MM-DD") from None
    if not date(1900, 1, 1) <= day <= date(9000, 1, 1):
        raise ValueError(f"dxa_date {text} is out of range")
    accession = values.get("accession", "")
    if len(accession) > 16:
        raise ValueError("accession is longer than 16 characters (a DICOM Accession Number has at most 16)")
    scores: dict[str, float | None] = {}
    for col in T_SCORE_COLUMNS:
        cell = values.get(col, "")
        if not cell:
            scores[col] = None
            continue
        try:
            t = float(cell)
        except ValueError:
            raise ValueError(f"{col} {cell!r} is not a number") from None
        if not math.isfinite(t) or not T_RANGE[0] <= t <= T_RANGE[1]:
            raise ValueError(f"{col} {cell} is outside [{T_RANGE[0]:g}, {T_RANGE[1]:g}]")
        scores[col] = t
    if all(v is None for v in scores.values()):
        raise ValueError("no T-score in this row")
    return DxaRow(line, patient, day.isoformat(), accession, scores)


# -- matching --------------------------------------------------------------------------------------------

@dataclass
class MatchReport:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    newly_matched: int = 0  # stored rows (of earlier imports too) that were not matched before
    no_longer_matched: int = 0
    changed: int = 0  # rows whose status, study, reason or candidates changed

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _study_day(value: str | None) -> date | None:
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])) if value and len(value) == 8 else None
    except ValueError:
        return None


def _screened_studies(session: Session, patient_ids: list[str]) -> dict[str, list[tuple]]:
    """patient ID → [(study_uid, accession, study day)] of the studies with findings (dated ones)."""
    out: dict[str, list[tuple]] = defaultdict(list)
    for i in range(0, len(patient_ids), 500):
        chunk = patient_ids[i:i + 500]
        for uid, pid, accession, study_date in session.execute(
                select(Study.study_uid, Study.patient_id, Study.accession_number, Study.study_date)
                .where(Study.patient_id.in_(chunk), exists().where(Finding.study_id == Study.id))
                .order_by(Study.id)):
            day = _study_day(study_date)
            if day is not None:
                out[pid].append((uid, accession or "", day))
    return out


def _decide(o: Outcome, studies: list[tuple], match_days: int) -> tuple[str, str | None, str | None, int]:
    """(status, study_uid, reason, candidates) of one outcome."""
    dxa = date.fromisoformat(o.dxa_date)
    start = dxa - timedelta(days=match_days)
    window = f"the {match_days} days before the DXA"
    if not studies:
        return "unmatched", None, "no screened study of this patient (with a study date)", 0
    pool = studies
    if o.accession:
        pool = [s for s in studies if s[1] == o.accession]
        if not pool:
            return "unmatched", None, "no screened study of this patient has this accession", 0
    inside = [s for s in pool if start <= s[2] <= dxa]
    if not inside:
        what = "the accession's study is dated" if o.accession else f"all {len(pool)} screened studies are dated"
        return "unmatched", None, f"{what} outside {window}", 0
    if len(inside) > 1:
        hint = "the accession names several studies" if o.accession else "add the accession to pin one"
        return "ambiguous", None, f"{len(inside)} screened studies in {window}: {hint}", len(inside)
    return "matched", inside[0][0], None, 1


def match(session: Session, match_days: int) -> MatchReport:
    """Re-match every stored outcome against the studies now in the database (not committed)."""
    report = MatchReport()
    outcomes = list(session.scalars(select(Outcome).order_by(Outcome.id)))
    studies = _screened_studies(session, sorted({o.patient_id for o in outcomes}))
    now = utcnow()
    for o in outcomes:
        status, uid, reason, n = _decide(o, studies.get(o.patient_id, []), match_days)
        report.counts[status] += 1
        if (status, uid, reason, n) != (o.match_status, o.study_uid, o.match_reason, o.candidates):
            if o.match_status != NEW:  # a row being imported now is new, not a change
                report.changed += 1
                report.newly_matched += status == "matched" and o.match_status != "matched"
                report.no_longer_matched += status != "matched" and o.match_status == "matched"
            o.match_status, o.study_uid, o.match_reason, o.candidates, o.updated_at = status, uid, reason, n, now
    session.flush()
    return report


def rematch(session: Session, match_days: int, *, by: str | None = None, peer: str | None = None) -> MatchReport:
    """`db outcomes match`: re-match, audit (counts only) and commit."""
    report = match(session, match_days)
    queue.audit(session, "outcomes_matched", peer=peer, detail=_counts_text(report) + (f"; by {by}" if by else ""))
    session.commit()
    return report


# -- importing -------------------------------------------------------------------------------------------

@dataclass
class ImportSummary:
    rows: int = 0
    created: int = 0
    unchanged: int = 0
    updated: list[int] = field(default_factory=list)  # line numbers
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))  # this file's rows
    problems: list[dict] = field(default_factory=list)  # this file's unmatched and ambiguous rows
    stored: MatchReport = field(default_factory=MatchReport)  # every stored row, earlier imports included

    @property
    def changed_nothing(self) -> bool:
        return not self.created and not self.updated and not self.stored.changed

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "changed_nothing": self.changed_nothing}


def import_rows(session: Session, rows: list[DxaRow], *, match_days: int, by: str | None = None,
                peer: str | None = None) -> ImportSummary:
    """Insert or update the rows, re-match every stored outcome, audit, commit: one transaction."""
    summary = ImportSummary(rows=len(rows))
    existing: dict[tuple, Outcome] = {}
    patients = sorted({r.patient_id for r in rows})
    try:
        for i in range(0, len(patients), 500):
            for o in session.scalars(select(Outcome).where(Outcome.patient_id.in_(patients[i:i + 500]))):
                existing[(o.patient_id, o.dxa_date, o.accession)] = o
        now = utcnow()
        by = (by or "")[:64] or None
        for r in rows:
            o = existing.get(r.key)
            if o is None:
                o = Outcome(patient_id=r.patient_id, dxa_date=r.dxa_date, accession=r.accession, **r.t_scores,
                            match_status=NEW, candidates=0, source_line=r.line, imported_by=by,
                            imported_at=now, updated_at=now)
                session.add(o)
                existing[r.key] = o
                summary.created += 1
            elif {c: getattr(o, c) for c in T_SCORE_COLUMNS} != r.t_scores:
                for c, v in r.t_scores.items():
                    setattr(o, c, v)
                o.source_line, o.imported_by, o.updated_at = r.line, by, now
                summary.updated.append(r.line)
            else:
                summary.unchanged += 1
        session.flush()
        summary.stored = match(session, match_days)
        for r in rows:
            o = existing[r.key]
            summary.counts[o.match_status] += 1
            if o.match_status != "matched":
                summary.problems.append({"line": r.line, "patient_id": r.patient_id, "dxa_date": r.dxa_date,
                                         "accession": r.accession or None, "status": o.match_status,
                                         "reason": o.match_reason, "candidates": o.candidates})
        detail = (f"rows {summary.rows}: new {summary.created}, updated {len(summary.updated)}, unchanged "
                  f"{summary.unchanged}; stored {_counts_text(summary.stored)}" + (f"; by {by}" if by else ""))
        queue.audit(session, "outcomes_imported", peer=peer, detail=detail)
        session.commit()
    except Exception:
        session.rollback()
        raise
    return summary


def _counts_text(r: MatchReport) -> str:
    return ", ".join(f"{k} {v}" for k, v in r.counts.items()) + f" ({r.newly_matched} newly matched)"


# -- reading back ----------------------------------------------------------------------------------------

def list_outcomes(session: Session, *, unmatched_only: bool = False) -> list[dict]:
    q = select(Outcome).order_by(Outcome.dxa_date, Outcome.id)
    if unmatched_only:
        q = q.where(Outcome.match_status != "matched")
    return [{"patient_id": o.patient_id, "dxa_date": o.dxa_date, "accession": o.accession or None,
             **{c: getattr(o, c) for c in T_SCORE_COLUMNS}, "status": o.match_status, "reason": o.match_reason,
             "candidates": o.candidates, "study_uid": o.study_uid, "line": o.source_line,
             "imported_by": o.imported_by, "updated_at": o.updated_at.isoformat(timespec="seconds") + "Z"}
            for o in session.scalars(q)]


def matched_by_study(session: Session, study_uids: list[str] | None = None) -> tuple[dict[str, Outcome], int]:
    """study_uid → its matched outcome, the earliest DXA where several DXA results matched one study
    (the DXA closest after the radiograph), and how many later ones were set aside."""
    q = select(Outcome).where(Outcome.match_status == "matched").order_by(Outcome.dxa_date, Outcome.id)
    if study_uids is not None:
        chosen: list[Outcome] = []
        for i in range(0, len(study_uids), 500):
            chosen += session.scalars(q.where(Outcome.study_uid.in_(study_uids[i:i + 500])))
        chosen.sort(key=lambda o: (o.dxa_date, o.id))
    else:
        chosen = list(session.scalars(q))
    out: dict[str, Outcome] = {}
    later = 0
    for o in chosen:
        if o.study_uid in out:
            later += 1
        else:
            out[o.study_uid] = o
    return out, later


def labels_by_study(session: Session, study_uids: list[str]) -> dict[str, dict[str, float]]:
    """The DXA T-scores (manifest columns, empty where unknown) of the studies that have a matched outcome:
    the labels `calibrate --from-node` gives those studies' image rows."""
    found, _ = matched_by_study(session, sorted(set(study_uids)))
    return {uid: {c: "" if getattr(o, c) is None else getattr(o, c) for c in T_SCORE_COLUMNS}
            for uid, o in found.items()}

"""The Performance page: the node's realised performance against imported DXA results, and the
admin's upload of a DXA outcomes CSV (admin.outcomes, admin.performance; `db outcomes`, `db performance`).

``GET /performance`` (signed in): the figures of the whole selection, per scanner group and site type
(``?by=month``: per DXA month too; ``scanner``, ``from``, ``to`` narrow by DXA date), and the stored DXA
results that are unmatched or ambiguous, with their line and reason. ``POST /outcomes/import`` (admin,
CSRF): the CSV, imported whole or not at all, as `db outcomes import`. ``POST /outcomes/match`` (admin,
CSRF): re-match every stored result. Both are audited by counts only.
"""
from __future__ import annotations


from flask import flash, g, redirect, render_template, request, url_for
from werkzeug.exceptions import BadRequest

from ..admin import outcomes
from ..config import Settings
from . import auth
from .context import audit, db_session, query_date

MAX_UPLOAD_BYTES = 16 * 1024 * 1024


def register(app, settings: Settings) -> None:
    positive = settings.output.positive_categories

    @app.get("/performance")
    @auth.login_required
    def performance_page():
        by = request.args.get("by") or None
        if by not in (None, "month"):
            raise BadRequest("by must be month (of the DXA date) or absent")
        scanner = request.args.get("scanner") or None
        since, until = query_date(request.args.get("from"), "from"), query_date(request.args.get("to"), "to")
        from ..admin import performance  # numpy, scipy, scikit-learn: loaded on the first visit
        try:
            report = performance.performance(db_session(), positive_categories=positive, by=by, since=since,
                                             until=until, scanner=scanner)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return render_template("performance.html", report=report, rows=performance.table_rows(report), by=by,
                               scanner=scanner or "", since=since, until=until,
                               match_days=settings.outcomes.match_days,
                               problems=outcomes.list_outcomes(db_session(), unmatched_only=True),
                               columns=outcomes.KNOWN_COLUMNS)

    @app.post("/outcomes/import")
    @auth.admin_required
    def outcomes_import():
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            flash("Choose a CSV file of DXA results to upload.")
            return redirect(url_for("performance_page"))
        data = upload.stream.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            flash(f"Not imported: the file is larger than {MAX_UPLOAD_BYTES >> 20} MB.")
            return redirect(url_for("performance_page"))
        try:
            rows = outcomes.parse(data)
        except outcomes.OutcomeFileError as exc:
            audit("outcomes_import_refused", f"by {g.user.name}: {str(exc).splitlines()[0].split(':')[0]}")
            flash(f"Not imported: {exc}")
            return redirect(url_for("performance_page"))
        s = outcomes.import_rows(db_session(), rows, match_days=settings.outcomes.match_days, by=g.user.name,
                                 peer=f"web:{g.user.name}")
        c = s.counts
        flash(f"Imported {s.rows} DXA result(s): {s.created} new, {len(s.updated)} updated"
              + (f" (lines {', '.join(map(str, s.updated[:20]))})" if s.updated else "")
              + f", {s.unchanged} unchanged; {c['matched']} matched, {c['unmatched']} unmatched, "
              f"{c['ambiguous']} ambiguous; {s.stored.newly_matched} earlier result(s) newly matched."
              + (" Unchanged: the database already held exactly this." if s.changed_nothing else ""))
        return redirect(url_for("performance_page"))

    @app.post("/outcomes/match")
    @auth.admin_required
    def outcomes_match():
        r = outcomes.rematch(db_session(), settings.outcomes.match_days, by=g.user.name, peer=f"web:{g.user.name}")
        flash(f"Re-matched: {r.counts['matched']} matched, {r.counts['unmatched']} unmatched, "
              f"{r.counts['ambiguous']} ambiguous; {r.newly_matched} newly matched, "
              f"{r.no_longer_matched} no longer matched.")
        return redirect(url_for("performance_page"))

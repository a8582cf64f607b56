"""The drift watch on the dashboard: every scanner group's status, the signals that moved, its
history, and charts of its studies (monitor.watch keeps the checks; the scheduler makes them)."""
from __future__ import annotations

from flask import Flask, abort, render_template, request

from ..config import Settings
from ..monitor import watch
from . import auth, charts
from .context import db_session


def register(app: Flask, settings: Settings) -> None:
    configured = list(settings.calibrations)

    @app.get("/drift")
    @auth.login_required
    def drift():
        s = db_session()
        checks = watch.latest_checks(s)
        groups = watch.scanner_groups(s, configured)
        chart_svgs = {}
        for check in checks:
            group = groups.get(check.scanner)
            if group is not None and group.instances:
                series = watch.group_series(s, group, settings.drift)
                chart_svgs[check.scanner] = charts.drift_chart(series["points"], f"Drift watch: {check.scanner}")
        unchecked = sorted(set(groups) - {c.scanner for c in checks})
        return render_template("drift.html", checks=checks, charts=chart_svgs, unchecked=unchecked,
                               cfg=settings.drift)

    @app.get("/drift/history")
    @auth.login_required
    def drift_history():
        key = request.args.get("scanner", "")
        if not key or len(key) > 200:
            abort(400, "name a scanner group: ?scanner=Manufacturer|ModelName")
        rows = watch.history(db_session(), key)
        if not rows:
            abort(404, "no drift checks of that scanner group")
        return render_template("drift_history.html", key=key, rows=rows)

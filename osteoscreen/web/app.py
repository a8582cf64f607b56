"""The dashboard: server-rendered pages over the same queries as `osteoscreen db`.

Pages: overview (node health, volume and positive-rate charts, the head of the worklist), the
follow-up worklist (acknowledge), screenings (filters, pages, CSV export), one study (findings,
earlier reports, deliveries, acknowledgements), statistics, failed deliveries (re-send) and health.
Unauthenticated: /login, /healthz (for container health checks) and /metrics (Prometheus; a bearer
token when `web.metrics_token` is set). Patient data is shown to signed-in users only, never logged;
views of a study and every change are audited with the user name and the Study UID.
"""
from __future__ import annotations

import csv
import io
import logging
import threading
import time
from datetime import date

from flask import (Flask, Response, abort, flash, g, jsonify, redirect, render_template, request,
                   stream_with_context, url_for)
from sqlalchemy import text

from .. import __version__
from ..admin import queries
from ..config import Settings
from ..dispatch.resend import NotFound as DeliveryNotFound
from ..dispatch.resend import resend
from ..findings import REASON_TEXT, SITES
from ..store.db import Database
from . import auth, charts
from .context import audit as _audit
from .context import close_session, db_session, query_date
from .drift_pages import register as register_drift_pages
from .heatmap_pages import register as register_heatmap_pages
from .outcome_pages import register as register_outcome_pages
from .metrics import Metrics

log = logging.getLogger("osteoscreen.web")

FILTER_KEYS = ("from", "to", "result", "site", "assessable", "positive", "acknowledged", "status", "modality",
               "calling_ae", "model_version", "patient")


class BadRequest(ValueError):
    pass


def _yes_no(value: str | None, name: str) -> bool | None:
    if value in (None, ""):
        return None
    if value in ("yes", "no"):
        return value == "yes"
    raise BadRequest(f"{name} must be yes or no")


def filters_from(args) -> queries.Filters:
    """The screening filters of a query string (the names of `osteoscreen db list`'s flags)."""
    try:
        return queries.Filters(
            since=query_date(args.get("from"), "from"), until=query_date(args.get("to"), "to"),
            result=args.get("result") or None, site=args.get("site") or None,
            assessable=_yes_no(args.get("assessable"), "assessable"),
            positive=_yes_no(args.get("positive"), "positive"),
            acknowledged=_yes_no(args.get("acknowledged"), "acknowledged"),
            status=args.get("status") or None, modality=args.get("modality") or None,
            calling_ae=args.get("calling_ae") or None, model_version=args.get("model_version") or None,
            patient=(args.get("patient") or "").strip() or None).validate()
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


class DashboardApp(Flask):
    def log_exception(self, exc_info) -> None:
        """Flask would log the URL (which can hold an accession number) and the whole traceback
        (which can hold query parameters): log the route pattern and the error type only."""
        rule = request.url_rule.rule if request.url_rule else "?"
        log.error("dashboard error on %s %s: %s", request.method, rule, exc_info[0].__name__)


class CachedMetrics:
    """/metrics computed at most every `seconds` (each scrape runs a dozen aggregate queries)."""

    def __init__(self, metrics: Metrics, seconds: float = 5.0):
        self.metrics, self.seconds = metrics, seconds
        self.lock = threading.Lock()
        self.at, self.value = -1e9, None

    def render(self) -> tuple[bytes, str]:
        with self.lock:
            if self.value is None or time.monotonic() - self.at >= self.seconds:
                self.value, self.at = self.metrics.render(), time.monotonic()
            return self.value


def create_app(settings: Settings, db: Database) -> Flask:
    app = DashboardApp(__name__)
    auth.configure(app, settings)
    metrics = CachedMetrics(Metrics(db, settings.output.positive_categories))
    throttle = auth.Throttle()
    positive = settings.output.positive_categories
    app.jinja_env.globals.update(version=__version__, SITES=SITES, RESULTS=queries.RESULTS,
                                 STATUSES=queries.STATUSES, REASON_TEXT=REASON_TEXT, ae_title=settings.ae_title,
                                 positive_categories=positive)
    app.jinja_env.filters.update(t=_fmt_t, dt=_fmt_dt, pct=_fmt_pct, reason=_fmt_reason, interval=_fmt_interval)

    app.extensions["osteoscreen.db"] = db
    session = db_session
    app.teardown_appcontext(close_session)

    @app.errorhandler(BadRequest)
    def bad_request(exc):
        return render_template("error.html", code=400, message=str(exc)), 400

    @app.errorhandler(queries.NotFound)
    def not_found(exc):
        return render_template("error.html", code=404, message=str(exc)), 404

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    def http_error(exc):
        return render_template("error.html", code=exc.code, message=exc.description), exc.code

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'")
        if g.get("user") is not None:
            resp.headers.setdefault("Cache-Control", "no-store")  # patient data stays out of shared caches
        return resp

    # -- sign-in ------------------------------------------------------------------------------------

    @app.route("/login", methods=["GET", "POST"])
    def login():
        error = None
        if request.method == "POST":
            name = request.form.get("username", "")[:64]
            keys = (f"ip:{request.remote_addr}", f"user:{name}")
            if throttle.blocked(*keys):
                return render_template("login.html", error="Too many failed sign-ins: try again in 15 minutes.",
                                       next=request.values.get("next", ""), no_users=False), 429
            user = auth.check_login(settings, name, request.form.get("password", ""))
            if user is not None:
                throttle.succeeded(*keys)
                auth.sign_in(user, settings)
                _audit("web_login", f"{user.name} ({user.role})")
                return redirect(auth.safe_next(request.form.get("next")))
            throttle.failed(*keys)
            # the typed name only if it is a user's: a password typed into the name field stays out
            who = f"user {name}" if auth.is_user(settings, name) else "an unknown user name"
            _audit("web_login_failed", f"{who} from {request.remote_addr}")
            error = "Unknown user name or wrong password."
        return render_template("login.html", error=error, next=request.values.get("next", ""),
                               no_users=not settings.web.users and not settings.web.trusted_proxy_header), \
            (401 if error else 200)

    @app.post("/logout")
    def logout():
        auth.check_csrf()
        from flask import session as cookie
        cookie.clear()
        return redirect(url_for("login"))

    # -- pages ------------------------------------------------------------------------------------------

    @app.get("/")
    @auth.login_required
    def overview():
        s = session()
        stats = queries.statistics(s, positive_categories=positive, by="week")
        return render_template("overview.html", health=queries.health(s, settings.storage), stats=stats,
                               volume_svg=charts.volume_chart(stats.periods),
                               rate_svg=charts.positive_rate_chart(stats.periods),
                               worklist=queries.worklist(s, positive_categories=positive, limit=10))

    @app.get("/worklist")
    @auth.login_required
    def worklist():
        include = request.args.get("all") == "1"
        items = queries.worklist(session(), positive_categories=positive, include_acknowledged=include)
        return render_template("worklist.html", items=items, include_acknowledged=include)

    @app.get("/screenings")
    @auth.login_required
    def screenings():
        f = filters_from(request.args)
        try:
            page_no = max(1, int(request.args.get("page", 1)))
        except ValueError:
            raise BadRequest("page must be a number") from None
        if page_no > 1_000_000:
            raise BadRequest("page out of range")
        size = settings.web.page_size
        page = queries.list_screenings(session(), f, positive_categories=positive, limit=size,
                                       offset=(page_no - 1) * size)
        args = {k: v for k, v in request.args.items() if k in FILTER_KEYS and v}
        return render_template("screenings.html", page=page, page_no=page_no, pages=max(1, -(-page.total // size)),
                               args=args)

    @app.get("/screenings.csv")
    @auth.login_required
    def screenings_csv():
        f = filters_from(request.args)
        _audit("web_export", None)

        def rows():
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=queries.EXPORT_COLUMNS)
            writer.writeheader()
            with db.session() as s:
                for row in queries.export_rows(s, f, positive_categories=positive):
                    writer.writerow(row)
                    if buf.tell() > 65536:
                        yield buf.getvalue()
                        buf.seek(0)
                        buf.truncate()
            yield buf.getvalue()
        return Response(stream_with_context(rows()), mimetype="text/csv",
                        headers={"Content-Disposition": f"attachment; filename=osteoscreen-{date.today()}.csv"})

    @app.get("/studies/<key>")
    @auth.login_required
    def study(key: str):
        detail = queries.study_detail(session(), key, positive_categories=positive)
        _audit("web_view_study", None, study_uid=detail.screening.study_uid)
        return render_template("study.html", d=detail, s=detail.screening)

    @app.post("/studies/<key>/ack")
    @auth.admin_required
    def acknowledge(key: str):
        study = queries.find_study(session(), key)
        try:
            queries.acknowledge(session(), study.study_uid, g.user.name, request.form.get("note", "").strip()[:2000],
                                positive_categories=positive)
            flash("Acknowledged: the study left the follow-up worklist.")
        except ValueError as exc:  # not positive (any more), or acknowledged by someone else meanwhile
            session().rollback()
            flash(f"Not acknowledged: {exc}.")
        return redirect(auth.safe_next(request.form.get("next")) if request.form.get("next")
                        else url_for("study", key=study.study_uid))

    @app.post("/studies/<key>/revoke")
    @auth.admin_required
    def revoke(key: str):
        n = queries.revoke_acknowledgement(session(), key, g.user.name)
        flash(f"{n} acknowledgement(s) withdrawn." if n else "Nothing to withdraw.")
        return redirect(url_for("study", key=key))

    @app.get("/stats")
    @auth.login_required
    def stats():
        by = request.args.get("by", "week")
        if by not in ("day", "week"):
            raise BadRequest("by must be day or week")
        try:
            st = queries.statistics(session(), positive_categories=positive, by=by,
                                    since=query_date(request.args.get("from"), "from"),
                                    until=query_date(request.args.get("to"), "to"))
        except ValueError as exc:  # reversed or over-long range
            raise BadRequest(str(exc)) from None
        return render_template("stats.html", st=st, by=by, volume_svg=charts.volume_chart(st.periods),
                               rate_svg=charts.positive_rate_chart(st.periods))

    @app.get("/deliveries")
    @auth.login_required
    def deliveries():
        s = session()
        return render_template("deliveries.html", items=queries.failed_deliveries(s),
                               health=queries.health(s, settings.storage))

    @app.post("/deliveries/<int:delivery_id>/resend")
    @auth.admin_required
    def resend_one(delivery_id: int):
        try:
            result = resend(session(), delivery_id=delivery_id)
        except DeliveryNotFound as exc:
            abort(404, str(exc))
        _audit("web_resend", f"delivery {delivery_id} by {g.user.name}")
        flash(_resend_message(result))
        return redirect(url_for("deliveries"))

    @app.post("/deliveries/resend-dead")
    @auth.admin_required
    def resend_dead():
        result = resend(session(), dead=True)
        _audit("web_resend", f"all dead deliveries by {g.user.name}")
        flash(_resend_message(result))
        return redirect(url_for("deliveries"))

    @app.get("/health")
    @auth.login_required
    def health_page():
        return render_template("health.html", health=queries.health(session(), settings.storage))

    register_heatmap_pages(app, settings)  # /studies/<key>/heatmaps/<uid>.png
    register_drift_pages(app, settings)  # /drift, /drift/history
    register_outcome_pages(app, settings)  # /performance, /outcomes/import, /outcomes/match

    # -- machines ---------------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz():
        """Liveness for container health checks: the web process answers and its database too."""
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any database failure is "unhealthy"
            return jsonify(status="database unreachable", error=type(exc).__name__), 503
        return jsonify(status="ok", version=__version__)

    @app.get("/metrics")
    def metrics_view():
        token = settings.web.metrics_token
        if token:
            if not auth.same(request.headers.get("Authorization", ""), f"Bearer {token}"):
                return Response("metrics need a bearer token\n", status=401,
                                headers={"WWW-Authenticate": 'Bearer realm="osteoscreen metrics"'})
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    return app


def _resend_message(result) -> str:
    parts = [f"{result.requeued} delivery(ies) queued again"]
    if result.already_queued:
        parts.append(f"{result.already_queued} already queued")
    if result.skipped_purged:
        parts.append(f"{result.skipped_purged} not possible: the file was removed by retention")
    return "; ".join(parts) + "."


def _fmt_interval(r) -> str:
    """A site's prediction interval, "-3.1 to -1.9 (90 %)", or an empty string."""
    low, high, level = (r.get(k) if isinstance(r, dict) else getattr(r, k, None)
                        for k in ("t_score_low", "t_score_high", "interval_level"))
    if low is None or high is None:
        return ""
    return f"{_fmt_t(low)} to {_fmt_t(high)}" + (f" ({100 * level:.0f} %)" if level else "")


def _fmt_t(value) -> str:
    return "–" if value is None else f"{value:+.1f}"


def _fmt_dt(value) -> str:
    if value is None:
        return "–"
    return value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else str(value)


def _fmt_pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _fmt_reason(value) -> str:
    return REASON_TEXT.get(value, value or "")

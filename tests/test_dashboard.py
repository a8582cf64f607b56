"""The dashboard (`osteoscreen web`, started by `serve`).

Part one drives the real Flask app through its test client for the rules of sign-in and roles
(quick, and each rule on its own). Part two runs `osteoscreen serve` as a process on a seeded
database and drives the dashboard in headless Chromium (Debian's `chromium`, driven by
Playwright without a browser download): sign in, filter, open a study, acknowledge a follow-up,
export CSV, and re-send a dead delivery that DCMTK storescp then really receives.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from osteoscreen.config import load
from osteoscreen.store.db import Database
from osteoscreen.store.models import Acknowledgement, AuditEvent, Delivery, Study
from osteoscreen.web.app import create_app
from osteoscreen.web.auth import hash_password

from .seed import seed, uid
from .test_node_e2e import Peer, free_port, port_open, wait_for

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22"}
USERS = [{"name": "alice", "role": "admin", "password_hash": hash_password(PASSWORDS["alice"])},
         {"name": "bob", "role": "read-only", "password_hash": hash_password(PASSWORDS["bob"])}]


# -- part one: the app's rules, through the test client -----------------------------------------------

@pytest.fixture
def seeded(tmp_path, db_url):
    return seed(db_url, tmp_path / "outbox")


def make_app(tmp_path, url, **web):
    settings = load(None, {"storage": str(tmp_path), "database_url": url}, environ={})
    settings.web.users = USERS
    for k, v in web.items():
        setattr(settings.web, k, v)
    db = Database(url)
    app = create_app(settings, db)
    app.config["TESTING"] = True
    return app, settings, db


def sign_in(client, name: str, password: str | None = None):
    return client.post("/login", data={"username": name, "password": password or PASSWORDS[name]})


def csrf(client) -> str:
    with client.session_transaction() as s:
        return s["csrf"]


def audit_events(db, event: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event)))


def test_pages_need_a_sign_in_and_a_wrong_password_is_refused_and_audited(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    for path in ("/", "/worklist", "/screenings", f"/studies/{uid(4)}", "/stats", "/deliveries", "/health",
                 "/screenings.csv"):
        r = c.get(path)
        assert r.status_code == 302 and r.headers["Location"].startswith("/login"), path
    r = sign_in(c, "alice", "wrong-password")
    assert r.status_code == 401 and b"wrong password" in r.data
    r = sign_in(c, "mallory", "whatever-it-is")
    assert r.status_code == 401
    assert len(audit_events(db, "web_login_failed")) == 2
    assert c.get("/").status_code == 302  # still signed out
    r = sign_in(c, "alice")
    assert r.status_code == 302 and r.headers["Location"] == "/"
    assert b"Test^Patient04" in c.get("/worklist").data
    db.dispose()


def test_read_only_users_see_but_cannot_acknowledge_or_resend(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "bob")
    page = c.get(f"/studies/{uid(4)}").data
    assert b"Test^Patient04" in page and b">Acknowledge</button>" not in page
    # the site table shows each estimate's interval and the calibration behind it
    assert b"-3.5 to -2.3 (90 %)" in page
    assert b"cal-seeded000001" in page and b"model&#39;s own" in page
    assert b"[-3.5, -2.3]" in c.get("/screenings").data  # the lists show the interval beside the estimate
    assert b"Re-send" not in c.get("/deliveries").data
    token = csrf(c)
    assert c.post(f"/studies/{uid(4)}/ack", data={"csrf_token": token}).status_code == 403
    assert c.post(f"/deliveries/{seeded.dead_delivery_id}/resend", data={"csrf_token": token}).status_code == 403
    with db.session() as s:
        assert s.scalars(select(Acknowledgement).where(Acknowledgement.by == "bob")).all() == []
        assert s.get(Delivery, seeded.dead_delivery_id).state == "dead"
    db.dispose()


def test_changes_need_the_forms_csrf_token(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "alice")
    assert c.post(f"/studies/{uid(4)}/ack", data={}).status_code == 400
    assert c.post(f"/studies/{uid(4)}/ack", data={"csrf_token": "forged"}).status_code == 400
    r = c.post(f"/studies/{uid(4)}/ack", data={"csrf_token": csrf(c), "note": "referred to DXA"})
    assert r.status_code == 302
    with db.session() as s:
        ack = s.scalars(select(Acknowledgement).where(Acknowledgement.by == "alice")).one()
        assert ack.note == "referred to DXA"
    assert [e.study_uid for e in audit_events(db, "acknowledged")] == [uid(4)]
    db.dispose()


def test_trusted_proxy_header_signs_in_only_from_trusted_addresses(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url, trusted_proxy_header="X-Forwarded-User",
                          trusted_proxies=["10.0.0.7"], proxy_admins=["carol"])
    c = app.test_client()
    from_proxy = {"REMOTE_ADDR": "10.0.0.7"}
    r = c.get("/worklist", headers={"X-Forwarded-User": "dave"}, environ_base=from_proxy)
    assert r.status_code == 200 and b"dave \xc2\xb7 read-only" in r.data and b">Acknowledge</button>" not in r.data
    r = c.get("/worklist", headers={"X-Forwarded-User": "carol"}, environ_base=from_proxy)
    assert b"carol \xc2\xb7 admin" in r.data and b">Acknowledge</button>" in r.data
    # the same header from anyone else is ignored
    r = c.get("/worklist", headers={"X-Forwarded-User": "carol"}, environ_base={"REMOTE_ADDR": "10.0.0.8"})
    assert r.status_code == 302
    db.dispose()


def test_a_user_removed_from_the_configuration_loses_the_session(tmp_path, seeded):
    app, settings, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "bob")
    assert c.get("/worklist").status_code == 200
    settings.web.users = [u for u in settings.web.users if u["name"] != "bob"]
    assert c.get("/worklist").status_code == 302
    db.dispose()


def test_sign_in_redirects_only_within_the_site(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    for target, expected in (("/screenings?result=normal", "/screenings?result=normal"),
                             ("https://evil.example/", "/"), ("//evil.example/x", "/"),
                             ("/\t/evil.example", "/"), ("/\\evil.example", "/"), ("/\n/evil.example", "/")):
        r = c.post("/login", data={"username": "bob", "password": PASSWORDS["bob"], "next": target})
        assert r.headers["Location"] == expected
    db.dispose()


def test_metrics_token_and_health_endpoint(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url, metrics_token="s3cret-token")
    c = app.test_client()
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = c.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert r.status_code == 200 and b"osteoscreen_deliveries_dead 1.0" in r.data
    r = c.get("/healthz")
    assert r.status_code == 200 and r.get_json()["status"] == "ok"
    db.dispose()


def test_healthz_reports_an_unreachable_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'gone' / 'x.db'}"
    app, _, db = make_app(tmp_path, url)
    shutil.rmtree(tmp_path / "gone")
    db.engine.dispose()
    (tmp_path / "gone").write_text("a file where the database folder was")
    r = app.test_client().get("/healthz")
    assert r.status_code == 503 and r.get_json()["status"] == "database unreachable"


def test_bad_filters_are_a_clear_400(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "bob")
    for query, words in (("from=2026-13-01", b"not a date"), ("result=maybe", b"expected one of"),
                         ("assessable=perhaps", b"yes or no"), ("from=2026-11-20&to=2026-11-01", b"after")):
        r = c.get(f"/screenings?{query}")
        assert r.status_code == 400 and words in r.data, query
    assert c.get("/studies/1.2.3.4.5").status_code == 404
    db.dispose()


def test_csv_export_follows_the_filters(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "bob")
    r = c.get("/screenings.csv?result=osteoporosis")
    rows = list(csv.DictReader(io.StringIO(r.data.decode())))
    assert sorted(row["study_uid"] for row in rows) == sorted([uid(4), uid(5), uid(12), uid(13)])
    assert {row["result"] for row in rows} == {"osteoporosis"}
    db.dispose()


# -- part two: `osteoscreen serve` and a real browser ----------------------------------------------------

def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI installs Debian's chromium)")
        pytest.skip("chromium not installed")
    return path


@pytest.fixture
def node(tmp_path):
    """`osteoscreen serve` on a seeded SQLite database; the dead delivery points at a live storescp."""
    peer = Peer(tmp_path / "pacs")
    storage = tmp_path / "var"
    url = f"sqlite:///{storage / 'osteoscreen.db'}"
    seeded = seed(url, storage / "outbox")
    destination = f"PACS@127.0.0.1:{peer.port}"
    db = Database(url)
    with db.session() as s:
        s.execute(update(Delivery).where(Delivery.id == seeded.dead_delivery_id).values(destination=destination))
        # S14 is still receiving (its image files are not on this disk): keep the settle timer off it
        s.execute(update(Study).where(Study.study_uid == uid(14)).values(
            last_received_at=datetime.now() + timedelta(days=1)))
        s.commit()
    http = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "storage": str(storage), "destinations": [destination], "bind_address": "127.0.0.1",
        "retention": {"spool_days": 0, "outbox_days": 0},
        "web": {"users": USERS, "port": http, "metrics_token": None}}))
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "osteoscreen.cli", "serve", "--config", str(config),
                             "--port", str(free_port())], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: port_open(http) or proc.poll() is not None, 60) and proc.poll() is None, \
            log.read_text()
        yield {"base": f"http://127.0.0.1:{http}", "db": db, "peer": peer, "seeded": seeded, "log": log}
    finally:
        proc.terminate()
        proc.wait(30)
        peer.stop()
        db.dispose()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.slow
def test_dashboard_in_chromium(node, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    base, db, peer, seeded = node["base"], node["db"], node["peer"], node["seeded"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.set_default_timeout(20_000)

            # sign in: a wrong password first
            page.goto(base + "/screenings")
            assert page.url.startswith(base + "/login")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "not-her-password")
            page.click("button[type=submit]")
            assert "wrong password" in page.inner_text("[role=alert]")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", PASSWORDS["alice"])
            page.click("button[type=submit]")
            page.wait_for_url(base + "/screenings")  # back where she was going
            assert page.inner_text("#whoami") == "alice · admin"
            assert page.locator("#screenings tbody tr").count() == 14

            # filter: osteoporosis, then osteoporosis on the left hip from a CR room
            page.select_option("select[name=result]", "osteoporosis")
            page.click(".filters button[type=submit]")
            page.wait_for_url("**result=osteoporosis**")
            rows = page.locator("#screenings tbody tr")
            assert sorted(rows.nth(i).get_attribute("data-study") for i in range(rows.count())) == \
                sorted([uid(4), uid(5), uid(12), uid(13)])
            page.fill("input[name=calling_ae]", "CR_ROOM2")
            page.click(".filters button[type=submit]")
            page.wait_for_url("**calling_ae=CR_ROOM2**")
            assert page.inner_text("#count").startswith("1 screening")

            # CSV export of what is on screen
            with page.expect_download() as download:
                page.click("a.export")
            rows_csv = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            assert [r["study_uid"] for r in rows_csv] == [uid(12)]

            # open a study that was re-reported: the latest result and the earlier one
            page.goto(base + "/screenings?patient=ACC0010")
            page.click(f"tr[data-study='{uid(10)}'] a")
            page.wait_for_url(f"**/studies/{uid(10)}")
            assert "normal" in page.inner_text("#result")
            assert "osteoporosis" in page.inner_text("#history")
            assert "-1.5 to -0.3 (90 %)" in page.inner_text("#sites")

            # the follow-up worklist: acknowledge the longest waiting
            page.click("header nav >> text=Follow-up")
            rows = page.locator("#worklist tbody tr")
            assert [rows.nth(i).get_attribute("data-study") for i in range(rows.count())] == seeded.worklist
            first = page.locator(f"#worklist tr[data-study='{uid(4)}']")
            first.locator("input[name=note]").fill("referred to DXA")
            first.locator("button", has_text="Acknowledge").click()
            page.wait_for_selector(".flash")
            rows = page.locator("#worklist tbody tr")
            assert [rows.nth(i).get_attribute("data-study") for i in range(rows.count())] == seeded.worklist[1:]
            with db.session() as s:
                ack = s.scalars(select(Acknowledgement).where(Acknowledgement.by == "alice")).one()
                assert ack.note == "referred to DXA"

            # statistics: charts drawn, the not-assessable reasons counted
            page.goto(base + "/stats?by=week&from=2026-11-02&to=2026-11-29")
            assert page.locator("svg[aria-label^='Studies screened']").count() == 1
            assert page.locator("#stats tbody tr").count() == 5  # four weeks and the total
            assert "metal implant" in page.inner_text("#reasons")

            # a dead delivery: re-send it, and storescp receives it
            page.click("header nav >> text=Deliveries")
            row = page.locator(f"#failed tr[data-delivery='{seeded.dead_delivery_id}']")
            assert "dead" in row.inner_text()
            row.locator("button", has_text="Re-send").click()
            assert "1 delivery(ies) queued again" in page.inner_text(".flash")

            def delivered():
                with db.session() as s:
                    return s.get(Delivery, seeded.dead_delivery_id).state == "delivered"
            assert wait_for(delivered, 30), node["log"].read_text()
            received = peer.objects()
            assert [f.name for f in received if f.name.endswith(f"{uid(13)}.99")], received  # named by SOP Instance UID
            page.reload()
            assert page.locator(f"#failed tr[data-delivery='{seeded.dead_delivery_id}']").count() == 0

            # node health: this very process reports its roles
            page.click("header nav >> text=Health")
            assert "web" in page.inner_text("#processes") and "listen" in page.inner_text("#processes")

            # a read-only colleague sees the same pages without the buttons
            page.locator("header button", has_text="Sign out").click()
            page.fill("input[name=username]", "bob")
            page.fill("input[name=password]", PASSWORDS["bob"])
            page.click("button[type=submit]")
            page.goto(base + "/worklist")
            assert page.locator("#worklist tbody tr").count() == 2
            assert page.locator("#worklist button", has_text="Acknowledge").count() == 0
        finally:
            browser.close()

    # Prometheus scrape of the same process
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    assert families["osteoscreen_followup_pending"].samples[0].value == 2  # S12, S13 after alice's acknowledgement
    assert families["osteoscreen_deliveries_dead"].samples[0].value == 0  # re-sent and delivered
    with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
        assert r.status == 200
    # without a session, patient data stays behind the sign-in page
    with urllib.request.urlopen(base + "/worklist", timeout=10) as r:
        assert r.url.startswith(base + "/login") and b"Test^Patient" not in r.read()


def test_sign_in_is_throttled_and_survives_any_characters(tmp_path, seeded):
    app, settings, db = make_app(tmp_path, seeded.url)
    settings.web.users = [{"name": "jürgen", "role": "read-only", "password_hash": hash_password("jürgen-pass-1")},
                          *USERS]
    c = app.test_client()
    assert sign_in(c, "Müller", "irrelevant-1").status_code == 401  # a non-ASCII name is just unknown
    assert sign_in(c, "jürgen", "jürgen-pass-1").status_code == 302
    c = app.test_client()
    for _ in range(5):
        assert sign_in(c, "bob", "wrong-password").status_code == 401
    # locked for this name (and this address), even with the right password
    assert sign_in(c, "bob").status_code == 429
    assert sign_in(c, "alice").status_code == 429
    events = audit_events(db, "web_login_failed")
    assert any("user bob" in e.detail for e in events) and any("unknown user name" in e.detail for e in events)
    assert not any("Müller" in (e.detail or "") for e in events)  # typed names that are no user stay out
    db.dispose()


def test_sessions_end_after_session_hours_and_on_a_new_password(tmp_path, seeded):
    app, settings, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "bob")
    assert c.get("/worklist").status_code == 200
    with c.session_transaction() as s:
        s["since"] -= settings.web.session_hours * 3600 + 1
    assert c.get("/worklist").status_code == 302
    sign_in(c, "bob")
    assert c.get("/worklist").status_code == 200
    settings.web.users = [USERS[0], {**USERS[1], "password_hash": hash_password("bob-new-secret-3")}]
    assert c.get("/worklist").status_code == 302
    db.dispose()


def test_only_a_current_positive_report_can_be_acknowledged(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "alice")
    r = c.post(f"/studies/{uid(1)}/ack", data={"csrf_token": csrf(c)}, follow_redirects=True)
    assert b"Not acknowledged" in r.data and b"not positive" in r.data
    r = c.post(f"/studies/{uid(5)}/ack", data={"csrf_token": csrf(c)}, follow_redirects=True)
    assert b"already acknowledged" in r.data
    with db.session() as s:
        assert s.scalars(select(Acknowledgement).where(Acknowledgement.by == "alice")).all() == []
    db.dispose()


def test_statistics_and_pages_refuse_ranges_they_cannot_serve(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url)
    c = app.test_client()
    sign_in(c, "bob")
    for query in ("by=day&from=2020-01-01&to=2026-11-29", "from=2026-11-20&to=2026-11-01", "to=9999-12-31"):
        r = c.get(f"/stats?{query}")
        assert r.status_code == 400, query
    assert c.get("/screenings?to=9999-12-31").status_code == 400
    assert c.get(f"/screenings?page={10 ** 20}").status_code == 400
    r = c.get("/stats?by=week&from=2026-11-04&to=2026-11-29")  # a Wednesday: the week starts on its Monday
    assert r.status_code == 200 and b"2026-W45" in r.data and b">2026-W44<" not in r.data
    db.dispose()


def test_trusted_proxies_may_be_networks(tmp_path, seeded):
    app, _, db = make_app(tmp_path, seeded.url, trusted_proxy_header="X-Forwarded-User",
                          trusted_proxies=["172.18.0.0/16"])
    c = app.test_client()
    ok = c.get("/worklist", headers={"X-Forwarded-User": "erin"}, environ_base={"REMOTE_ADDR": "172.18.0.1"})
    assert ok.status_code == 200 and b"erin" in ok.data
    no = c.get("/worklist", headers={"X-Forwarded-User": "erin"}, environ_base={"REMOTE_ADDR": "172.19.0.1"})
    assert no.status_code == 302
    db.dispose()

"""The drift watch: its statistics on windows with and without a shift, and a real node (DCMTK storescu
sends, `osteoscreen serve` screens) whose scanner changes processing under the same header, then
falls silent."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from osteoscreen.config import Drift
from osteoscreen.monitor import watch
from osteoscreen.monitor.signals import SiteRecord, Window, compare, moved
from osteoscreen.store.db import Database

from .browser import served, signed_in_page
from .test_dashboard import make_app, sign_in
from .test_node_e2e import OSTEOSCREEN, NodeProcess, Peer, storescu, wait_for, write_study


def _window(rng, n_studies=30, ood_shift=0.0, photometric="MONOCHROME2", spacing=0.15) -> Window:
    w = Window()
    for _ in range(n_studies):
        image = {"pixel_spacing": spacing, "bits_stored": 12, "photometric": photometric,
                 "exposure_index": float(rng.normal(400, 60)), "kvp": None}
        sites, patient_t = [], rng.normal(-1.0, 1.2)
        for _ in range(2):  # two hips of one patient: alike, as they are
            p = rng.dirichlet([4, 2, 1])
            ood = float(rng.gamma(8, 0.07) + ood_shift)
            ok = ood <= 1.0
            sites.append(SiteRecord(ok, None if ok else "out_of_distribution",
                                    dict(zip(("normal", "osteopenia", "osteoporosis"), p)) if ok else None,
                                    float(patient_t + rng.normal(0, 0.2)) if ok else None, ood))
        w.add([image], sites)
    return w


def test_stable_windows_rarely_alarm_and_a_shift_names_its_signals():
    rng = np.random.default_rng(3)
    alarms = sum(bool(moved(compare(_window(rng), _window(rng)), 0.05)) for _ in range(200))
    assert alarms <= 20  # Bonferroni at family-wise 0.05: about 10 in 200 at most, binomial noise allowed
    reference = _window(rng)
    tests = {t.signal: t for t in compare(reference, _window(rng, ood_shift=0.35))}
    assert {"ood_score", "gate"} & set(moved(list(tests.values()), 0.05))
    assert "kvp" not in tests  # absent in both windows: not tested
    assert tests["pixel_spacing"].p_value == 1.0  # one value everywhere
    changed = moved(compare(reference, _window(rng, photometric="MONOCHROME1", spacing=0.1)), 0.05)
    assert {"photometric", "pixel_spacing"} <= set(changed) and "ood_score" not in changed
    # too little of a signal is not tested, rather than tested badly
    assert compare(Window(), Window()) == []


SYNTH_A = {"Manufacturer": "Osteoscreen Phantom Works", "ManufacturerModelName": "Lumen FP-43",
           "StationName": "PHANTOM-A"}
GROUP_A = "Osteoscreen Phantom Works|Lumen FP-43"


def _send(tmp_path, node, seeds, profile, same_header_as_a=False):
    files = []
    for seed in seeds:
        paths, images = write_study("hip", tmp_path / "in", seed=seed, profile=profile)
        if same_header_as_a:  # another processing chain behind synthA's header
            for path, image in zip(paths, images):
                for keyword, value in SYNTH_A.items():
                    setattr(image.dataset, keyword, value)
                image.dataset.save_as(path, enforce_file_format=True)
        files += paths
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr


def _screened(node) -> int:
    with node.db().connect() as c:
        return c.execute(text("SELECT count(*) FROM studies WHERE status = 'screened'")).scalar()


def _drift(node, *extra) -> list[dict]:
    out = subprocess.run([*OSTEOSCREEN, "db", "drift", "--json", "--storage", str(node.storage), *extra],
                         capture_output=True, text=True, timeout=120, env=node.env)  # the node's drift settings
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_a_node_raises_drift_when_processing_changes_and_silent_when_a_group_stops(tmp_path):
    peer = Peer(tmp_path / "pacs")
    node = NodeProcess(tmp_path / "var", peer.port, env={
        "OSTEOSCREEN_DRIFT__WINDOW_STUDIES": "12", "OSTEOSCREEN_DRIFT__MIN_STUDIES": "10"})
    try:
        _send(tmp_path, node, range(500, 524), "synthA")
        assert wait_for(lambda: _screened(node) == 24, 300), node.log.read_text()[-3000:]
        stable = {g["scanner"]: g for g in _drift(node)}
        assert stable[GROUP_A]["status"] == "ok", stable[GROUP_A]
        assert stable[GROUP_A]["details"]["reference"]["studies"] == 12
        tested = {t["signal"] for t in stable[GROUP_A]["details"]["tests"]}
        assert {"pixel_spacing", "photometric", "ood_score", "p_osteoporosis", "t_score", "gate"} <= tested
        # synthD's chain behind synthA's header: raised within 12 studies of the change
        _send(tmp_path, node, range(600, 612), "synthD", same_header_as_a=True)
        assert wait_for(lambda: _screened(node) == 36, 300), node.log.read_text()[-3000:]
        changed = {g["scanner"]: g for g in _drift(node)}[GROUP_A]
        assert changed["status"] == "drift" and changed["signals"], changed
        assert {"ood_score", "gate"} & set(changed["signals"]), changed["signals"]
        history = _drift(node, "--history", GROUP_A)
        # the scheduler's own tick (30 s after start) may have checked too, before there were two windows
        assert [h["status"] for h in history][-2:] == ["ok", "drift"]
        assert {h["status"] for h in history[:-2]} <= {"insufficient data", "ok"}
        # prometheus and the dashboard read the stored checks; here the silence, a day later
        db = Database(f"sqlite:///{node.storage / 'osteoscreen.db'}")
        with db.session() as s:
            later = watch.utcnow() + timedelta(hours=25)
            silent = {c.scanner: c for c in watch.check_all(s, Drift(window_studies=12, min_studies=10), [], now=later)}
        db.dispose()
        assert silent[GROUP_A].status == "silent"
        assert [g["status"] for g in _drift(node, "--no-check") if g["scanner"] == GROUP_A] == ["silent"]
        log = node.log.read_text()
        assert "PHANTOM^" not in log
        _metrics_and_pages(tmp_path, node)
    finally:
        node.stop()
        peer.stop()


def _metrics_and_pages(tmp_path, node):
    """/metrics parsed, the drift pages in the test client and in headless Chromium, on the node's database."""
    url = f"sqlite:///{node.storage / 'osteoscreen.db'}"
    app, settings, db = make_app(tmp_path, url)
    settings.drift.window_studies, settings.drift.min_studies = 12, 10
    try:
        body = app.test_client().get("/metrics").data.decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(body) for s in fam.samples}
        status = {lab["status"]: v for (name, labels), v in samples.items() if name == "osteoscreen_drift_status"
                  for lab in [dict(labels)] if lab["scanner"] == GROUP_A}
        assert status == {"ok": 0, "drift": 0, "silent": 1, "insufficient data": 0}
        assert samples[("osteoscreen_scanner_last_received_timestamp_seconds", (("scanner", GROUP_A),))] > 0
        c = app.test_client()
        sign_in(c, "bob")
        page = c.get("/drift").data.decode()
        assert GROUP_A in page and "silent" in page and 'aria-label="Drift watch: ' in page
        history = c.get("/drift/history", query_string={"scanner": GROUP_A}).data.decode()
        assert history.count("badge drift-drift") >= 1 and history.count("badge drift-ok") >= 1
        assert c.get("/drift/history", query_string={"scanner": "Nobody|None"}).status_code == 404
        _drift_in_chromium(app)
    finally:
        db.dispose()


def _drift_in_chromium(app):
    with served(app) as base, signed_in_page(base, "/drift", "bob") as page:
        row = page.locator("#groups tbody tr", has_text=GROUP_A)
        assert "silent" in row.inner_text()
        assert page.locator(f"svg[aria-label='Drift watch: {GROUP_A}']").is_visible()
        row.locator("a").click()
        page.wait_for_url("**/drift/history**")
        assert "drift" in page.inner_text("#history") and "ok" in page.inner_text("#history")


def test_the_watch_needs_two_windows(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with db.session() as s:
        assert watch.check_all(s, Drift(), ["Acme|FP-1"]) [0].status == "insufficient data"
    db.dispose()
    out = subprocess.run([sys.executable, "-m", "osteoscreen.cli", "db", "drift", "--storage", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "no scanner group" in out.stdout


def test_retention_keeps_each_groups_latest_check(tmp_path):
    from osteoscreen.store.models import DriftCheck
    from osteoscreen.store.retention import purge
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    now = watch.utcnow()
    with db.session() as s:
        for days, key in ((90, "A|1"), (60, "A|1"), (1, "A|1"), (90, "B|2")):
            s.add(DriftCheck(scanner=key, checked_at=now - timedelta(days=days), status="ok", signals=[], details={}))
        s.commit()
        purge(s, spool_days=0, outbox_days=0, rows_days=30, now=now)
        left = sorted((c.scanner, (now - c.checked_at).days) for c in s.query(DriftCheck))
    db.dispose()
    assert left == [("A|1", 1), ("B|2", 90)]  # B's only check is its status: kept however old

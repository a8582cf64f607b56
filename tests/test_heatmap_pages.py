"""The study page's heatmaps: thumbnails and full-size PNGs of the heatmap Secondary Captures.

Real heatmap DICOM files (reports.heatmap.build_heatmap on a small DX, as test_reports makes them)
are written into the outbox of the seeded database (tests/seed.py) and recorded as deliveries of
study S04, as the worker would; S09's seeded heatmap delivery points at a file that is not there.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from datetime import datetime

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from osteoscreen.admin import heatmaps
from osteoscreen.findings import ModelInfo
from osteoscreen.reports.codes import DISCLAIMER
from osteoscreen.reports.heatmap import build_heatmap
from osteoscreen.reports.uids import derived_uid
from osteoscreen.store.models import AuditEvent, Delivery, Study
from osteoscreen.web import heatmap_pages

from .seed import DESTINATION, seed, uid
from .browser import served, signed_in_page
from .test_dashboard import make_app, sign_in
from .test_reports import findings_for, make_dx

MODEL = ModelInfo("osteoscreen-osteonet", "0.3.0", "0123456789abcdef" * 4)  # the seeded findings' version
WIDTH, HEIGHT = 600, 400  # the heatmap's display grid (the text band comes below)


def _heatmap(study_uid: str, report_uid: str) -> pydicom.Dataset:
    source = make_dx(study_uid=study_uid)
    source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = f"{study_uid}.1.0"  # the seeded instance
    yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    display = 0.3 + 0.4 * xx / WIDTH
    heat = np.exp(-((yy - 200) ** 2 + (xx - 380) ** 2) / (2 * 30.0 ** 2)).astype(np.float32)
    return build_heatmap(source, display, heat, findings_for(source), MODEL, display_scale=2.0,
                         report_uid=report_uid)


@contextmanager
def heatmapped(tmp_path, db_url):
    """S04 with two heatmaps: the latest report's (a real file) and an earlier report's (purged)."""
    seeded = seed(db_url, tmp_path / "outbox")
    app, settings, db = make_app(tmp_path, db_url)
    with db.session() as s:
        st = s.scalar(select(Study).where(Study.study_uid == uid(4)))
        sr = s.scalar(select(Delivery).where(Delivery.study_id == st.id, Delivery.kind == "sr"))
        ds = _heatmap(uid(4), st.last_report_uid)
        path = seeded.outbox / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        current = Delivery(study_id=st.id, sop_instance_uid=str(ds.SOPInstanceUID), kind="heatmap", path=str(path),
                           destination=DESTINATION, state="delivered", attempts=1)
        earlier_uid = derived_uid(f"{uid(4)}.1.0", MODEL.version, "heatmap", sr.sop_instance_uid)
        earlier = Delivery(study_id=st.id, sop_instance_uid=earlier_uid, kind="heatmap",
                           path=str(seeded.outbox / "gone.dcm"), destination=DESTINATION, state="delivered",
                           attempts=1, purged_at=datetime(2026, 12, 1))
        # the same object queued for a second destination: still one heatmap
        archive = Delivery(study_id=st.id, sop_instance_uid=str(ds.SOPInstanceUID), kind="heatmap", path=str(path),
                           destination="ARCHIVE@127.0.0.1:2", state="pending")
        s.add_all([current, earlier, archive])
        s.commit()
    client = app.test_client()
    sign_in(client, "alice")
    yield {"app": app, "db": db, "client": client, "uid": str(ds.SOPInstanceUID), "ds": ds, "path": path,
           "earlier_uid": earlier_uid, "outbox": seeded.outbox}
    db.dispose()


@pytest.fixture
def study4(tmp_path, db_url):
    with heatmapped(tmp_path, db_url) as data:
        yield data


def url(sop_uid: str, size: str | None = None, study: str | None = None) -> str:
    return f"/studies/{study or uid(4)}/heatmaps/{sop_uid}.png" + (f"?size={size}" if size else "")


def png(resp) -> Image.Image:
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    assert resp.mimetype == "image/png"
    image = Image.open(io.BytesIO(resp.data))
    image.load()
    return image


def audits(db, event: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event)))


def test_thumbnail_and_full_size_are_pngs_of_the_heatmap(study4):
    client, ds, db = study4["client"], study4["ds"], study4["db"]
    rows, cols = int(ds.Rows), int(ds.Columns)
    assert cols == WIDTH and rows > HEIGHT  # the text band below the picture

    thumb = png(client.get(url(study4["uid"])))  # thumb is the default
    assert thumb.mode == "RGB" and max(thumb.size) == heatmap_pages.THUMB
    assert abs(thumb.size[0] / thumb.size[1] - cols / rows) < 0.02
    assert audits(db, "web_view_heatmap") == []  # thumbnails are part of the (audited) study view

    resp = client.get(url(study4["uid"], "full"))
    full = png(resp)
    assert full.size == (cols, rows)
    assert np.array_equal(np.asarray(full), ds.pixel_array)  # PNG is lossless: the very pixels
    cache_control = resp.headers["Cache-Control"]
    assert cache_control.startswith("private") and "max-age" in cache_control and "no-store" not in cache_control
    events = audits(db, "web_view_heatmap")
    assert [(e.study_uid, e.peer) for e in events] == [(uid(4), "web:alice")]
    assert study4["uid"] in events[0].detail and "Test^Patient" not in events[0].detail

    # the browser may revalidate: same picture, 304
    again = client.get(url(study4["uid"], "full"), headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status_code == 304


def test_full_size_is_capped_and_renders_are_cached(study4, monkeypatch):
    client, app = study4["client"], study4["app"]
    monkeypatch.setitem(heatmap_pages.SIZES, "full", 300)
    full = png(client.get(url(study4["uid"], "full")))
    assert max(full.size) == 300
    cache = app.extensions["osteoscreen.heatmap_cache"]
    assert len(cache.items) == 1
    calls = []
    real = heatmap_pages.render_png
    monkeypatch.setattr(heatmap_pages, "render_png", lambda *a: calls.append(a) or real(*a))
    png(client.get(url(study4["uid"], "full")))
    assert calls == []  # served from memory
    stat = os.stat(study4["path"])
    os.utime(study4["path"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rewritten file: rendered anew
    png(client.get(url(study4["uid"], "full")))
    assert len(calls) == 1


def test_the_study_page_shows_thumbnails_that_open_the_full_size(study4):
    client = study4["client"]
    page = client.get(f"/studies/{uid(4)}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    thumb, full = url(study4["uid"], "thumb"), url(study4["uid"], "full")
    assert f'src="{thumb}"' in html and f'href="{full}"' in html
    assert f'alt="Heatmap of left hip, right hip (hip AP). {DISCLAIMER}"' in html
    # the earlier report's heatmap was purged: said so, and no picture asked for
    assert "Heatmap removed by retention" in html and "earlier report" in html
    assert url(study4["earlier_uid"]) not in html


def test_a_purged_or_missing_heatmap_is_a_404_and_the_page_still_renders(study4):
    client, db = study4["client"], study4["db"]
    resp = client.get(url(study4["earlier_uid"], "full"))
    assert resp.status_code == 404 and "removed by retention" in resp.get_data(as_text=True)

    # S09's heatmap delivery (pending) points at a file that is not in the outbox
    missing = client.get(url(f"{uid(9)}.98", study=uid(9)))
    assert missing.status_code == 404 and "missing" in missing.get_data(as_text=True)
    page = client.get(f"/studies/{uid(9)}")
    assert page.status_code == 200 and "Heatmap file missing from the outbox" in page.get_data(as_text=True)

    # retention removes the current one too (file first, then the row is marked)
    study4["path"].unlink()
    with db.session() as s:
        d = s.scalar(select(Delivery).where(Delivery.sop_instance_uid == study4["uid"]))
        d.purged_at = datetime(2026, 12, 2)
        s.commit()
    assert client.get(url(study4["uid"])).status_code == 404
    page = client.get(f"/studies/{uid(4)}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.count("Heatmap removed by retention") == 2 and "<img" not in html


def test_unknown_foreign_and_malformed_uids_are_refused(study4):
    client = study4["client"]
    assert client.get(url("1.2.3.4.5")).status_code == 404  # a UID, but no heatmap of this study
    assert client.get(url(study4["uid"], study=uid(9))).status_code == 404  # S04's heatmap under S09
    assert client.get(url(f"{uid(4)}.99.1")).status_code == 404  # an SR of S04 is not a heatmap
    assert client.get(url(study4["uid"], study="1.2.3.999")).status_code == 404  # no such study
    for bad in ("..", "1.2.03", "1..2", "1.2.3a", "x" * 10, "1." + "2" * 70, "1.2%00"):
        assert client.get(url(bad)).status_code == 400, bad
    for traversal in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2E%2E%2Foutbox%2Fx"):
        assert client.get(url(traversal)).status_code in (400, 404), traversal
    assert client.get(url(study4["uid"], "huge")).status_code == 400


def test_pictures_need_a_sign_in(study4):
    anonymous = study4["app"].test_client()
    resp = anonymous.get(url(study4["uid"], "full"))
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]


def test_the_heatmap_list_names_source_image_and_sites(study4):
    with study4["db"].session() as s:
        st = s.scalar(select(Study).where(Study.study_uid == uid(4)))
        listed = heatmaps.study_heatmaps(s, st)
    assert [(h.sop_instance_uid, h.state, h.current) for h in listed] == \
        [(study4["uid"], "available", True), (study4["earlier_uid"], "purged", False)]
    first = listed[0]
    assert first.source_sop_instance_uid == f"{uid(4)}.1.0" and (first.region, first.view) == ("hip", "ap")
    assert first.sites == ("left_hip", "right_hip") and first.model_version == "0.3.0"
    assert first.path == str(study4["path"]) and listed[1].path is None


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_monochrome_image_renders_grey_through_its_window(photometric, tmp_path):
    ds = make_dx()
    ds.PhotometricInterpretation = photometric
    path = tmp_path / "dx.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = Image.open(io.BytesIO(heatmap_pages.render_png(str(path), 1000)))
    assert image.mode == "L" and image.size == (256, 256)  # never scaled up
    grey = np.asarray(image).astype(int)
    raw = ds.pixel_array.astype(int)  # window 2048/4096 over 0..4095: about raw / 16
    expected = raw * 255 // 4095 if photometric == "MONOCHROME2" else 255 - raw * 255 // 4095
    assert np.abs(grey - expected).max() <= 1


@pytest.mark.slow
def test_heatmap_thumbnails_load_in_chromium(tmp_path):
    with heatmapped(tmp_path, f"sqlite:///{tmp_path / 'browser.db'}") as data:
        _in_chromium(data)
        assert [e.peer for e in audits(data["db"], "web_view_heatmap")] == ["web:bob"]


def _in_chromium(data) -> None:
    with served(data["app"]) as base, signed_in_page(base, f"/studies/{uid(4)}", "bob") as page:
        img = page.locator(f"#heatmaps li[data-heatmap='{data['uid']}'] img")
        img.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        assert max(img.evaluate("i => [i.naturalWidth, i.naturalHeight]")) == heatmap_pages.THUMB
        assert "NOT FOR DIAGNOSTIC USE" in img.get_attribute("alt")
        assert "Heatmap removed by retention" in page.inner_text("#heatmaps")

        with page.context.expect_page() as opened:
            page.locator(f"#heatmaps li[data-heatmap='{data['uid']}'] a").click()
        full = opened.value
        full.wait_for_load_state()
        assert full.url == base + url(data["uid"], "full")
        full.wait_for_function("document.images.length > 0 && document.images[0].complete")
        assert full.evaluate("[document.images[0].naturalWidth, document.images[0].naturalHeight]") == \
            [int(data["ds"].Columns), int(data["ds"].Rows)]

"""`osteoscreen demo` (behind `make demo`): the whole loop on embedded defaults, results filed by kind."""
from pydicom import dcmread

from osteoscreen.demo import KO_CLASS, SR_CLASS, run_demo


def test_demo_runs_the_loop_and_files_every_result(tmp_path, capsys):
    assert run_demo(tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "NOT FOR DIAGNOSTIC USE" in out and out.count("SR:") == 2
    received = sorted((tmp_path / "demo" / "pacs").rglob("*.dcm"))
    kinds = {p.name.split("_", 1)[1]: p for p in received}
    assert {"SR.dcm", "heatmap.dcm"} <= set(kinds)
    for path in received:  # the file name says what the object is
        sop_class = dcmread(path, stop_before_pixels=True).SOPClassUID
        expected = {SR_CLASS: "SR", KO_CLASS: "KOS"}.get(sop_class, "heatmap")
        assert path.name.endswith(f"_{expected}.dcm")
    # the administrator's next steps work on what the demo left: the CLI lists both studies, and the
    # dashboard configuration it wrote signs in its demo user with the password it printed
    import re

    from osteoscreen.cli import main
    from osteoscreen.config import load
    from osteoscreen.store.db import Database
    from osteoscreen.web.app import create_app
    storage = tmp_path / "demo" / "var"
    assert main(["db", "list", "--storage", str(storage), "--json"]) == 0
    import json
    listing = json.loads(capsys.readouterr().out)
    assert listing["total"] == 2 and all(item["status"] == "screened" for item in listing["items"])
    password = re.search(r"user demo, password (\S+)\)", out).group(1)
    settings = load(tmp_path / "demo" / "dashboard.yaml")
    db = Database(settings.db_url)
    try:
        client = create_app(settings, db).test_client()
        assert client.post("/login", data={"username": "demo", "password": "wrong"}).status_code == 401
        assert client.post("/login", data={"username": "demo", "password": password}).status_code == 302
        assert client.get("/screenings").status_code == 200
    finally:
        db.dispose()

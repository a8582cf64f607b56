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

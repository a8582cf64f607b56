"""`osteoscreen score` runs the node's pipeline over a manifest (gates and view fusion included) and
`osteoscreen evaluate` reads what it writes, leaving refused sites out with their reasons."""
import csv
import json

from osteoscreen.cli import main
from osteoscreen.synth import synthesize


def read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_score_then_evaluate(tmp_path, capsys):
    hip = synthesize("hip", 3, tmp_path / "hip", seed=8801, progress=False)
    lumbar = synthesize("lumbar", 3, tmp_path / "lumbar", seed=8802, progress=False, implant_rate=0.0)
    metal = synthesize("hip", 2, tmp_path / "metal", seed=8803, progress=False, implant_rate=1.0)

    assert main(["score", "--manifest", str(hip), "--out", str(tmp_path / "hip.csv"), "--quiet"]) == 0
    rows = read(tmp_path / "hip.csv")
    assert len(rows) == 6 and sorted({r["site"] for r in rows}) == ["left_hip", "right_hip"]
    truth = {(r["study_instance_uid"], s): r[f"{s}_t_score"] for r in read(hip) for s in ("left_hip", "right_hip")}
    for r in rows:  # each study site carries its own truth, and an answer or a reason
        assert r["true_t_score"] == truth[(r["group"], r["site"])]
        assert (r["assessable"] == "1") == (r["predicted_class"] != "") and (r["assessable"] == "1" or r["reason"])
        if r["assessable"] == "1":
            assert r["predicted_femoral_neck_t_score"] != ""  # hips report the femoral neck too
    capsys.readouterr()

    assert main(["score", "--manifest", str(lumbar), "--out", str(tmp_path / "lumbar.csv"), "--quiet"]) == 0
    rows = read(tmp_path / "lumbar.csv")
    assert len(rows) == 3 and {r["site"] for r in rows} == {"lumbar_spine"}  # one row per study, not per view
    assert all(r["site_type"] == "lumbar_fused" for r in rows if r["assessable"] == "1")
    assert all(len(r["files"].split(";")) == 2 for r in rows)
    capsys.readouterr()

    assert main(["score", "--manifest", str(metal), "--out", str(tmp_path / "metal.csv"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metal_sites"] == 4 and summary["metal_refused_rate"] >= 0.75
    rows = read(tmp_path / "metal.csv")
    assert sum(r["reason"] == "metal_implant" for r in rows) >= 3

    # evaluate scores the assessable rows and counts the rest with their reasons
    merged = tmp_path / "all.csv"
    with open(merged, "w", newline="") as fh:
        all_rows = read(tmp_path / "hip.csv") + read(tmp_path / "lumbar.csv") + read(tmp_path / "metal.csv")
        writer = csv.DictWriter(fh, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    assert main(["evaluate", str(merged), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    refused = [r for r in all_rows if r["assessable"] == "0"]
    assert report["n"] == len(all_rows) - len(refused)
    assert report["not_assessable"]["n"] == len(refused) and report["not_assessable"]["reasons"].get("metal_implant", 0) >= 3
    assert "femoral_neck" in report["regions"] and report["regions"]["femoral_neck"]["n"] >= 4


def test_evaluate_when_every_site_was_refused(tmp_path, capsys):
    pred = tmp_path / "p.csv"
    pred.write_text("group,site,assessable,reason,true_class,predicted_class\n"
                    "s1,left_hip,0,metal_implant,normal,\ns1,right_hip,0,out_of_distribution,osteopenia,\n")
    assert main(["evaluate", str(pred), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 0 and report["not_assessable"] == {"n": 2, "reasons": {"metal_implant": 1, "out_of_distribution": 1}}
    assert main(["evaluate", str(pred)]) == 0
    assert "nothing assessable: 2 site(s) refused" in capsys.readouterr().out


def test_score_bad_manifest_is_usage_error(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,t\nx,1\n")
    assert main(["score", "--manifest", str(bad), "--out", str(tmp_path / "o.csv")]) == 2
    assert main(["score", "--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o.csv")]) == 2

"""`osteoscreen predict` and the shipped model: the DESIGN.md JSON contract, the written objects,
and proof that the model learned bone density from pixels (a fresh phantom seed, never trained on)."""
import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from osteoscreen.cli import main
from osteoscreen.config import DEFAULT_MODEL
from osteoscreen.synth import synthesize

from .conftest import dciodvfy_errors

SITE_KEYS = {"site", "class", "probabilities", "t_score", "assessable", "reason"}


def predict_json(capsys, *args) -> list[dict]:
    assert main(["predict", "--json", *map(str, args)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_json_contract_and_written_objects(tmp_path, capsys):
    hip = synthesize("hip", 1, tmp_path / "hip", seed=7001, progress=False).parent
    chest = synthesize("chest", 1, tmp_path / "chest", seed=7002, progress=False).parent
    files = sorted(hip.glob("*.dcm")) + sorted(chest.glob("*.dcm"))
    records = predict_json(capsys, *files, "--out", tmp_path / "out")
    assert [r["file"] for r in records] == [str(f) for f in files]
    pelvis, thorax = records
    assert set(pelvis) >= {"file", "sop_instance_uid", "assessable", "reason", "sites"}
    assert sorted(s["site"] for s in pelvis["sites"]) == ["left_hip", "right_hip"]
    for s in pelvis["sites"]:
        # the DESIGN.md contract keys, extended compatibly with the DXA regions of a hip
        assert set(s) == SITE_KEYS | {"regions", "t_score_interval", "interval_level", "calibration"}
        assert s["assessable"] and s["class"] in ("normal", "osteopenia", "osteoporosis")
        # the shipped model's own calibration gives a 90 % interval around the estimate, to one decimal
        low, high = s["t_score_interval"]
        assert s["interval_level"] == 0.9 and low < s["t_score"] < high and s["calibration"] is None
        assert all(round(v, 1) == v for v in (low, high, s["t_score"]))
        assert set(s["probabilities"]) == {"normal", "osteopenia", "osteoporosis"}
        assert set(s["regions"]) == {"total_hip", "femoral_neck"} and s["regions"]["total_hip"] == s["t_score"]
    assert thorax["assessable"] is False and thorax["reason"] == "not_screening_image" and thorax["sites"] == []
    written = sorted((tmp_path / "out").glob("*.dcm"))
    assert [p.name.split(".", 1)[1] for p in written] == ["heatmap.dcm", "sr.dcm"]
    for p in written + files:
        assert dciodvfy_errors(p) == [], p


def test_predict_unreadable_file(tmp_path, capsys):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    (record,) = predict_json(capsys, junk)
    assert record["assessable"] is False and record["reason"] == "unreadable_pixels"
    assert main(["predict", str(tmp_path / "missing.dcm")]) == 2


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="shipped model missing")
def test_shipped_model_learned_bone_density_from_pixels(tmp_path, capsys):
    manifest = synthesize("hip", 24, tmp_path / "hold", seed=424242, progress=False)
    import csv
    rows = list(csv.DictReader(open(manifest)))
    records = predict_json(capsys, *[manifest.parent / r["path"] for r in rows])
    truth, prob, t_true, t_pred = [], [], [], []
    for row, rec in zip(rows, records):
        for s in rec["sites"]:
            if s["assessable"]:
                truth.append(row[f"{s['site']}_class"] == "osteoporosis")
                prob.append(s["probabilities"]["osteoporosis"])
                t_true.append(float(row[f"{s['site']}_t_score"]))
                t_pred.append(s["t_score"])
    assert len(truth) >= 44  # nearly every phantom hip is assessable
    auc = roc_auc_score(truth, prob)
    r = stats.pearsonr(t_true, t_pred)[0]
    mae = float(np.mean(np.abs(np.array(t_true) - np.array(t_pred))))
    print(f"fresh-seed hold-out: {len(truth)} hips, osteoporosis AUC {auc:.3f}, T-score r {r:.3f}, MAE {mae:.2f}")
    assert auc > 0.85 and r > 0.8 and mae < 0.8

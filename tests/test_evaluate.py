"""`evaluate` against metrics computed by hand from a small confusion matrix."""
import json

import numpy as np
import pytest

from osteoscreen.cli import main
from osteoscreen.training.evaluate import delong_auc, evaluate_arrays, wilson_ci

# rows true, columns predicted: normal, osteopenia, osteoporosis
CM = [[5, 2, 1],
      [1, 4, 1],
      [0, 1, 5]]


def rows_from_cm(cm):
    labels = ["normal", "osteopenia", "osteoporosis"]
    out = []
    for i, row in enumerate(cm):
        for j, n in enumerate(row):
            out += [(labels[i], labels[j])] * n
    return out


def test_confusion_matrix_metrics_by_hand():
    pairs = rows_from_cm(CM)
    r = evaluate_arrays([a for a, _ in pairs], [b for _, b in pairs])
    assert r["n"] == 20 and r["accuracy"] == pytest.approx(14 / 20)
    assert r["confusion_matrix"]["rows_true_cols_predicted"] == CM
    op = r["classes"]["osteoporosis"]  # TP 5, FN 1, FP 2, TN 12
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (5, 1, 2, 12)
    assert op["sensitivity"] == pytest.approx(5 / 6)
    assert op["specificity"] == pytest.approx(12 / 14)
    assert op["ppv"] == pytest.approx(5 / 7)
    assert op["npv"] == pytest.approx(12 / 13)
    pen = r["classes"]["osteopenia"]  # TP 4, FN 2, FP 3, TN 11
    assert pen["sensitivity"] == pytest.approx(4 / 6) and pen["specificity"] == pytest.approx(11 / 14)
    lo, hi = op["sensitivity_ci"]
    assert 0 <= lo < 5 / 6 < hi <= 1


def test_wilson_interval_known_value():
    # Wilson 95 % interval for 5/6 (Newcombe 1998 style): 0.4365 – 0.9699
    lo, hi = wilson_ci(5, 6)
    assert lo == pytest.approx(0.4365, abs=1e-3) and hi == pytest.approx(0.9699, abs=1e-3)


def test_delong_auc_matches_pairwise_count():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = y + rng.normal(0, 1.2, 60)
    auc, var = delong_auc(y, s)
    pos, neg = s[y == 1], s[y == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc == pytest.approx(pairwise) and 0 < var < 0.05


def test_cli_evaluate_json_and_plots(tmp_path, capsys):
    pairs = rows_from_cm(CM)
    lines = ["true_class,predicted_class,p_normal,p_osteopenia,p_osteoporosis,true_t_score,predicted_t_score"]
    idx = {"normal": 0, "osteopenia": 1, "osteoporosis": 2}
    for k, (t, p) in enumerate(pairs):
        probs = [0.1, 0.1, 0.1]
        probs[idx[p]] = 0.8
        lines.append(f"{t},{p},{probs[0]},{probs[1]},{probs[2]},{-1.0 - idx[t]},{-1.1 - idx[p]}")
    csv = tmp_path / "pred.csv"
    csv.write_text("\n".join(lines) + "\n")
    assert main(["evaluate", str(csv), "--json", "--plots", str(tmp_path / "plots")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 20 and 0 <= report["classes"]["osteoporosis"]["auc"] <= 1
    assert report["t_score"]["mae"] > 0
    for name in ("roc.png", "calibration.png", "bland_altman.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_cli_evaluate_bad_labels_is_usage_error(tmp_path):
    csv = tmp_path / "pred.csv"
    csv.write_text("true_class,predicted_class\nnormal,broken\n")
    assert main(["evaluate", str(csv)]) == 2
    assert main(["evaluate", str(tmp_path / "missing.csv")]) == 2

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


# A second, different confusion matrix: nothing is ever predicted osteoporosis, so its PPV is 0/0.
CM2 = [[9, 3, 0],
       [2, 7, 0],
       [1, 4, 0]]


def test_second_confusion_matrix_with_an_empty_predicted_class(capsys):
    pairs = rows_from_cm(CM2)
    r = evaluate_arrays([a for a, _ in pairs], [b for _, b in pairs])
    assert r["n"] == 26 and r["accuracy"] == pytest.approx(16 / 26)
    assert r["confusion_matrix"]["rows_true_cols_predicted"] == CM2
    no = r["classes"]["normal"]  # TP 9, FN 3, FP 3, TN 11
    assert (no["tp"], no["fn"], no["fp"], no["tn"]) == (9, 3, 3, 11)
    assert no["sensitivity"] == pytest.approx(9 / 12) and no["specificity"] == pytest.approx(11 / 14)
    assert no["ppv"] == pytest.approx(9 / 12) and no["npv"] == pytest.approx(11 / 14)
    pen = r["classes"]["osteopenia"]  # TP 7, FN 2, FP 7, TN 10
    assert (pen["tp"], pen["fn"], pen["fp"], pen["tn"]) == (7, 2, 7, 10)
    assert pen["sensitivity"] == pytest.approx(7 / 9) and pen["specificity"] == pytest.approx(10 / 17)
    assert pen["ppv"] == pytest.approx(7 / 14) and pen["npv"] == pytest.approx(10 / 12)
    op = r["classes"]["osteoporosis"]  # TP 0, FN 5, FP 0, TN 21: never predicted
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (0, 5, 0, 21)
    assert op["sensitivity"] == 0.0 and op["specificity"] == 1.0
    assert op["ppv"] is None and op["ppv_ci"] is None  # undefined, not a crash and not 0
    assert op["npv"] == pytest.approx(21 / 26)
    text = json.dumps(r)  # JSON null, not NaN
    assert '"ppv": null' in text and "NaN" not in text
    from osteoscreen.training.evaluate_text import format_report
    assert "osteoporosis" in format_report(r)


def test_missing_probabilities_are_counted_and_left_out_of_auc():
    y = ["normal", "osteopenia", "osteoporosis"] * 4
    probs = np.tile(np.eye(3) * 0.8 + 0.1, (4, 1))
    probs[[1, 5], :] = np.nan  # two rows scored without probabilities
    r = evaluate_arrays(y, y, probs)
    assert r["skipped_missing_probabilities"] == 2 and r["n"] == 12
    assert r["classes"]["osteoporosis"]["auc"] == pytest.approx(1.0)
    assert r["ece"] == pytest.approx(0.1)  # confidence 0.9, all correct
    assert evaluate_arrays(y, y)["skipped_missing_probabilities"] == 12  # no probability columns at all


# ---- paired DeLong comparison ----------------------------------------------------------------------

def _structural_direct(y, s):
    """DeLong's structural components the slow way, O(m·n)."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def test_paired_delong_covariance_matches_direct_computation():
    from osteoscreen.training.evaluate import delong_paired
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 41)
    sa = np.round(y + rng.normal(0, 1.0, 41), 1)  # rounded: ties inside and across classes
    sb = np.round(0.5 * y + 0.5 * sa + rng.normal(0, 1.0, 41), 1)
    aucs, cov = delong_paired(y, sa, sb)
    auc_a, v10a, v01a = _structural_direct(y, sa)
    auc_b, v10b, v01b = _structural_direct(y, sb)
    m, n = (y == 1).sum(), (y == 0).sum()
    s10 = np.cov(np.stack([v10a, v10b]), ddof=1)
    s01 = np.cov(np.stack([v01a, v01b]), ddof=1)
    expected = s10 / m + s01 / n
    assert aucs == pytest.approx([auc_a, auc_b])
    assert cov == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert cov[0, 1] != 0  # the two models are correlated: the paired test uses it
    assert delong_auc(y, sa)[1] == pytest.approx(expected[0, 0])  # unpaired variance agrees


def test_delong_test_identical_and_clearly_better():
    from osteoscreen.training.evaluate import delong_test
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1.5, 200)
    same = delong_test(y, s, s.copy())
    assert same["difference"] == 0 and same["se"] == 0 and same["p_value"] == 1.0
    good = y + rng.normal(0, 0.3, 200)
    better = delong_test(y, good, s)
    assert better["difference"] > 0.1 and better["p_value"] < 0.01
    assert better["ci"][0] > 0
    assert delong_test(y, s, good)["p_value"] == pytest.approx(better["p_value"])  # symmetric


CSV_HEADER = "group,site,true_class,predicted_class,p_normal,p_osteopenia,p_osteoporosis,true_t_score,predicted_t_score"


def _prediction_rows(rng, n_studies, noise):
    """Rows as the training tool writes them; lumbar studies have two rows with one key (AP, LAT)."""
    rows = []
    for g in range(n_studies):
        sites = ["lumbar_spine", "lumbar_spine"] if g % 3 == 0 else ["right_hip", "left_hip"]
        for site in sites:
            t = float(rng.normal(-1.5, 1.2))
            true = "normal" if t >= -1 else "osteoporosis" if t <= -2.5 else "osteopenia"
            pt = t + float(rng.normal(0, noise))
            logits = -np.abs(np.array([-0.5, -1.75, -3.0]) - pt) * 2
            p = np.exp(logits) / np.exp(logits).sum()
            pred = ["normal", "osteopenia", "osteoporosis"][int(np.argmax(p))]
            rows.append([f"1.2.3.{g}", site, true, pred, *(f"{v:.5f}" for v in p), f"{t:.3f}", f"{pt:.3f}"])
    return rows


def _write(path, rows, header=CSV_HEADER):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _pair_of_files(tmp_path, n_studies=60):
    rng = np.random.default_rng(11)
    a = _prediction_rows(rng, n_studies, 0.4)
    b = [list(r) for r in a]
    rng_b = np.random.default_rng(12)
    for r in b:  # B: the same cases, noisier estimates
        t = float(r[7])
        pt = t + float(rng_b.normal(0, 1.2))
        logits = -np.abs(np.array([-0.5, -1.75, -3.0]) - pt) * 2
        p = np.exp(logits) / np.exp(logits).sum()
        r[3] = ["normal", "osteopenia", "osteoporosis"][int(np.argmax(p))]
        r[4:7] = [f"{v:.5f}" for v in p]
        r[8] = f"{pt:.3f}"
    return _write(tmp_path / "a.csv", a), b


def test_cli_compare_json_pairs_by_key_regardless_of_order(tmp_path, capsys):
    a_csv, b = _pair_of_files(tmp_path)
    b_csv = _write(tmp_path / "b.csv", b)
    order = np.random.default_rng(5).permutation(len(b))
    # shuffle whole studies' rows but keep the AP-before-LAT order within a repeated key
    order = sorted(range(len(b)), key=lambda i: (order[i - (i % 2)], i))
    b_shuffled = _write(tmp_path / "b_shuffled.csv", [b[i] for i in order])
    assert main(["evaluate", str(a_csv), "--compare", str(b_csv), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("n", "accuracy", "classes", "confusion_matrix", "t_score"):  # A's contract keys unchanged
        assert key in report
    assert report["classes"]["osteoporosis"]["sensitivity"] is not None
    c = report["comparison"]
    assert c["pairing"] == "group,site" and c["n_paired"] == 120 and c["skipped_missing_probabilities"] == 0
    for label in ("normal", "osteopenia", "osteoporosis"):
        e = c["classes"][label]
        assert e["auc_a"] == pytest.approx(report["classes"][label]["auc"])
        assert e["difference"] == pytest.approx(e["auc_a"] - e["auc_b"])
        assert e["ci"][0] < e["difference"] < e["ci"][1] and 0 <= e["p_value"] <= 1
    assert c["classes"]["osteoporosis"]["difference"] > 0 and c["classes"]["osteoporosis"]["p_value"] < 0.01
    t = c["t_score"]
    assert t["mae_a"] == pytest.approx(report["t_score"]["mae"], abs=1e-9)
    assert t["difference"] == pytest.approx(t["mae_a"] - t["mae_b"]) and t["ci"][1] < 0
    assert "paired t" in t["method"]
    assert main(["evaluate", str(a_csv), "--compare", str(b_shuffled), "--json"]) == 0
    shuffled = json.loads(capsys.readouterr().out)["comparison"]
    c.pop("b"), shuffled.pop("b")
    assert shuffled == c


def test_cli_compare_by_row_order_and_text_table(tmp_path, capsys):
    a_csv, b = _pair_of_files(tmp_path, n_studies=30)
    header = CSV_HEADER.replace("group,site,", "")
    a_rows = [r.split(",")[2:] for r in a_csv.read_text().splitlines()[1:]]
    a_plain = _write(tmp_path / "a_plain.csv", a_rows, header)
    b_plain = _write(tmp_path / "b_plain.csv", [r[2:] for r in b], header)
    assert main(["evaluate", str(a_plain), "--compare", str(b_plain)]) == 0
    out = capsys.readouterr().out
    assert "paired by row order" in out and "DeLong" in out and "T-score MAE" in out
    assert main(["evaluate", str(a_plain), "--compare", str(b_plain), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["comparison"]
    b_csv = _write(tmp_path / "b.csv", b)
    assert main(["evaluate", str(a_csv), "--compare", str(b_csv), "--json"]) == 0
    keyed = json.loads(capsys.readouterr().out)["comparison"]
    assert c["pairing"] == "row order"
    assert c["classes"] == keyed["classes"] and c["t_score"] == keyed["t_score"]


def test_cli_compare_mismatch_is_usage_error(tmp_path, capsys):
    a_csv, b = _pair_of_files(tmp_path, n_studies=12)
    header = CSV_HEADER.replace("group,site,", "")
    a_rows = [r.split(",")[2:] for r in a_csv.read_text().splitlines()[1:]]
    a_plain = _write(tmp_path / "a_plain.csv", a_rows, header)
    # truth differs in one row
    wrong = [list(r) for r in b]
    wrong[3][2] = "osteoporosis" if wrong[3][2] != "osteoporosis" else "normal"
    assert main(["evaluate", str(a_csv), "--compare", str(_write(tmp_path / "w.csv", wrong))]) == 2
    assert "true labels disagree" in capsys.readouterr().err
    # by order: different lengths, and shuffled rows (truth no longer lines up)
    assert main(["evaluate", str(a_plain), "--compare",
                 str(_write(tmp_path / "short.csv", [r[2:] for r in b[:-1]], header))]) == 2
    assert "rows" in capsys.readouterr().err
    rev = [r[2:] for r in b][::-1]
    assert main(["evaluate", str(a_plain), "--compare", str(_write(tmp_path / "rev.csv", rev, header))]) == 2
    # by key: a case missing from B
    assert main(["evaluate", str(a_csv), "--compare", str(_write(tmp_path / "miss.csv", b[2:]))]) == 2
    assert "only in A" in capsys.readouterr().err
    assert main(["evaluate", str(a_csv), "--compare", str(tmp_path / "nothing.csv")]) == 2


def test_compare_uses_site_type_when_both_files_have_it(tmp_path, capsys):
    """The training tool's CSVs carry site_type: the AP and LAT rows of one lumbar spine then pair
    by it, whatever their order in either file."""
    a_csv, b = _pair_of_files(tmp_path, n_studies=30)
    a = [r.split(",") for r in a_csv.read_text().splitlines()[1:]]
    header = CSV_HEADER.replace("group,site,", "group,site,site_type,")

    def with_type(rows):
        out, seen = [], set()
        for r in rows:
            if r[1] == "lumbar_spine":
                st = "lumbar_lat" if (r[0], r[1]) in seen else "lumbar_ap"
                seen.add((r[0], r[1]))
            else:
                st = "hip"
            out.append(r[:2] + [st] + r[2:])
        return out

    a_typed, b_typed = with_type(a), with_type(b)
    a_path = _write(tmp_path / "a_t.csv", a_typed, header)
    assert main(["evaluate", str(a_path), "--compare", str(_write(tmp_path / "b_t.csv", b_typed, header)), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)["comparison"]
    assert ref["pairing"] == "group,site,site_type"
    swapped = list(b_typed)
    for i in range(0, len(swapped) - 1, 2):  # swap AP and LAT of every lumbar study in B
        if swapped[i][1] == "lumbar_spine":
            swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    assert main(["evaluate", str(a_path), "--compare", str(_write(tmp_path / "b_s.csv", swapped, header)), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["comparison"]
    assert got["classes"] == ref["classes"] and got["t_score"] == ref["t_score"]

"""`osteoscreen evaluate`'s reports as text: what a person reads in the terminal."""
from __future__ import annotations


def format_comparison(c: dict) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    def pval(p):
        return "n/a" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.4f}")

    lines = [f"paired comparison: A = {c.get('a', 'A')}, B = {c.get('b', 'B')}",
             f"  {c['n_paired']} paired rows (paired by {c['pairing']}); "
             f"{c['skipped_missing_probabilities']} left out of the AUC tests for missing probabilities",
             f"  accuracy A {100 * c['accuracy_a']:.1f} %, B {100 * c['accuracy_b']:.1f} %",
             f"  {'class':<13}{'AUC A':>7}{'AUC B':>7}{'A-B':>8}{'SE':>7}  {'95% CI':<17}{'p':>8}"]
    for label, e in c["classes"].items():
        ci = e.get("ci")
        lines.append(f"  {label:<13}{num(e['auc_a'], '.3f'):>7}{num(e['auc_b'], '.3f'):>7}"
                     f"{num(e['difference'], '+.3f'):>8}{num(e['se'], '.3f'):>7}  "
                     f"{'' if not ci else f'{ci[0]:+.3f} to {ci[1]:+.3f}':<17}{pval(e['p_value']):>8}")
    lines.append("  (DeLong paired test, one vs rest)")
    if "t_score" in c:
        t = c["t_score"]
        lines.append(f"  T-score MAE: A {t['mae_a']:.3f}, B {t['mae_b']:.3f}, A-B {t['difference']:+.3f} "
                     f"(95% CI {t['ci'][0]:+.3f} to {t['ci'][1]:+.3f}, paired t, p {pval(t['p_value'])}, n {t['n']})")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    lines = [f"n = {report['n']}   accuracy = {pct(report['accuracy'])} %"]
    if report["n"] == 0:
        na = report.get("not_assessable", {"n": 0, "reasons": {}})
        return "\n".join(lines + [f"nothing assessable: {na['n']} site(s) refused ("
                                   + (", ".join(f"{k} {v}" for k, v in na["reasons"].items()) or "none") + ")"])
    lines.append(f"{'class':<13}{'sens':>7}{'spec':>7}{'PPV':>7}{'NPV':>7}{'AUC':>8}  AUC 95% CI")
    for label, c in report["classes"].items():
        ci = c.get("auc_ci")
        lines.append(f"{label:<13}{pct(c['sensitivity']):>7}{pct(c['specificity']):>7}{pct(c['ppv']):>7}"
                     f"{pct(c['npv']):>7}{'' if c.get('auc') is None else format(c['auc'], '8.3f'):>8}"
                     f"  {'' if not ci else f'{ci[0]:.3f}-{ci[1]:.3f}'}")
    cm = report["confusion_matrix"]
    lines.append("confusion matrix (rows true, columns predicted): " + ", ".join(cm["labels"]))
    lines += ["  " + " ".join(f"{v:6d}" for v in row) for row in cm["rows_true_cols_predicted"]]
    if "ece" in report:
        lines.append(f"expected calibration error = {report['ece']:.3f}")
    if report.get("skipped_missing_probabilities"):
        lines.append(f"{report['skipped_missing_probabilities']} row(s) without probabilities left out of AUC and ECE")
    if "t_score" in report:
        t = report["t_score"]
        ba = t["bland_altman"]
        lines.append(f"T-score: MAE {t['mae']:.3f}, r {t['pearson_r'] if t['pearson_r'] is None else round(t['pearson_r'], 3)}, "
                     f"Bland-Altman bias {ba['mean_difference']:+.3f} (LoA {ba['loa_lower']:+.2f} to {ba['loa_upper']:+.2f})")
        if "interval" in t:
            iv = t["interval"]
            lines.append(f"prediction intervals: coverage {100 * iv['coverage']:.1f} % (95 % CI "
                         f"{100 * iv['coverage_ci'][0]:.1f}-{100 * iv['coverage_ci'][1]:.1f}) of {iv['n']}, "
                         f"mean width {iv['mean_width']:.2f}"
                         + (f"; {iv['rows_without_interval']} without an interval" if iv["rows_without_interval"] else ""))
    for region, r in report.get("regions", {}).items():
        lines.append(f"{region.replace('_', ' ')} T-score: n {r['n']}, MAE {r['mae']:.3f}, r {r['pearson_r']:.3f}")
    if "not_assessable" in report:
        na = report["not_assessable"]
        reasons = ", ".join(f"{k} {v}" for k, v in na["reasons"].items()) or "none"
        lines.append(f"not assessable (left out above): {na['n']} ({reasons})")
    return "\n".join(lines)

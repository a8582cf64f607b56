"""The model card written beside every checkpoint: what the model is, what it was trained on, how
it did on its hold-out, and what it must not be used for."""
from __future__ import annotations

from pathlib import Path

from ..model.inference import TTA_VIEWS


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _ci(ci) -> str:
    return "" if not ci else f" ({ci[0]:.3f}–{ci[1]:.3f})"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


TITLES = {
    "holdout": "Independent hold-out (phantoms from seeds never used in training, training scanner profiles)",
    "holdout_profile": "Held-out scanner profile (a detector and processing chain never seen in training)",
    "validation": "Validation split (studies held out of training, same generator seeds)",
}
ORDER = ("holdout", "holdout_profile", "validation")


def domain_shift(metrics: dict) -> str:
    """The AUC drop from the hold-out to the held-out scanner profile, if both were measured."""
    try:
        a = metrics["holdout"]["classes"]["osteoporosis"]["auc"]
        b = metrics["holdout_profile"]["classes"]["osteoporosis"]["auc"]
    except KeyError:
        return ""
    return (f"\n**Domain shift**: osteoporosis AUC {a:.3f} on the hold-out, {b:.3f} on the held-out scanner "
            f"profile: a drop of {a - b:+.3f}.\n")


def _metrics_section(title: str, m: dict) -> str:
    rows = []
    for label, c in m["classes"].items():
        auc = "n/a" if c.get("auc") is None else f"{c['auc']:.3f}{_ci(c.get('auc_ci'))}"
        rows.append(f"| {label} | {c['n_true']} | {_pct(c['sensitivity'])} | {_pct(c['specificity'])} | "
                    f"{_pct(c['ppv'])} | {_pct(c['npv'])} | {auc} |")
    t = m.get("t_score", {})
    ba = t.get("bland_altman", {})
    by_type = "".join(f"\n| {k} | {v['n']} | {_pct(v['accuracy'])} | "
                      f"{'n/a' if v['osteoporosis_auc'] is None else format(v['osteoporosis_auc'], '.3f')} | "
                      f"{'n/a' if v['t_mae'] is None else format(v['t_mae'], '.3f')} |"
                      for k, v in m.get("by_site_type", {}).items())
    extra = ""
    for region, r in m.get("regions", {}).items():
        extra += f"\n{region.replace('_', ' ')} T-score (a DXA reporting region within the hip): n = {r['n']}, MAE {r['mae']:.3f}, r {r['pearson_r']:.3f}."
    fused = m.get("lumbar_fused")
    if fused:
        f, a, b = fused["fused"], fused["ap_only"], fused["lat_only"]
        extra += (f"\nLumbar studies with AP and lateral views (n = {fused['n_studies']}): T-score MAE AP {a['t_mae']:.3f}, "
                  f"lateral {b['t_mae']:.3f}, fused {f['t_mae']:.3f}; osteoporosis AUC AP {_num(a['osteoporosis_auc'])}, "
                  f"lateral {_num(b['osteoporosis_auc'])}, fused {_num(f['osteoporosis_auc'])}.")
    imp = m.get("implant_detection")
    if imp:
        extra += (f"\nImplant head (metal in the crop → not assessable): sensitivity {_pct(imp['sensitivity'])} on "
                  f"{imp['n_with_metal']} crops with metal, specificity {_pct(imp['specificity'])} on {imp['n_without']} without.")
    if "out_of_distribution_rate" in m:
        extra += f"\nCrops the out-of-distribution gate would refuse: {_pct(m['out_of_distribution_rate'])}."
    return f"""### {title}
n = {m['n']} site crops; accuracy {_pct(m['accuracy'])}; expected calibration error {m.get('ece', float('nan')):.3f};
T-score MAE {t.get('mae', float('nan')):.3f}, Pearson r {t.get('pearson_r') or float('nan'):.3f},
Bland-Altman bias {ba.get('mean_difference', float('nan')):+.3f} (limits {ba.get('loa_lower', float('nan')):+.2f} to {ba.get('loa_upper', float('nan')):+.2f}).

| class (one vs rest) | n | sensitivity | specificity | PPV | NPV | AUC (95 % CI, DeLong) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{extra}

| site type | n | accuracy | osteoporosis AUC | T-score MAE |
|---|---|---|---|---|{by_type}
"""


def _guidance(cfg: dict, trained: dict) -> str:
    weight = cfg.get("cam_guidance", 0.0)
    if not weight:
        return ""
    return (f"\n- Grad-CAM guidance (weight {weight}, reached linearly over the first "
            f"{cfg.get('cam_guidance_warmup', 0):.0%} of the epochs): on the {trained.get('n_masked', 'n/a')} training crops that came with a "
            "bone mask, the share of the Grad-CAM mass (the map the node draws, for the true class) lying off "
            "bone was added to the loss, so the model learnt to take its evidence from bone. The Grad-CAM "
            "figures of this model are therefore partly a training target: they show that it looks at bone, "
            "measured on phantoms it never saw, not that it found bone unprompted.")


def _init(trained: dict) -> str:
    init = trained.get("init")
    if not init:
        return ""
    return (f"\n- Fine-tuned from {init.get('name')} {init.get('version')} (`{init['checkpoint']}`), "
            f"layers frozen: {init['freeze']}.")


def _calibration(ckpt: dict) -> str:
    """The model's own calibration: what its validation split gave the intervals, out of fold."""
    cal = ckpt.get("calibration")
    after = ((cal or {}).get("report", {}).get("labelled", {}).get("after_cross_validated", {}).get("all"))
    if not after:
        return ("\n## Prediction intervals\nNone: the validation split had too few studies for the model's own "
                "calibration (at least 20); fit one with `osteoscreen calibrate --embed`.\n")
    iv = after.get("interval") or {}
    coverage = f"{100 * iv['coverage']:.1f} %" if iv else "n/a"
    return (f"\n## Prediction intervals (the model's own calibration, {cal['id']})\n"
            f"Fitted on {cal['n'].get('labelled_studies', 0)} labelled studies of its training scanners (`train`: the validation split), cross-fitted by "
            f"study: per-site-type T-score corrections, {cal.get('probabilities')} class probabilities and "
            f"split-conformal intervals. Out of fold: T-score MAE {after['mae']:.3f}, bias {after['bias']:+.3f}, "
            f"90 % interval coverage {coverage}. On another scanner these intervals are not to be trusted: "
            "calibrate on its own images (`osteoscreen calibrate`).\n")


def write_model_card(path: Path, ckpt: dict) -> None:
    trained = ckpt["trained_on"]
    cfg = ckpt["train_config"]
    metrics = ckpt["metrics"]
    names = sorted(metrics, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))
    sections = domain_shift(metrics) + "\n".join(_metrics_section(TITLES.get(name, f"Set {name}"), metrics[name])
                                                 for name in names)
    text = f"""# Model card: {ckpt['name']} {ckpt['version']}

**Intended use: demonstration and software testing only. Not a medical device. Not for diagnosis.**
This model was trained exclusively on osteoscreen's own *synthetic phantoms*. It has never seen a
patient radiograph or a DXA measurement; its figures below describe phantoms, not people, and say
nothing about clinical accuracy. A hospital must retrain and evaluate on its own DXA-matched
radiographs (`osteoscreen train`, `osteoscreen evaluate`) before drawing any conclusion.

## What it does
Per site crop (each proximal femur of a pelvis/hip AP radiograph; L1–L4 on lumbar AP or lateral
views) it outputs calibrated probabilities of the WHO categories normal / osteopenia / osteoporosis
and an estimated T-score. Inputs: a 128 × 128 crop normalised with the 2σ z-transform, age, sex and
BMI from the DICOM header with explicit missing indicators, and the site type.

## Architecture
OsteoNet: residual CNN (widths {ckpt['arch']['widths']}) with a non-local (self-attention) block,
covariates joined after pooling, a 3-class head and a T-score head (outputs: site{''.join(', ' + r for r in ckpt.get('t_outputs', []))});
temperature-scaled probabilities (T = {ckpt['temperature']:.3f}); test-time augmentation
{f'on ({len(TTA_VIEWS)} views, logits averaged)' if ckpt.get('tta') else 'off'};
Grad-CAM on the 16 × 16 map after the non-local block. Out-of-distribution gate: Mahalanobis distance of the pooled
features to the training crops of the same site type{' (thresholds ' + ', '.join(f"{v['threshold']:.1f}" for v in ckpt.get('ood', {}).values()) + ')' if ckpt.get('ood') else ' (not fitted)'}.

## Training data
- Manifests: {', '.join(f'`{m}`' for m in trained['manifests'])}
- Site crops: {trained['n_train']} for training, {trained['n_val']} for validation (split by study, seed {cfg['seed']})
- Images the localiser could not use: {trained['extraction_problems']}
- Epochs {cfg['epochs']}, batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, one-cycle schedule; augmentation:
  vendor processing (monotone LUT incl. S-curves, dynamic-range compression, edge enhancement, blur,
  grid-line residue), gamma (exposure), 2σ windowing jitter, small rotation/scale/shift, noise; covariates set to
  "missing" at random ({cfg.get('covariate_dropout', 0)} each) so that absent header values are handled.{_guidance(cfg, trained)}{_init(trained)}

## Results on synthetic phantoms
{sections}
Plots (ROC, calibration, Bland-Altman) are in `plots/` beside the training output.
{_calibration(ckpt)}
## Limitations
- Synthetic phantoms only: real anatomy, pathology, positioning, implants and scanners differ.
- The published models this design follows lost up to 0.17 AUC on another hospital's images;
  expect at least that on real data.
- Never use a "normal" result to rule out osteoporosis.

Created {ckpt['created']}.
"""
    path.write_text(text)

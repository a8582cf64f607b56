"""The model card written beside every checkpoint: what the model is, what it was trained on, how
it did on its hold-out, and what it must not be used for."""
from __future__ import annotations

from pathlib import Path


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _ci(ci) -> str:
    return "" if not ci else f" ({ci[0]:.3f}–{ci[1]:.3f})"


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
    return f"""### {title}
n = {m['n']} site crops; accuracy {_pct(m['accuracy'])}; expected calibration error {m.get('ece', float('nan')):.3f};
T-score MAE {t.get('mae', float('nan')):.3f}, Pearson r {t.get('pearson_r') or float('nan'):.3f},
Bland-Altman bias {ba.get('mean_difference', float('nan')):+.3f} (limits {ba.get('loa_lower', float('nan')):+.2f} to {ba.get('loa_upper', float('nan')):+.2f}).

| class (one vs rest) | n | sensitivity | specificity | PPV | NPV | AUC (95 % CI, DeLong) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

| site type | n | accuracy | osteoporosis AUC | T-score MAE |
|---|---|---|---|---|{by_type}
"""


def write_model_card(path: Path, ckpt: dict) -> None:
    trained = ckpt["trained_on"]
    cfg = ckpt["train_config"]
    sections = "\n".join(_metrics_section(
        "Independent hold-out (phantoms from a seed never used in training)" if name == "holdout"
        else "Validation split (studies held out of training, same generator seed)", m)
        for name, m in sorted(ckpt["metrics"].items(), key=lambda kv: kv[0] != "holdout"))
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
covariates joined after pooling, a 3-class head and a T-score head; temperature-scaled
probabilities (T = {ckpt['temperature']:.3f}); Grad-CAM on the last feature map.

## Training data
- Manifests: {', '.join(f'`{m}`' for m in trained['manifests'])}
- Site crops: {trained['n_train']} for training, {trained['n_val']} for validation (split by study, seed {cfg['seed']})
- Images the localiser could not use: {trained['extraction_problems']}
- Epochs {cfg['epochs']}, batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, one-cycle schedule; augmentation:
  gamma (exposure), 2σ windowing jitter, small rotation/scale/shift, noise.

## Results on synthetic phantoms
{sections}
Plots (ROC, calibration, Bland-Altman) are in `plots/` beside the training output.

## Limitations
- Synthetic phantoms only: real anatomy, pathology, positioning, implants and scanners differ.
- The published models this design follows lost up to 0.17 AUC on another hospital's images;
  expect at least that on real data.
- Never use a "normal" result to rule out osteoporosis.

Created {ckpt['created']}.
"""
    path.write_text(text)

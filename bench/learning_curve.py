"""How many local cases does a hospital need? A learning curve on the held-out scanner profile synthD.

For n = 25, 50, 100, 200, 400 DXA-labelled synthD studies (drawn, seeded, from the calibration pool
of scripts/calibration_study.sh), three ways of adapting the shipped model:
- **calibrate**: `osteoscreen calibrate` on the n labelled studies plus 200 unlabelled ones;
- **fine-tune**: `osteoscreen train --init <shipped> --freeze early` on the n studies (15 epochs, lr 5e-4);
- **scratch**: `osteoscreen train` on the n studies alone (30 epochs).
Each is scored per site crop on the 225 synthD evaluation studies (never used to adapt) through the
model's own predict (test-time augmentation, gate, calibration): refusals, T-score MAE, osteoporosis
AUC and 90 % interval coverage of the crops it answers. A trained model's intervals come from its
validation split, which has too few studies below n = 100 (no interval: coverage n/a).

    python -m bench.learning_curve [--build build/cal] [--sizes 25,50,100,200,400] [--quick]
                                   [--methods calibrate,fine-tune,scratch]

With --methods naming fewer than all three, only those are measured again and the others' figures
are kept from the existing JSON (e.g. after a change to `calibrate` alone).

Writes docs/benchmarks/learning-curve.json and .png; docs/CALIBRATION.md quotes them. Phantoms only.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _samples(build: Path, name: str, parts: list[str], unlabelled: bool):
    from osteoscreen.training.dataset import Samples, extract_samples
    cache = build / f"{name}.samples.npz"
    if cache.is_file():
        return Samples.load(cache)
    samples, _ = extract_samples([build / p / "manifest.csv" for p in parts], progress=True, unlabelled=unlabelled)
    samples.save(cache)
    return samples


def _by_studies(s, studies):
    keep = set(studies)
    return s.subset(np.where([g in keep for g in s.groups])[0])


def score_crops(model, s) -> dict:
    """Per-crop figures of a model (under its calibration) on labelled samples."""
    from sklearn.metrics import roc_auc_score
    from osteoscreen.model.calibration import SITE_TYPE_NAMES
    from osteoscreen.pipeline.crops import normalise
    crops = np.stack([normalise(c) for c in s.crops])
    pred = model.predict(crops, s.covariates, s.site_types, images=s.images, scenes=s.scenes)
    answered = ~pred.out_of_distribution()
    t, truth = pred.t_scores[answered], s.t_scores[answered].astype(float)
    out = {"n": int(len(s)), "refused": float(1 - answered.mean())}
    if answered.sum() < 10:
        return out
    osteo = truth <= -2.5
    out["mae"] = float(np.abs(t - truth).mean())
    out["bias"] = float((t - truth).mean())
    out["auc"] = float(roc_auc_score(osteo, pred.probabilities[answered, 2])) if 0 < osteo.sum() < len(osteo) else None
    cal = model.calibration
    if cal is not None:
        iv = cal.intervals(t, [SITE_TYPE_NAMES[k] for k in s.site_types[answered]], model.interval_level)
        ok = np.isfinite(iv).all(1)
        if ok.any():
            out["coverage"] = float(((iv[ok, 0] <= truth[ok]) & (truth[ok] <= iv[ok, 1])).mean())
    return out


METHODS = ("calibrate", "fine-tune", "scratch")


def run(build: Path, sizes: list[int], quick: bool, save=None, methods=METHODS, previous: dict | None = None) -> dict:
    """save(results), if given, is called after each n: a long run keeps what it has measured.
    Methods not in `methods` keep their figures from `previous`."""
    import torch
    from osteoscreen.config import DEFAULT_MODEL
    from osteoscreen.model.inference import LoadedModel
    from osteoscreen.training.calibrate import calibrate
    from osteoscreen.training.train import TrainConfig, train
    torch.set_num_threads(2)
    pool = _samples(build, "pool", ["pool/hip", "pool/lumbar"], unlabelled=False)
    evaluation = _samples(build, "profile", ["profile/hip", "profile/lumbar"], unlabelled=False)
    studies = sorted(set(pool.groups))
    rng = np.random.default_rng(14)
    rng.shuffle(studies)
    unlabelled_pool = studies[max(sizes):max(sizes) + 200]
    base = LoadedModel(DEFAULT_MODEL, "cpu")
    kept = (previous or {}).get("methods", {})
    results = {"sizes": sizes, "evaluation_crops": len(evaluation), "before": score_crops(base, evaluation),
               "methods": {m: ({} if m in methods else kept.get(m, {})) for m in METHODS},
               "measured": {m: (time.strftime("%Y-%m-%d") if m in methods else (previous or {}).get("measured", {}).get(m))
                            for m in METHODS}}
    epochs = {"fine-tune": 3 if quick else 15, "scratch": 4 if quick else 30}
    for n in sizes:
        labelled = _by_studies(pool, studies[:n])
        unl = _by_studies(pool, unlabelled_pool)
        unl.t_scores[:] = np.nan
        both = type(pool)(**{k: np.concatenate([getattr(labelled, k), getattr(unl, k)]) for k in labelled.__dict__})
        if "calibrate" in methods:
            t0 = time.time()
            cal = calibrate([], DEFAULT_MODEL, samples=both, progress=False)
            results["methods"]["calibrate"][n] = {**score_crops(base.with_calibration(cal), evaluation),
                                                  "seconds": time.time() - t0}
        for method in [m for m in ("fine-tune", "scratch") if m in methods]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                labelled.save(out / "samples.npz")  # train reads its crop cache on --resume
                cfg = TrainConfig(epochs=epochs[method], batch_size=32, lr=5e-4 if method == "fine-tune" else 2e-3,
                                  t_loss_weight=3.0, seed=0, device="cpu",
                                  init=str(DEFAULT_MODEL) if method == "fine-tune" else None,
                                  freeze="early" if method == "fine-tune" else "none")
                t0 = time.time()
                path = train([], out, cfg, resume=True, progress=False)
                results["methods"][method][n] = {**score_crops(LoadedModel(path, "cpu"), evaluation),
                                                 "seconds": time.time() - t0}
        print(f"n = {n}: " + "; ".join(f"{m} {results['methods'][m][n]}" for m in methods), flush=True)
        if save is not None:
            save(results)
    return results


def table(results: dict) -> str:
    """The figures as a Markdown table (what docs/CALIBRATION.md quotes)."""
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)
    b = results["before"]
    lines = ["| labelled studies | method | refused | T-score MAE | bias | osteoporosis AUC | 90 % coverage | minutes |",
             "|---|---|---|---|---|---|---|---|",
             f"| 0 | shipped model, no site calibration | {f(b.get('refused'), '.1%')} | {f(b.get('mae'), '.3f')} | "
             f"{f(b.get('bias'), '+.3f')} | {f(b.get('auc'), '.3f')} | {f(b.get('coverage'), '.1%')} | |"]
    sizes = sorted({int(n) for by_n in results["methods"].values() for n in by_n})
    for n in sizes:
        for method, by_n in results["methods"].items():
            r = {int(k): v for k, v in by_n.items()}.get(n)
            if r:
                lines.append(f"| {n} | {method} | {f(r.get('refused'), '.1%')} | {f(r.get('mae'), '.3f')} | "
                             f"{f(r.get('bias'), '+.3f')} | {f(r.get('auc'), '.3f')} | {f(r.get('coverage'), '.1%')} | "
                             f"{r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, key, label in zip(axes, ("refused", "mae", "auc", "coverage"),
                              ("share of crops refused (out of distribution)", "T-score MAE (crops answered)",
                               "osteoporosis AUC", "90 % interval coverage")):
        for method, by_n in results["methods"].items():
            by_n = {int(n): v for n, v in by_n.items()}  # JSON keys are text
            xs = [n for n in sorted(by_n) if by_n[n].get(key) is not None]
            ax.plot(xs, [by_n[n][key] for n in xs], marker="o", label=method)
        before = results["before"].get(key)
        if before is not None:
            ax.axhline(before, color="grey", linestyle=":", label="shipped model, no site calibration")
        if key == "coverage":
            ax.axhspan(0.87, 0.93, color="green", alpha=0.1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(results["sizes"], [str(n) for n in results["sizes"]])
        ax.set_xlabel("DXA-labelled synthD studies")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("Adapting to a new scanner (synthetic phantoms, profile synthD)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="build/cal", help="folder of scripts/calibration_study.sh's phantoms")
    p.add_argument("--sizes", default="25,50,100,200,400")
    p.add_argument("--quick", action="store_true", help="few epochs: a check that it runs, not figures")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="measure only these (comma-separated); the others' figures are kept from OUT.json")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "learning-curve"))
    p.add_argument("--from-json", action="store_true", help="only draw the plot again from OUT.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        results = json.loads(out.with_suffix(".json").read_text())
        plot(results, out.with_suffix(".png"))
        print(table(results))
        return 0
    build = Path(args.build)
    if not (build / "pool" / "hip" / "manifest.csv").is_file():
        print(f"{build}: run scripts/calibration_study.sh first (it makes the synthD pool)", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results):
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        print(f"--methods: choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else None
    run(build, [int(n) for n in args.sizes.split(",")], args.quick, save, methods, previous)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

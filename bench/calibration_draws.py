"""How much does one draw of labelled cases move a site calibration? `calibrate` on several seeded
draws of the synthD pool, each scored the way the node reports.

`scripts/calibration_study.sh` measures one draw (seed 14) of 100 labelled + 200 unlabelled studies
through the whole pipeline. One draw of 100 studies is a small sample: which studies a hospital
happens to label moves the MAE by about ±0.01. This benchmark repeats that calibration for 100
draws (seeds 1-100, 14 first: the same draw as the study script's) and scores each:
- on the **evaluation set** (the 225 synthD studies of seeds 9101/9102 the study script evaluates on,
  never used to calibrate);
- on the **pool's other studies** (those the draw left out, neither labelled nor unlabelled), on
  which the feature correction's defaults were chosen (docs/CALIBRATION.md).
Figures are node-level, as `score` + `evaluate` give them: each hip one site, each lumbar study one
site (the mean of its AP and lateral estimates, with the fused interval), on the sites the gate
answers. The estimates are the model's own under the calibration (test-time augmentation, gate,
image pairing of the hips), not the DICOM pipeline's, which is why the seed-14 row can differ from
the study script's in the third decimal. The network runs once on the pool and once on the
evaluation set; each draw's `calibrate` and scores re-combine those outputs (`calibrate(outputs=)`,
`node_figures_from_outputs`), which give the figures of a forward pass per draw to 1e-5.

    python -m bench.calibration_draws [--build build/cal] [--seeds 14,1,2,…] [--labelled 100]

About 15 seconds a draw on 2 cores (25 minutes for the 100). Writes docs/benchmarks/calibration-draws.json (each draw, the
mean and its standard error); docs/CALIBRATION.md quotes it. Phantoms only.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
UNLABELLED = 200
SEEDS = (14, *(s for s in range(1, 101) if s != 14))


def draw_indices(pool, seed: int, n_labelled: int, n_unlabelled: int = UNLABELLED):
    """The study script's draw: the pool's studies sorted, shuffled by random.Random(seed); the first
    n_labelled keep their T-scores, the next n_unlabelled lose them. Returns the rows drawn, whether
    each is labelled, and the rows left out."""
    studies = sorted(set(pool.groups))
    random.Random(seed).shuffle(studies)
    labelled, unlabelled = set(studies[:n_labelled]), set(studies[n_labelled:n_labelled + n_unlabelled])
    used = np.array([g in labelled or g in unlabelled for g in pool.groups])
    rows = np.where(used)[0]
    return rows, np.array([pool.groups[i] in labelled for i in rows], dtype=bool), np.where(~used)[0]


def draw(pool, seed: int, n_labelled: int, n_unlabelled: int = UNLABELLED):
    """draw_indices' samples: (those drawn, unlabelled ones without T-scores; the rest)."""
    return _drawn_samples(pool, *draw_indices(pool, seed, n_labelled, n_unlabelled))


def _drawn_samples(pool, rows, labelled, rest):
    both = pool.subset(rows)
    both.t_scores = np.where(labelled, both.t_scores, np.nan).astype(np.float32)
    return both, pool.subset(rest)


def node_figures(model, s) -> dict:
    """Node-level MAE, bias and 90 % coverage of a model under its calibration on labelled samples,
    from the model's own predict: hips one site each, a lumbar study's AP and lateral crops one fused
    site (their mean)."""
    from osteoscreen.pipeline.crops import normalise
    pred = model.predict(np.stack([normalise(c) for c in s.crops]), s.covariates, s.site_types, images=s.images,
                         scenes=s.scenes)
    return _figures(pred.t_scores, ~pred.out_of_distribution(), s, model.calibration, model.interval_level)


def node_figures_from_outputs(model, out: dict, s) -> dict:
    """node_figures without a forward pass: `out` holds the uncalibrated network's outputs on `s`
    (training.calibrate.network_outputs) and `model` is a calibrated view; the estimates are what its
    predict gives (the calibration's corrections on the same feature sets, its gate), which
    tests/test_calibration.py checks."""
    from osteoscreen.training.calibrate import _refused
    t = model.calibration.correct(out["t"], s.site_types, features=out["feature_sets"])
    return _figures(t, ~_refused(out["features"], s.site_types, model.ood), s, model.calibration,
                    model.interval_level)


def _figures(t, answered, s, cal, level) -> dict:
    from osteoscreen.model.calibration import SITE_TYPE_NAMES
    from osteoscreen.training.recalibrate import fused_pairs
    truth = s.t_scores.astype(np.float64)
    intervals = cal.intervals(t, [SITE_TYPE_NAMES[k] for k in s.site_types], level)
    hips = np.where((s.site_types == 0) & answered)[0]
    pairs = np.array([(a, b) for a, b in fused_pairs(s.groups, s.site_types) if answered[a] and answered[b]],
                     dtype=int).reshape(-1, 2)
    ap, lat = pairs.T
    fused = (t[ap] + t[lat]) / 2
    est, true = np.concatenate([t[hips], fused]), np.concatenate([truth[hips], truth[ap]])
    bounds = np.concatenate([intervals[hips], cal.intervals(fused, ["lumbar_fused"] * len(ap), level)])
    err = est - true
    n_hips = len(hips)
    inside = (bounds[:, 0] <= true) & (true <= bounds[:, 1])
    return {"sites": int(len(err)), "refused": float(1 - answered.mean()), "mae": float(np.abs(err).mean()),
            "bias": float(err.mean()), "coverage": float(inside.mean()),
            "hip_mae": float(np.abs(err[:n_hips]).mean()), "hip_coverage": float(inside[:n_hips].mean()),
            "lumbar_mae": float(np.abs(err[n_hips:]).mean()) if len(err) > n_hips else None,
            "lumbar_coverage": float(inside[n_hips:].mean()) if len(err) > n_hips else None}


def run(build: Path, seeds: list[int], n_labelled: int, save=None) -> dict:
    import torch
    from bench.learning_curve import _samples
    from osteoscreen.config import DEFAULT_MODEL
    from osteoscreen.model.inference import LoadedModel
    from osteoscreen.training.calibrate import calibrate, network_outputs, subset_outputs
    torch.set_num_threads(2)
    pool = _samples(build, "pool", ["pool/hip", "pool/lumbar"], unlabelled=False)
    evaluation = _samples(build, "profile", ["profile/hip", "profile/lumbar"], unlabelled=False)
    pool, evaluation = (s.subset(np.where(s.implants == 0)[0]) for s in (pool, evaluation))  # as calibrate and the node
    base = LoadedModel(DEFAULT_MODEL, "cpu")
    # the network's outputs once: a draw's calibration and scores only re-combine them
    pool_out, evaluation_out = network_outputs(base, pool), network_outputs(base, evaluation)
    results = {"measured": time.strftime("%Y-%m-%d"), "labelled": n_labelled, "unlabelled": UNLABELLED,
               "seeds": list(seeds), "draws": {}}
    for seed in seeds:
        rows, labelled, left_out = draw_indices(pool, seed, n_labelled)
        both, rest = _drawn_samples(pool, rows, labelled, left_out)
        t0 = time.time()
        cal = calibrate([], DEFAULT_MODEL, samples=both, progress=False, seed=0,
                        outputs=subset_outputs(pool_out, rows, both))
        model = base.with_calibration(cal)
        results["draws"][seed] = {"evaluation": node_figures_from_outputs(model, evaluation_out, evaluation),
                                  "pool_rest": node_figures_from_outputs(model, subset_outputs(pool_out, left_out, rest), rest),
                                  "feature_correction": {k: v["used"] for k, v in
                                                         cal.report["labelled"]["feature_correction"].items()},
                                  "seconds": time.time() - t0}
        r = results["draws"][seed]
        print(f"seed {seed}: evaluation MAE {r['evaluation']['mae']:.3f} coverage {r['evaluation']['coverage']:.1%}; "
              f"pool's other studies MAE {r['pool_rest']['mae']:.3f} coverage {r['pool_rest']['coverage']:.1%}", flush=True)
        draws = results["draws"].values()
        results["mean"] = {part: {k: float(np.mean([d[part][k] for d in draws]))
                                  for k in ("mae", "bias", "coverage", "hip_mae", "lumbar_mae", "refused")}
                           for part in ("evaluation", "pool_rest")}
        if len(draws) > 1:
            results["standard_error"] = {part: {k: float(np.std([d[part][k] for d in draws], ddof=1) / np.sqrt(len(draws)))
                                                for k in ("mae", "coverage")} for part in ("evaluation", "pool_rest")}
        if save is not None:
            save(results)
    return results


def table(results: dict) -> str:
    """The figures as a Markdown table (what docs/CALIBRATION.md quotes)."""
    lines = ["| draw (seed) | evaluation set: MAE | hips | fused lumbar | coverage | pool's other studies: MAE | coverage |",
             "|---|---|---|---|---|---|---|"]
    rows = [(str(seed), d) for seed, d in results["draws"].items()] + [("mean", {
        "evaluation": results["mean"]["evaluation"], "pool_rest": results["mean"]["pool_rest"]})]
    for name, d in rows:
        e, p = d["evaluation"], d["pool_rest"]
        lines.append(f"| {name} | {e['mae']:.3f} | {e['hip_mae']:.3f} | {e['lumbar_mae']:.3f} | {e['coverage']:.1%} | "
                     f"{p['mae']:.3f} | {p['coverage']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="build/cal", help="folder of scripts/calibration_study.sh's phantoms")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--labelled", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "calibration-draws.json"))
    args = p.parse_args(argv)
    build = Path(args.build)
    if not (build / "pool" / "hip" / "manifest.csv").is_file():
        print(f"{build}: run scripts/calibration_study.sh first (it makes the synthD pool)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = run(build, [int(s) for s in args.seeds.split(",")], args.labelled,
                  save=lambda r: out.write_text(json.dumps(r, indent=1)))
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often does the drift watch cry wolf, and how soon does it see a real change? (phantoms only)

Screens phantom studies through the node's own pipeline (pipeline.screen_study with the shipped
model, as the worker does) and feeds what the node would record (equipment.acquisition of each
image, each site's finding) to the drift watch's own statistics (monitor.signals):

- **stable stream**: 300 studies from the training profiles (synthA/B/C: three scanner groups; two
  pelvis for each lumbar spine study), in arrival order, with a check after every 10th study of a group;
- **false alarms**: 900 more stable studies; per group, its first window against each later disjoint
  window in arrival order, and random disjoint reference and recent windows drawn from its stable
  studies (200 draws per group and window size);
- **detection**: synthD's processing chain (and, subtler, synthB's) behind synthA's Manufacturer and
  Model header, arriving after synthA's stable studies: how many changed studies until `drift`, over
  50 random orders of the changed studies, checking after each one;
- the same with the acquisition values of synthA studies put on the changed ones (the processing
  alone: only the images' appearance, the outputs and the gate can show it);
- for window sizes 20, 30 and 50 studies, at family-wise alpha 0.05.

    python -m bench.drift [--build build/drift] [--quick]

Writes docs/benchmarks/drift.json; docs/MONITORING.md quotes it. The screened studies are cached in
BUILD/studies.json, so a second run only recomputes the statistics.
"""
from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = (20, 30, 50)
ALPHA = 0.05
SYNTH_A_HEADER = {"Manufacturer": "Osteoscreen Phantom Works", "ManufacturerModelName": "Lumen FP-43",
                  "StationName": "PHANTOM-A"}
_MODEL = None


def _init() -> None:
    global _MODEL
    import torch
    from osteoscreen.config import DEFAULT_MODEL
    from osteoscreen.model.inference import LoadedModel
    torch.set_num_threads(1)
    _MODEL = LoadedModel(DEFAULT_MODEL, "cpu")


def _screen(job: tuple[str, str, int, bool]) -> dict:
    """One phantom study → what the node records of it (no pixels)."""
    from osteoscreen.equipment import acquisition, scanner_key
    from osteoscreen.pipeline.screen import StudyImage, screen_study
    from osteoscreen.synth import make_study
    profile, kind, seed, as_a = job
    images = make_study(kind, np.random.default_rng(seed), profile=profile, patient_index=seed)
    for im in images:
        if as_a:  # another processing chain behind synthA's header
            for keyword, value in SYNTH_A_HEADER.items():
                setattr(im.dataset, keyword, value)
    results = screen_study([StudyImage(im.dataset, kind, im.view) for im in images], _MODEL, heatmaps=False)
    return {"profile": profile, "kind": kind, "seed": seed, "group": scanner_key(images[0].dataset),
            "images": [acquisition(im.dataset) for im in images],
            "sites": [{"assessable": f.assessable, "reason": f.reason, "probabilities": f.probabilities,
                       "t_score": f.t_score, "ood_score": f.ood_score} for r in results for f in r.sites]}


def _jobs(quick: bool) -> dict[str, list]:
    rng = np.random.default_rng(2026)
    n_stable, n_pool, n_change = (90, 90, 30) if quick else (300, 900, 100)

    def stable(n, seed0):
        return [(str(rng.choice(["synthA", "synthB", "synthC"])), "lumbar" if rng.random() < 1 / 3 else "hip",
                 seed0 + i, False) for i in range(n)]
    change = [("synthD", "lumbar" if rng.random() < 1 / 3 else "hip", 72_000 + i, True) for i in range(n_change)]
    return {"stable": stable(n_stable, 71_000), "pool": stable(n_pool, 73_000), "synthD_as_A": change}


def screen_all(build: Path, quick: bool) -> dict[str, list[dict]]:
    cache = build / "studies.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from tqdm import tqdm
    build.mkdir(parents=True, exist_ok=True)
    out = {}
    with Pool(2, initializer=_init) as pool:
        for name, jobs in _jobs(quick).items():
            out[name] = list(tqdm(pool.imap(_screen, jobs), total=len(jobs), desc=f"screening {name}", unit="study"))
    cache.write_text(json.dumps(out))
    return out


def _window(studies: list[dict]):
    from osteoscreen.monitor.signals import SiteRecord, Window
    w = Window()
    for s in studies:
        w.add(s["images"], [SiteRecord(**site) for site in s["sites"]])
    return w


def _check(reference: list[dict], recent: list[dict]) -> list[str]:
    from osteoscreen.monitor.signals import compare, moved
    return moved(compare(_window(reference), _window(recent)), ALPHA)


def stable_stream(stable: list[dict], w: int) -> dict:
    """Checks as the node makes them: after every 10th study of a group, once it has two windows."""
    seen: dict[str, list[dict]] = {}
    checks, alarms, signals = 0, 0, []
    for s in stable:
        g = seen.setdefault(s["group"], [])
        g.append(s)
        if len(g) >= 2 * w and len(g) % 10 == 0:
            checks += 1
            moved = _check(g[:w], g[-w:])
            alarms += bool(moved)
            signals += moved
    return {"checks": checks, "alarms": alarms, "signals": sorted(set(signals)),
            "studies_per_group": {k: len(v) for k, v in seen.items()}}


def sequential(stable: list[dict], w: int) -> dict:
    """Per group, its first window as reference and each later disjoint window in arrival order."""
    by_group: dict[str, list[dict]] = {}
    for s in stable:
        by_group.setdefault(s["group"], []).append(s)
    n, alarms = 0, 0
    for studies in by_group.values():
        for start in range(w, len(studies) - w + 1, w):
            n += 1
            alarms += bool(_check(studies[:w], studies[start:start + w]))
    return {"windows": n, "alarms": alarms, "rate": alarms / n if n else None}


def false_alarms(stable: list[dict], w: int, draws: int, rng) -> dict:
    by_group: dict[str, list[dict]] = {}
    for s in stable:
        by_group.setdefault(s["group"], []).append(s)
    alarms, n, signals = 0, 0, {}
    for studies in by_group.values():
        if len(studies) < 2 * w:
            continue
        for _ in range(draws):
            idx = rng.permutation(len(studies))
            moved = _check([studies[i] for i in idx[:w]], [studies[i] for i in idx[w:2 * w]])
            n += 1
            alarms += bool(moved)
            for m in moved:
                signals[m] = signals.get(m, 0) + 1
    return {"windows": n, "alarms": alarms, "rate": alarms / n if n else None, "signals": signals}


def detection(before: list[dict], changed: list[dict], w: int, orders: int, rng) -> dict:
    """Changed studies until the first drift (None: not within all of them), checking after each."""
    delays, named = [], {}
    for _ in range(orders):
        ref_idx = rng.permutation(len(before))
        reference = [before[i] for i in ref_idx[:w]]
        lead = [before[i] for i in ref_idx[w:2 * w]]  # the recent window before the change
        order = [changed[i] for i in rng.permutation(len(changed))]
        delay = None
        for k in range(1, len(order) + 1):
            recent = (lead + order[:k])[-w:]
            moved = _check(reference, recent)
            if moved:
                delay = k
                for m in moved:
                    named[m] = named.get(m, 0) + 1
                break
        delays.append(delay)
    found = [d for d in delays if d is not None]
    return {"orders": orders, "detected": len(found), "median_studies": float(np.median(found)) if found else None,
            "max_studies": max(found) if found else None, "signals_first_named": named}


def masked(changed: list[dict], donors: list[dict], rng) -> list[dict]:
    """The changed studies with the acquisition values of randomly drawn donor studies."""
    return [dict(s, images=donors[int(rng.integers(len(donors)))]["images"]) for s in changed]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", type=Path, default=ROOT / "build" / "drift")
    p.add_argument("--quick", action="store_true", help="fewer studies and draws (a smoke run)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "drift.json")
    args = p.parse_args(argv)
    data = screen_all(args.build, args.quick)
    stable, every = data["stable"], data["stable"] + data["pool"]
    a = [s for s in every if s["profile"] == "synthA"]
    b_as_a = [dict(s, group=a[0]["group"], images=[dict(im, StationName="PHANTOM-A") for im in s["images"]])
              for s in every if s["profile"] == "synthB"]
    rng = np.random.default_rng(7)
    draws, orders = (40, 10) if args.quick else (200, 50)
    report = {"alpha": ALPHA, "studies": {k: len(v) for k, v in data.items()}, "windows": {}}
    for w in WINDOWS:
        entry = {"stable_stream": stable_stream(stable, w), "sequential_windows": sequential(every, w),
                 "false_alarms": false_alarms(every, w, draws, rng)}
        if len(a) >= 2 * w:
            entry["synthD_behind_synthA"] = detection(a, data["synthD_as_A"], w, orders, rng)
            entry["synthB_behind_synthA"] = detection(a, b_as_a, w, orders, rng)
            # the processing alone: the changed studies carry synthA studies' acquisition values, so
            # only appearance, outputs and the gate can tell
            entry["synthD_processing_only"] = detection(a, masked(data["synthD_as_A"], a, rng), w, orders, rng)
            entry["synthB_processing_only"] = detection(a, masked(b_as_a, a, rng), w, orders, rng)
        report["windows"][str(w)] = entry
        print(f"window {w}: stable stream {entry['stable_stream']['alarms']}/{entry['stable_stream']['checks']} "
              f"checks alarmed; sequential windows {entry['sequential_windows']['alarms']}/"
              f"{entry['sequential_windows']['windows']}; random windows "
              f"{entry['false_alarms']['alarms']}/{entry['false_alarms']['windows']}",
              *(f"; {k}: detected {v['detected']}/{v['orders']}, median {v['median_studies']}, max {v['max_studies']}"
                for k, v in entry.items() if k.endswith(("synthA", "only"))))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end CPU time for one pelvis AP radiograph, stage by stage, against DCMTK's converter.

    python benchmarks/bench_pelvis.py [--repeats 5] [--seed 0] [--model PATH] [--json OUT.json]

One synthetic pelvis AP (`synth.make_study("hip")`, full detector resolution) is written to a
temporary folder twice: uncompressed (Explicit VR Little Endian) and as a JPEG 2000 lossless copy
(pydicom's `compress` through pylibjpeg-openjpeg; DCMTK has no JPEG 2000 codec). The model is
loaded once and the localiser's atlases are built, then each file is scored once unmeasured (warm)
and `--repeats` times measured.

Two measurements per file:
- *stages*: the pipeline's steps called one by one, as `pipeline.screen.screen_study` chains them:
  read (dcmread), decode (pixel_array), LUTs (modality + VOI + [0, 1] + MONOCHROME1), resample to
  the working grid, localise, quality gates (the metal mask, where the pipeline has them), crop
  (+ normalise, covariates), model + Grad-CAM, CAM to display grid (paste + resample), SR build
  (+ encode), heatmap SC build (+ encode). Median per stage.
- *end to end*: the real calls with nothing taken apart: dcmread → screen_study(heatmaps=True) →
  build_sr → build_heatmap, both objects encoded to bytes in memory. Its median is "our total";
  whatever the stage list misses (e.g. quality gates) shows as the gap to the sum of stage medians.

Reference, timed the same way on the same file (a new process per run, as a user runs it):
`dcmj2pnm +Wi 1 +on` (DICOM → 8-bit PNG with the file's VOI window) and `dcmj2pnm +Wi 1` (→ PNM).
DCMTK cannot decode JPEG 2000, so for that copy the reference is OpenJPEG's `opj_decompress`
(codestream → PGM) where it is installed; the ratio to the uncompressed DCMTK run is given as well.
Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.encaps import generate_fragmented_frames  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless  # noqa: E402

from osteoscreen.config import Settings, DEFAULT_MODEL  # noqa: E402
from osteoscreen.model.inference import LoadedModel  # noqa: E402
from osteoscreen.pipeline import localize  # noqa: E402
from osteoscreen.pipeline.covariates import read_covariates  # noqa: E402
from osteoscreen.pipeline.crops import normalise, paste_map, site_type, square_crop  # noqa: E402
from osteoscreen.pipeline.dicom_io import WORKING_SPACING_MM, pixel_spacing, resample  # noqa: E402
from osteoscreen.pipeline.screen import (DISPLAY_MAX_SIDE, EXPECTED_SITES, StudyImage,  # noqa: E402
                                         patient_left_on_image_right, screen_study)
from osteoscreen.reports.heatmap import build_heatmap  # noqa: E402
from osteoscreen.reports.sr import build_sr  # noqa: E402
from osteoscreen.synth import make_study  # noqa: E402
from osteoscreen.synth.dicom_writer import write_dataset  # noqa: E402

from osteoscreen.pipeline.quality import MetalDetector  # noqa: E402

STAGES = ("read", "decode", "luts", "resample", "localise", "quality_gates",
          "crop", "model_gradcam", "cam_to_display", "sr_build", "heatmap_build")


def _encode(ds) -> int:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.tell()


class _Clock:
    def __init__(self):
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - self._t)
        self._t = now


def staged(path: Path, model: LoadedModel, result_for_reports) -> dict[str, float]:
    """One pass through the pipeline's steps, each timed (seconds)."""
    clock = _Clock()
    ds = dcmread(path)
    clock.lap("read")
    stored = ds.pixel_array
    clock.lap("decode")
    values = apply_modality_lut(stored, ds).astype(np.float32)  # as dicom_io.display_values
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        values = apply_voi_lut(values, ds, index=0).astype(np.float32)
    lo, hi = np.percentile(values[::4, ::4], [0.1, 99.9])
    values = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        values = 1.0 - values
    clock.lap("luts")
    (row_mm, col_mm), _ = pixel_spacing(ds)
    spacing = (row_mm + col_mm) / 2.0
    scale = min(1.0, spacing / WORKING_SPACING_MM)
    pixels = resample(values, scale) if scale < 1.0 else values
    eff = spacing / scale
    clock.lap("resample")
    located = localize.locate_sites(pixels, (eff, eff), "hip", "ap",
                                    patient_left_on_image_right=patient_left_on_image_right(ds))
    clock.lap("localise")
    metal = MetalDetector(pixels, eff)
    for loc in located:
        metal.in_site(loc.box)
    clock.lap("quality_gates")
    cov = read_covariates(ds).vector()
    crops, types = [], []
    for loc in located:
        if loc.site in EXPECTED_SITES["hip"]:
            crops.append(square_crop(pixels, loc.box, mirrored=(loc.site == "left_hip")))
            types.append(site_type(loc.site, "ap"))
    batch = np.stack([normalise(c.pixels) for c in crops])
    covs = np.array([cov] * len(crops), dtype=np.float32)
    clock.lap("crop")
    pred = model.predict(batch, covs, np.array(types))
    clock.lap("model_gradcam")
    heat = np.zeros(pixels.shape, dtype=np.float32)
    for i, c in enumerate(crops):
        heat = np.maximum(heat, paste_map(pred.cams[i], c, pixels.shape))
    factor = min(1.0, DISPLAY_MAX_SIDE / max(pixels.shape))
    display = resample(pixels, factor) if factor < 1 else pixels
    hm = resample(heat, display.shape[0] / heat.shape[0]) if heat.shape != display.shape else heat
    clock.lap("cam_to_display")
    r = result_for_reports
    _encode(build_sr([ds], r.sites, model.info))
    clock.lap("sr_build")
    _encode(build_heatmap(ds, r.display, r.heatmap, r.sites, model.info, display_scale=r.display_scale))
    clock.lap("heatmap_build")
    return clock.times


def end_to_end(path: Path, model: LoadedModel):
    """The real path, nothing taken apart: what a worker does for one image (seconds, result)."""
    t0 = time.perf_counter()
    ds = dcmread(path)
    result = screen_study([StudyImage(ds, "hip", "ap")], model, heatmaps=True)[0]
    _encode(build_sr([ds], result.sites, model.info))
    if result.display is not None:
        _encode(build_heatmap(ds, result.display, result.heatmap, result.sites, model.info,
                              display_scale=result.display_scale))
    return time.perf_counter() - t0, result


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        err = " | ".join(proc.stderr.decode(errors="replace").strip().splitlines())[:300]
        raise RuntimeError(f"{Path(cmd[0]).name} exit {proc.returncode}: {err}")
    return elapsed


def _summary(values: list[float]) -> dict:
    ms = [1000 * v for v in values]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def references(path: Path, work: Path, repeats: int, j2k: bool) -> dict:
    """External converters on the same file, one process per run (warm: one unmeasured run first)."""
    out: dict = {}
    tool = shutil.which("dcmj2pnm")
    commands = {}
    if tool:
        commands["dcmj2pnm_png"] = [tool, "+Wi", "1", "+on", str(path), str(work / "ref.png")]
        commands["dcmj2pnm_pnm"] = [tool, "+Wi", "1", str(path), str(work / "ref.pnm")]
    else:
        out["dcmj2pnm"] = {"error": "dcmj2pnm not found (apt-get install dcmtk)"}
    if j2k:
        opj = shutil.which("opj_decompress")
        if opj:
            ds = dcmread(path)
            frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
            (work / "frame.j2k").write_bytes(frame)
            commands["opj_decompress_pgm"] = [opj, "-quiet", "-i", str(work / "frame.j2k"), "-o", str(work / "ref.pgm")]
        else:
            out["opj_decompress_pgm"] = {"error": "opj_decompress not found (apt-get install libopenjp2-tools)"}
    for name, cmd in commands.items():
        try:
            _run(cmd)  # warm the page cache and the loader
            out[name] = _summary([_run(cmd) for _ in range(repeats)])
            out[name]["command"] = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
        except RuntimeError as exc:
            out[name] = {"error": str(exc)}
    return out


def bench_file(path: Path, model: LoadedModel, repeats: int, work: Path, j2k: bool, progress) -> dict:
    _, result = end_to_end(path, model)  # warm
    staged(path, model, result)
    e2e, stages = [], {s: [] for s in STAGES}
    for i in range(repeats):
        progress(f"  {path.name}: repeat {i + 1}/{repeats}")
        t, result = end_to_end(path, model)
        e2e.append(t)
        for name, v in staged(path, model, result).items():
            stages[name].append(v)
    stage_medians = {s: 1000 * statistics.median(v) for s, v in stages.items()}
    out = {"file_bytes": path.stat().st_size,
           "stages_median_ms": stage_medians,
           "stages_sum_ms": sum(stage_medians.values()),
           "end_to_end": _summary(e2e),
           "sites": [{"site": f.site, "assessable": f.assessable, "reason": f.reason, "class": f.category}
                     for f in result.sites],
           "reference": references(path, work, repeats, j2k)}
    total = out["end_to_end"]["median_ms"]
    out["ratio_to_reference"] = {name: total / r["median_ms"] for name, r in out["reference"].items()
                                 if "median_ms" in r}
    return out


def run(repeats: int = 5, seed: int = 0, model_path: Path = DEFAULT_MODEL, progress=print,
        torch_threads: int | None = None) -> dict:
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)

    image = make_study("hip", np.random.default_rng(seed))[0]
    ds = image.dataset
    model = LoadedModel(model_path, "cpu")
    t0 = time.perf_counter()
    if hasattr(localize, "warm_up"):
        localize.warm_up()
    warm_up_s = time.perf_counter() - t0
    report = {"image": {"rows": int(ds.Rows), "columns": int(ds.Columns), "bits_stored": int(ds.BitsStored),
                        "photometric": str(ds.PhotometricInterpretation),
                        "pixel_spacing_mm": [float(v) for v in (ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"))]},
              "repeats": repeats, "seed": seed, "model": str(model_path),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(),
                          "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
              "localiser_warm_up_ms": 1000 * warm_up_s, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="bench_pelvis_") as tmp:
        work = Path(tmp)
        for name, ts in (("explicit_vr_little_endian", ExplicitVRLittleEndian), ("jpeg2000_lossless", JPEG2000Lossless)):
            path = work / f"pelvis_{name}.dcm"
            t0 = time.perf_counter()
            write_dataset(ds, path, ts)
            progress(f"{name}: written in {time.perf_counter() - t0:.1f} s ({path.stat().st_size / 1e6:.1f} MB)")
            report["variants"][name] = bench_file(path, model, repeats, work, ts == JPEG2000Lossless, progress)
        ref = report["variants"]["explicit_vr_little_endian"]["reference"].get("dcmj2pnm_png", {})
        if "median_ms" in ref:  # J2K scored end to end vs DCMTK on the uncompressed file
            v = report["variants"]["jpeg2000_lossless"]
            v["ratio_to_reference"]["dcmj2pnm_png_on_uncompressed"] = v["end_to_end"]["median_ms"] / ref["median_ms"]
    return report


def format_table(report: dict) -> str:
    img = report["image"]
    m = report["machine"]
    load = "n/a" if m["load_average_1min"] is None else f"{m['load_average_1min']:.2f}"
    lines = [f"pelvis AP {img['rows']}x{img['columns']}, {img['bits_stored']} bit, {img['photometric']}; "
             f"{report['repeats']} repeats, medians in ms; torch {m['torch']} on {m['torch_threads']} thread(s), "
             f"{m['cpu_count']} CPU(s), 1-min load {load}"]
    names = list(report["variants"])
    short = {"explicit_vr_little_endian": "uncompressed", "jpeg2000_lossless": "JPEG 2000 lossless"}
    w, cw = 34, 20
    lines.append(f"{'stage':<{w}}" + "".join(f"{short.get(n, n):>{cw}}" for n in names))
    for s in STAGES:
        lines.append(f"{s:<{w}}" + "".join(f"{report['variants'][n]['stages_median_ms'][s]:>{cw}.1f}" for n in names))
    lines.append(f"{'sum of stage medians':<{w}}" + "".join(f"{report['variants'][n]['stages_sum_ms']:>{cw}.1f}" for n in names))
    lines.append(f"{'end to end (our total)':<{w}}"
                 + "".join(f"{report['variants'][n]['end_to_end']['median_ms']:>{cw}.1f}" for n in names))
    refs = sorted({r for n in names for r in report["variants"][n]["reference"]})
    for r in refs:
        cells = []
        for n in names:
            ref = report["variants"][n]["reference"].get(r)
            cells.append("-" if ref is None else ("cannot" if "error" in ref else f"{ref['median_ms']:.1f}"))
        lines.append(f"{'reference ' + r:<{w}}" + "".join(f"{c:>{cw}}" for c in cells))
    ratios = sorted({r for n in names for r in report["variants"][n]["ratio_to_reference"]})
    for r in ratios:
        cells = [report["variants"][n]["ratio_to_reference"].get(r) for n in names]
        lines.append(f"{'ours / ' + r:<{w}}" + "".join(f"{'-' if c is None else f'{c:.2f}x':>{cw}}" for c in cells))
    for n in names:
        for r, ref in report["variants"][n]["reference"].items():
            if "error" in ref:
                lines.append(f"note: {short.get(n, n)}: {r}: {ref['error'].splitlines()[0][:160]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--torch-threads", type=int, default=Settings().model_threads,
                   help="torch.set_num_threads (default: the node's model_threads setting)")
    p.add_argument("--json", help="also write the full report here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    report = run(args.repeats, args.seed, Path(args.model),
                 progress=(lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr)),
                 torch_threads=args.torch_threads)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

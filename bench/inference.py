"""Model inference throughput, and the stages of one study, beside references in the same run.

    python -m bench.inference [--quick] [--workdir DIR] [--no-progress]

1. **Site crops per second** through the shipped checkpoint exactly as the worker calls it
   (`LoadedModel.predict`: the checkpoint's test-time augmentation setting, Grad-CAM, the
   out-of-distribution distance), at batch sizes 1, 8 and 32 on the CPU, with torch on the node's
   `model_threads` default (1 thread) and on 2 threads. The crops are real: a few synthetic studies
   go through the pipeline's own decode → localise → gate → crop (`pipeline.screen._prepare`), and
   their crops are tiled to the batch size. Each timed repeat scores at least 32 crops (32 calls at
   batch 1); warm-up first, median of the repeats. Reference in the same run: the bare network
   forward on the same batch (no TTA, no Grad-CAM, `torch.inference_mode`), so the ratio is what
   production scoring costs over the plain network.
   On a CUDA machine the same is measured on the GPU at batch 1, 8, 32, 128, 512, … until
   throughput stops rising or memory runs out, in both `model_precision` settings: fp32 and mixed
   (the model's predict under `torch.autocast`, bf16 where the GPU supports it, else fp16); target
   ≥ 1,000 site crops/s. Without a GPU a row says so.
2. **Stage breakdown** of one pelvis AP (uncompressed, and the same as JPEG 2000 lossless) and one
   lumbar AP + lateral study, each stage of `screen_study` and of the worker's result objects timed
   on its own: read, decode, preprocess (LUTs + resample to the working grid), localise, quality
   gates, crop, infer (the network: identity view with autograd on + the TTA views + OOD distance),
   Grad-CAM (the backward pass and the map), CAM to display, SR build, SC (heatmap) build, KOS build
   (positive studies: the phantoms are chosen osteoporotic so that a KOS is built), and send
   (`node.sender.send_files` of SR + heatmaps + KOS to a DCMTK `storescp` over loopback). Medians in
   ms. The end-to-end figure is the real calls, nothing taken apart (dcmread → screen_study →
   build_sr / build_heatmap / build_kos, encoded in memory), like benchmarks/bench_pelvis.py, which
   this supersedes. Reference in the same run: DCMTK `dcmj2pnm +Wi 1 +on` (DICOM → 8-bit PNG through
   the VOI window, a new process per run) on the same files; ratio = our end to end / reference.
   DCMTK has no JPEG 2000 decoder: the J2K copy is compared with `opj_decompress` when installed,
   otherwise with dcmj2pnm on the uncompressed file (said in the row's note).

Plots: crops/s against batch size (one line per thread count, GPU lines when present, dashed the
bare-forward reference) and a horizontal stacked bar of the stages.
Not a test: nothing asserts a time.
"""
from __future__ import annotations

import argparse
import io
import json
import math
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

from .common import free_port as _free_port, load_average as _load, port_open as _port_open, wait_for as _wait

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CPU_BATCHES = (1, 8, 32)
GPU_BATCHES = (1, 8, 32, 128, 512, 2048, 8192)
GPU_TARGET = 1000.0
STAGES = ("read", "decode", "preprocess", "localise", "quality_gates", "crop", "infer", "gradcam",
          "cam_to_display", "sr_build", "heatmap_build", "kos_build", "send")
STAGE_LABELS = {"read": "read (dcmread)", "decode": "decode (pixel_array)",
                "preprocess": "preprocess (LUTs + resample)", "localise": "localise", "quality_gates": "quality gates",
                "crop": "crop (+ normalise, covariates)", "infer": "infer (network, TTA, OOD)",
                "gradcam": "Grad-CAM", "cam_to_display": "CAM to display grid", "sr_build": "SR build (+ encode)",
                "heatmap_build": "SC heatmap build (+ encode)", "kos_build": "KOS build (+ encode)",
                "send": "send (C-STORE to storescp)"}


# -- small private helpers ---------------------------------------------------------------------------
def row(measure: str, value, unit: str, *, reference: str | None = None, reference_value=None,
        ratio=None, target: str | None = None, met=None, note: str | None = None) -> dict:
    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    return {"measure": measure, "value": num(value), "unit": unit, "reference": reference,
            "reference_value": num(reference_value), "ratio": num(ratio), "target": target,
            "met": met, "note": note}


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class _Bar:
    """tqdm on stderr when progress, else nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def step(self, text: str | None = None, n: int = 1) -> None:
        if self.bar is not None:
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- studies -----------------------------------------------------------------------------------------
def _study_where(kind: str, wanted, first_seed: int, tries: int = 80):
    """The first clean phantom from first_seed on whose truth satisfies `wanted` (else first_seed's)."""
    from osteoscreen.synth import make_study
    for seed in range(first_seed, first_seed + tries):
        images = make_study(kind, np.random.default_rng(seed), patient_index=seed, implants=(),
                            foreign_body_rate=0.0)
        if wanted([t for im in images for t in im.sites.values()]):
            return images, seed
    return make_study(kind, np.random.default_rng(first_seed), patient_index=first_seed, implants=()), first_seed


def positive_study(kind: str, first_seed: int):
    """A phantom very likely estimated osteoporotic, so that the KOS is built too."""
    return _study_where(kind, lambda sites: sites and min(s.t_score for s in sites) <= -3.2
                        and all(s.category == "osteoporosis" for s in sites), first_seed)


def real_crops(n_hip: int, n_lumbar: int):
    """Crops, covariates and site types from synthetic studies through the pipeline's own extraction."""
    from osteoscreen.config import DEFAULT_MODEL
    from osteoscreen.model.inference import LoadedModel
    from osteoscreen.pipeline import screen
    from osteoscreen.pipeline.crops import normalise
    from osteoscreen.pipeline.screen import StudyImage
    from osteoscreen.synth import make_study
    model = LoadedModel(DEFAULT_MODEL, "cpu")  # _prepare asks it which calibration an image's scanner has
    crops, covs, types = [], [], []
    for kind, count in (("hip", n_hip), ("lumbar", n_lumbar)):
        for seed in range(count):
            images = make_study(kind, np.random.default_rng(1000 + seed), patient_index=seed)
            _, pending = screen._prepare([StudyImage(im.dataset, kind, im.view) for im in images], model, heatmaps=False)
            for p in pending:
                crops.append(normalise(p.crop.pixels))
                covs.append(p.covariates)
                types.append(p.site_type)
    return np.stack(crops).astype(np.float32), np.array(covs, dtype=np.float32), np.array(types, dtype=np.int64)


def _tile(arr: np.ndarray, n: int) -> np.ndarray:
    return arr[np.arange(n) % len(arr)]


# -- crops per second --------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def _bare_forward(model, crops, covs, types):
    """The reference: the network alone, identity view, no Grad-CAM, no TTA, no OOD (in the model's
    precision)."""
    import torch
    with torch.inference_mode(), model.autocast():
        x = torch.from_numpy(np.ascontiguousarray(crops))[:, None].to(model.device)
        cov = torch.from_numpy(covs).to(model.device)
        st = torch.from_numpy(types).to(model.device)
        logits, t = model.net(x, cov, st)
        return logits.float().cpu().numpy(), t.float().cpu().numpy()


def crops_per_second(fn, model, crops, covs, types, batch: int, repeats: int, min_crops: int = 32,
                     warmup: int = 2) -> dict:
    """Median crops/s of `fn(model, crops, covs, types)` called on `batch` crops at a time."""
    c, v, t = _tile(crops, batch), _tile(covs, batch), _tile(types, batch)
    calls = max(1, math.ceil(min_crops / batch))
    for _ in range(warmup):
        fn(model, c, v, t)
    _sync(model.device)
    rates = []
    for _ in range(repeats):
        _sync(model.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(model, c, v, t)
        _sync(model.device)
        rates.append(calls * batch / (time.perf_counter() - t0))
    return {"batch": batch, "calls_per_repeat": calls, "median": statistics.median(rates),
            "min": min(rates), "max": max(rates), "repeats": repeats}


def _production(model, crops, covs, types):
    return model.predict(crops, covs, types, batch_size=len(crops))


def cpu_throughput(model, crops, covs, types, thread_counts, repeats: int, bar: _Bar, quick: bool = False) -> dict:
    import torch
    out = {}
    before = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            per = {}
            for batch in CPU_BATCHES:
                kw = {"min_crops": 8, "warmup": 1} if quick else {}
                ours = crops_per_second(_production, model, crops, covs, types, batch, repeats, **kw)
                ref = crops_per_second(_bare_forward, model, crops, covs, types, batch, repeats, **kw)
                per[batch] = {"production": ours, "bare_forward": ref, "load_1min": _load()}
                bar.step(f"CPU {threads} thr batch {batch}: {ours['median']:.0f}/s")
            out[threads] = per
    finally:
        torch.set_num_threads(before)
    return out


def gpu_throughput(model_path: Path, crops, covs, types, repeats: int, bar: _Bar) -> dict | None:
    """The worker's predict on CUDA in both `model_precision` settings (fp32; mixed: autocast), batch
    sizes rising until throughput saturates or memory runs out."""
    import torch
    if not torch.cuda.is_available():
        return None
    from osteoscreen.model.inference import LoadedModel
    out = {"device": torch.cuda.get_device_name(0), "modes": {}}
    for mode in ("fp32", "mixed"):
        model = LoadedModel(model_path, "cuda", precision=mode)
        if model.autocast_dtype is not None:
            out["autocast_dtype"] = str(model.autocast_dtype).replace("torch.", "")
        series, best = [], 0.0
        flat = 0
        for batch in GPU_BATCHES:
            try:
                torch.cuda.reset_peak_memory_stats()
                r = crops_per_second(_production, model, crops, covs, types, batch, repeats,
                                     min_crops=max(256, batch))
                r["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
                ref = crops_per_second(_bare_forward, model, crops, covs, types, batch, repeats,
                                       min_crops=max(256, batch))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                series.append({"batch": batch, "error": "out of memory"})
                break
            r["bare_forward"] = ref
            series.append(r)
            bar.step(f"GPU {mode} batch {batch}: {r['median']:.0f}/s")
            if r["median"] < best * 1.05:  # saturated: under 5 % better than the best so far, twice
                flat += 1
                if flat >= 2:
                    break
            else:
                flat = 0
            best = max(best, r["median"])
        out["modes"][mode] = series
        del model
        torch.cuda.empty_cache()
    return out


# -- stage breakdown ---------------------------------------------------------------------------------
class _Clock:
    def __init__(self, device=None):
        self.times: dict[str, float] = {}
        self.device = device
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device is not None:
            _sync(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - self._t)
        self._t = now


def staged(files: list[Path], kind: str, views: list[str], model, objects_dir: Path, destination) -> dict:
    """One pass through screen_study's steps and the worker's result objects, each timed (seconds)."""
    from pydicom import dcmread
    from osteoscreen.config import Output
    from osteoscreen.findings import CLASSES, ImageResult, SiteFinding
    from osteoscreen.node.sender import send_files
    from osteoscreen.pipeline.covariates import read_covariates
    from osteoscreen.pipeline.crops import normalise, paste_map, site_type, square_crop
    from osteoscreen.pipeline.dicom_io import WORKING_SPACING_MM, display_values, pixel_spacing, resample
    from osteoscreen.pipeline.localize import locate_sites
    from osteoscreen.pipeline.quality import MetalDetector
    from osteoscreen.pipeline.screen import (DISPLAY_MAX_SIDE, EXPECTED_SITES, HEATMAP_FEATHER, SITE_REGIONS,
                                             header_laterality, patient_left_on_image_right)
    from osteoscreen.reports.heatmap import build_heatmap
    from osteoscreen.reports.kos import build_kos
    from osteoscreen.reports.sr import build_sr

    out = Output()
    clock = _Clock()
    dss, per_image = [], []
    crops_all, covs_all, types_all, owners = [], [], [], []
    for path, view in zip(files, views):
        ds = dcmread(path)
        clock.lap("read")
        ds.pixel_array  # decoded once; pydicom keeps the array for display_values below
        clock.lap("decode")
        values = display_values(ds)  # the pipeline's own: Modality LUT, VOI LUT, [0, 1], MONOCHROME1
        (row_mm, col_mm), _ = pixel_spacing(ds)
        spacing = (row_mm + col_mm) / 2.0
        scale = min(1.0, spacing / WORKING_SPACING_MM)
        pixels = resample(values, scale) if scale < 1.0 else values
        eff = spacing / scale
        clock.lap("preprocess")
        located = locate_sites(pixels, (eff, eff), kind, view, patient_left_on_image_right=patient_left_on_image_right(ds),
                               image_laterality=header_laterality(ds))
        clock.lap("localise")
        metal = MetalDetector(pixels, eff)
        for loc in located:
            metal.in_site(loc.box)
        clock.lap("quality_gates")
        cov = read_covariates(ds).vector()
        result = ImageResult(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), assessable=True)
        crops = []
        for loc in located:
            if loc.site in EXPECTED_SITES[kind]:
                crop = square_crop(pixels, loc.box, mirrored=(loc.site == "left_hip"))
                crops.append((loc, crop))
                crops_all.append(normalise(crop.pixels))
                covs_all.append(cov)
                types_all.append(site_type(loc.site, view))
                owners.append(len(per_image))
        clock.lap("crop")
        dss.append(ds)
        per_image.append((ds, result, pixels, scale, crops))
    # the model's own predict, told to report the end of each stage (network + TTA + OOD; Grad-CAM)
    pred = model.predict(np.stack(crops_all), np.array(covs_all, np.float32), np.array(types_all), lap=clock.lap)
    probs, cams = pred.probabilities, pred.cams
    k = 0
    for ds, result, pixels, scale, crops in per_image:
        heat = np.zeros(pixels.shape, dtype=np.float32)
        for loc, crop in crops:
            heat = np.maximum(heat, paste_map(cams[k], crop, pixels.shape, HEATMAP_FEATHER))
            p = probs[k]
            result.sites.append(SiteFinding(
                site=loc.site, source_sop_instance_uid=result.sop_instance_uid, source_sop_class_uid=result.sop_class_uid,
                assessable=True, box=tuple(int(round(v / scale)) for v in loc.box), confidence=float(loc.confidence),
                category=CLASSES[int(np.argmax(p))], probabilities={c: round(float(v), 4) for c, v in zip(CLASSES, p)},
                t_score=float(pred.t_scores[k])))
            names = SITE_REGIONS.get(loc.site)
            if names and model.region_names:
                f = result.sites[-1]
                f.regions = {names[0]: f.t_score}
                f.regions.update({r: float(pred.region_t_scores[r][k]) for r in model.region_names if r in names})
            k += 1
        factor = min(1.0, DISPLAY_MAX_SIDE / max(pixels.shape))
        display = resample(pixels, factor) if factor < 1 else pixels
        hm = resample(heat, display.shape[0] / heat.shape[0]) if heat.shape != display.shape else heat
        hm = np.pad(hm, [(0, max(0, a - b)) for a, b in zip(display.shape, hm.shape)])[:display.shape[0], :display.shape[1]]
        result.display, result.heatmap, result.display_scale = display, hm, scale * factor
    clock.lap("cam_to_display")
    findings = [f for _, r, *_ in per_image for f in r.sites]
    sr = build_sr(dss, findings, model.info, series_number=out.series_number_sr,
                  series_description=out.series_description_sr)
    blobs = [("sr", _encode(sr))]
    clock.lap("sr_build")
    for ds, result, *_ in per_image:
        blobs.append(("heatmap", _encode(build_heatmap(ds, result.display, result.heatmap, result.sites, model.info,
                                                       display_scale=result.display_scale,
                                                       series_number=out.series_number_heatmap,
                                                       series_description=out.series_description_heatmap,
                                                       report_uid=str(sr.SOPInstanceUID)))))
    clock.lap("heatmap_build")
    kos = build_kos(dss, findings, model.info, positive_categories=out.positive_categories,
                    series_number=out.series_number_kos, series_description=out.series_description_kos, sr=sr)
    if kos is not None:
        blobs.append(("kos", _encode(kos)))
    clock.lap("kos_build")
    paths = []
    for i, (name, blob) in enumerate(blobs):  # the outbox files (untimed: the worker writes them, fsynced)
        p = objects_dir / f"{name}{i}.dcm"
        p.write_bytes(blob)
        paths.append(p)
    clock._t = time.perf_counter()
    sent = send_files(destination, paths)
    clock.lap("send")
    times = clock.times  # the object files stay (overwritten next pass) for the storescu reference
    times["_kos_built"] = kos is not None
    times["_sent_ok"] = all(r.ok for r in sent)
    times["_objects"] = [n for n, _ in blobs]
    return times


def end_to_end(files: list[Path], kind: str, views: list[str], model):
    """The real calls, nothing taken apart: dcmread → screen_study(heatmaps=True) → SR, heatmaps, KOS."""
    from pydicom import dcmread
    from osteoscreen.config import Output
    from osteoscreen.pipeline.screen import StudyImage, screen_study
    from osteoscreen.reports.heatmap import build_heatmap
    from osteoscreen.reports.kos import build_kos
    from osteoscreen.reports.sr import build_sr
    out = Output()
    t0 = time.perf_counter()
    dss = [dcmread(p) for p in files]
    results = screen_study([StudyImage(ds, kind, v) for ds, v in zip(dss, views)], model, heatmaps=True)
    findings = [f for r in results for f in r.sites]
    sr = build_sr(dss, findings, model.info, series_number=out.series_number_sr,
                  series_description=out.series_description_sr)
    _encode(sr)
    for ds, r in zip(dss, results):
        if r.display is not None and any(f.assessable for f in r.sites):
            _encode(build_heatmap(ds, r.display, r.heatmap, r.sites, model.info, display_scale=r.display_scale,
                                  report_uid=str(sr.SOPInstanceUID)))
    kos = build_kos(dss, findings, model.info, positive_categories=out.positive_categories, sr=sr)
    if kos is not None:
        _encode(kos)
    return time.perf_counter() - t0, findings


def _run_tool(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exit {proc.returncode}: "
                           + " | ".join(proc.stderr.decode(errors="replace").strip().splitlines())[:300])
    return elapsed


def reference_time(files: list[Path], work: Path, repeats: int, j2k: bool, fallback_files: list[Path]) -> dict:
    """DCMTK dcmj2pnm → PNG on every file of the study (summed per run), one process per file as a user
    runs it; one unmeasured run first. J2K: opj_decompress on the codestreams where installed, else
    dcmj2pnm on the uncompressed files."""
    from pydicom import dcmread
    from pydicom.encaps import generate_fragmented_frames
    dcmj2pnm, opj = shutil.which("dcmj2pnm"), shutil.which("opj_decompress")
    if j2k and opj:
        cmds = []
        for i, f in enumerate(files):
            frame = b"".join(next(generate_fragmented_frames(dcmread(f).PixelData)))
            (work / f"frame{i}.j2k").write_bytes(frame)
            cmds.append([opj, "-quiet", "-i", str(work / f"frame{i}.j2k"), "-o", str(work / f"ref{i}.pgm")])
        name, note = "opj_decompress → PGM", None
    elif dcmj2pnm:
        src = fallback_files if j2k else files
        cmds = [[dcmj2pnm, "+Wi", "1", "+on", str(f), str(work / f"ref{i}.png")] for i, f in enumerate(src)]
        name = "DCMTK dcmj2pnm → PNG"
        note = ("DCMTK cannot decode JPEG 2000 and opj_decompress is not installed: reference is dcmj2pnm "
                "on the uncompressed copy") if j2k else None
    else:
        return {"error": "dcmj2pnm not found (apt-get install dcmtk)"}
    try:
        for c in cmds:
            _run_tool(c)
        runs = [sum(_run_tool(c) for c in cmds) for _ in range(repeats)]
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"name": name, "note": note, "median_ms": 1000 * statistics.median(runs), "min_ms": 1000 * min(runs),
            "max_ms": 1000 * max(runs), "commands": [" ".join(Path(x).name if i == 0 else x for i, x in enumerate(c))
                                                      for c in cmds]}


def storescu_reference(paths: list[Path], port: int, repeats: int) -> dict:
    """DCMTK storescu sending the same result objects to the same storescp (one association, -R: the
    objects' own SOP classes), a new process per run; one unmeasured run first."""
    tool = shutil.which("storescu")
    if not tool or not paths:
        return {"error": "storescu not found" if not tool else "no objects"}
    cmd = [tool, "-R", "-aet", "OSTEOSCREEN", "-aec", "PACS", "127.0.0.1", str(port), *map(str, paths)]
    try:
        _run_tool(cmd)
        runs = [_run_tool(cmd) for _ in range(repeats)]
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"name": "DCMTK storescu, same objects, same storescp", "median_ms": 1000 * statistics.median(runs),
            "min_ms": 1000 * min(runs), "max_ms": 1000 * max(runs)}


class _StoreSCP:
    """A DCMTK storescp on a free loopback port: the peer of the 'send' stage."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), "+xa", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _wait(lambda: _port_open(self.port) or self.proc.poll() is not None, 15) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def stage_breakdown(model, work: Path, repeats: int, quick: bool, bar: _Bar) -> dict:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
    from osteoscreen.config import Destination
    from osteoscreen.synth.dicom_writer import write_dataset

    pelvis, pelvis_seed = positive_study("hip", 105)
    lumbar, lumbar_seed = positive_study("lumbar", 200)
    cases = {}
    p_plain = work / "pelvis.dcm"
    write_dataset(pelvis[0].dataset, p_plain, ExplicitVRLittleEndian)
    cases["pelvis"] = {"files": [p_plain], "kind": "hip", "views": ["ap"], "seed": pelvis_seed, "j2k": False}
    if not quick:
        p_j2k = work / "pelvis_j2k.dcm"
        write_dataset(pelvis[0].dataset, p_j2k, JPEG2000Lossless)
        cases["pelvis_j2k"] = {"files": [p_j2k], "kind": "hip", "views": ["ap"], "seed": pelvis_seed, "j2k": True,
                               "uncompressed": [p_plain]}
    lfiles = []
    for im in lumbar:
        f = work / f"lumbar_{im.view}.dcm"
        write_dataset(im.dataset, f, ExplicitVRLittleEndian)
        lfiles.append(f)
    cases["lumbar_ap_lat"] = {"files": lfiles, "kind": "lumbar", "views": [im.view for im in lumbar],
                              "seed": lumbar_seed, "j2k": False}
    out = {}
    peer = _StoreSCP(work / "storescp")
    try:
        dest = Destination.parse(f"PACS@127.0.0.1:{peer.port}")
        objects = work / "objects"
        objects.mkdir(exist_ok=True)
        for name, case in cases.items():
            files, kind, views = case["files"], case["kind"], case["views"]
            end_to_end(files, kind, views, model)  # warm
            staged(files, kind, views, model, objects, dest)
            e2e, stages, extra = [], {s: [] for s in STAGES}, {}
            for i in range(repeats):
                t, findings = end_to_end(files, kind, views, model)
                e2e.append(t)
                times = staged(files, kind, views, model, objects, dest)
                for s in STAGES:
                    stages[s].append(times.get(s, 0.0))
                extra = {k: v for k, v in times.items() if k.startswith("_")}
                bar.step(f"{name} {i + 1}/{repeats}")
            med = {s: 1000 * statistics.median(v) for s, v in stages.items()}
            send_ref = storescu_reference(sorted(objects.glob("*.dcm")), peer.port, repeats)
            ref = reference_time(files, work, repeats, case["j2k"], case.get("uncompressed", files))
            total = 1000 * statistics.median(e2e)
            out[name] = {"files": [f.name for f in files], "file_bytes": [f.stat().st_size for f in files],
                         "seed": case["seed"], "stages_median_ms": med,
                         "stages_sum_ms": sum(med.values()), "stages_sum_without_send_ms": sum(med.values()) - med["send"],
                         "end_to_end_ms": {"median": total, "min": 1000 * min(e2e), "max": 1000 * max(e2e), "n": len(e2e)},
                         "kos_built": extra.get("_kos_built"), "sent_ok": extra.get("_sent_ok"),
                         "objects": extra.get("_objects"),
                         "sites": [{"site": f.site, "assessable": f.assessable, "category": f.category,
                                    "reason": f.reason} for f in findings],
                         "reference": ref, "send_reference": send_ref, "load_1min": _load()}
    finally:
        peer.stop()
    return out


# -- plots -------------------------------------------------------------------------------------------
def plot_throughput(cpu: dict, gpu: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if gpu else 1, figsize=(11 if gpu else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    for threads, per in cpu.items():
        b = sorted(per)
        line, = ax.plot(b, [per[x]["production"]["median"] for x in b], "o-", label=f"production, {threads} thread(s)")
        ax.plot(b, [per[x]["bare_forward"]["median"] for x in b], "--", color=line.get_color(), alpha=0.6,
                label=f"bare forward (reference), {threads} thread(s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (crops)")
    ax.set_ylabel("site crops / s")
    ax.set_title("CPU: LoadedModel.predict (TTA + Grad-CAM)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if gpu:
        ax = axes[0][1]
        for mode, series in gpu["modes"].items():
            ok = [r for r in series if "median" in r]
            line, = ax.plot([r["batch"] for r in ok], [r["median"] for r in ok], "o-", label=f"production {mode}")
            ax.plot([r["batch"] for r in ok], [r["bare_forward"]["median"] for r in ok], "--", color=line.get_color(),
                    alpha=0.6, label=f"bare forward {mode}")
        ax.axhline(GPU_TARGET, color="red", lw=0.8, ls=":", label="target 1,000/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (crops)")
        ax.set_title(f"GPU: {gpu['device']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stages(stages: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(stages)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 1.1 * (len(names) + 1)))
    cmap = plt.get_cmap("tab20")
    labels_y = []
    y = 0
    for name in names:
        left = 0.0
        for i, s in enumerate(STAGES):
            v = stages[name]["stages_median_ms"][s]
            ax.barh(y, v, left=left, color=cmap(i % 20), label=STAGE_LABELS[s] if y == 0 else None)
            left += v
        e2e = stages[name]["end_to_end_ms"]["median"]
        ax.plot([e2e, e2e], [y - 0.4, y + 0.4], "k-", lw=2, label="end to end, real calls (no send)" if y == 0 else None)
        labels_y.append(name)
        y += 1
        ref = stages[name]["reference"]
        if "median_ms" in ref:
            ax.barh(y, ref["median_ms"], color="0.6", hatch="//", label="reference" if y == 1 else None)
            labels_y.append(f"{name}: {ref['name']}")
            y += 1
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median ms (CPU)")
    ax.set_title("One study, stage by stage (medians)")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the module's interface --------------------------------------------------------------------------
def run(quick: bool, workdir: Path, progress: bool = True) -> dict:
    import torch
    from osteoscreen.config import DEFAULT_MODEL, Settings
    from osteoscreen.model.inference import LoadedModel
    from osteoscreen.pipeline import localize

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    node_threads = Settings().model_threads
    thread_counts = sorted({node_threads, 2})
    repeats = 3 if quick else 7
    stage_repeats = 2 if quick else 7
    raw: dict = {"quick": quick, "model": str(DEFAULT_MODEL), "torch": torch.__version__,
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "load_1min_start": _load(),
                 "node_model_threads": node_threads}
    model = LoadedModel(DEFAULT_MODEL, "cpu", node_threads)  # as the worker (device auto resolves to cpu here)
    raw["tta"] = model.tta
    t0 = time.perf_counter()
    localize.warm_up()
    raw["localiser_warm_up_ms"] = 1000 * (time.perf_counter() - t0)

    n_cases = 2 if quick else 3
    total_steps = len(thread_counts) * len(CPU_BATCHES) + n_cases * stage_repeats
    bar = _Bar(total_steps, "inference", progress)
    tmp = tempfile.TemporaryDirectory(prefix="bench_inference_", dir=workdir)
    try:
        crops, covs, types = real_crops(1 if quick else 3, 1 if quick else 2)
        raw["crops"] = {"source": "real: synthetic studies through pipeline.screen._prepare (decode, localise, "
                                  "gates, square_crop, normalise)", "distinct": int(len(crops)),
                        "shape": list(crops.shape[1:]), "site_types": types.tolist()}
        cpu = cpu_throughput(model, crops, covs, types, thread_counts, repeats, bar, quick)
        torch.set_num_threads(node_threads)
        raw["cpu"] = {str(k): {str(b): v for b, v in per.items()} for k, per in cpu.items()}
        gpu = gpu_throughput(DEFAULT_MODEL, crops, covs, types, repeats, bar)
        raw["gpu"] = gpu
        stages = stage_breakdown(model, Path(tmp.name), stage_repeats, quick, bar)
        raw["stages"] = stages
    finally:
        bar.close()
        tmp.cleanup()
    raw["load_1min_end"] = _load()

    rows = []
    tta_note = f"TTA {'on (5 views)' if model.tta else 'off'} + Grad-CAM + OOD, as the worker"
    for threads, per in cpu.items():
        for b in CPU_BATCHES:
            r = per[b]
            rows.append(row(f"crops/s CPU batch {b} ({threads} thread{'s' if threads > 1 else ''})",
                            r["production"]["median"], "crops/s", reference="bare network forward (no TTA, no CAM)",
                            reference_value=r["bare_forward"]["median"],
                            ratio=_ratio(r["production"]["median"], r["bare_forward"]["median"]),
                            note=f"{tta_note}; real crops; median of {repeats} repeats of ≥ {per[b]['production']['calls_per_repeat'] * b} crops"
                                 + ("; node default threads" if threads == node_threads else "")))
    if gpu is None:
        rows.append(row("crops/s GPU", None, "crops/s", target="≥ 1,000 site crops/s on a GPU", met=None,
                        note="no GPU in this run"))
    else:
        best = 0.0
        for mode, series in gpu["modes"].items():
            for r in series:
                if "median" not in r:
                    rows.append(row(f"crops/s GPU {mode} batch {r['batch']}", None, "crops/s", note=r["error"]))
                    continue
                best = max(best, r["median"])
                label = mode if mode == "fp32" else f"mixed ({gpu.get('autocast_dtype', '?')})"
                rows.append(row(f"crops/s GPU {label} batch {r['batch']}", r["median"], "crops/s",
                                reference="bare network forward", reference_value=r["bare_forward"]["median"],
                                ratio=_ratio(r["median"], r["bare_forward"]["median"]),
                                note=f"{gpu['device']}; peak {r['peak_memory_mib']:.0f} MiB"))
        rows.append(row("crops/s GPU (best)", best, "crops/s", target="≥ 1,000 site crops/s on a GPU",
                        met=best >= GPU_TARGET, note=gpu["device"]))
    for name, st in stages.items():
        for s in STAGES:
            note = None
            if s == "kos_build" and not st["kos_built"]:
                note = "no positive site: no KOS"
            if s == "send":
                note = f"{'+'.join(st['objects'] or [])} to storescp over loopback (send_files)"
            if s == "send":
                sref = st["send_reference"]
                rows.append(row(f"{name}: {STAGE_LABELS[s]}", st["stages_median_ms"][s], "ms", reference=sref.get("name"),
                                reference_value=sref.get("median_ms"),
                                ratio=_ratio(st["stages_median_ms"][s], sref.get("median_ms")),
                                note="; ".join(x for x in (note, sref.get("error")) if x)))
                continue
            rows.append(row(f"{name}: {STAGE_LABELS[s]}", st["stages_median_ms"][s], "ms", note=note))
        ref = st["reference"]
        total = st["end_to_end_ms"]["median"]
        rows.append(row(f"{name}: end to end (no send)", total, "ms",
                        reference=ref.get("name"), reference_value=ref.get("median_ms"),
                        ratio=_ratio(total, ref.get("median_ms")),
                        note="; ".join(x for x in (ref.get("note"), ref.get("error"),
                                                   f"sum of stage medians without send {st['stages_sum_without_send_ms']:.0f} ms",
                                                   f"{len(st['files'])} file(s), {sum(st['file_bytes']) / 1e6:.1f} MB")
                                       if x)))
    plots = []
    p1 = workdir / "inference_crops_per_s.png"
    plot_throughput(cpu, gpu, p1)
    plots.append(str(p1))
    p2 = workdir / "inference_stages.png"
    plot_stages(stages, p2)
    plots.append(str(p2))
    return {"name": "inference", "rows": rows, "plots": plots, "raw": raw}


def format_rows(rows: list[dict]) -> str:
    def f(v):
        if v is None:
            return "–"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    w = max(len(r["measure"]) for r in rows) + 2
    lines = [f"{'measure':<{w}}{'value':>12}  {'unit':<8}{'reference':>12}  {'ratio':>7}  met   note"]
    for r in rows:
        met = "–" if r["met"] is None else ("yes" if r["met"] else "NO")
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['measure']:<{w}}{f(r['value']):>12}  {r['unit']:<8}{f(r['reference_value']):>12}  "
                     f"{ratio:>7}  {met:<4}  {r['reference'] or ''}{' | ' if r['reference'] and r['note'] else ''}"
                     f"{r['note'] or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, module=None) -> int:
    p = argparse.ArgumentParser(description=(module or sys.modules[__name__]).__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workdir", default=str(ROOT / "var" / "bench"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    result = (module or sys.modules[__name__]).run(args.quick, Path(args.workdir), progress=not args.no_progress)
    print(format_rows(result["rows"]))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Rebuild the atlas localiser's data file, models/localiser-atlas-v1.npz, from the phantom generator.

    .venv/bin/python scripts/build_localiser_atlas.py            # rebuild; print size and sha256
    .venv/bin/python scripts/build_localiser_atlas.py --check    # rebuild in memory, compare, write nothing

The atlas is `synth.phantoms.mean_anatomy` (8 unposed phantoms from a fixed seed, averaged) for hip
AP, lumbar AP and lumbar lateral, area-averaged to the localiser's working pixel
(`localize.WORK_MM`), with the mean site landmarks (format: `osteoscreen/pipeline/localize_atlas.py`).

Deterministic: the generator is seeded and the file is written with fixed member order, dates and
compression, so the same code on the same numpy/scipy/torch gives the same arrays and so the same
bytes (checked: two builds, one sha256). Another platform or library version may change the
floating-point arrays in their last bits, and then the bytes; tests/test_atlas.py compares the shipped
arrays with a rebuild within a tolerance. When the arrays change on purpose (new phantoms, new
WORK_MM), write the file, put the printed sha256 into `localize_atlas.ATLAS_SHA256`, and run
tests/test_localize.py and tests/test_atlas.py.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from osteoscreen.pipeline import localize_atlas  # noqa: E402
from osteoscreen.pipeline.localize import WORK_MM  # noqa: E402
from osteoscreen.synth.phantoms import mean_anatomy  # noqa: E402


def build() -> dict[str, np.ndarray]:
    """The atlas file's arrays, drawn by the phantom generator."""
    return localize_atlas.atlas_arrays(mean_anatomy, WORK_MM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=localize_atlas.ATLAS_PATH, help="where to write the atlas")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in memory and compare with the file at --out; write nothing")
    args = parser.parse_args(argv)
    arrays = build()
    data = localize_atlas.atlas_bytes(arrays)
    digest = hashlib.sha256(data).hexdigest()
    if args.check:
        shipped = args.out.read_bytes() if args.out.is_file() else b""
        same = hashlib.sha256(shipped).hexdigest() == digest
        print(f"{args.out}: {'identical to' if same else 'DIFFERS from'} a rebuild (sha256 {digest})")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes), sha256 {digest}")
    if digest != localize_atlas.ATLAS_SHA256:
        print(f"note: localize_atlas.ATLAS_SHA256 is {localize_atlas.ATLAS_SHA256}; set it to {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

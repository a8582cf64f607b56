"""Pixel decoding: every transfer syntax the listener accepts decodes to the same image.

Compressed files are made by DCMTK (dcmcjpeg, dcmcjpls, dcmcrle, dcmconv) — real encoders from
another code base — and by pydicom/OpenJPEG for JPEG 2000.
"""
import os
import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless,
                         generate_uid)

from osteoscreen.node.transfer import ACCEPTED_TRANSFER_SYNTAXES
from osteoscreen.pipeline.dicom_io import UnreadablePixels, display_values, load_radiograph, pixel_spacing

from .conftest import require_tool


def make_dx(bits: int = 12, photometric: str = "MONOCHROME2", shape=(300, 240), seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = (0.3 + 0.5 * np.exp(-((yy - rows / 2) ** 2 + (xx - cols / 3) ** 2) / 3000.0)
           + 0.05 * rng.standard_normal(shape))
    img = np.clip(img, 0, 1) * (2 ** bits - 1)
    if photometric == "MONOCHROME1":
        img = (2 ** bits - 1) - img
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelData = img.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    return ds


def _dcmtk(tool: str, args: list[str], src, dst):
    require_tool(tool)
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True, timeout=60)


ENCODERS = {
    ImplicitVRLittleEndian: ("dcmconv", ["+ti"]),
    ExplicitVRBigEndian: ("dcmconv", ["+tb"]),
    DeflatedExplicitVRLittleEndian: ("dcmconv", ["+td"]),
    JPEGLosslessSV1: ("dcmcjpeg", ["+e1"]),
    JPEGLossless: ("dcmcjpeg", ["+el"]),
    JPEGExtended12Bit: ("dcmcjpeg", ["+ee"]),
    JPEGBaseline8Bit: ("dcmcjpeg", ["+eb"]),
    JPEGLSLossless: ("dcmcjpls", ["+el"]),
    JPEGLSNearLossless: ("dcmcjpls", ["+en"]),
    RLELossless: ("dcmcrle", []),
}
LOSSY = {JPEGExtended12Bit, JPEGBaseline8Bit, JPEGLSNearLossless}


@pytest.mark.parametrize("syntax", [ts for ts in ACCEPTED_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian],
                         ids=lambda ts: ts.name)
def test_every_accepted_transfer_syntax_decodes(tmp_path, syntax):
    ds = make_dx(bits=8 if syntax == JPEGBaseline8Bit else 12)
    src = tmp_path / "src.dcm"
    ds.save_as(src, enforce_file_format=True)
    reference = display_values(dcmread(src))
    dst = tmp_path / "dst.dcm"
    if syntax in ENCODERS:
        tool, args = ENCODERS[syntax]
        _dcmtk(tool, args, src, dst)
    else:  # JPEG 2000 via OpenJPEG
        enc = dcmread(src)
        enc.compress(syntax, encoding_plugin="pylibjpeg", **({"j2k_cr": [20]} if syntax != JPEG2000Lossless else {}))
        enc.save_as(dst, enforce_file_format=True)
    decoded_ds = dcmread(dst)
    assert decoded_ds.file_meta.TransferSyntaxUID == syntax
    decoded = display_values(decoded_ds)
    assert decoded.shape == reference.shape
    error = np.abs(decoded - reference).max()
    if syntax in LOSSY or syntax.name.startswith("JPEG 2000 Image Compression") and syntax != JPEG2000Lossless:
        # Lossy codecs smooth the noise, and DCMTK's lossy encoder also stretches the stored range
        # (its default +sp): the picture, as 10 × 10 block means, must be the same picture.
        blocks = lambda a: a.astype(float).reshape(30, 10, 24, 10).mean(axis=(1, 3)).ravel()  # noqa: E731
        assert np.corrcoef(blocks(decoded_ds.pixel_array), blocks(dcmread(src).pixel_array))[0, 1] > 0.99
    else:
        assert error < 1e-6


def test_monochrome1_is_inverted_to_bone_bright():
    m2, m1 = make_dx(photometric="MONOCHROME2"), make_dx(photometric="MONOCHROME1")
    a, b = display_values(m2), display_values(m1)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99  # same picture after inversion
    assert a[150, 80] > a[10, 10]  # the bright blob stays bright


def test_rescale_and_window_are_applied():
    ds = make_dx()
    plain = display_values(ds)
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, -100.0
    assert np.allclose(display_values(ds), plain, atol=1e-3)  # a linear rescale changes nothing after normalising
    ds.WindowCenter, ds.WindowWidth = 2 * 0.55 * 4095 - 100, 2 * 0.2 * 4095
    windowed = display_values(ds)
    assert (windowed <= 0.0).mean() > 0.3  # the narrow window clips the darker half to black
    assert not np.allclose(windowed, plain, atol=0.05)


def test_spacing_and_resampling():
    ds = make_dx(shape=(400, 300))
    assert pixel_spacing(ds) == ((0.2, 0.2), True)
    ds.EstimatedRadiographicMagnificationFactor = 1.25
    (r, c), _ = pixel_spacing(ds)
    assert r == pytest.approx(0.16)
    rad = load_radiograph(ds, working_spacing_mm=0.5)
    assert rad.scale == pytest.approx(0.32) and rad.pixels.shape == (128, 96)
    del ds.ImagerPixelSpacing
    assert pixel_spacing(ds)[1] is False


def test_truncated_pixel_data_is_unreadable():
    ds = make_dx()
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(UnreadablePixels):
        display_values(ds)


@pytest.mark.parametrize("variant", ["plain", "monochrome1", "rescale_window", "voi_lut_sequence", "signed"])
def test_the_lookup_table_path_equals_the_chain_over_every_pixel(variant):
    """display_values runs Modality → VOI → [0, 1] → inversion once per possible stored value and looks
    pixels up; the result must be exactly the chain run over every pixel."""
    from pydicom.dataset import Dataset as Item

    from osteoscreen.pipeline.dicom_io import _to_unit
    ds = make_dx(photometric="MONOCHROME1" if variant == "monochrome1" else "MONOCHROME2", seed=3)
    if variant == "rescale_window":
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -20.0
        ds.WindowCenter, ds.WindowWidth = 1000.0, 1500.0
    if variant == "voi_lut_sequence":
        item = Item()
        item.LUTDescriptor = [4096, 0, 16]
        item.LUTData = [int(65535 * (v / 4095) ** 0.5) for v in range(4096)]
        ds.VOILUTSequence = [item]
    if variant == "signed":
        raw = np.frombuffer(ds.PixelData, dtype=np.uint16).astype(np.int32)
        ds.PixelRepresentation = 1
        ds.PixelData = (raw - 2048).astype(np.int16).tobytes()
    stored = ds.pixel_array
    direct = _to_unit(stored, ds, sample=lambda v: v[::4, ::4])
    looked_up = display_values(ds)
    assert stored.dtype.kind in "iu" and looked_up.shape == stored.shape
    np.testing.assert_array_equal(looked_up, direct)


def test_jpeg2000_is_decoded_at_a_reduced_resolution_with_the_same_findings():
    """A JPEG 2000 image finer than the working grid is decoded only down to the resolution level the
    pipeline needs (the codestream holds it); geometry and findings match the full decode."""
    import copy

    from pydicom.uid import JPEG2000Lossless

    from osteoscreen.config import DEFAULT_MODEL
    from osteoscreen.model.inference import LoadedModel
    from osteoscreen.pipeline.dicom_io import reduced_jpeg2000
    from osteoscreen.pipeline.screen import StudyImage, screen_study
    from osteoscreen.synth import make_study
    model = LoadedModel(DEFAULT_MODEL, "cpu", 1)
    for seed, kind in ((101, "hip"), (102, "lumbar")):
        images = make_study(kind, np.random.default_rng(seed), patient_index=seed)
        plain = [StudyImage(copy.deepcopy(im.dataset), kind, im.view) for im in images]
        j2k = []
        for im in images:
            ds = copy.deepcopy(im.dataset)
            ds.compress(JPEG2000Lossless)
            assert reduced_jpeg2000(ds, 1) is not None  # the reduced path is the one taken
            a, b = load_radiograph(im.dataset), load_radiograph(ds)
            assert a.source_shape == b.source_shape and a.pixels.shape == b.pixels.shape
            assert abs(a.scale - b.scale) < 1e-3 and np.abs(a.pixels - b.pixels).mean() < 0.02
            j2k.append(StudyImage(ds, kind, im.view))
        for ra, rb in zip(screen_study(plain, model), screen_study(j2k, model)):
            for fa, fb in zip(ra.sites, rb.sites):
                assert (fa.site, fa.assessable, fa.category) == (fb.site, fb.assessable, fb.category)
                if fa.t_score is not None:
                    assert abs(fa.t_score - fb.t_score) < 0.15


def test_jpeg2000_threads_decode_the_same_pixels(tmp_path, monkeypatch):
    """OpenJPEG on several threads (decode_threads, through OPJ_NUM_THREADS) gives the pixels one
    thread gives, for the reduced decode the pipeline uses; an operator's OPJ_NUM_THREADS stays."""
    from pydicom.uid import JPEG2000Lossless

    from osteoscreen.pipeline import dicom_io
    from osteoscreen.synth import make_study
    from osteoscreen.synth.dicom_writer import write_dataset

    ds = make_study("hip", np.random.default_rng(7), patient_index=7)[0].dataset
    path = tmp_path / "j2k.dcm"
    write_dataset(ds, path, JPEG2000Lossless)
    j2k = dcmread(path)
    monkeypatch.setattr(dicom_io, "_OPERATOR_OPJ_THREADS", None)
    monkeypatch.delenv("OPJ_NUM_THREADS", raising=False)
    decoded = {}
    for threads in (1, 2, 0):
        dicom_io.set_jpeg2000_threads(threads)
        expected = min(len(os.sched_getaffinity(0)), dicom_io.MAX_AUTO_DECODE_THREADS) if threads == 0 else threads
        assert os.environ["OPJ_NUM_THREADS"] == str(expected)
        decoded[threads] = dicom_io.reduced_jpeg2000(j2k, 1)
        assert decoded[threads] is not None
    assert np.array_equal(decoded[1], decoded[2]) and np.array_equal(decoded[1], decoded[0])
    monkeypatch.setattr(dicom_io, "_OPERATOR_OPJ_THREADS", "3")
    monkeypatch.setenv("OPJ_NUM_THREADS", "3")
    dicom_io.set_jpeg2000_threads(0)
    assert os.environ["OPJ_NUM_THREADS"] == "3"

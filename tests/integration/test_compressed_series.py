"""Compressed series from real encoders (dcmtk, pylibjpeg) load into the same volume.

Lossless syntaxes must give identical voxels; lossy ones the same geometry and close values.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from ian_node.phantom.mr_series import StudyInfo, build_mr_series
from ian_node.segment.volume import load_series
from tests.tools import dcmtk

pytestmark = pytest.mark.integration

STUDY = StudyInfo(patient_id="GEO-3", patient_name="Compressed^Test")
AFFINE = np.array([[0, 0, 0.5, -20], [0, 0.6, 0, 5], [1.2, 0, 0, 30], [0, 0, 0, 1.0]])


def _smooth_volume() -> hd.Volume:
    """12-bit values with smooth structure (as MR is), so that lossy codecs stay close."""
    s, r, c = np.meshgrid(np.arange(4), np.arange(48), np.arange(40), indexing="ij")
    values = 1500 + 1200 * np.sin(r / 7.0) * np.cos(c / 9.0) + 300 * s
    noise = np.random.default_rng(3).normal(0, 20, values.shape)
    array = np.clip(values + noise, 0, 4095).astype(np.uint16)
    return hd.Volume(array, AFFINE, coordinate_system="PATIENT", frame_of_reference_uid=STUDY.frame_of_reference_uid)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The uncompressed series on disk, and the volume and affine load_series reads from it."""
    folder = tmp_path_factory.mktemp("plain")
    paths = []
    for i, ds in enumerate(build_mr_series(_smooth_volume(), STUDY)):
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    reference = load_series(paths)
    return paths, reference.volume.array, reference.volume.affine


def _dcmtk(tool: str, *options: str):
    def run(src: Path, dst: Path) -> None:
        subprocess.run([dcmtk(tool), *options, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return run


def _pydicom(syntax: UID, **kwargs):
    def run(src: Path, dst: Path) -> None:
        ds = pydicom.dcmread(src)
        ds.compress(syntax, encoding_plugin="pylibjpeg", **kwargs)
        ds.save_as(dst, enforce_file_format=True)
    return run


#: name: (encoder, transfer syntax it must produce, largest allowed absolute error; values span ~2400)
CODECS = {
    "jpeg-lossless-sv1 (dcmcjpeg)": (_dcmtk("dcmcjpeg", "+e1"), JPEGLosslessSV1, 0),
    "jpeg-lossless (dcmcjpeg)": (_dcmtk("dcmcjpeg", "+el"), JPEGLossless, 0),
    "jpeg-ls-lossless (dcmcjpls)": (_dcmtk("dcmcjpls", "+el"), JPEGLSLossless, 0),
    "rle (dcmcrle)": (_dcmtk("dcmcrle"), RLELossless, 0),
    "deflate (dcmconv)": (_dcmtk("dcmconv", "+td"), DeflatedExplicitVRLittleEndian, 0),
    "jpeg-2000-lossless (pylibjpeg)": (_pydicom(JPEG2000Lossless), JPEG2000Lossless, 0),
    "jpeg-ls-near-lossless (dcmcjpls)": (_dcmtk("dcmcjpls", "+en"), JPEGLSNearLossless, 2),
    # dcmcjpeg's lossy modes rescale the pixel range (to 0..255 for baseline); +rm records the inverse
    # as RescaleSlope/Intercept, which load_series applies (without +rm the values come back shifted)
    "jpeg-extended-12bit (dcmcjpeg)": (_dcmtk("dcmcjpeg", "+ee", "+rm", "+q", "95"), JPEGExtended12Bit, 20),
    "jpeg-baseline-8bit (dcmcjpeg)": (_dcmtk("dcmcjpeg", "+eb", "+rm", "+q", "95"), JPEGBaseline8Bit, 100),
    "jpeg-2000-lossy (pylibjpeg)": (_pydicom(JPEG2000, j2k_psnr=[60.0]), JPEG2000, 60),
}


@pytest.mark.parametrize("codec", list(CODECS))
def test_compressed_series_loads_the_same_volume(codec: str, originals, tmp_path: Path) -> None:
    encode, syntax, max_error = CODECS[codec]
    paths, reference, affine = originals
    compressed = []
    for src in paths:
        compressed.append(tmp_path / src.name)
        encode(src, compressed[-1])
    assert pydicom.dcmread(compressed[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    loaded = load_series(compressed[::-1])
    np.testing.assert_allclose(loaded.volume.affine, affine)
    if max_error == 0:
        np.testing.assert_array_equal(loaded.volume.array, reference)
    else:
        error = np.abs(loaded.volume.array.astype(np.float64) - reference)
        assert error.max() <= max_error, error.max()


def test_compressed_enhanced_multiframe_series_loads_the_same_volume(originals, tmp_path: Path) -> None:
    paths, reference, affine = originals
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=generate_uid(prefix=None), series_number=2,
        sop_instance_uid=generate_uid(prefix=None), instance_number=1,
    )
    plain, packed = tmp_path / "enhanced.dcm", tmp_path / "enhanced-jls.dcm"
    enhanced.save_as(plain, enforce_file_format=True)
    _dcmtk("dcmcjpls", "+el")(plain, packed)
    loaded = load_series([packed])
    assert loaded.frames[0].dataset.file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_allclose(loaded.volume.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(loaded.volume.array, reference)


def test_jpeg_ls_decodes_with_the_declared_pylibjpeg_plugin_alone(originals, tmp_path: Path) -> None:
    # pyjpegls may also be installed; the project only declares pylibjpeg(-libjpeg), which must suffice
    paths, reference, _ = originals
    packed = tmp_path / "jls.dcm"
    _dcmtk("dcmcjpls", "+el")(paths[0], packed)
    ds = pydicom.dcmread(packed)
    array, _ = get_decoder(JPEGLSLossless).as_array(ds, decoding_plugin="pylibjpeg")
    np.testing.assert_array_equal(array, pydicom.dcmread(paths[0]).pixel_array)

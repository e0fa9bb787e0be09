"""pydicom's own bundled test files (loaded by name; a glob would try to download)."""

from __future__ import annotations

import numpy as np
import pytest

from medal.errors import ImageReadError
from medal.io import load_image

pydicom_data = pytest.importorskip("pydicom.data")


def data_file(name: str):
    try:
        path = pydicom_data.get_testdata_file(name, download=False)
    except TypeError:  # older pydicom without the download argument
        path = pydicom_data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


IMAGES = {
    # name: expected shape (None = [H, W] gray of any size)
    "CT_small.dcm": (128, 128),
    "MR_small.dcm": (64, 64),
    "MR_small_RLE.dcm": (64, 64),
    "MR_small_bigendian.dcm": (64, 64),
    "MR_small_implicit.dcm": (64, 64),
    "MR_small_jp2klossless.dcm": (64, 64),
    "MR_small_jpeg_ls_lossless.dcm": (64, 64),
    "image_dfl.dcm": None,  # deflated explicit little endian
    "JPGExtended.dcm": None,
    "JPEG2000.dcm": None,
    "JPEGLSNearLossless_16.dcm": None,
    "ExplVR_BigEnd.dcm": None,
    "SC_rgb_rle.dcm": (100, 100, 3),
    "SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),
    "SC_ybr_full_422_uncompressed.dcm": (100, 100, 3),
    "SC_rgb_rle_2frame.dcm": (100, 100, 3),
    "examples_palette.dcm": None,
    "examples_ybr_color.dcm": None,
    "rtdose.dcm": None,  # multi-frame dose grid: middle frame
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_bundled_images_decode(name):
    img = load_image(data_file(name))
    assert img.dtype == np.float32 and np.isfinite(img).all()
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > img.min()
    if IMAGES[name] is not None:
        assert img.shape == IMAGES[name]
    assert img.ndim in (2, 3)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_syntaxes_give_the_same_pixels(name):
    ref = load_image(data_file("MR_small.dcm"), window="minmax")
    np.testing.assert_allclose(load_image(data_file(name), window="minmax"), ref, atol=1e-6)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("test-SR.dcm", "no pixel data"),
        ("rtplan.dcm", "no pixel data"),
        ("waveform_ecg.dcm", "no pixel data"),
        ("MR_truncated.dcm", "truncat"),
        ("rtplan_truncated.dcm", r"no pixel data \(SOP class RT Plan Storage\)"),
        # a non-conformant 12-bit JPEG stream that no installed decoder accepts
        ("JPEG-lossy.dcm", r"cannot decode pixel data \(JPEG Extended"),
    ],
)
def test_non_images_and_broken_files_are_refused_with_a_reason(name, reason):
    with pytest.raises(ImageReadError, match=reason) as e:
        load_image(data_file(name))
    assert "\n" not in e.value.reason

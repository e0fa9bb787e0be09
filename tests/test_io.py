"""medal.io: Pillow and DICOM decoding to float32 [0, 1]; every test file is built in tmp_path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_encoder
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medal.dicomwrite import write_dicom
from medal.errors import DataError, ImageReadError
from medal.io import IMAGE_SUFFIXES, count_frames, load_image, read_dicom_header, sniff_format

# ---------------------------------------------------------------------------- helpers


def check_output(img: np.ndarray, shape: tuple[int, ...]) -> None:
    assert img.dtype == np.float32
    assert img.shape == shape
    assert img.flags["C_CONTIGUOUS"]
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0


def dicom_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    sop_class: str = SecondaryCaptureImageStorage,
    **attrs: object,
) -> Dataset:
    """A minimal image dataset; ``pixels``: ``[H, W]``, ``[F, H, W]``, ``[H, W, 3]`` or
    ``[F, H, W, 3]`` of an integer dtype (which sets BitsAllocated)."""
    pixels = np.asarray(pixels)
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    frames = pixels.ndim == (4 if colour else 3)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def save_dicom(path: Path, ds: Dataset, transfer_syntax: str | None = None) -> Path:
    if transfer_syntax is not None:
        if not get_encoder(transfer_syntax).is_available:
            pytest.skip(f"no encoder installed for {UID(transfer_syntax).name}")
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h: int = 8, w: int = 10, hi: int = 4000) -> np.ndarray:
    """uint16 [h, w], values 0..hi row-major."""
    return np.linspace(0, hi, h * w).round().astype(np.uint16).reshape(h, w)


def linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, written out independently of medal."""
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))


# ---------------------------------------------------------------------------- formats


def test_suffixes_and_sniffing(tmp_path: Path) -> None:
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
    (tmp_path / "a.PNG").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "noext").write_bytes(b"\0" * 200)
    save_dicom(tmp_path / "1.2.840.10008.99", dicom_dataset(ramp()))
    save_dicom(tmp_path / "dicomnoext", dicom_dataset(ramp()))
    assert sniff_format(tmp_path / "a.PNG") == "pillow"
    assert sniff_format(tmp_path / "x.JPEG") == "pillow"
    assert sniff_format(tmp_path / "x.dcm") == "dicom"  # by suffix, even if it does not exist
    assert sniff_format(tmp_path / "x.DICOM") == "dicom"
    assert sniff_format(tmp_path / "notes.txt") is None
    assert sniff_format(tmp_path / "noext") is None
    assert sniff_format(tmp_path / "dicomnoext") == "dicom"
    assert sniff_format(tmp_path / "1.2.840.10008.99") == "dicom"
    assert load_image(tmp_path / "dicomnoext").shape == (8, 10)
    assert sniff_format(tmp_path) is None


# ---------------------------------------------------------------------------- Pillow


def test_png_8bit_grey(tmp_path: Path) -> None:
    px = np.array([[0, 51, 255], [102, 204, 153]], np.uint8)
    Image.fromarray(px).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    check_output(img, (2, 3))
    np.testing.assert_allclose(img, px / 255, atol=1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "g.png", window="minmax"), px / 255, atol=1e-6)
    assert count_frames(tmp_path / "g.png") == 1


def test_png_16bit_grey_and_windows(tmp_path: Path) -> None:
    px = np.array([[0, 1000, 4000], [30000, 65535, 2000]], np.uint16)
    Image.fromarray(px).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    check_output(img, (2, 3))
    np.testing.assert_allclose(img, px / 65535, atol=1e-6)
    mm = load_image(tmp_path / "g16.png", window="minmax")
    np.testing.assert_allclose(mm, px / 65535, atol=1e-6)  # its range is already 0..65535
    win = load_image(tmp_path / "g16.png", window=(2000.0, 2001.0))  # raw values
    np.testing.assert_allclose(win, linear_window(px.astype(float), 2000, 2001), atol=1e-6)
    assert win[0, 0] == 0 and win[1, 1] == 1 and abs(win[1, 2] - 0.5) < 1e-3


def test_minmax_constant_image_is_zeros(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 5), 77, np.uint8)).save(tmp_path / "c.png")
    img = load_image(tmp_path / "c.png", window="minmax")
    check_output(img, (4, 5))
    assert not img.any()


def test_rgb_rgba_palette(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = load_image(tmp_path / "rgb.png")
    check_output(img, (4, 6, 3))
    np.testing.assert_allclose(img[0, 0], [1.0, 128 / 255, 0.0], atol=1e-6)

    rgba = np.dstack([rgb, np.full((4, 6), 100, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    check_output(img, (4, 6, 3))

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(tmp_path / "pal.png")
    img = load_image(tmp_path / "pal.png")
    check_output(img, (4, 6, 3))
    np.testing.assert_allclose(img[2, 3], [1.0, 128 / 255, 0.0], atol=2 / 255)

    grey_pal = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6) * 10).convert("P")
    grey_pal.putpalette([v for i in range(256) for v in (i, i, i)])
    grey_pal.save(tmp_path / "greypal.png")
    check_output(load_image(tmp_path / "greypal.png"), (4, 6))


def test_jpeg_exif_orientation_rotates(tmp_path: Path) -> None:
    px = np.zeros((20, 40), np.uint8)
    px[:, :20] = 255  # bright left half
    im = Image.fromarray(px)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "o.jpg")
    check_output(img, (40, 20))
    assert img[:20].mean() > 0.9 and img[20:].mean() < 0.1  # left half is now on top


def test_tiff_16bit_and_multipage(tmp_path: Path) -> None:
    px = np.array([[0, 32768], [65535, 100]], np.uint16)
    Image.fromarray(px).save(tmp_path / "t.tif")
    img = load_image(tmp_path / "t.tif")
    check_output(img, (2, 2))
    np.testing.assert_allclose(img, px / 65535, atol=1e-6)
    pages = [Image.fromarray(np.full((3, 3), v, np.uint8)) for v in (255, 0)]
    pages[0].save(tmp_path / "multi.tiff", save_all=True, append_images=pages[1:])
    np.testing.assert_allclose(load_image(tmp_path / "multi.tiff"), 1.0)


def test_cmyk_and_bilevel(tmp_path: Path) -> None:
    Image.new("CMYK", (5, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    img = load_image(tmp_path / "cmyk.jpg")
    check_output(img, (3, 5, 3))
    assert img[..., 0].mean() > 0.9 and img[..., 1:].mean() < 0.1  # red
    Image.new("1", (4, 2), 1).save(tmp_path / "b.bmp")
    np.testing.assert_allclose(load_image(tmp_path / "b.bmp"), 1.0)


def test_truncated_and_fake_images_raise(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        load_image(tmp_path / "trunc.png")
    assert isinstance(err.value, DataError)
    assert err.value.path == tmp_path / "trunc.png" and "\n" not in err.value.reason
    (tmp_path / "fake.jpg").write_text("not a jpeg")
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(tmp_path / "fake.jpg")
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_invalid_arguments_are_value_errors(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "z.png")
    for bad in ("auto", (40.0, 0.0), (40.0, -1.0), (float("nan"), 10.0), (1.0,)):
        with pytest.raises(ValueError):
            load_image(tmp_path / "z.png", window=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_image(tmp_path / "z.png", frame="first")


# ---------------------------------------------------------------------------- DICOM grey


def test_dicom_rescale_and_file_window(tmp_path: Path) -> None:
    px = ramp()
    ds = dicom_dataset(
        px,
        bits_stored=12,
        RescaleSlope="2",
        RescaleIntercept="-1024",
        WindowCenter="1000",
        WindowWidth="2001",
    )
    path = save_dicom(tmp_path / "ct.dcm", ds)
    img = load_image(path)
    check_output(img, (8, 10))
    hu = px * 2.0 - 1024
    np.testing.assert_allclose(img, linear_window(hu, 1000, 2001), atol=1e-5)
    # A few pixels by hand: HU -1024 is below the window, 7976 above, and the centre pixel.
    assert img[0, 0] == 0.0 and img[-1, -1] == 1.0
    i = np.flatnonzero(hu.ravel() > 1000)[0]
    expected = (hu.ravel()[i] - 999.5) / 2000 + 0.5
    assert img.ravel()[i] == pytest.approx(expected, abs=1e-6)
    # The override is applied after the modality LUT.
    over = load_image(path, window=(0.0, 401.0))
    np.testing.assert_allclose(over, linear_window(hu, 0, 401), atol=1e-5)
    # minmax ignores the file window.
    np.testing.assert_allclose(load_image(path, window="minmax"), px / px.max(), atol=1e-6)


def test_dicom_multiple_windows_and_voi_functions(tmp_path: Path) -> None:
    px = ramp(hi=1000)
    ds = dicom_dataset(px, WindowCenter=[500, 100], WindowWidth=[201, 50])
    np.testing.assert_allclose(
        load_image(save_dicom(tmp_path / "a.dcm", ds)),
        linear_window(px.astype(float), 500, 201),
        atol=1e-5,
    )
    ds = dicom_dataset(px, WindowCenter="500", WindowWidth="200", VOILUTFunction="SIGMOID")
    img = load_image(save_dicom(tmp_path / "s.dcm", ds))
    np.testing.assert_allclose(img, 1 / (1 + np.exp(-4 * (px - 500.0) / 200)), atol=1e-5)
    ds = dicom_dataset(px, WindowCenter="500", WindowWidth="200", VOILUTFunction="LINEAR_EXACT")
    img = load_image(save_dicom(tmp_path / "e.dcm", ds))
    np.testing.assert_allclose(img, np.clip((px - 500.0) / 200 + 0.5, 0, 1), atol=1e-5)
    ds = dicom_dataset(px, WindowCenter="500", WindowWidth="0")  # unusable: fall back to range
    img = load_image(save_dicom(tmp_path / "bad.dcm", ds))
    np.testing.assert_allclose(img, px / px.max(), atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    px = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.uint16)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 2, 8])  # 4 entries, first maps 2, 8-bit output
    item.add_new("LUTData", "US", [10, 20, 30, 255])
    ds = dicom_dataset(px, VOILUTSequence=[item], WindowCenter="3", WindowWidth="2")
    img = load_image(save_dicom(tmp_path / "lut.dcm", ds))  # the LUT wins over the window
    expected = np.array([[10, 10, 10, 20], [30, 255, 255, 255]]) / 255
    np.testing.assert_allclose(img, expected, atol=1e-6)


def test_dicom_no_window_is_minmax(tmp_path: Path) -> None:
    px = ramp(hi=3000) + 500
    img = load_image(save_dicom(tmp_path / "n.dcm", dicom_dataset(px)))
    check_output(img, (8, 10))
    np.testing.assert_allclose(img, (px - 500.0) / 3000, atol=1e-6)
    const = load_image(save_dicom(tmp_path / "c.dcm", dicom_dataset(np.full((3, 3), 9, np.uint8))))
    assert not const.any()


def test_dicom_monochrome1_inverted(tmp_path: Path) -> None:
    px = ramp(hi=4095)
    ds = dicom_dataset(px, photometric="MONOCHROME1", bits_stored=12)
    img = load_image(save_dicom(tmp_path / "m1.dcm", ds))
    assert img[-1, -1] == 0.0 and img[0, 0] == 1.0  # the brightest raw value shows as black
    np.testing.assert_allclose(img, 1 - px / 4095, atol=1e-6)
    ds = dicom_dataset(px, photometric="MONOCHROME1", WindowCenter="2048", WindowWidth="4096")
    img = load_image(save_dicom(tmp_path / "m1w.dcm", ds))
    np.testing.assert_allclose(img, 1 - linear_window(px.astype(float), 2048, 4096), atol=1e-5)


def test_dicom_signed_pixels(tmp_path: Path) -> None:
    px = np.array([[-2000, -1000, 0], [1000, 2000, 3000]], np.int16)
    ds = dicom_dataset(
        px,
        signed=True,
        RescaleSlope="1",
        RescaleIntercept="0",
        WindowCenter="0",
        WindowWidth="2001",
    )
    img = load_image(save_dicom(tmp_path / "signed.dcm", ds))
    np.testing.assert_allclose(img, linear_window(px.astype(float), 0, 2001), atol=1e-5)
    assert img[0, 0] == 0 and img[1, 1] == 1 and img[0, 2] == pytest.approx(0.5 + 0.5 / 2000)
    mm = load_image(tmp_path / "signed.dcm", window="minmax")
    np.testing.assert_allclose(mm, (px + 2000.0) / 5000, atol=1e-6)


def test_dicom_multiframe(tmp_path: Path) -> None:
    frames = np.stack([np.full((4, 5), 100 * (i + 1), np.uint16) for i in range(5)])
    frames[:, 0, 0] = 0  # so min-max of each frame is 0..100*(i+1)
    ds = dicom_dataset(frames, WindowCenter="250", WindowWidth="101")
    path = save_dicom(tmp_path / "mf.dcm", ds)
    assert count_frames(path) == 5
    assert int(read_dicom_header(path).NumberOfFrames) == 5
    assert "PixelData" not in read_dicom_header(path)
    middle = load_image(path)  # frame 2: value 300, above the window
    check_output(middle, (4, 5))
    assert middle[1, 1] == 1.0
    assert load_image(path, frame=1)[1, 1] == pytest.approx((200 - 249.5) / 100 + 0.5)
    assert load_image(path, frame=0)[1, 1] == 0.0
    np.testing.assert_allclose(load_image(path, frame=4, window="minmax")[1, 1], 1.0)
    for bad in (5, -1):
        with pytest.raises(ImageReadError, match="out of range"):
            load_image(path, frame=bad)
    single = save_dicom(tmp_path / "single.dcm", dicom_dataset(ramp()))
    assert count_frames(single) == 1
    assert load_image(single, frame=3).shape == (8, 10)  # single-frame files ignore frame


def test_enhanced_multiframe_functional_groups(tmp_path: Path) -> None:
    """Enhanced IODs keep rescale (shared) and window (per frame) in functional groups."""
    frames = np.stack([ramp(hi=1000)] * 3)
    ds = dicom_dataset(frames)
    rescale, shared = Dataset(), Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = "1", "-500", "US"
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for center in (-400, 0, 400):
        voi, group = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = str(center), "101"
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    path = save_dicom(tmp_path / "enh.dcm", ds)
    values = frames[0] - 500.0
    for index, center in enumerate((-400, 0, 400)):
        np.testing.assert_allclose(
            load_image(path, frame=index), linear_window(values, center, 101), atol=1e-5
        )


# ---------------------------------------------------------------------------- DICOM colour


def test_dicom_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[:2, :, 2] = 255, 51, 102
    img = load_image(save_dicom(tmp_path / "rgb.dcm", dicom_dataset(rgb, photometric="RGB")))
    check_output(img, (4, 6, 3))
    np.testing.assert_allclose(img, rgb / 255, atol=1e-6)


def test_dicom_rgb_multiframe(tmp_path: Path) -> None:
    rgb = np.zeros((3, 4, 6, 3), np.uint8)
    rgb[1, ..., 1] = 255
    path = save_dicom(tmp_path / "rgbmf.dcm", dicom_dataset(rgb, photometric="RGB"))
    img = load_image(path)
    check_output(img, (4, 6, 3))
    np.testing.assert_allclose(img[..., 1], 1.0)


def test_dicom_native_ybr_full_is_converted(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    img = load_image(save_dicom(tmp_path / "ybr.dcm", dicom_dataset(ybr, photometric="YBR_FULL")))
    check_output(img, (4, 6, 3))
    np.testing.assert_allclose(img, rgb / 255, atol=2 / 255)


def test_dicom_jpeg_baseline_ybr(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:16, 0:16]
    rgb = np.stack([xx * 16, yy * 16, np.full_like(xx, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=100, subsampling=1)  # 4:2:2
    ds = dicom_dataset(rgb, photometric="YBR_FULL_422")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    img = load_image(save_dicom(tmp_path / "jpeg.dcm", ds))
    check_output(img, (16, 16, 3))
    assert np.abs(img - rgb / 255).mean() < 0.03  # RGB, not left as YCbCr


def test_dicom_palette_colour(tmp_path: Path) -> None:
    px = np.array([[0, 1], [2, 3]], np.uint8)
    ds = dicom_dataset(px, photometric="PALETTE COLOR")
    for colour, values in zip(
        ("Red", "Green", "Blue"), ([0, 65535, 0, 32768], [0, 0, 65535, 32768], [0, 0, 0, 65535])
    ):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(values, np.uint16).tobytes())
    img = load_image(save_dicom(tmp_path / "pal.dcm", ds))
    check_output(img, (2, 2, 3))
    np.testing.assert_allclose(img[0, 1], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(img[1, 1], [32768 / 65535, 32768 / 65535, 1], atol=1e-6)


# ---------------------------------------------------------------------------- compressed


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "jpeg2000"]
)
def test_dicom_compressed_lossless(tmp_path: Path, syntax: str) -> None:
    px = ramp(32, 32, hi=4000)  # OpenJPEG's default resolutions need >= 32 x 32
    ds = dicom_dataset(px, bits_stored=12, WindowCenter="2000", WindowWidth="4001")
    path = save_dicom(tmp_path / "c.dcm", ds, syntax)
    img = load_image(path)
    np.testing.assert_allclose(img, linear_window(px.astype(float), 2000, 4001), atol=1e-5)


def test_dicom_compressed_multiframe_rle(tmp_path: Path) -> None:
    frames = np.stack([ramp(hi=100 * (i + 1)) for i in range(3)])
    path = save_dicom(tmp_path / "rlemf.dcm", dicom_dataset(frames), RLELossless)
    assert count_frames(path) == 3
    np.testing.assert_allclose(
        load_image(path, frame=2, window=(150.0, 101.0)),
        linear_window(frames[2].astype(float), 150, 101),
        atol=1e-5,
    )


# ---------------------------------------------------------------------------- broken DICOM


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    ds = dicom_dataset(ramp(), sop_class=BasicTextSRStorage)
    del ds.PixelData
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        delattr(ds, keyword)
    ds.Modality = "SR"
    path = save_dicom(tmp_path / "sr.dcm", ds)
    with pytest.raises(ImageReadError, match=r"no pixel data \(SOP class Basic Text SR"):
        load_image(path)


def test_truncated_dicom(tmp_path: Path) -> None:
    path = save_dicom(tmp_path / "full.dcm", dicom_dataset(ramp(32, 32)))
    data = path.read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(data[:-500])
    with pytest.raises(ImageReadError, match="truncated pixel data"):
        load_image(tmp_path / "trunc.dcm")
    rle = save_dicom(tmp_path / "rle.dcm", dicom_dataset(ramp(32, 32)), RLELossless)
    data = rle.read_bytes()
    (tmp_path / "rletrunc.dcm").write_bytes(data[: len(data) - 200])
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(tmp_path / "rletrunc.dcm")


def test_text_file_with_dcm_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("patient notes, definitely not DICOM\n" * 20)
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        load_image(path)
    with pytest.raises(ImageReadError):
        count_frames(path)
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(ImageReadError):
        load_image(tmp_path / "empty.dcm")


def test_dicom_without_preamble_or_meta(tmp_path: Path) -> None:
    """Old files: bare implicit VR little endian dataset, no 'DICM' header."""
    px = ramp()
    ds = dicom_dataset(px, WindowCenter="2000", WindowWidth="4001")
    del ds.file_meta
    path = tmp_path / "raw.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    img = load_image(path)
    np.testing.assert_allclose(img, linear_window(px.astype(float), 2000, 4001), atol=1e-5)
    assert count_frames(path) == 1


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    ds = dicom_dataset(ramp())
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"  # private: no decoder exists
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageReadError, match="unsupported transfer syntax 1.2.3.4.5"):
        load_image(path)


# ------------------------------------------------- every syntax pydicom writes or encodes
def _write_uncompressed(path: Path, ds: Dataset, syntax: str) -> Path:
    """Uncompressed syntaxes: pydicom re-encodes the dataset when writing."""
    import pydicom

    ds.file_meta.TransferSyntaxUID = syntax
    big = syntax == ExplicitVRBigEndian
    if big:
        arr = np.frombuffer(ds.PixelData, dtype=np.uint16 if ds.BitsAllocated == 16 else np.uint8)
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    pydicom.dcmwrite(
        path,
        ds,
        enforce_file_format=True,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=not big,
    )
    return path


@pytest.mark.parametrize(
    "syntax",
    ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"],
    ids=["implicit-le", "explicit-le", "deflated", "explicit-be"],
)
def test_uncompressed_syntaxes_written_by_pydicom(tmp_path, syntax):
    px = ramp(8, 10)
    ref = load_image(save_dicom(tmp_path / "ref.dcm", dicom_dataset(px)), window="minmax")
    img = load_image(
        _write_uncompressed(tmp_path / "x.dcm", dicom_dataset(px), syntax), window="minmax"
    )
    np.testing.assert_allclose(img, ref, atol=1e-6)


@pytest.mark.parametrize(
    "syntax, kwargs, tol",
    [
        (JPEGLSNearLossless, {"jls_error": 3}, 8 / 4000),
        (JPEG2000, {"j2k_cr": [5]}, 0.05),
    ],
    ids=["jpeg-ls-near-lossless", "jpeg2000-lossy"],
)
def test_lossy_encoders_decode_close_to_the_original(tmp_path, syntax, kwargs, tol):
    if not get_encoder(syntax).is_available:
        pytest.fail(
            f"{UID(syntax).name} encoder missing: install the pylibjpeg/pyjpegls "
            f"plugins from pyproject"
        )
    px = ramp(32, 32)
    ref = load_image(save_dicom(tmp_path / "ref.dcm", dicom_dataset(px)), window="minmax")
    ds = dicom_dataset(px)
    ds.compress(syntax, **kwargs)
    ds.save_as(tmp_path / "lossy.dcm", enforce_file_format=True)
    img = load_image(tmp_path / "lossy.dcm", window="minmax")
    assert np.abs(img - ref).max() <= tol


def test_rgb_planar_configuration_1(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    ds = dicom_dataset(rgb, photometric="RGB")
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()  # RRR..GGG..BBB
    img = load_image(save_dicom(tmp_path / "planar.dcm", ds))
    np.testing.assert_allclose(img[0, 0], [1.0, 128 / 255, 0.0], atol=1e-6)
    assert img.shape == (4, 5, 3)


def test_dicomdir_is_refused_with_a_reason(tmp_path):
    from pydicom.uid import MediaStorageDirectoryStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "MEDAL"
    ds.DirectoryRecordSequence = []
    path = tmp_path / "DICOMDIR"
    ds.save_as(path, enforce_file_format=True)
    assert sniff_format(path) == "dicom"  # found by a folder scan (no suffix, DICM magic)
    with pytest.raises(ImageReadError, match="no pixel data") as e:
        load_image(path)
    assert "\n" not in e.value.reason


# --- very large images: a pixel limit, and decoding reduced ---------------------------------
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` (8-bit grey) and holds one empty IDAT: cheap to
    write, and a decoder that trusts it would allocate width * height bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def test_image_over_the_pixel_limit_is_refused_unread(tmp_path):
    from medal.data import ImageDataset
    from medal.io import MAX_PIXELS

    assert MAX_PIXELS == 178_956_970
    big = png_header_only(tmp_path / "huge.png", 20_000, 20_000)
    with pytest.raises(
        ImageReadError,
        match=r"huge\.png: image of 400 million pixels is over "
        r"the limit of 179 million \(medal\.io\.MAX_PIXELS",
    ):
        load_image(big)
    x, _, reason = ImageDataset([big], channels=1, size=28)[0]
    assert "over the limit of 179 million" in reason and x.shape == (1, 28, 28)
    dcm = write_dicom(tmp_path / "huge.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(dcm)
    ds.Rows, ds.Columns = 14_000, 14_000  # the header says so; the check comes first
    ds.save_as(dcm)
    with pytest.raises(
        ImageReadError,
        match=r"huge\.dcm: image of 14000x14000 = 196 million "
        r"pixels is over the limit",
    ):
        load_image(dcm)


def test_pillow_limit_lowered_elsewhere_is_a_reason(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(
        ImageReadError,
        match=r"a\.png: image of 0 million pixels is over the "
        r"limit of 0 million \(2 x Pillow's",
    ):
        load_image(p)


def test_large_image_decoded_reduced_matches_the_full_decode(tmp_path):
    from medal.data import DECODE_REDUCING_GAP, ImageDataset, to_tensor

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1500, 0:1100]
    img = 120 + 80 * np.sin(xx / 90) * np.cos(yy / 130) + rng.normal(0, 20, xx.shape)
    for name, arr in (
        ("grey.png", img.astype(np.uint8)),
        ("deep.png", (img * 200).astype(np.uint16)),
        ("rgb.png", np.stack([img, img * 0.5, 255 - img], -1).astype(np.uint8)),
    ):
        p = tmp_path / name
        Image.fromarray(arr).save(p)
        assert load_image(p, min_size=84).shape[:2] == (150, 110)  # / 10, which divides both
        full = to_tensor(load_image(p), 1, 28)
        x, _, reason = ImageDataset([p], channels=1, size=28)[0]
        assert reason == "" and DECODE_REDUCING_GAP == 3
        assert float((x - full).abs().max()) < 0.05, name  # normalised units (std 0.25)


def test_large_jpeg_is_decoded_at_reduced_resolution(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(np.full((3000, 4000), 128, np.uint8)).save(p, quality=90)
    out = load_image(p, min_size=300)
    assert min(out.shape) >= 300 and out.shape[0] <= 3000 // 8 * 1.01  # DCT scaling, 1/8
    assert load_image(p).shape == (3000, 4000)


PEAK = """
import resource, sys
from pathlib import Path
from medal.data import ImageDataset
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x, _, reason = ImageDataset([Path(sys.argv[1])], channels=1, size=28)[0]
assert reason == "", reason
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_12000_pixel_png_decodes_without_a_full_size_float_copy(tmp_path):
    """The issue's case: a 12000 x 12000 PNG (144 MB of 8-bit pixels) took 2.9 GB. Decoded
    reduced it needs the decoded pixels and little more (measured in a fresh process)."""
    import subprocess
    import sys

    p = tmp_path / "scan.png"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from PIL import Image; "
            "Image.new('L', (12000, 12000), 90).save(sys.argv[1])",
            str(p),
        ],
        check=True,
    )
    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(p)],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
    )
    grew = int(out.stdout.split()[-1])
    assert grew < 500e6, f"{grew / 1e6:.0f} MB"  # pixels 144 MB (+ their array copy)

#!/usr/bin/env python3
"""Decode-once benchmark: images/s for a cold and a cached pass over a folder of DICOMs.

By default it writes N synthetic 16-bit 512x512 DICOMs compressed with JPEG 2000 (lossless)
into a temporary folder, then runs medal's dataset twice through the decode cache (model input
224x224, 1 channel): the first pass decodes and fills the cache, the second reads it. Prints
both rates and their ratio (target: >= 5x for JPEG 2000).

    python scripts/bench_decode.py [--n 64] [--syntax jpeg2000|rle|jpegls|none] [--folder DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from medal.data import ImageDataset
from medal.dicomwrite import write_dicom
from medal.scan import file_sha256, scan_folder

SYNTAXES = {
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "none": ExplicitVRLittleEndian,
}


def make_folder(folder: Path, n: int, syntax: str, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        # smooth anatomy-like structure plus noise: compresses like a real radiograph
        img = (
            1500
            + 1000 * np.sin(xx / (20 + i % 7)) * np.cos(yy / 31)
            + rng.normal(0, 40, (size, size))
        )
        write_dicom(
            folder / f"img{i:04d}.dcm",
            np.clip(img, 0, 4095).astype(np.uint16),
            bits_stored=12,
            window=(1500, 2500),
            transfer_syntax=SYNTAXES[syntax],
        )


def one_pass(ds: ImageDataset) -> float:
    t0 = time.perf_counter()
    for i in range(len(ds)):
        _, _, reason = ds[i]
        if reason:
            raise SystemExit(f"{ds.paths[i]}: {reason}")
    return len(ds) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--syntax", choices=sorted(SYNTAXES), default="jpeg2000")
    p.add_argument("--size", type=int, default=512, help="synthetic image size (default 512)")
    p.add_argument("--input-size", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--folder", type=Path, help="use the DICOMs in this folder instead")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder or Path(tmp) / "dicoms"
        if a.folder is None:
            print(f"writing {a.n} {a.size}x{a.size} DICOMs ({a.syntax}) ...", flush=True)
            make_folder(folder, a.n, a.syntax, a.size)
        paths = scan_folder(folder)
        ids = [file_sha256(q) for q in paths]
        ds = ImageDataset(
            paths, channels=1, size=a.input_size, ids=ids, cache_dir=Path(tmp) / "cache"
        )
        cold = one_pass(ds)
        warm = one_pass(ds)
    print(f"{len(paths)} DICOMs -> 1x{a.input_size}x{a.input_size} inputs")
    print(f"cold pass (decode + preprocess + fill cache): {cold:8.1f} images/s")
    print(f"cached pass:                                  {warm:8.1f} images/s")
    print(f"ratio: {warm / cold:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

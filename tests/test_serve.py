"""The labelling page (``medal labels serve``): the round book, the server's gate and the page
itself in a real Chromium, on a round exported by the real pipeline."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import make_image, save, write_config

from medal.cli import main
from medal.config import load_config
from medal.dicomwrite import write_dicom
from medal.errors import LabellingError, MedalError
from medal.labelling import Candidate, export_round
from medal.workspace import Workspace
from medal.sources import sync

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "labelling-page.png"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 directly


# --- data ---------------------------------------------------------------------------------
def ct_phantom(size: int = 256, seed: int = 0) -> np.ndarray:
    """A chest-CT-like slice in Hounsfield units ``[size, size]``: air, body, two lungs with
    vessels, heart, spine, noise."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[0:size, 0:size] - size / 2) / (size / 2)
    hu = np.full((size, size), -1000.0)
    hu[(x / 0.9) ** 2 + (y / 0.68) ** 2 < 1] = 30  # soft tissue
    hu[(x / 0.9) ** 2 + (y / 0.68) ** 2 < 0.88] = -90  # fat under the skin
    hu[(x / 0.84) ** 2 + (y / 0.62) ** 2 < 1] = 35
    for cx in (-0.42, 0.42):  # lungs with vessels
        lung = ((x - cx) / 0.33) ** 2 + ((y + 0.05) / 0.5) ** 2 < 1
        hu[lung] = -860
        for _ in range(25):
            vx, vy = cx + rng.uniform(-0.25, 0.25), rng.uniform(-0.45, 0.35)
            hu[lung & ((x - vx) ** 2 + (y - vy) ** 2 < rng.uniform(2e-4, 1e-3))] = -200
    hu[((x - 0.05) / 0.2) ** 2 + ((y + 0.02) / 0.18) ** 2 < 1] = 45  # heart
    hu[(x**2 + (y - 0.45) ** 2) < 0.012] = 700  # vertebra
    hu[(x**2 + (y - 0.45) ** 2) < 0.004] = 250
    return hu + rng.normal(0, 12, hu.shape)


def write_ct(path: Path, frames: list[np.ndarray]) -> Path:
    """A CT DICOM (12 bits stored, intercept -1024, window 40/400) with one or more frames."""
    stored = [np.clip(np.rint(f + 1024), 0, 4095).astype(np.uint16) for f in frames]
    write_dicom(path, stored[0], bits_stored=12, intercept=-1024, window=(40, 400))
    ds = pydicom.dcmread(path)
    ds.Modality = "CT"
    if len(stored) > 1:
        ds.NumberOfFrames = len(stored)
        ds.PixelData = np.stack(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def round_data(tmp_path: Path) -> Path:
    """labelled (4 per class), validation (4 per class) and a pool of six: three PNG, a 12-bit
    DICOM, a CT slice and a three-frame CT. Returns the config path."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, name in enumerate(("normal", "pneumonia")):
        for i in range(4):
            save(root / "labelled" / name / f"l{i}.png", make_image(c, rng))
            save(root / "validation" / name / f"v{i}.png", make_image(c, rng))
    for i in range(3):
        save(root / "pool" / f"p{i}.png", make_image(i % 2, rng))
    save(root / "pool" / "d0.dcm", make_image(1, rng), as_dicom=True)
    write_ct(root / "pool" / "ct.dcm", [ct_phantom()])
    write_ct(root / "pool" / "ct3.dcm", [ct_phantom(seed=1) + 40 * k for k in range(3)])
    return write_config(tmp_path)


def exported(cfg, n: int = 4) -> Path:
    """A round folder of the first ``n`` pool images, exported without a model (fast)."""
    with Workspace(cfg) as ws:
        snap = sync(ws)
        chosen = [
            Candidate(it, 1.0 / (i + 1), np.array([0.3, 0.7])) for i, it in enumerate(snap.pool[:n])
        ]
        return export_round(
            ws,
            ws.next_round(),
            chosen,
            strategy="bald",
            model_round=0,
            pool_size=len(snap.pool),
            score_seconds=0.1,
        )


def read_labels(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def ledger(cfg, round: int = 1) -> dict[str, tuple[str, str]]:
    with Workspace(cfg) as ws:
        return {r.image_id: (r.label, r.source) for r in ws.db.labels(round)}


# --- the round book: what the page writes ----------------------------------------------------
def test_decisions_are_written_at_once_in_the_format_ingest_reads(tiny_config):
    from medal import api
    from medal.serve import RoundBook

    folder = exported(tiny_config)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    book = RoundBook(folder, tiny_config.classes)
    assert book.classes == ["normal", "pneumonia"]
    assert book.set(files[0], label="Pneumonia") == {"label": "pneumonia", "comment": ""}
    # on disk at once, as a whole file (the temporary file is gone)
    rows = read_labels(folder / "labels.csv")
    assert [r["file"] for r in rows] == files
    assert rows[0] == {"file": files[0], "label": "pneumonia", "comment": ""}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    book.set(files[1], label="unsure", comment="  rib or\nnodule? =1+1 ")
    book.set(files[2], label="normal")
    book.set(files[2], label="")  # cleared: back to the pool
    book.set(files[3], comment="=HYPERLINK(x)")
    with pytest.raises(LabellingError, match="not allowed; allowed: normal, pneumonia, unsure"):
        book.set(files[3], label="pneumothorax")
    with pytest.raises(LabellingError, match="not an image of round 001"):
        book.set("../labels.csv", label="normal")
    # a new book on the same folder (a restarted server) resumes from the file
    again = RoundBook(folder)  # classes from manifest.csv without a config
    assert again.classes == ["normal", "pneumonia"]
    assert again.labels() == {
        files[0]: {"label": "pneumonia", "comment": ""},
        files[1]: {"label": "unsure", "comment": "rib or nodule? =1+1"},
        files[2]: {"label": "", "comment": ""},
        files[3]: {"label": "", "comment": "'=HYPERLINK(x)"},
    }
    r = api.ingest(tiny_config, folder)
    assert r.labelled == {"pneumonia": 1, "unsure": 1} and r.returned_to_pool == 2


def test_rows_and_columns_it_does_not_own_are_kept(tiny_config):
    from medal.serve import RoundBook

    folder = exported(tiny_config, n=3)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    # a spreadsheet's version: ';', BOM, an annotator column, a row missing, one label typed
    (folder / "labels.csv").write_bytes(
        f"\ufefffile;label;annotator\n{files[2]};NORMAL;ann\n{files[0]};;\n".encode()
    )
    book = RoundBook(folder, tiny_config.classes)
    assert book.labels()[files[2]] == {"label": "normal", "comment": ""}
    book.set(files[1], label="pneumonia")
    rows = read_labels(folder / "labels.csv")
    assert rows == [
        {"file": files[2], "label": "NORMAL", "annotator": "ann", "comment": ""},
        {"file": files[0], "label": "", "annotator": "", "comment": ""},
        {"file": files[1], "label": "pneumonia", "annotator": "", "comment": ""},
    ]


def test_an_annotator_writes_their_own_file(tiny_config):
    from medal import api
    from medal.serve import RoundBook

    folder = exported(tiny_config, n=2)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    for name, labels in (("ana", ["normal", "pneumonia"]), ("ben", ["normal", "pneumonia"])):
        book = RoundBook(folder, tiny_config.classes, annotator=name)
        for f, lab in zip(files, labels):
            book.set(f, label=lab)
        assert book.labels_path.name == f"labels_{name}.csv"
    assert all(r["label"] == "" for r in read_labels(folder / "labels.csv"))
    r = api.ingest(tiny_config, folder)
    assert r.labelled == {"normal": 1, "pneumonia": 1}
    assert [(a, b, n) for a, b, n, _ in r.agreement] == [("ana", "ben", 2)]
    with pytest.raises(LabellingError, match="annotator name '../x' is not allowed"):
        RoundBook(folder, annotator="../x")


def test_a_folder_that_is_not_this_rounds_is_refused(tiny_config, tmp_path):
    from medal.serve import RoundBook

    folder = exported(tiny_config, n=2)
    with pytest.raises(
        LabellingError, match="exported with classes normal, pneumonia, but the config has cat, dog"
    ):
        RoundBook(folder, ["cat", "dog"])
    with pytest.raises(LabellingError, match="not a round folder"):
        RoundBook(tmp_path)
    (folder / "labels.csv").write_text("name,value\n")
    with pytest.raises(LabellingError, match="must have columns 'file' and 'label'"):
        RoundBook(folder)


def test_blind_by_default(tiny_config):
    from medal.serve import RoundBook

    folder = exported(tiny_config, n=2)  # blind: the folder holds no prediction to show
    book = RoundBook(folder)
    assert book.classes == ["normal", "pneumonia"]  # from the class folders
    blind = book.state(show_predictions=False)
    assert not {"predicted", "score", "probs"} & set(blind["images"][0])
    cfg = load_config(tiny_config.path, {"labelling.show_predictions": True})
    assert cfg.labelling.show_predictions and not tiny_config.labelling.show_predictions
    shown = RoundBook(exported(cfg, n=2)).state(show_predictions=True)["images"][0]
    assert shown["predicted"] == "pneumonia" and shown["probs"] == {
        "normal": "0.3000",
        "pneumonia": "0.7000",
    }


# --- pixels ---------------------------------------------------------------------------------
def test_pixels_are_full_depth_modality_values(tmp_path):
    from medal.serve import read_pixels

    hu = np.rint(ct_phantom(64))
    frames = [hu, hu + 100, hu + 200]
    meta, values = read_pixels(write_ct(tmp_path / "ct3.dcm", frames))
    assert meta["frames"] == 3 and meta["frame"] == 1  # the middle frame, as medal reads it
    assert values.dtype == np.float32 and np.array_equal(values, np.clip(frames[1], -1024, 3071))
    assert meta["window"] == [40.0, 400.0] and meta["units"] == "HU"
    names = [p["name"] for p in meta["presets"]]
    assert names[:4] == ["file", "lung", "mediastinum", "bone"]
    meta, values = read_pixels(tmp_path / "ct3.dcm", 2)
    assert meta["frame"] == 2 and values.max() == np.clip(frames[2], -1024, 3071).max()
    with pytest.raises(MedalError, match="frame 3 out of range"):
        read_pixels(tmp_path / "ct3.dcm", 3)

    # a radiograph stored MONOCHROME1: presets from its histogram, mirrored
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    p = write_dicom(tmp_path / "dx.dcm", raw, photometric="MONOCHROME1", bits_stored=12)
    ds = pydicom.dcmread(p)
    ds.Modality = "DX"
    ds.save_as(p, enforce_file_format=True)
    meta, values = read_pixels(p)
    assert np.array_equal(values, raw) and meta["window"] is None
    lung = next(x for x in meta["presets"] if x["name"] == "lung")
    assert lung["center"] > np.median(raw)  # dark on screen = high values in MONOCHROME1

    # 16-bit PNG keeps its 16 bits
    from PIL import Image

    png = np.array([[0, 1], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(png).save(tmp_path / "x.png")
    meta, values = read_pixels(tmp_path / "x.png")
    assert np.array_equal(values, png) and meta["window"] == [32767.5, 65535.0]


# --- the server's gate ------------------------------------------------------------------------
def request(
    url: str, *, token: str | None = None, body: dict | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of a GET (or a JSON POST) to the real server."""
    import json

    headers = {} if token is None else {"X-Medal-Token": token}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with NO_PROXY.open(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture
def served(tiny_config):
    """A real server (uvicorn in a thread, a free port on 127.0.0.1) on a fresh round folder."""
    import threading

    from medal.serve import serve

    folder = exported(tiny_config, n=2)
    server = serve(folder)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = server.url.split("/?token=")[0]
    deadline = time.monotonic() + 30
    while True:  # up once it refuses a request without the token
        try:
            if request(base + "/")[0] == 403:
                break
        except urllib.error.URLError:  # bound, not yet listening
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield server, base
    server.stop()
    thread.join(timeout=30)


def test_every_request_needs_the_token_and_only_round_images_are_read(served, tmp_path):
    import json
    from urllib.parse import quote

    server, base = served
    folder, token = server.book.folder, server.token
    assert server.url == f"{base}/?token={token}" and base.startswith("http://127.0.0.1:")
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    os.symlink(tmp_path / "secret.txt", folder / "link.png")
    os.remove(folder / files[1])  # an exported image swapped for a link out of the folder
    os.symlink(tmp_path / "secret.txt", folder / files[1])
    for url in (
        "/",
        "/api/state",
        f"/api/pixels?file={files[0]}",
        f"/?token={token}x",
        "/api/state?token=",
        "/static/labelling.html",
    ):
        status, body, _ = request(base + url)
        assert status == 403 and b"token" in body, url
    assert request(base + "/api/label", body={"file": files[0], "label": "normal"})[0] == 403
    assert read_labels(folder / "labels.csv")[0]["label"] == ""
    status, page, headers = request(server.url)
    assert status == 200 and "default-src 'none'" in headers["content-security-policy"]
    assert b"http://" not in page and b"https://" not in page  # nothing from the web
    status, body, _ = request(base + "/api/state", token=token)
    assert json.loads(body)["images"][0]["file"] == files[0]
    for name in (
        "../../../medal.toml",
        str(tmp_path / "secret.txt"),
        "manifest.csv",
        "link.png",
        "labels.csv",
        files[1],
    ):
        status, body, _ = request(f"{base}/api/pixels?file={quote(name)}", token=token)
        assert status == 404 and b"TOPSECRET" not in body, name
    assert request(f"{base}/api/pixels?file={files[0]}", token=token)[0] == 200
    status, body, _ = request(
        base + "/api/label", token=token, body={"file": files[0], "label": "normal"}
    )
    saved = json.loads(body)
    assert saved.pop("version") == server.book.version()
    assert saved == {"file": files[0], "label": "normal", "comment": ""}
    assert (
        request(base + "/api/label", token=token, body={"file": files[0], "label": "cat"})[0] == 400
    )
    assert read_labels(folder / "labels.csv")[0]["label"] == "normal"


def test_missing_serve_extra_says_how_to_install(monkeypatch, tiny_config):
    from medal import serve

    folder = exported(tiny_config, n=2)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MedalError, match=r"pip install 'medal-al\[serve\]'"):
        serve.serve(folder)


def test_cli_labels_serve_arguments(tiny_config, capsys):
    cfg = str(tiny_config.path)
    assert main(["labels", "serve"]) == 2
    assert "exactly one round folder" in capsys.readouterr().err
    assert main(["labels", "export", "-o", "x.csv"]) == 2
    assert "needs the config: -c CONFIG" in capsys.readouterr().err
    assert main(["labels", "-c", cfg, "serve", "nowhere/round-001"]) == 2
    assert "round folder not found" in capsys.readouterr().err


# --- the page in a real browser -------------------------------------------------------------
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright as sp
    except ImportError:
        reason = "the playwright package is missing (pip install -e '.[test]')"
        if os.environ.get("MEDAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MEDAL_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return sp()


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "medal", "labels", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 180
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "?token=" in line:
            return proc, line.strip()
    proc.kill()
    raise AssertionError("the server printed no address:\n" + "".join(seen))


@pytest.mark.browser
def test_label_a_round_in_chromium_and_ingest_it(chromium, tmp_path):
    cfg_path = round_data(tmp_path)
    c = ["-c", str(cfg_path), "-q"]
    assert main(["train", *c]) == 0
    assert main(["query", *c]) == 0
    folder = tmp_path / "ws" / "labelling" / "round-001"
    with open(folder / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    files = [r["file"] for r in manifest]
    source = {r["file"]: Path(r["source_path"]).name for r in manifest}
    assert len(files) == 6 and sorted(source.values()) == [
        "ct.dcm",
        "ct3.dcm",
        "d0.dcm",
        "p0.png",
        "p1.png",
        "p2.png",
    ]
    typed = ["normal", "pneumonia", "unsure", "pneumonia", "normal", "normal"]
    key = {"normal": "1", "pneumonia": "2", "unsure": "u"}
    comment = "faint opacity, left base?"

    proc, url = start_server(["serve", str(folder), *c])
    try:
        base = url.split("/?token=")[0]
        for bad in (base + "/", base + "/api/state", base + "/api/state?token=nope"):
            assert request(bad)[0] == 403
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(url)

            def shown(name: str) -> None:
                page.wait_for_function(
                    "n => (document.getElementById('stage').dataset.shown || '')"
                    ".startsWith(n + '#')",
                    arg=name,
                    timeout=30000,
                )

            def saved() -> None:
                page.wait_for_function(
                    "() => document.getElementById('saved').textContent"
                    ".startsWith('saved in labels.csv')",
                    timeout=30000,
                )

            shown(files[0])
            assert page.inner_text("#count") == "0 of 6 labelled"
            assert "Hidden while labelling" in page.inner_text("#model")
            assert page.inner_text("#classes").split("\n") == [
                "1normal",
                "2pneumonia",
                "uunsure",
                "⌫clear",
            ]  # the key shown on each button
            for i in range(3):
                if i == 1:
                    page.keyboard.press("c")
                    page.keyboard.type(comment)
                    page.keyboard.press("Enter")
                page.keyboard.press(key[typed[i]])
                shown(files[i + 1])
            saved()
            assert page.inner_text("#count") == "3 of 6 labelled"

            # reload mid-way: the page resumes at the first image without a label
            page.reload()
            shown(files[3])
            assert page.inner_text("#count") == "3 of 6 labelled"
            assert page.inner_text("#file") == files[3]
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("ArrowLeft")
            shown(files[1])
            assert page.input_value("#comment") == comment
            page.keyboard.press("End")
            page.keyboard.press("Home")
            page.keyboard.press("n")  # next image without a label
            shown(files[3])
            for i in range(3, 6):
                page.keyboard.press(key[typed[i]])
                if i < 5:
                    shown(files[i + 1])
            saved()
            assert page.inner_text("#count") == "6 of 6 labelled"
            assert page.is_visible(
                "#done"
            ) and "Done: all 6 images labelled (1 unsure)" in page.inner_text("#done")

            # the three-frame CT opens at its middle frame; the arrows move through frames
            page.click(f"#list li:nth-child({files.index(_name(source, 'ct3.dcm')) + 1})")
            shown(_name(source, "ct3.dcm"))
            assert page.is_visible("#framebox") and page.input_value("#frame") == "1"
            page.keyboard.press("ArrowDown")
            page.wait_for_function(
                "() => document.getElementById('stage').dataset.shown.endsWith('#2')"
            )
            assert page.inner_text("#frametext").startswith("frame 3 of 3")

            # window/level on the CT slice: a preset, then a drag; computed from HU values
            page.click(f"#list li:nth-child({files.index(_name(source, 'ct.dcm')) + 1})")
            shown(_name(source, "ct.dcm"))
            stage = page.locator("#stage")
            assert stage.get_attribute("data-window") == "40/400"  # the file's window
            before = _canvas_sum(page)
            page.keyboard.press("w")
            page.wait_for_function(
                "() => document.getElementById('stage').dataset.window === '-600/1500'"
            )
            assert "lung" in page.inner_text("#wl")
            box = stage.bounding_box()
            assert box is not None
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx - 25, cy - 10, steps=5)
            page.mouse.up()
            page.wait_for_function(
                "() => !document.getElementById('wl').textContent.includes('lung')"
            )
            center, width = map(float, stage.get_attribute("data-window").split("/"))
            assert center < -600 and width < 1500 and "(custom)" in page.inner_text("#wl")
            windowed = _canvas_sum(page)
            assert windowed != before
            page.keyboard.press("i")  # invert, and back
            page.wait_for_function(
                "() => document.getElementById('wl').textContent.includes('inverted')"
            )
            assert _canvas_sum(page) != windowed
            page.keyboard.press("i")
            zoom = page.text_content("#overlay")
            page.mouse.wheel(0, -400)  # zoom in around the pointer, then fit again
            page.wait_for_function(
                "z => document.getElementById('overlay').textContent !== z", arg=zoom
            )
            page.keyboard.press("f")
            page.wait_for_function(
                "z => document.getElementById('overlay').textContent === z", arg=zoom
            )
            assert _canvas_sum(page) == windowed
            shot = tmp_path / "labelling-page.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("MEDAL_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, SCREENSHOT)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    rows = read_labels(folder / "labels.csv")
    assert [(r["file"], r["label"]) for r in rows] == list(zip(files, typed))
    assert [r["comment"] for r in rows] == ["", comment, "", "", "", ""]
    assert main(["ingest", *c, str(folder)]) == 0
    ids = {r["file"]: r["image_id"] for r in manifest}
    assert ledger(load_config(cfg_path)) == {
        ids[f]: (lab, "labels.csv") for f, lab in zip(files, typed)
    }


def _name(source: dict[str, str], src: str) -> str:
    return next(f for f, s in source.items() if s == src)


def _canvas_sum(page) -> int:
    return page.evaluate("""() => { const c = document.getElementById('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i]; return s; }""")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_labels_serve_does_not_load_torch(tiny_config):
    """``medal labels serve`` needs no torch: in a real process serving a round (its pixels
    too, DICOM included), torch's shared library is never mapped (torch took seconds of the
    start-up)."""
    from urllib.parse import quote

    folder = exported(tiny_config, n=40)
    proc, url = start_server(["serve", str(folder)])
    try:
        base, token = url.split("/?token=")
        assert request(f"{base}/api/state", token=token)[0] == 200
        files = [p.name for p in sorted(folder.iterdir()) if p.suffix in (".dcm", ".png")]
        assert any(f.endswith(".dcm") for f in files)
        for name in files[:12]:
            assert request(f"{base}/api/pixels?file={quote(name)}", token=token)[0] == 200
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "python" in maps  # the process is the server itself
        assert "libtorch" not in maps and "torchvision" not in maps
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize(
    "header", ["file,label,label", "file,label,file", "File,label,Comment,comment"]
)
def test_a_labels_file_with_a_repeated_column_is_refused_by_the_page(tiny_config, header):
    """The page reads labels.csv as ingest does: a column named twice (which one holds the
    label would be a guess) stops the page with one line naming line 1; the file is kept."""
    from medal.serve import RoundBook

    folder = exported(tiny_config, n=2)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    width = len(header.split(","))
    text = header + "\n" + "".join(f"{f}{',' * (width - 1)}\n" for f in files)
    (folder / "labels.csv").write_text(text, encoding="utf-8")
    with pytest.raises(LabellingError, match=r"labels\.csv line 1: column '\w+' appears 2 times"):
        RoundBook(folder, tiny_config.classes).save(files[0], label="normal")
    assert (folder / "labels.csv").read_text(encoding="utf-8") == text

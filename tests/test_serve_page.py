"""The labelling page in a real headless Chromium against real server processes (issue 26):
failed saves look unsaved, keyboard focus never mislabels, an ingested round turns the page
read-only, two tabs converge, undo and the key overlay."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_serve import exported, read_labels, start_server, sync_playwright

pytestmark = pytest.mark.browser


@contextmanager
def browser(chromium: str) -> Iterator:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def open_page(b, url: str):
    page = b.new_page(viewport={"width": 1280, "height": 760})
    page.goto(url)
    return page


def shown(page, name: str) -> None:
    page.wait_for_function(
        "n => (document.getElementById('stage').dataset.shown || '').startsWith(n + '#')",
        arg=name,
        timeout=30000,
    )


def text_is(page, selector: str, text: str, timeout: float = 15000) -> None:
    page.wait_for_function(
        "([s, t]) => document.querySelector(s).textContent === t",
        arg=[selector, text],
        timeout=timeout,
    )


def rows(folder: Path) -> dict[str, tuple[str, str]]:
    return {
        r["file"]: (r["label"], r.get("comment") or "") for r in read_labels(folder / "labels.csv")
    }


def wait_rows(folder: Path, page, want: dict[str, tuple[str, str]]) -> None:
    """Until labels.csv has ``want`` for those files (polled through the page's clock)."""
    for _ in range(150):
        got = rows(folder)
        if all(got.get(f) == v for f, v in want.items()):
            return
        page.wait_for_timeout(100)
    assert {f: rows(folder).get(f) for f in want} == want


def stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=60)


@contextmanager
def served(args: list[str]) -> Iterator:
    """A real ``medal labels serve`` process: ``(process, address)``, stopped on the way out
    (also when the test stopped it itself)."""
    proc, url = start_server(args)
    try:
        yield proc, url
    finally:
        stop(proc)


def test_space_enter_and_a_dragged_comment_never_mislabel(chromium, tiny_config):
    folder = exported(tiny_config, n=4)
    files = list(rows(folder))
    with served(["serve", str(folder)]) as (proc, url), browser(chromium) as b:
        page = open_page(b, url)
        shown(page, files[0])
        page.click("#classes button >> nth=0")  # a mouse click on "normal"
        shown(page, files[1])
        wait_rows(folder, page, {files[0]: ("normal", "")})
        page.keyboard.press("Space")  # the clicked button must not take these
        page.keyboard.press("Enter")
        page.wait_for_timeout(800)
        assert rows(folder)[files[1]] == ("", "")
        assert page.inner_text("#file") == files[1]
        assert page.inner_text("#count") == "1 of 4 labelled"

        # a comment, then window/level dragged on the image: the next digit labels
        page.keyboard.press("c")
        page.keyboard.type("rib fracture?")
        box = page.locator("#stage").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + 30, cy + 10, steps=4)
        page.mouse.up()
        page.keyboard.press("2")
        shown(page, files[2])
        wait_rows(folder, page, {files[1]: ("pneumonia", "rib fracture?")})

        # a comment left by a click on another image stays with its own image
        page.keyboard.press("c")
        page.keyboard.type("left base")
        page.click("#list li:nth-child(4)")
        shown(page, files[3])
        wait_rows(folder, page, {files[2]: ("", "left base"), files[3]: ("", "")})
        assert page.input_value("#comment") == ""


def test_a_failed_save_is_shown_unsaved_not_counted_and_retried(chromium, tiny_config):
    folder = exported(tiny_config, n=4)
    files = list(rows(folder))
    with served(["serve", str(folder)]) as (proc, url), browser(chromium) as b:
        page = open_page(b, url)
        shown(page, files[0])
        page.keyboard.press("1")
        shown(page, files[1])
        text_is(page, "#saved", "saved in labels.csv")
        stop(proc)  # the server stops
        page.keyboard.press("2")
        page.keyboard.press("1")  # queued behind the failed save: dropped, not applied
        page.wait_for_function(
            "() => document.getElementById('saved').textContent.startsWith('NOT SAVED')",
            timeout=15000,
        )
        page.wait_for_timeout(300)
        assert page.inner_text("#count") == "1 of 4 labelled · 1 NOT SAVED"
        assert page.inner_text("#file") == files[1]  # did not move on
        assert "NOT SAVED" in page.inner_text("#list li:nth-child(2)")
        assert "NOT SAVED" in page.inner_text("#overlay-label")
        assert rows(folder)[files[1]] == ("", "")

    # the server comes back: the unsaved decision is retried and then counted
    with served(["serve", str(folder)]) as (proc, url), browser(chromium) as b:
        page = open_page(b, url)
        shown(page, files[1])
        page.route("**/api/label", lambda route: route.abort())  # unreachable
        page.keyboard.press("2")
        page.wait_for_function(
            "() => document.getElementById('saved').textContent.startsWith('NOT SAVED')",
            timeout=15000,
        )
        assert page.inner_text("#count") == "1 of 4 labelled · 1 NOT SAVED"
        page.unroute("**/api/label")  # reachable again
        text_is(page, "#count", "2 of 4 labelled")
        assert rows(folder)[files[1]] == ("pneumonia", "")
        assert page.inner_text("#file") == files[1]
        text_is(page, "#saved", "saved in labels.csv")


def test_an_ingested_round_turns_the_page_read_only(chromium, tiny_config):
    from medal.cli import main

    folder = exported(tiny_config, n=4)
    files = list(rows(folder))
    args = ["serve", str(folder), "-c", str(tiny_config.path)]
    with served(args) as (proc, url), browser(chromium) as b:
        page = open_page(b, url)
        shown(page, files[0])
        page.keyboard.press("1")
        shown(page, files[1])
        text_is(page, "#saved", "saved in labels.csv")
        assert main(["ingest", "-c", str(tiny_config.path), "-q", str(folder)]) == 0
        page.wait_for_function(
            "() => document.body.classList.contains('readonly')", timeout=15000
        )  # while the page stays open
        assert "round 001 was ingested on" in page.inner_text("#readonly")
        before = (folder / "labels.csv").read_bytes()
        page.keyboard.press("2")
        page.keyboard.press("c")
        page.keyboard.type("late")
        page.keyboard.press("Enter")
        page.wait_for_timeout(500)
        assert (folder / "labels.csv").read_bytes() == before
        assert page.inner_text("#count") == "1 of 4 labelled"
        page.reload()  # opened again: read-only at once
        shown(page, files[1])
        assert page.evaluate("document.body.classList.contains('readonly')")


def test_two_tabs_converge(chromium, tiny_config):
    folder = exported(tiny_config, n=4)
    files = list(rows(folder))
    with served(["serve", str(folder)]) as (proc, url), browser(chromium) as b:
        one, two = open_page(b, url), open_page(b, url)
        shown(one, files[0])
        shown(two, files[0])
        one.keyboard.press("1")
        text_is(two, "#list li:nth-child(1) .lab", "normal")  # tab two learns it
        text_is(two, "#count", "1 of 4 labelled")
        two.keyboard.press("ArrowRight")
        shown(two, files[1])
        two.keyboard.press("2")
        text_is(one, "#list li:nth-child(2) .lab", "pneumonia")  # and tab one
        text_is(one, "#count", "2 of 4 labelled")
    assert rows(folder) == {
        files[0]: ("normal", ""),
        files[1]: ("pneumonia", ""),
        files[2]: ("", ""),
        files[3]: ("", ""),
    }


def test_fast_keys_undo_help_and_the_real_ingest_command(chromium, tiny_config):
    folder = exported(tiny_config, n=4)
    files = list(rows(folder))
    args = ["serve", str(folder), "-c", str(tiny_config.path)]
    with served(args) as (proc, url), browser(chromium) as b:
        page = open_page(b, url)
        shown(page, files[0])
        for k in "1212":  # pressed faster than the saves answer: applied in order
            page.keyboard.press(k)
        text_is(page, "#count", "4 of 4 labelled")
        assert rows(folder) == {
            files[0]: ("normal", ""),
            files[1]: ("pneumonia", ""),
            files[2]: ("normal", ""),
            files[3]: ("pneumonia", ""),
        }
        assert page.is_visible("#done")
        assert f"medal ingest -c {tiny_config.path} {folder}" in page.inner_text("#done")
        page.keyboard.press("Control+z")  # undo the last decision
        text_is(page, "#count", "3 of 4 labelled")
        assert rows(folder)[files[3]] == ("", "")
        assert page.inner_text("#file") == files[3]
        assert not page.is_visible("#help")
        page.keyboard.press("?")
        assert page.is_visible("#help") and "undo the last decision" in page.inner_text("#help")
        page.keyboard.press("Escape")
        assert not page.is_visible("#help")

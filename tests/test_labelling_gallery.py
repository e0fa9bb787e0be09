"""medal.labelling.gallery: the self-contained preview page of a round."""

from __future__ import annotations

import numpy as np

from medal.labelling.gallery import gallery_html


def test_gallery_escapes_names_and_counts_previews():
    rows = [
        (1, "001_<b>.png", "previews/001_<b>.png", 0.5, "pneu<monia", np.array([0.25, 0.75])),
        (2, "002_x.dcm", None, 0.25, "", np.zeros(0)),
    ]
    page = gallery_html(7, ["normal", "pneu<monia"], rows, show_predictions=True)
    assert "<title>medal labelling round 007</title>" in page
    assert 'data-images="1"' in page  # only the first row has a preview to wait for
    assert "001_<b>" not in page and "001_&lt;b&gt;.png" in page
    assert "pneu&lt;monia" in page and "pneu<monia" not in page
    assert "<p>(no preview)</p>" in page and "no model yet" in page  # a zero-label row
    assert 'style="width:75.0%"' in page and "0.750" in page
    assert "http" not in page  # nothing fetched from elsewhere


def test_a_blind_gallery_shows_no_score_prediction_or_probability():
    rows = [(1, "001_a.png", "previews/001_a.png", 0.4321, "pneumonia", np.array([0.25, 0.75]))]
    page = gallery_html(1, ["normal", "pneumonia"], rows)  # blind is the default
    assert 'data-file="001_a.png"' in page and "<code>pneumonia</code>" in page
    for shown in (
        "0.4321",
        "0.432",
        "0.750",
        "75.0%",
        "0.250",
        "model predicts",
        "data-predicted",
        'class="probs"',
        'class="score"',
    ):
        assert shown not in page
    assert "blind labelling" in page

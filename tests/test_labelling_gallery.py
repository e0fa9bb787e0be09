"""medal.labelling.gallery: the self-contained preview page of a round."""

from __future__ import annotations

import numpy as np

from medal.labelling.gallery import gallery_html


def test_gallery_escapes_names_and_counts_previews():
    rows = [(1, "001_<b>.png", "previews/001_<b>.png", 0.5, "pneu<monia", np.array([0.25, 0.75])),
            (2, "002_x.dcm", None, 0.25, "", np.zeros(0))]
    page = gallery_html(7, ["normal", "pneu<monia"], rows)
    assert "<title>medal labelling round 007</title>" in page
    assert 'data-images="1"' in page  # only the first row has a preview to wait for
    assert "001_<b>" not in page and "001_&lt;b&gt;.png" in page
    assert "pneu&lt;monia" in page and "pneu<monia" not in page
    assert "<p>(no preview)</p>" in page and "no model yet" in page  # a zero-label row
    assert 'style="width:75.0%"' in page and "0.750" in page
    assert "http" not in page  # nothing fetched from elsewhere

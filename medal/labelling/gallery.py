"""The gallery: a self-contained page of a round's previews (with the model's scores and
predictions only when ``labelling.show_predictions`` is true)."""

from __future__ import annotations

import html

import numpy as np

from ..workspace import UNSURE


def gallery_html(
    round_no: int,
    classes: list[str],
    rows: list[tuple[int, str, str | None, float, str, np.ndarray]],
    *,
    show_predictions: bool = False,
) -> str:
    """A self-contained page (no scripts from elsewhere, no network) showing each image; the
    model's score, prediction and probabilities only with ``show_predictions`` (otherwise the
    page is blind: nothing of the model's opinion is in it)."""
    esc = html.escape
    labels = "".join(f"<li><code>{esc(c)}</code></li>" for c in [*classes, UNSURE])
    cards = [_card(classes, row, show_predictions) for row in rows]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>medal labelling round {round_no:03d}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: .6em;
        margin: 0; width: 260px; }}
.card img {{ width: 256px; height: 256px; object-fit: contain; background: #000;
            image-rendering: pixelated; }}
.rank {{ font-size: 1.3em; font-weight: bold; }}
.file {{ font-family: monospace; font-size: .85em; word-break: break-all; }}
.probs {{ width: 100%; font-size: .85em; }}
.probs td:nth-child(2) {{ width: 50%; }}
.bar {{ height: .7em; background: #3b7dd8; }}
.num {{ text-align: right; }}
</style></head>
<body data-images="{sum(1 for r in rows if r[2])}" data-loaded="0">
<h1>Labelling round {round_no:03d}</h1>
<p>{len(rows)} images, most uncertain first{"" if show_predictions else _BLIND}.
Type one label per image in <code>labels.csv</code> (or move the image file into its class
folder), or label them on the labelling page: <code>medal labels serve</code>.
Allowed labels:</p>
<ul class="labels">{labels}</ul>
<div class="grid">{"".join(cards)}</div>
<script>
function imageLoaded(img) {{
  if (img.naturalWidth > 0) {{
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded) + 1);
  }}
}}
</script>
</body></html>
"""


def _card(
    classes: list[str],
    row: tuple[int, str, str | None, float, str, np.ndarray],
    show_predictions: bool,
) -> str:
    """One image's card: its preview (or a note that there is none), rank and file name, and
    with ``show_predictions`` the model's score, prediction and probabilities ``[C]``."""
    esc = html.escape
    rank, name, preview, score, pred, probs = row
    img = (
        f'<img src="{esc(preview)}" alt="{esc(name)}" onload="imageLoaded(this)">'
        if preview
        else "<p>(no preview)</p>"
    )
    model = _model_opinion(classes, score, pred, probs) if show_predictions else ""
    return (
        f'<figure class="card" data-rank="{rank}" data-file="{esc(name)}"'
        + (f' data-predicted="{esc(pred)}"' if show_predictions else "")
        + f">{img}"
        f'<figcaption><div class="rank">#{rank}</div><div class="file">{esc(name)}</div>'
        f"{model}</figcaption></figure>"
    )


_BLIND = (
    " (blind labelling: the model's predictions and scores are not shown; "
    "<code>labelling.show_predictions</code>)"
)


def _model_opinion(classes: list[str], score: float, pred: str, probs: np.ndarray) -> str:
    """The score, prediction and probability bars of one image."""
    esc = html.escape
    prob_rows = "".join(
        f'<tr><td>{esc(c)}</td><td><div class="bar" style="width:{100 * float(p):.1f}%">'
        f'</div></td><td class="num">{float(p):.3f}</td></tr>'
        for c, p in zip(classes, probs)
    )
    return (
        f'<div>score <span class="score">{score:.4g}</span></div>'
        + (
            f'<div>model predicts <b class="pred">{esc(pred)}</b></div>'
            if pred
            else "<div>no model yet (first round chosen from the pool alone)</div>"
        )
        + f'<table class="probs">{prob_rows}</table>'
    )

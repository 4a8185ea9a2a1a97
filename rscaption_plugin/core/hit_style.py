"""How the search dock's hits look on the map, told apart at a glance and in the legend.

Why each rule is as it is (issue 22, from a person reading hits in QGIS 3.22):

* the four score bands are four colours of one ramp (pale orange to dark red), not one colour at
  four opacities: the legend drew those as one swatch four times;
* hits below the query's "no good match" line (``SearchHit.match_line``) get a grey dashed
  outline and no fill: listed, but not coloured as matches;
* the reference tile of "Similar to selected" keeps a thick cyan outline of its own, so the map
  still says what the hits are like;
* the hits are no longer all selected: QGIS paints selected features in its selection colour
  over their symbols, which hid the score colours. The dock selects only the hit it points at.
"""

from __future__ import annotations

from qgis.core import QgsFillSymbol, QgsRuleBasedRenderer
from qgis.PyQt.QtGui import QColor

from .layers import apply_default_style, tile_filter, tile_rules

#: One colour per score band, weakest first (ColorBrewer OrRd): distinct hues in the legend.
BAND_COLOURS = ((253, 187, 132), (252, 141, 89), (227, 74, 51), (179, 0, 0))
#: Fill opacity of a band (0-255): the imagery shows through the strongest one too.
BAND_ALPHA = 120
WEAK_COLOUR = (150, 150, 150)
REFERENCE_COLOUR = (0, 200, 255)


def _symbol(outline, width: float, fill=None, style: str = "solid") -> QgsFillSymbol:
    r, g, b = outline
    fr, fg, fb, fa = fill if fill else (0, 0, 0, 0)
    return QgsFillSymbol.createSimple({
        "color": f"{fr},{fg},{fb},{fa}", "outline_color": f"{r},{g},{b},255", "outline_width": str(width),
        "outline_width_unit": "MM", "outline_style": style})


def band_symbol(band: int) -> QgsFillSymbol:
    colour = BAND_COLOURS[band]
    return _symbol(colour, 0.8, (*colour, BAND_ALPHA))


def is_good(hit: dict, match_line: float | None) -> bool:
    return match_line is None or hit.get("score") is None or hit["score"] >= match_line


def apply_hit_style(layer, hits: list[dict], match_line: float | None = None, reference=None) -> None:
    """Hits in score bands (strongest darkest), weak hits (below ``match_line``) grey and dashed,
    the ``reference`` tile of a similarity search in cyan; every other tile keeps the default
    style (outlines, low-confidence hatch)."""
    if not hits and reference is None:
        apply_default_style(layer)
        return
    root = QgsRuleBasedRenderer.Rule(None)
    if reference is not None:
        root.appendChild(QgsRuleBasedRenderer.Rule(_symbol(REFERENCE_COLOUR, 1.4), 0, 0, tile_filter([reference]),
                                                   f"reference: tile {reference}"))
    good = [h for h in hits if is_good(h, match_line)]
    weak = [h["tile_id"] for h in hits if not is_good(h, match_line)]
    scores = [h["score"] for h in good if h.get("score") is not None]
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
    bands = len(BAND_COLOURS)
    for b in range(bands):
        a, z = lo + (hi - lo) * b / bands, lo + (hi - lo) * (b + 1) / bands
        ids = [h["tile_id"] for h in good if h.get("score") is not None
               and (a <= h["score"] <= z if b == bands - 1 else a <= h["score"] < z)]
        if ids:
            root.appendChild(QgsRuleBasedRenderer.Rule(band_symbol(b), 0, 0, tile_filter(ids), f"score {a:.3f} – {z:.3f}"))
    unscored = [h["tile_id"] for h in good if h.get("score") is None]
    if unscored:
        root.appendChild(QgsRuleBasedRenderer.Rule(band_symbol(bands - 1), 0, 0, tile_filter(unscored), "hits"))
    if weak:
        label = f"weak: below the match line {match_line:.3f}"
        root.appendChild(QgsRuleBasedRenderer.Rule(_symbol(WEAK_COLOUR, 0.6, style="dash"), 0, 0,
                                                   tile_filter(weak), label))
    others = QgsRuleBasedRenderer.Rule(None, 0, 0, "ELSE", "other tiles")
    tile_rules(others)
    root.appendChild(others)
    layer.setRenderer(QgsRuleBasedRenderer(root))
    layer.triggerRepaint()


"""The search dock's "most changed" list, shown while its layer is a change layer.

A change layer is read straight from its GeoPackage (the scores are stored; no model, no task),
so the ranking is instant. Each row is one tile's "A -> B" summary and score; the row under the
cursor shows the two dates' captions as a pair, since a score alone does not say what changed,
and a click selects the tile on the map, zooms to it and flashes it.
"""

from __future__ import annotations

from qgis.core import QgsProject
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QSpinBox, QVBoxLayout, QWidget

from ..core.change_layers import is_change_layer, most_changed
from ..core.layers import select_tiles, translucent_selection, zoom_to_tile

TILE_ROLE = Qt.ItemDataRole.UserRole


def pair_html(tile: dict) -> str:
    def esc(text):
        return str(text or "—").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    return (f"<b>before</b>: {esc(tile.get('caption_before'))}<br/>"
            f"<b>after</b>: {esc(tile.get('caption_after'))}<br/>"
            f"<small>tile {tile.get('tile_id')} · row {tile.get('row')}, col {tile.get('col')}</small>")


class MostChangedPanel(QWidget):
    def __init__(self, iface=None, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.tiles: list[dict] = []
        self._layer_id: str | None = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(QLabel("<b>Most changed tiles</b>"), 1)
        row.addWidget(QLabel("show"))
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 1000)
        self.k_spin.setValue(20)
        self.k_spin.valueChanged.connect(lambda _v: self.refresh())
        row.addWidget(self.k_spin)
        lay.addLayout(row)
        self.list = QListWidget()
        self.list.setWordWrap(True)
        self.list.currentRowChanged.connect(self._current_changed)
        self.list.itemClicked.connect(lambda item: self.show_tile(self.list.row(item)))
        lay.addWidget(self.list, 1)
        self.pair_label = QLabel("")  # the two captions of the current tile, side by side in time
        self.pair_label.setWordWrap(True)
        self.pair_label.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.pair_label)
        self.setVisible(False)

    def layer(self):
        return QgsProject.instance().mapLayer(self._layer_id) if self._layer_id else None

    def set_layer(self, layer) -> None:
        """Show the ranking of ``layer`` when it is a change layer; hide (and forget) otherwise."""
        if layer is not None and is_change_layer(layer):
            self._layer_id = layer.id()
            self.setVisible(True)
            self.refresh()
        else:
            self._layer_id = None
            self.tiles = []
            self.list.clear()
            self.pair_label.setText("")
            self.setVisible(False)

    def refresh(self) -> None:
        layer = self.layer()
        self.list.blockSignals(True)
        self.list.clear()
        self.tiles = most_changed(layer, self.k_spin.value()) if layer is not None else []
        for rank, tile in enumerate(self.tiles, 1):
            item = QListWidgetItem(f"{rank:>2}. {float(tile['change']):.2f}  {tile.get('summary') or ''}")
            item.setData(TILE_ROLE, tile.get("tile_id"))
            item.setToolTip(f"before: {tile.get('caption_before')}\nafter: {tile.get('caption_after')}")
            self.list.addItem(item)
        self.list.blockSignals(False)
        self.pair_label.setText("" if self.tiles else "no scored tiles in this layer")

    def _current_changed(self, row: int) -> None:
        if 0 <= row < len(self.tiles):
            self.show_tile(row)

    def show_tile(self, row: int) -> bool:
        """Select the tile, zoom to it (flashed) and show its before/after pair."""
        layer = self.layer()
        if layer is None or not (0 <= row < len(self.tiles)):
            return False
        tile = self.tiles[row]
        self.pair_label.setText(pair_html(tile))
        select_tiles(layer, [tile["tile_id"]])
        if self.iface is None:
            return False
        canvas = self.iface.mapCanvas()
        translucent_selection(canvas)
        return zoom_to_tile(canvas, layer, tile["tile_id"])

"""Search dock: type a query, get the best-matching tiles ranked, selected and zoomable.

The query must go through the model's text tower, which may be slow to load and needs torch, so
the search runs as a QgsTask (in-process or through the backend subprocess); the dock only
renders results. It works on any layer whose source is an rscaption GeoPackage, including a
reopened export.
"""

from __future__ import annotations

from qgis.core import QgsApplication, QgsProject
from qgis.gui import QgsDockWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QBrush, QColor
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.hit_style import apply_hit_style, is_good
from ..core.layers import (apply_default_style, gpkg_path_of, is_tile_layer, select_tiles, translucent_selection,
                           zoom_to_tile)
from ..core.qgis_compat import LAYER_FILTER_POLYGON
from ..core.settings import PluginSettings
from ..core.similar import SimilarTask
from ..core.tasks import SearchTask

TILE_ROLE = Qt.ItemDataRole.UserRole
HIT_ROLE = Qt.ItemDataRole.UserRole + 1


class SearchDock(QgsDockWidget):
    def __init__(self, iface=None, parent=None):
        super().__init__("rscaption search", parent)
        self.setObjectName("RscaptionSearchDock")
        self.iface = iface
        self.hits: list[dict] = []
        self.error: str | None = None
        self.searching = False
        self.task: SearchTask | None = None
        self.backend: dict = {}
        self._hits_layer_id: str | None = None  # the layer the listed hits belong to
        self.match_line: float | None = None  # the listed query's "no good match" line (None: unknown)
        self.reference: int | None = None  # the tile "Similar to selected" ranked against
        self._quiet = False  # selecting a row without moving the map (a new list keeps the overview)
        self._build()
        QgsProject.instance().layersWillBeRemoved.connect(self._layers_removed)

    def _build(self) -> None:
        body = QWidget()
        lay = QVBoxLayout(body)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(LAYER_FILTER_POLYGON)
        lay.addWidget(QLabel("Captioned tile layer"))
        lay.addWidget(self.layer_combo)
        from .change_panel import MostChangedPanel  # shown only while the layer is a change layer

        self.change_panel = MostChangedPanel(self.iface)
        lay.addWidget(self.change_panel, 2)
        self.layer_combo.layerChanged.connect(self.change_panel.set_layer)
        row = QHBoxLayout()
        self.query_edit = QLineEdit()
        self.query_edit.setPlaceholderText("e.g. a river next to green farmland")
        self.query_edit.returnPressed.connect(self.search)
        self.search_button = QPushButton("Search")
        # clicked(bool) would pass `checked` as the query: call without arguments
        self.search_button.clicked.connect(lambda: self.search())
        row.addWidget(self.query_edit, 1)
        row.addWidget(self.search_button)
        lay.addLayout(row)
        self.similar_button = QPushButton("Similar to selected")
        self.similar_button.setToolTip("rank the layer's tiles by how much their imagery looks like the selected "
                                       "tile (the one tile selected on the map, else the highlighted result)")
        self.similar_button.clicked.connect(lambda: self.similar())
        lay.addWidget(self.similar_button)
        row = QHBoxLayout()
        row.addWidget(QLabel("top k"))
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 1000)
        self.k_spin.setValue(10)
        row.addWidget(self.k_spin)
        row.addWidget(QLabel("min score"))
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(-1.0, 1.0)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(4)
        self.threshold_spin.setValue(-1.0)
        row.addWidget(self.threshold_spin)
        row.addWidget(QLabel("min confidence"))
        self.confidence_spin = QDoubleSpinBox()
        self.confidence_spin.setRange(0.0, 1.0)
        self.confidence_spin.setSingleStep(0.1)
        self.confidence_spin.setDecimals(2)
        self.confidence_spin.setValue(0.0)
        self.confidence_spin.setToolTip("rank only tiles whose caption confidence (the predicted chance that "
                                        "the caption names the right scene) is at least this")
        row.addWidget(self.confidence_spin)
        lay.addLayout(row)
        self.style_check = QCheckBox("Colour tiles by score")
        self.style_check.setChecked(True)
        lay.addWidget(self.style_check)
        self.match_label = QLabel("")  # the query's match line, and "no good match" when nothing reaches it
        self.match_label.setWordWrap(True)
        lay.addWidget(self.match_label)
        self.results = QListWidget()
        # long captions wrap at word boundaries (never cut mid-word); the tooltip has the full text
        self.results.setWordWrap(True)
        self.results.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.results.setResizeMode(QListView.ResizeMode.Adjust)
        self.results.currentRowChanged.connect(self._current_changed)
        self.results.itemClicked.connect(lambda item: self.zoom_to_row(self.results.row(item)))
        lay.addWidget(self.results, 1)
        row = QHBoxLayout()
        self.prev_button = QPushButton("◀ Previous")
        self.next_button = QPushButton("Next ▶")
        self.prev_button.clicked.connect(lambda: self.step(-1))
        self.next_button.clicked.connect(lambda: self.step(1))
        row.addWidget(self.prev_button)
        row.addWidget(self.next_button)
        lay.addLayout(row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.setWidget(body)

    # -- search ----------------------------------------------------------------------------------
    def set_layer(self, layer) -> None:
        self.layer_combo.setLayer(layer)

    def detach(self) -> None:
        """Stop listening to the project (the plugin calls this when it unloads)."""
        try:
            QgsProject.instance().layersWillBeRemoved.disconnect(self._layers_removed)
        except (TypeError, RuntimeError):
            pass

    def _layers_removed(self, layer_ids) -> None:
        if self._hits_layer_id is not None and self._hits_layer_id in list(layer_ids):
            self.clear_hits("the layer was removed: hits cleared")

    def clear_hits(self, message: str = "") -> None:
        """Forget the listed hits; their layer (if still there) loses the selection and highlight."""
        layer = QgsProject.instance().mapLayer(self._hits_layer_id) if self._hits_layer_id else None
        self._hits_layer_id = None
        self.hits = []
        self.match_line = self.reference = None
        self.match_label.setText("")
        self.results.clear()
        if layer is not None:
            layer.removeSelection()
            apply_default_style(layer)
        self._status(message)

    def search(self, query: str | None = None) -> SearchTask | None:
        if query is not None:
            self.query_edit.setText(query)
        query = self.query_edit.text().strip()
        layer = self.layer_combo.currentLayer()
        if not query:
            self._status("type a query first")
            return None
        if layer is None or not is_tile_layer(layer):
            self._status("choose a layer made by rscaption (a GeoPackage with its embeddings)")
            return None
        return self._start(f"searching '{query}'…", lambda settings: SearchTask(
            gpkg_path_of(layer), query, self.k_spin.value(), settings.backend_mode, settings.python(),
            device=settings.device, on_finished=lambda outcome, lid=layer.id(): self._finished(outcome, lid),
            min_confidence=self.confidence_spin.value() or None))

    def _start(self, status: str, make_task):
        """One ranking task at a time (search or similar): both buttons stay greyed until it ends."""
        if self.searching:
            self._status("a search is already running")
            return None
        settings = PluginSettings.load()
        self.clear_hits()  # the last query's hits never stand under a new one, nor after it fails
        self.searching = True
        self.error = None
        self.search_button.setEnabled(False)
        self.similar_button.setEnabled(False)
        self._status(status)
        self.task = make_task(settings)
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    # -- similar tiles ---------------------------------------------------------------------------
    def selected_tile(self, layer) -> int | None:
        """The tile to match: the one tile selected on the layer (the dock selects the hit its list
        points at), or, with nothing selected, the highlighted result row."""
        ids = [f["tile_id"] for f in layer.selectedFeatures()]
        if len(ids) == 1:
            return int(ids[0])
        row = self.results.currentRow()
        if not ids and self.hits and layer.id() == self._hits_layer_id and 0 <= row < len(self.hits):
            return int(self.hits[row]["tile_id"])
        return None

    def similar(self, tile_id: int | None = None) -> SimilarTask | None:
        """Rank the layer's tiles by image likeness to ``tile_id`` (default: :meth:`selected_tile`)."""
        layer = self.layer_combo.currentLayer()
        if layer is None or not is_tile_layer(layer):
            self._status("choose a layer made by rscaption (a GeoPackage with its embeddings)")
            return None
        if tile_id is None:
            tile_id = self.selected_tile(layer)
        if tile_id is None:
            count = layer.selectedFeatureCount()
            self._status("select one tile on the map first" + (f" ({count} are selected)" if count > 1 else ""))
            return None
        return self._start(f"finding tiles like tile {tile_id}…", lambda settings: SimilarTask(
            gpkg_path_of(layer), tile_id, self.k_spin.value(), settings.backend_mode, settings.python(),
            min_confidence=self.confidence_spin.value() or None,
            on_finished=lambda outcome, lid=layer.id(): self._finished(
                outcome, lid, f"tile(s) like tile {tile_id} (outlined in cyan)", reference=tile_id)))

    def _finished(self, outcome, layer_id: str, what: str = "match(es)", reference=None) -> None:
        self.searching = False
        self.task = None
        self.search_button.setEnabled(True)
        self.similar_button.setEnabled(True)
        self.backend = outcome.backend
        layer = QgsProject.instance().mapLayer(layer_id)
        if not outcome.ok:
            self.error = outcome.error or ("cancelled" if outcome.cancelled else "search failed")
            self.clear_hits(self.error)
            return
        threshold = self.threshold_spin.value()
        self.show_hits([h for h in outcome.hits if h.get("score") is None or h["score"] >= threshold], layer, what,
                       reference=reference)

    def show_hits(self, hits: list[dict], layer=None, what: str = "match(es)", reference=None) -> None:
        """List the hits (weak ones greyed), colour them on the map and select the first one,
        without moving the map: the overview stays until the person asks for a hit."""
        layer = layer or self.layer_combo.currentLayer()
        self.hits = list(hits)
        self._hits_layer_id = layer.id() if layer is not None else None
        self.reference = reference
        self.match_line = next((h["match_line"] for h in self.hits if h.get("match_line") is not None), None)
        self.results.blockSignals(True)
        self.results.clear()
        for rank, hit in enumerate(self.hits, 1):
            self.results.addItem(self._item(rank, hit))
        self.results.blockSignals(False)
        if layer is not None:
            if not self.hits:
                layer.removeSelection()
            if self.iface is not None:  # QGIS's opaque yellow would hide the imagery under the selected hit
                translucent_selection(self.iface.mapCanvas())
            if self.style_check.isChecked():
                apply_hit_style(layer, self.hits, self.match_line, reference)
            else:
                apply_default_style(layer)
        device = self.backend.get("device")
        where = f" · {self.backend.get('mode')}{' on ' + device if device else ''}" if self.backend else ""
        good = sum(1 for h in self.hits if is_good(h, self.match_line))
        self._status(f"{good} {what}" + (f", {len(self.hits) - good} weak" if good < len(self.hits) else "") + where)
        self.match_label.setText(self._match_words(good))
        if self.hits:
            self._quiet = True
            try:
                self.results.setCurrentRow(0)
            finally:
                self._quiet = False

    def _item(self, rank: int, hit: dict) -> QListWidgetItem:
        score, caption = hit.get("score"), hit.get("caption", "")
        weak = not is_good(hit, self.match_line)
        text = f"{rank:>2}. {score:.3f}{'  weak' if weak else ''}  {caption}" if score is not None else caption
        item = QListWidgetItem(text)
        item.setData(TILE_ROLE, hit.get("tile_id"))
        conf = hit.get("confidence")
        tip = (f"{caption}\ntile {hit.get('tile_id')} (row {hit.get('row')}, col {hit.get('col')})"
               + (f", confidence {conf:.2f}" if conf is not None else ""))
        if weak:
            item.setForeground(QBrush(QColor(130, 130, 130)))
            tip += (f"\nbelow this query's match line {self.match_line:.3f}: it scores no better than "
                    "images of unrelated scenes do")
        item.setToolTip(tip)
        return item

    def _match_words(self, good: int) -> str:
        if self.match_line is None or not self.hits:
            return ""
        if not good:
            return (f"<b>No good match</b>: every hit scores below this query's match line "
                    f"{self.match_line:.3f} (the model's scores for images of unrelated scenes); "
                    "these are only the closest tiles.")
        return f"Match line {self.match_line:.3f} (this model, this query): {good} of {len(self.hits)} hits reach it."

    # -- navigation ------------------------------------------------------------------------------
    def step(self, delta: int) -> None:
        if not self.hits:
            return
        current = self.results.currentRow()
        row = (current + delta) % len(self.hits) if current >= 0 else (0 if delta > 0 else len(self.hits) - 1)
        self.results.setCurrentRow(row)

    def _current_changed(self, row: int) -> None:
        """The hit the list points at is the one tile selected on the map (selecting them all
        painted the score colours over); the map moves to it unless a new list is being shown."""
        if not 0 <= row < len(self.hits):
            return
        layer = QgsProject.instance().mapLayer(self._hits_layer_id) if self._hits_layer_id else None
        if layer is not None:
            select_tiles(layer, [self.hits[row]["tile_id"]])
        if not self._quiet:
            self.zoom_to_row(row)

    def zoom_to_row(self, row: int) -> bool:
        layer = self.layer_combo.currentLayer()
        if layer is None or not (0 <= row < len(self.hits)) or self.iface is None:
            return False
        return zoom_to_tile(self.iface.mapCanvas(), layer, self.hits[row]["tile_id"])

    def _status(self, text: str) -> None:
        self.status.setText(text)
